"""Exact segmentation metrics from an int64 confusion matrix.

Each rank counts its own pixels on its device with an int64 `bincount` (CPU) or `scatter_add_`
(CUDA, where it costs no host sync); never float histograms (docs/design-notes.md: float32 bins stop counting at
2^24); the ignore index excluded. ONE all-reduce sums the matrices
after the loop, so the result equals a single process's count bit for bit whatever the world size.
"""

from __future__ import annotations

import math

import torch

CHUNK = 1 << 17
"""Pixels the CPU count bins at a time: its two int32 buffers (1 MiB) stay in a core's L2 cache
(1 MiB on Zen 4, 2 MiB on Sapphire Rapids), and each chunk's fixed cost of about 17 us (seven
small ops) is paid 16 times for a 4x512x1024 update, not 32 (`launch/bench.py metric`: 2.9 ms for
that update on a 2-core AMD EPYC, AVX512, BENCHMARKS.md)."""


class ConfusionMatrix:
    """Rows = ground truth, columns = prediction; counts are int64."""

    def __init__(self, num_classes: int, ignore_index: int, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        self._scratch: tuple[torch.Tensor, torch.Tensor] | None = None
        """Two int32 buffers of CHUNK pixels that the CPU count reuses."""

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Count pixels of integer predictions (in [0, n): an argmax) against integer labels of the same
        shape (in [0, n) or the ignore index)."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(target.shape)} differ")
        n = self.num_classes
        if target.device.type == "cpu" and n <= self.ignore_index < 2**16 and (self.ignore_index + 1) * n < 2**31:
            self.matrix += self._bincount(pred, target)
            return
        # Elsewhere (CUDA): ignored pixels go to one extra bin that is dropped. Boolean indexing
        # (target[valid]) has a data-dependent size, a host sync on CUDA, and CUDA's bincount sizes
        # its output from the data's max, another; scatter_add_ into a fixed n*n + 1 bins needs neither.
        index = torch.where(target == self.ignore_index, n * n, target.to(torch.int64) * n + pred.to(torch.int64))
        index = index.flatten()
        bins = torch.zeros(n * n + 1, dtype=torch.int64, device=index.device)
        bins.scatter_add_(0, index, torch.ones_like(index))
        self.matrix += bins[: n * n].reshape(n, n)

    def _bincount(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The CPU count, 4x faster than the scatter: bin target * n + pred as int32, ignored pixels
        included (they fall in the bins of row `ignore_index`, past the n x n kept), no mask at all.
        The count is exact: bincount counts in int64. On the CPU a look at the small bins costs no
        sync, so a label outside [0, n) that is not the ignore index still fails loudly.

        It goes in chunks of CHUNK pixels through two reused int32 buffers that stay in the core's
        cache (measured with `launch/bench.py metric`, BENCHMARKS.md). Fresh full-size
        temporaries cost their page faults on every update, and full-size reused ones a trip to
        memory for each of the four passes over them."""
        n, ignore = self.num_classes, self.ignore_index
        size, flat_pred, flat_target = pred.numel(), pred.reshape(-1), target.reshape(-1)
        if self._scratch is None:
            self._scratch = (torch.empty(CHUNK, dtype=torch.int32), torch.empty(CHUNK, dtype=torch.int32))
        bins = torch.zeros((ignore + 1) * n, dtype=torch.int64)
        for start in range(0, size, CHUNK):
            stop = min(start + CHUNK, size)
            index, other = self._scratch[0][: stop - start], self._scratch[1][: stop - start]
            index.copy_(flat_target[start:stop])
            other.copy_(flat_pred[start:stop])
            torch.add(other, index, alpha=n, out=index)  # pred + n * target: one pass, not mul_ then add_
            counted = torch.bincount(index, minlength=(ignore + 1) * n)  # a negative label raises here
            if counted.numel() > bins.numel():
                raise ValueError(f"a label is outside [0, {n}) and is not the ignore index {ignore}")
            bins += counted
        if bins[n * n: ignore * n].any():
            raise ValueError(f"a label is outside [0, {n}) and is not the ignore index {ignore}")
        return bins[: n * n].reshape(n, n)


def _ratio(num: int, den: int) -> float | None:
    return num / den if den > 0 else None


def metrics_from_confusion(matrix: torch.Tensor) -> dict:
    """IoU = TP / (TP + FP + FN) per class (None where the union is 0), mIoU over the rest;
    pixel accuracy, mean class accuracy, per-class precision, recall and Dice."""
    cm = [[int(v) for v in row] for row in matrix.tolist()]
    n = len(cm)
    tp = [cm[i][i] for i in range(n)]
    gt = [sum(cm[i]) for i in range(n)]
    pr = [sum(cm[r][i] for r in range(n)) for i in range(n)]
    iou = [_ratio(tp[i], gt[i] + pr[i] - tp[i]) for i in range(n)]
    recall = [_ratio(tp[i], gt[i]) for i in range(n)]
    precision = [_ratio(tp[i], pr[i]) for i in range(n)]
    dice = [_ratio(2 * tp[i], gt[i] + pr[i]) for i in range(n)]
    total = sum(gt)
    present = [v for v in iou if v is not None]
    accs = [v for v in recall if v is not None]
    return {
        "miou": sum(present) / len(present) if present else math.nan,
        "per_class_iou": iou,
        "pixel_accuracy": _ratio(sum(tp), total),
        "mean_accuracy": sum(accs) / len(accs) if accs else None,
        "per_class": {"precision": precision, "recall": recall, "dice": dice},
        "confusion_matrix": cm,
        "valid_pixels": total,
    }


def format_table(metrics: dict, class_names: list[str]) -> str:
    """The per-class table printed after an evaluation."""
    width = max(8, *(len(c) for c in class_names))
    fmt = lambda v: "   n/a" if v is None else f"{100 * v:6.2f}"  # noqa: E731
    pc = metrics["per_class"]
    lines = [f"{'class':<{width}}  {'IoU':>6}  {'prec':>6}  {'recall':>6}  {'dice':>6}"]
    for i, name in enumerate(class_names):
        lines.append(
            f"{name:<{width}}  {fmt(metrics['per_class_iou'][i])}  {fmt(pc['precision'][i])}  "
            f"{fmt(pc['recall'][i])}  {fmt(pc['dice'][i])}"
        )
    lines.append(
        f"{'mIoU':<{width}}  {fmt(metrics['miou'])}   pixel acc {fmt(metrics['pixel_accuracy'])}   "
        f"mean acc {fmt(metrics['mean_accuracy'])}"
    )
    return "\n".join(lines)
