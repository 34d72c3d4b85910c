import re

import pytest

from segdist.bench import build_parser
from segdist.errors import UserError

ROW = re.compile(r"(fused|foreach|for-loop)\s+([\d.]+)\s+(\d+\.\d{3})\s+([\d.]+)")


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_optim_bench_times_the_train_step_under_every_implementation(capsys, optimizer):
    args = build_parser().parse_args(["optim", "--optimizer", optimizer, "--block", "1", "--rounds", "1",
                                      "--size", "32", "--batch", "2"])
    assert args.run(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"train step by optim.implementation: demo, batch 2 at 32x32, ") and "CPU" in out[0]
    assert f", {optimizer}, 1 process, 1 thread(s), 1 interleaved rounds" in out[0]
    rows = {m.group(1): tuple(map(float, m.groups()[1:])) for m in map(ROW.fullmatch, out[3:]) if m}
    assert list(rows) == ["fused", "foreach", "for-loop"] and len(out) == 6
    assert rows["for-loop"][1] == 1.0  # for-loop / for-loop
    assert all(ms > 0 and ratio > 0 and alone > 0 for ms, ratio, alone in rows.values())


def test_the_paired_ratio_is_the_median_of_back_to_back_ratios():
    from segdist.bench.step import paired_ratio

    # the second round ran while the machine was slow for both
    rounds = [{"for-loop": 0.100, "fused": 0.090}, {"for-loop": 0.300, "fused": 0.290}, {"for-loop": 0.110, "fused": 0.100}]
    assert paired_ratio(rounds, "for-loop", "fused") == pytest.approx(1.1)


def test_optim_bench_refuses_an_empty_block():
    args = build_parser().parse_args(["optim", "--block", "0"])
    with pytest.raises(UserError, match="--block must be >= 1"):
        args.run(args)
