import math

import numpy as np
import pytest
import torch

from segdist.metrics import ConfusionMatrix, format_table, metrics_from_confusion


def numpy_confusion(pred, target, n, ignore):
    valid = target != ignore
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (target[valid], pred[valid]), 1)
    return cm


def test_confusion_matches_numpy_and_skips_ignore():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 4, size=(3, 17, 19))
    target[rng.random(target.shape) < 0.2] = 255
    pred = rng.integers(0, 4, size=target.shape)
    cm = ConfusionMatrix(4, 255)
    cm.update(torch.from_numpy(pred[:2]), torch.from_numpy(target[:2]))
    cm.update(torch.from_numpy(pred[2:]), torch.from_numpy(target[2:]))
    assert cm.matrix.dtype == torch.int64
    assert np.array_equal(cm.matrix.numpy(), numpy_confusion(pred, target, 4, 255))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64])
def test_labels_of_any_integer_dtype_count_the_same(dtype):
    # the eval loader gives uint8 masks (int32 past 256 classes), an argmax int64 predictions;
    # more pixels than one chunk of the CPU count, and a last chunk that is not full
    rng = np.random.default_rng(2)
    target = rng.integers(0, 7, size=(3, 150, 200))
    target[:, :20] = 255
    pred = rng.integers(0, 7, size=target.shape)
    cm = ConfusionMatrix(7, 255)
    cm.update(torch.from_numpy(pred), torch.from_numpy(target).to(dtype))
    assert np.array_equal(cm.matrix.numpy(), numpy_confusion(pred, target, 7, 255))


def test_counts_past_float32_precision():
    # 2^24 + 1 pixels of one class: float32 histograms lose the last one (docs/design-notes.md).
    cm = ConfusionMatrix(2, 255)
    target = torch.zeros(2**24 + 1, dtype=torch.int64)
    cm.update(target, target)
    assert int(cm.matrix[0, 0]) == 2**24 + 1


def test_metric_formulas():
    cm = torch.tensor([[5, 1, 0], [2, 3, 0], [0, 0, 0]])
    m = metrics_from_confusion(cm)
    assert m["per_class_iou"][0] == 5 / (6 + 7 - 5)
    assert m["per_class_iou"][1] == 3 / (5 + 4 - 3)
    assert m["per_class_iou"][2] is None  # no union: not counted in the mean
    assert math.isclose(m["miou"], (5 / 8 + 3 / 6) / 2)
    assert m["pixel_accuracy"] == 8 / 11
    assert m["per_class"]["precision"][0] == 5 / 7 and m["per_class"]["recall"][1] == 3 / 5
    assert m["per_class"]["dice"][0] == 10 / 13
    assert m["valid_pixels"] == 11 and m["confusion_matrix"][1] == [2, 3, 0]
    table = format_table(m, ["bg", "a", "b"])
    assert "n/a" in table and "mIoU" in table


def test_both_count_paths_agree_with_numpy():
    # ignore 255 takes the CPU bincount path; a negative ignore index the scatter (CUDA's) path.
    rng = np.random.default_rng(1)
    target = rng.integers(0, 5, size=(2, 33, 31))
    hole = rng.random(target.shape) < 0.3
    pred = rng.integers(0, 5, size=target.shape)
    for ignore in (255, -100):
        labels = np.where(hole, ignore, target)
        cm = ConfusionMatrix(5, ignore)
        cm.update(torch.from_numpy(pred), torch.from_numpy(labels).to(torch.uint8 if ignore == 255 else torch.int64))
        assert np.array_equal(cm.matrix.numpy(), numpy_confusion(pred, labels, 5, ignore)), ignore


def test_label_out_of_range_fails_loudly():
    pred = torch.zeros(2, 4, dtype=torch.int64)
    for bad in (7, 254, 300, -3):
        target = torch.zeros(2, 4, dtype=torch.int64)
        target[1, 2] = bad
        with pytest.raises((ValueError, RuntimeError)):  # RuntimeError: bincount of a negative value
            ConfusionMatrix(5, 255).update(pred, target)
