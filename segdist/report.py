"""What an evaluation leaves for people to look at: the per-class table (CSV and Markdown), the
row-normalised confusion matrix and a per-class IoU bar chart as figures, and image strips
(input | truth | prediction [| errors]) drawn large enough to read.

`write_report(folder, metrics, classes)` writes `metrics.json`, `per_class.csv`, `per_class.md` and
`confusion.png` into a folder, each atomically; the trainer gives every evaluation such a folder
(`<run_dir>/metrics/step-<N>/`) and `launch/eval.py --report DIR` one of its own. Figures are
drawn with matplotlib's Agg backend (already installed with cityscapesscripts), off screen, as
HxWx3 uint8 arrays that TensorBoard and PNG files take alike.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from segdist.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text

MIN_PANEL = 256
"""Strip panels are at least this many pixels high (small images are upscaled, nearest)."""
ERROR_COLOURS = {"right": (40, 40, 40), "wrong": (230, 40, 40), "ignored": (255, 255, 255)}
"""The errors panel: correct pixels dark, wrong ones red, ignored ones white."""


# ---------------------------------------------------------------------------------------------
# The per-class table

def per_class_rows(metrics: dict, classes: Sequence[str]) -> list[dict]:
    """One row per class: IoU, precision, recall, Dice (None where undefined) and the pixels of
    the class in the truth and in the prediction, from the metrics' confusion matrix."""
    cm = np.asarray(metrics["confusion_matrix"], dtype=np.int64)
    pc = metrics["per_class"]
    return [{"class": name, "iou": metrics["per_class_iou"][i], "precision": pc["precision"][i],
             "recall": pc["recall"][i], "dice": pc["dice"][i], "truth_pixels": int(cm[i].sum()),
             "predicted_pixels": int(cm[:, i].sum())} for i, name in enumerate(classes)]


def per_class_csv(metrics: dict, classes: Sequence[str]) -> str:
    """The table as CSV; undefined values are empty cells, ratios have full precision."""
    rows = per_class_rows(metrics, classes)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buf.getvalue()


