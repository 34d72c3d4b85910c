import re

import pytest

from segdist.bench import build_parser
from segdist.errors import UserError


def test_eval_bench_times_the_three_modes_and_the_counting_share(capsys):
    args = build_parser().parse_args(["eval", "--count", "4", "--size", "64", "--crop", "32", "--batch-size", "2"])
    assert args.run(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("eval throughput: 4 frames of 64x64, demo UNet") and "slide window 32 stride 21" in out[0]
    assert out[1].split() == ["mode", "samples/s", "update", "share", "all-reduce", "share"]
    rows = {}
    for line in out[2:]:
        match = re.fullmatch(r"(whole|slide|slide \+ flip)\s+([\d.]+)\s+([\d.]+)%\s+([\d.]+)%", line)
        assert match, line
        rows[match.group(1)] = [float(v) for v in match.groups()[1:]]
    assert sorted(rows) == ["slide", "slide + flip", "whole"]
    assert all(rate > 0 and 0 < update < 100 and 0 <= reduce < 100 for rate, update, reduce in rows.values())


def test_eval_bench_refuses_a_window_of_zero():
    with pytest.raises(UserError, match="--crop must be >= 1"):
        args = build_parser().parse_args(["eval", "--crop", "0"])
        args.run(args)
