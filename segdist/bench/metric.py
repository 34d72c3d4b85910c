"""`launch/bench.py metric`: the confusion-matrix update against a numpy loop and torchmetrics."""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from segdist.errors import UserError
from segdist.precision import detect_hardware

METRIC_DOC = """Confusion-matrix update: segdist's ConfusionMatrix.update against the
per-class numpy loop of our users' VOC accumulation study, as they wrote it (its mean_iou: per class, count predicted and true
pixels, then rebuild the boolean masks for the intersection and again for the union; made exact
by masking predictions on ignored pixels), against the same loop written tightly (each mask
built once), and against torchmetrics' MulticlassJaccardIndex.update; on the same random labels
with an ignore band, one thread, best of --rounds interleaved rounds. The labels are uint8 by
default, as segdist's eval loader delivers masks of up to 256 classes, and the predictions
int64, as an argmax gives them; all read the same tensors (--label-dtype int64 for int64
labels, as they had). All must agree: the per-class intersection and union of both
loops and torchmetrics' matrix are checked against segdist's before any time is printed."""


def add_parser(sub) -> None:
    p = sub.add_parser("metric", help="confusion-matrix update vs a numpy per-class loop and torchmetrics",
                       description=METRIC_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=19, help="classes (default 19, Cityscapes)")
    p.add_argument("--shape", type=int, nargs=3, default=[4, 512, 1024], metavar=("N", "H", "W"),
                   help="batch of label maps (default 4 512 1024)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds, the best counts (default 5)")
    p.add_argument("--label-dtype", choices=("uint8", "int64"), default="uint8",
                   help="dtype of the labels (default uint8, what the eval loader gives; predictions are int64)")
    p.set_defaults(run=run_metric)


def notebook_loop(pred: np.ndarray, target: np.ndarray, n: int, ignore: int) -> tuple[np.ndarray, np.ndarray]:
    """The VOC accumulation study's `mean_iou` loop as it was written, per class: count the predicted and
    true pixels, skip a class absent from both, then recompute the two boolean masks for the
    intersection and again for the union. One change makes it exact: predictions on ignored
    pixels are set to -1 first (the study counted them in the union). Returns the per-class
    intersection and union."""
    preds = np.where(target != ignore, pred, -1)
    inter, union = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    for cls in range(n):
        if (preds == cls).sum() == 0 and (target == cls).sum() == 0:
            continue
        inter[cls] = np.logical_and(preds == cls, target == cls).sum()
        union[cls] = np.logical_or(preds == cls, target == cls).sum()
    return inter, union


def lean_loop(pred: np.ndarray, target: np.ndarray, n: int, ignore: int) -> tuple[np.ndarray, np.ndarray]:
    """The same per-class loop written tightly, a stricter reference: one valid mask, and two
    boolean masks per class, each built once."""
    valid = target != ignore
    inter, union = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    for c in range(n):
        p, t = (pred == c) & valid, target == c
        inter[c] = np.logical_and(p, t).sum()
        union[c] = np.logical_or(p, t).sum()
    return inter, union


def run_metric(args: argparse.Namespace) -> int:
    from segdist.metrics import ConfusionMatrix

    try:
        from torchmetrics.classification import MulticlassJaccardIndex
    except ImportError:
        raise UserError("bench metric needs torchmetrics: pip install -e '.[bench]'") from None
    torch.set_num_threads(1)
    n, ignore = args.classes, 255
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, n, tuple(args.shape), generator=g)
    target[:, : args.shape[1] // 10] = ignore  # an ignored band, as Cityscapes' ego-vehicle rows
    target = target.to(getattr(torch, args.label_dtype))
    pred = torch.randint(0, n, tuple(args.shape), generator=g)
    pred_np, target_np = pred.numpy(), target.numpy()

    # One matrix (and one torchmetrics metric) updated again and again, as evaluation updates one
    # per batch; each timed call starts from zero counts.
    cm = ConfusionMatrix(n, ignore)
    metric = MulticlassJaccardIndex(num_classes=n, ignore_index=ignore, average=None)

    def ours():
        cm.matrix.zero_()
        cm.update(pred, target)
        return cm.matrix

    def numpy_loop():
        return notebook_loop(pred_np, target_np, n, ignore)

    def numpy_lean():
        return lean_loop(pred_np, target_np, n, ignore)

    def torchmetrics_update():
        metric.reset()
        metric.update(pred, target)
        return metric.confmat

    counts = ours().clone()
    tm = torchmetrics_update()
    diag = counts.diagonal()
    expected = (diag.numpy(), (counts.sum(0) + counts.sum(1) - diag).numpy())
    agree = torch.equal(tm.to(torch.int64), counts) and all(
        np.array_equal(got, want) for loop in (numpy_loop, numpy_lean) for got, want in zip(loop(), expected))
    if not agree:
        raise RuntimeError("the confusion matrices differ")
    runs = {"segdist ConfusionMatrix.update": ours, "users' per-class numpy loop": numpy_loop,
            "the same loop written tightly (numpy)": numpy_lean,
            "torchmetrics MulticlassJaccardIndex.update": torchmetrics_update}
    best = {name: float("inf") for name in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    print(f"metric update: {n} classes, {'x'.join(map(str, args.shape))} {args.label_dtype} labels and int64 "
          f"predictions, 1 thread, best of {args.rounds}; "
          f"{detect_hardware().describe()}")
    print(f"{'update':<44} {'ms':>9} {'segdist speed-up':>17}")
    ours_s = best["segdist ConfusionMatrix.update"]
    for name, seconds in best.items():
        print(f"{name:<44} {1000 * seconds:>9.2f} {seconds / ours_s:>16.1f}x")
    print("all four agree: the same matrix (per-class intersection and union for the numpy loops)")
    return 0