def per_class_markdown(metrics: dict, classes: Sequence[str]) -> str:
    """The table as Markdown (percentages, "n/a" where undefined) with the mIoU below it."""
    pct = lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"  # noqa: E731
    lines = ["| class | IoU % | precision % | recall % | Dice % | truth pixels | predicted pixels |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in per_class_rows(metrics, classes):
        lines.append(f"| {row['class']} | {pct(row['iou'])} | {pct(row['precision'])} | {pct(row['recall'])} | "
                     f"{pct(row['dice'])} | {row['truth_pixels']} | {row['predicted_pixels']} |")
    lines.append("")
    lines.append(f"mIoU **{pct(metrics['miou'])} %**, pixel accuracy {pct(metrics['pixel_accuracy'])} %, "
                 f"mean accuracy {pct(metrics['mean_accuracy'])} %; {metrics['valid_pixels']} valid pixels"
                 + (f" of {metrics['num_samples']} samples" if "num_samples" in metrics else ""))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Figures

def pyplot():
    """matplotlib.pyplot on the off-screen Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def render(fig) -> np.ndarray:
    """A matplotlib figure as an HxWx3 uint8 array (the figure is closed)."""
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[:, :, :3].copy()
    pyplot().close(fig)
    return rgb


def row_normalised(matrix: np.ndarray) -> np.ndarray:
    """Each row (a true class) divided by its total: where that class's pixels went. Rows of a
    class absent from the truth are 0."""
    matrix = np.asarray(matrix, dtype=np.float64)
    totals = matrix.sum(axis=1, keepdims=True)
    return np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)


def confusion_figure(matrix, classes: Sequence[str]) -> np.ndarray:
    """HxWx3 uint8 image of the row-normalised confusion matrix, class names on both axes, each
    cell's share written in it when there are few enough classes to read it."""
    plt = pyplot()
    shares = row_normalised(matrix)
    n = len(classes)
    side = min(4 + 0.45 * n, 40)
    fig, ax = plt.subplots(figsize=(side + 1.5, side), dpi=100)
    im = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), labels=list(classes), rotation=90, fontsize=8 if n <= 40 else 5)
    ax.set_yticks(range(n), labels=list(classes), fontsize=8 if n <= 40 else 5)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("confusion matrix (each row sums to 1)")
    if n <= 25:
        for r in range(n):
            for c in range(n):
                if shares[r, c] >= 0.005:
                    ax.text(c, r, f"{shares[r, c]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if shares[r, c] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return render(fig)


def iou_bar_chart(metrics: dict, classes: Sequence[str]) -> np.ndarray:
    """HxWx3 uint8 image of a horizontal bar per class (its IoU; classes without a union are
    marked n/a), with the mIoU as a dashed line."""
    plt = pyplot()
    n = len(classes)
    ious = [v if v is not None else 0.0 for v in metrics["per_class_iou"]]
    fig, ax = plt.subplots(figsize=(8, min(2 + 0.28 * n, 60)), dpi=100)
    ax.barh(range(n), ious, color="tab:blue")
    for i, v in enumerate(metrics["per_class_iou"]):
        ax.text((v or 0.0) + 0.01, i, "n/a" if v is None else f"{v:.3f}", va="center", fontsize=7)
    ax.set_yticks(range(n), labels=list(classes), fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.1)
    if not math.isnan(metrics["miou"]):
        ax.axvline(metrics["miou"], color="tab:red", linestyle="--", label=f"mIoU {metrics['miou']:.3f}")
        ax.legend(loc="lower right")
    ax.set_xlabel("IoU")
    ax.set_title("per-class IoU")
    fig.tight_layout()
    return render(fig)


def write_png(path: str | Path, image: np.ndarray) -> None:
    from segdist.data.shards import encode_png

    atomic_write_bytes(path, encode_png(image))


def write_report(folder: str | Path, metrics: dict, classes: Sequence[str],
                 confusion: np.ndarray | None = None) -> Path:
    """metrics.json, per_class.csv, per_class.md and confusion.png in `folder` (created), each
    written atomically; `confusion` is the figure when the caller has drawn it already. Returns
    the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "metrics.json", metrics)
    atomic_write_text(folder / "per_class.csv", per_class_csv(metrics, classes))
    atomic_write_text(folder / "per_class.md", per_class_markdown(metrics, classes))
    if confusion is None:
        confusion = confusion_figure(metrics["confusion_matrix"], classes)
    write_png(folder / "confusion.png", confusion)
    return folder


# ---------------------------------------------------------------------------------------------
# Image strips

def colorize(mask: np.ndarray, palette: list[list[int]], ignore_index: int) -> np.ndarray:
    """HxW label map → HxWx3 uint8 in the dataset palette; ignored pixels white."""
    lut = np.zeros((max(256, ignore_index + 1, len(palette)), 3), dtype=np.uint8)
    lut[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    lut[ignore_index] = 255
    return lut[np.clip(mask, 0, len(lut) - 1)]


def upscale(image: np.ndarray, min_height: int = MIN_PANEL) -> np.ndarray:
    """`image` repeated by the smallest whole factor that makes it at least `min_height` high
    (nearest neighbour: label maps keep their exact colours)."""
    factor = max(1, -(-min_height // image.shape[0]))
    return image if factor == 1 else np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def error_map(truth: np.ndarray, pred: np.ndarray, ignore_index: int) -> np.ndarray:
    """HxWx3: right pixels dark, wrong ones red, ignored ones white."""
    out = np.empty((*truth.shape, 3), dtype=np.uint8)
    out[:] = ERROR_COLOURS["right"]
    out[pred != truth] = ERROR_COLOURS["wrong"]
    out[truth == ignore_index] = ERROR_COLOURS["ignored"]
    return out


def strip(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, palette, ignore_index: int,
          errors: bool = False, min_height: int = MIN_PANEL) -> np.ndarray:
    """input | truth | prediction [| errors] side by side (4 px white gaps), each panel at least
    `min_height` high."""
    panels = [image, colorize(truth, palette, ignore_index), colorize(pred, palette, ignore_index)]
    if errors:
        panels.append(error_map(truth, pred, ignore_index))
    gap = np.full((upscale(image, min_height).shape[0], 4, 3), 255, dtype=np.uint8)
    parts = []
    for panel in panels:
        parts += [upscale(panel, min_height), gap]
    return np.concatenate(parts[:-1], axis=1)


def image_iou(truth: np.ndarray, pred: np.ndarray, num_classes: int, ignore_index: int) -> float:
    """Mean IoU of one image over the classes in its truth or its prediction (1.0 for an image
    with no valid pixel): how `--show` ranks the worst samples."""
    valid = truth != ignore_index
    t, p = truth[valid].astype(np.int64), pred[valid].astype(np.int64)
    if t.size == 0:
        return 1.0
    cm = np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    present = union > 0
    return float((tp[present] / union[present]).mean())
