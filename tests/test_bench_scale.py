import re

import pytest

from segdist.bench import build_parser
from segdist.errors import UserError


@pytest.mark.slow
def test_scale_bench_trains_one_and_two_processes_on_the_real_path(capsys):
    args = build_parser().parse_args(["scale", "--steps", "10", "--count", "64", "--set", "data.batch_size=4",
                                      "--set", "data.crop=[32,32]"])
    assert args.run(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("training throughput: shapes_unet.toml, batch 4 per process at 32x32")
    assert "10 steps per run" in out[0] and "CPU" in out[0]
    assert out[1].split() == ["processes", "samples/s", "ms/step", "data", "wait", "speed-up"]
    table = {}
    for line in out[2:]:
        match = re.fullmatch(r"\s*(\d+)\s+([\d.]+)\s+(\d+)\s+([\d.]+)%\s+([\d.]+)x", line)
        assert match, line
        table[int(match.group(1))] = [float(v) for v in match.groups()[1:]]
    assert sorted(table) == [1, 2]
    assert table[1][3] == 1.0 and all(row[0] > 0 and row[1] > 0 and 0 <= row[2] <= 100 for row in table.values())


def test_scale_bench_refuses_too_few_steps():
    args = build_parser().parse_args(["scale", "--steps", "4"])
    with pytest.raises(UserError, match="--steps must be >= 10"):
        args.run(args)
