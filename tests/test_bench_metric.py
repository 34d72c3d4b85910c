import re

import pytest

from segdist.bench import build_parser


@pytest.mark.parametrize("dtype", ["uint8", "int64"])
def test_metric_bench_checks_the_three_agree_and_prints_each(capsys, dtype):
    args = build_parser().parse_args(["metric", "--classes", "5", "--shape", "2", "40", "60", "--rounds", "1",
                                      "--label-dtype", dtype])
    assert args.run(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"metric update: 5 classes, 2x40x60 {dtype} labels and int64 predictions, 1 thread")
    assert "CPU" in out[0]
    names = [re.match(r"(.+?)\s+[\d.]+\s+[\d.]+x$", line).group(1) for line in out[2:5]]
    assert names == ["segdist ConfusionMatrix.update", "notebook 002 per-class numpy loop",
                     "torchmetrics MulticlassJaccardIndex.update"]
    assert out[5].startswith("all three agree")


def test_notebook_loop_counts_intersection_and_union_over_valid_pixels():
    import numpy as np

    from segdist.bench.metric import notebook_loop

    target = np.array([[0, 1, 255], [1, 1, 0]])
    pred = np.array([[0, 0, 1], [1, 0, 0]])
    inter, union = notebook_loop(pred, target, 2, 255)
    assert inter.tolist() == [2, 1] and union.tolist() == [4, 3]
