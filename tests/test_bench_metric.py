import re

import pytest

from segdist.bench import build_parser


@pytest.mark.parametrize("dtype", ["uint8", "int64"])
def test_metric_bench_checks_the_four_agree_and_prints_each(capsys, dtype):
    args = build_parser().parse_args(["metric", "--classes", "5", "--shape", "2", "40", "60", "--rounds", "1",
                                      "--label-dtype", dtype])
    assert args.run(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"metric update: 5 classes, 2x40x60 {dtype} labels and int64 predictions, 1 thread")
    assert "CPU" in out[0]
    names = [re.match(r"(.+?)\s+[\d.]+\s+[\d.]+x$", line).group(1) for line in out[2:6]]
    assert names == ["segdist ConfusionMatrix.update", "users' per-class numpy loop",
                     "the same loop written tightly (numpy)", "torchmetrics MulticlassJaccardIndex.update"]
    assert out[6].startswith("all four agree")


@pytest.mark.parametrize("loop", ["notebook_loop", "lean_loop"])
def test_both_numpy_loops_count_intersection_and_union_over_valid_pixels(loop):
    import numpy as np

    from segdist.bench import metric

    target = np.array([[0, 1, 255], [1, 1, 0]])
    inter, union = getattr(metric, loop)(np.array([[0, 0, 1], [1, 0, 0]]), target, 2, 255)
    assert inter.tolist() == [2, 1] and union.tolist() == [4, 3]
    pred = np.array([[0, 0, 2], [1, 0, 2]])  # the ignored pixel's prediction (2) is not counted in the union
    inter, union = getattr(metric, loop)(pred, target, 3, 255)
    assert inter.tolist() == [1, 1, 0] and union.tolist() == [4, 3, 1]
