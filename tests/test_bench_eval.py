import re

import pytest

from segdist.bench import build_parser
from segdist.errors import UserError


def test_eval_bench_times_the_three_modes_grouped_and_alone_and_the_counting_share(capsys):
    args = build_parser().parse_args(["eval", "--count", "4", "--size", "64", "--crop", "32", "--batch-size", "2",
                                      "--rounds", "2"])
    assert args.run(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("eval throughput: 4 frames of 64x64, demo UNet") and "slide window 32 stride 21" in out[0]
    assert "groups of 2 against alone" in out[0] and "best of 2" in out[0]
    check_rows(out[1:], [1])


def check_rows(lines, worlds):
    assert lines[0].split() == ["mode", "processes", "samples/s", "alone/s", "groups/alone", "update", "share",
                                "all-reduce", "share", "rank", "wait", "share"]
    rows = {}
    for line in lines[1:]:
        match = re.fullmatch(r"(whole|slide|slide \+ flip)\s+(\d+)" + r"\s+([\d.]+)" * 3 + r"\s+([\d.]+)%" * 3, line)
        assert match, line
        rows[match.group(1), int(match.group(2))] = [float(v) for v in match.groups()[2:]]
    assert sorted(rows) == sorted((mode, w) for mode in ("slide", "slide + flip", "whole") for w in worlds)
    assert all(rate > 0 and alone > 0 and ratio == pytest.approx(rate / alone, rel=0.05)
               and 0 < update < 100 and 0 <= reduce < 100 and 0 <= wait < 100
               for rate, alone, ratio, update, reduce, wait in rows.values())
    return rows


@pytest.mark.slow
def test_eval_bench_launches_itself_per_world_size(capsys):
    args = build_parser().parse_args(["eval", "--count", "4", "--size", "64", "--crop", "32", "--batch-size", "2",
                                      "--processes", "1", "2"])
    assert args.run(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("eval throughput: 4 frames of 64x64") and "1, 2 process(es)" in out[0]
    rows = check_rows(out[1:], [1, 2])
    assert rows["whole", 2][4] > 0  # the real all-reduce over gloo takes time


def test_eval_bench_refuses_a_window_of_zero():
    with pytest.raises(UserError, match="--crop must be >= 1"):
        args = build_parser().parse_args(["eval", "--crop", "0"])
        args.run(args)
