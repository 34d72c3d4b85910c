import re

import pytest

from segdist.bench import build_parser
from segdist.errors import UserError

ROW = re.compile(r"\s*(\d+)\s+([\d.]+)\s+([\d.]+)\s+(\d+\.\d{3})\s+(\d+\.\d{3})")


def rows(lines: list[str]) -> dict[int, tuple[float, float, float, float]]:
    out = {}
    for line in lines:
        match = ROW.fullmatch(line)
        assert match, line
        world, seg, bare, ratio, paired = match.groups()
        out[int(world)] = (float(seg), float(bare), float(ratio), float(paired))
    return out


def test_step_bench_in_this_process_times_both_loops(capsys):
    args = build_parser().parse_args(["step", "--block", "1", "--rounds", "1"])
    assert args.run(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("train step: demo, batch 8 per process at 64x64") and "1 process(es)" in out[0]
    assert "CPU" in out[0] and out[1].split() == ["processes", "segdist", "ms/step", "bare", "ms/step", "bare", "/",
                                                   "segdist", "paired"]
    (seg, bare, ratio, paired), = rows(out[3:]).values()
    assert seg > 0 and bare > 0 and ratio == pytest.approx(bare / seg, abs=0.002)
    # one round: its two blocks are also the best ones, so the paired median is the same ratio
    assert paired == pytest.approx(ratio, abs=0.002)


def test_the_aa_check_puts_a_second_bare_loop_in_segdists_column(capsys, monkeypatch):
    import segdist.train.step

    def not_segdist(*args, **kwargs):
        raise AssertionError("segdist's train_step ran in an A/A check")

    monkeypatch.setattr(segdist.train.step, "train_step", not_segdist)
    args = build_parser().parse_args(["step", "--aa", "--block", "1", "--rounds", "2", "--size", "32"])
    assert args.run(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("train step A/A (a second bare loop in segdist's column): demo, batch 8 per process at 32x32")
    (seg, bare, ratio, paired), = rows(out[3:]).values()
    assert seg > 0 and bare > 0 and paired > 0


@pytest.mark.slow
def test_a_launched_aa_check_passes_aa_to_its_child(capsys):
    args = build_parser().parse_args(["step", "--aa", "--processes", "1", "--block", "1", "--rounds", "1", "--size", "32"])
    assert args.run(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("train step A/A (a second bare loop in segdist's column)") and "1 process(es)" in out[0]
    assert sorted(rows(out[3:])) == [1]


def test_the_paired_ratio_is_the_median_of_the_rounds_back_to_back_ratios():
    from segdist.bench.step import paired_ratio

    # round 2 ran while the machine was slow for both loops; round 3 was segdist's unlucky one
    rounds = [{"segdist": 0.100, "bare": 0.099}, {"segdist": 0.200, "bare": 0.196}, {"segdist": 0.130, "bare": 0.097}]
    assert paired_ratio(rounds) == pytest.approx(0.98)
    # the best blocks alone compare one lucky block with another: 0.097 / 0.100
    assert min(r["bare"] for r in rounds) / min(r["segdist"] for r in rounds) == pytest.approx(0.97)


@pytest.mark.slow
def test_step_bench_launches_one_and_two_processes(capsys):
    # the 2-process row runs segdist's DDP step against plain DistributedDataParallel over gloo
    args = build_parser().parse_args(["step", "--processes", "1", "2", "--block", "1", "--rounds", "1", "--size", "32"])
    assert args.run(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert "at 32x32" in out[0] and "1, 2 process(es), 1 thread(s) each" in out[0]
    table = rows(out[3:])
    assert sorted(table) == [1, 2] and all(v > 0 for row in table.values() for v in row)


def test_step_bench_refuses_a_world_of_zero():
    args = build_parser().parse_args(["step", "--processes", "0"])
    with pytest.raises(UserError, match="world sizes must be >= 1"):
        args.run(args)
