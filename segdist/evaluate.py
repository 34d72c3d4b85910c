"""Exact distributed evaluation: `evaluate` (the metrics of a model on a split: for the trainer,
the benches and `evaluate_checkpoint`), `evaluate_checkpoint` (a checkpoint's metrics on a split,
printed and written: what `launch/eval.py` runs) and `predict_sample` (one frame as evaluation
predicts it).
Calling this module calls `evaluate_checkpoint`: `segdist.evaluate(recipe, checkpoint=...)`
(segdist.api).

Each rank reads a disjoint part of the split (segdist.data.stream.EvalStream), runs the unwrapped
model (no DDP collectives in the loop), and counts an int64 confusion matrix at the label's own
resolution. Before the loop the ranks take rank 0's BatchNorm statistics (share_buffers); after it
ONE all-reduce sums the matrix together with the sample count; the summed pixel count must equal
the manifest's valid-pixel total.

What is invariant: the batches. The frames that go through the model together are a canonical
group of `batch_size` consecutive samples in manifest order, whatever the world size and the loader
workers (the ranks and workers take whole groups), and frames of different sizes within a group run
one by one. So every prediction, and hence the metrics, are the same bit for bit on 1 or 8 GPUs,
even where a kernel chosen by the batch's shape (cuDNN) would move a near-tie. A frame's prediction
may still differ from its prediction in a batch of another size (`batch_size = 1`: frames alone, as
`predict_sample` runs them). The cost: ceil(N / batch_size) batches, the fewest there can be; a
rank's loader worker reads only the shards that hold its groups, and a shard that two of them share
is read by both up to the second one's first sample (read past, not decoded). Groups against frames
alone: docs/evaluation.md and BENCHMARKS.md.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from segdist.api import make_callable
from segdist.data.manifest import Manifest
from segdist.data.sample import pad_image, padded_size
from segdist.data.stream import EvalStream, eval_loader
from segdist.errors import UserError
from segdist.metrics import ConfusionMatrix, metrics_from_confusion
from segdist.inference import InferenceMode, labels
from segdist.preprocess import to_input
from segdist.report import image_iou

if TYPE_CHECKING:
    from segdist.recipe import Recipe

log = logging.getLogger("segdist")


@torch.no_grad()
def share_buffers(model: torch.nn.Module, accelerator) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics).

    DDP broadcasts buffers from rank 0 *before* each forward, then every rank updates its running
    statistics with its own batch: after a training step the ranks hold different statistics, and
    without this each rank would evaluate a slightly different model (measured: val mIoU 0.9066
    in training vs 0.9062 from the saved checkpoint). Rank 0's are the ones checkpoints save."""
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)


@torch.no_grad()
def predict_sample(model: torch.nn.Module, image: np.ndarray, accelerator, mode: InferenceMode) -> np.ndarray:
    """HxW label map of one HxWx3 uint8 image, predicted exactly as `evaluate` predicts a frame
    (zero-padded to a multiple of 32, under the run's autocast, in `mode`), alone: as `evaluate` with
    batch_size 1 (in a group, a GPU's kernels may round a near-tie otherwise); the model is in eval mode."""
    h, w = image.shape[:2]
    ph, pw = padded_size(h, w)
    x = to_input(torch.from_numpy(pad_image(image))[None], accelerator.device)
    with accelerator.autocast():
        return labels(model, x[:, :, :ph, :pw], mode)[0, :h, :w].cpu().numpy()


@torch.no_grad()
def evaluate(model: torch.nn.Module, manifest: Manifest, accelerator, batch_size: int, num_workers: int,
             mode: InferenceMode | None = None, per_image: bool = False) -> dict:
    """Metrics of `model` on the whole split, identical for any world size; frames go through the
    model in the canonical groups of `batch_size` (see the module docstring) as `mode` says
    (segdist.inference; default: whole frames, one pass). With `per_image`
    the metrics also hold `per_image_iou`: each sample's key → its own mean IoU
    (segdist.report.image_iou), gathered from every rank."""
    mode = mode or InferenceMode()
    image_ious: dict[str, float] = {}
    was_training = model.training
    model.eval()
    share_buffers(model, accelerator)
    stream = EvalStream.of(manifest, rank=accelerator.process_index, world=accelerator.num_processes,
                           group=batch_size)
    loader = eval_loader(stream, num_workers, pin_memory=accelerator.device.type == "cuda")
    cm = ConfusionMatrix(manifest.num_classes, manifest.ignore_index, accelerator.device)
    samples = 0
    for keys, images, masks, sizes in loader:
        x, masks = to_input(images, accelerator.device), masks.to(accelerator.device, non_blocking=True)
        # A batch is one canonical group (the same frames whatever the world size). Frames of
        # different sizes still run one by one, each at its own padded size: the padding a larger
        # neighbour would add is in the model's receptive field.
        parts = [slice(None)] if len(set(sizes)) == 1 else [slice(i, i + 1) for i in range(len(sizes))]
        for part, size in zip(parts, sizes):
            h, w = padded_size(*size)
            with accelerator.autocast():
                pred = labels(model, x[part, :, :h, :w], mode)
            cm.update(pred, masks[part, :h, :w])
            if per_image:
                for key, p, t, (fh, fw) in zip(keys[part], pred.cpu().numpy(), masks[part].cpu().numpy(), sizes[part]):
                    image_ious[key] = image_iou(t[:fh, :fw], p[:fh, :fw], manifest.num_classes, manifest.ignore_index)
        samples += len(masks)
    # The one collective: the matrix and the sample count, summed over ranks.
    n = manifest.num_classes
    packed = torch.cat([cm.matrix.flatten(), torch.tensor([samples], dtype=torch.int64, device=cm.matrix.device)])
    packed = accelerator.reduce(packed, reduction="sum")
    cm.matrix = packed[: n * n].reshape(n, n)
    metrics = metrics_from_confusion(cm.matrix.cpu())
    metrics["num_samples"] = int(packed[-1])
    metrics["world_size"] = accelerator.num_processes
    metrics["split"] = manifest.split
    if (metrics["valid_pixels"] != manifest.valid_pixels or metrics["num_samples"] != manifest.num_samples):
        raise UserError(
            f"evaluation of split {manifest.split!r} counted {metrics['num_samples']} samples and "
            f"{metrics['valid_pixels']} valid pixels, the manifest says {manifest.num_samples} and "
            f"{manifest.valid_pixels}: the shards changed since conversion; run launch/shard.py verify"
        )
    if per_image:
        metrics["per_image_iou"] = _gather_dicts(image_ious, accelerator)
    model.train(was_training)
    return metrics


def _gather_dicts(part: dict, accelerator) -> dict:
    if accelerator.num_processes == 1:
        return dict(sorted(part.items()))
    import torch.distributed as dist

    parts: list = [None] * accelerator.num_processes
    dist.all_gather_object(parts, part)
    return dict(sorted((k, v) for p in parts for k, v in p.items()))


def evaluate_checkpoint(recipe: Recipe | str | os.PathLike, *, checkpoint: str | os.PathLike,
                        overrides: Sequence[str] | str = (), split: str | None = None,
                        out: str | os.PathLike | None = None, report: str | os.PathLike | None = None,
                        show: int = 0) -> dict:
    """`segdist.evaluate` (segdist.api) and `launch/eval.py`: the metrics of `checkpoint` (a run
    folder: its best checkpoint, else the latest; or one checkpoints/step-N folder; its EMA weights
    when it has them, the ones training ranked `best` by) on `split` (default the recipe's
    data.val_split), on every process of the launch. `recipe` is a TOML path or a loaded Recipe,
    `overrides` the `--set` strings. `out` and `report` are checked before evaluating; then the main
    process prints the per-class table, writes the metrics JSON to `out`, the report folder to
    `report` (segdist.report.write_report) and strips of the `show` worst samples into it.
    Returns the metrics (what `out` holds; on every process)."""
    from segdist.data.manifest import load_split
    from segdist.distributed import forget_accelerator, make_accelerator, setup_logging
    from segdist.fileio import atomic_write_json, unwritable
    from segdist.metrics import format_table
    from segdist.models import load_trained
    from segdist.precision import resolve_precision
    from segdist.recipe import resolve_recipe
    from segdist.report import write_report

    recipe = resolve_recipe(recipe, overrides)
    if show < 0:
        raise UserError(f"--show must be a number of samples >= 0, got {show}")
    if show and report is None:
        raise UserError("--show N writes its strips into the report folder: give --report DIR too")
    manifest = load_split(recipe.data, split or recipe.data.val_split, evaluation=True)
    model, info = load_trained(recipe, checkpoint, manifest)
    if out is not None and unwritable(Path(out).resolve().parent) is not None:
        raise UserError(f"--out {out}: its folder does not exist or is not writable")
    if report is not None and unwritable(Path(report).resolve(), create=True) is not None:
        raise UserError(f"--report {report}: it is not a folder that can be created and written")
    accelerator = make_accelerator(resolve_precision(recipe.train.precision))
    try:
        setup_logging(accelerator.is_main_process)
        model.to(accelerator.device)
        mode = InferenceMode.from_recipe(recipe)
        log.info("evaluating %s on split %r (%d samples) with %d processes; %s",
                 info.checkpoint, manifest.split, manifest.num_samples, accelerator.num_processes, mode.describe())
        metrics = evaluate(model, manifest, accelerator, recipe.eval.batch_size, recipe.eval.num_workers, mode,
                           per_image=bool(show))
        metrics["checkpoint"] = str(info.checkpoint)
        if accelerator.is_main_process:
            print(format_table(metrics, manifest.classes), flush=True)
            print(f"mIoU {metrics['miou']:.4f} on {metrics['num_samples']} samples, "
                  f"{metrics['valid_pixels']} valid pixels ({accelerator.num_processes} processes)", flush=True)
            if out is not None:
                atomic_write_json(out, metrics)
            if report is not None:
                write_report(report, metrics, manifest.classes)
                if show:
                    write_worst(Path(report), model.eval(), manifest, metrics["per_image_iou"], show, accelerator,
                                mode)
                print(f"report in {report}", flush=True)
        accelerator.end_training()
        return metrics
    finally:
        forget_accelerator()  # the next run in this interpreter makes its own


def write_worst(folder: Path, model, manifest: Manifest, image_ious: dict, count: int, accelerator,
                mode: InferenceMode) -> list[Path]:
    """`worst-<i>-<key>.png` in `folder` for the `count` samples of lowest per-image IoU (ties by
    key): input | truth | prediction | errors, predicted again as evaluation predicted them."""
    from segdist.data.sample import decode_sample, read_shard
    from segdist.report import strip, write_png

    worst = sorted(image_ious, key=lambda k: (image_ious[k], k))[:count]
    rank = {key: i for i, key in enumerate(worst)}
    written = []
    for shard in manifest.sources():
        for sample in read_shard(shard):
            if sample["__key__"] not in rank:
                continue
            key, image, mask = decode_sample(sample, manifest.num_classes, manifest.ignore_index)
            pred = predict_sample(model, image, accelerator, mode)
            name = f"worst-{rank[key] + 1:0{len(str(count))}d}-{key.replace('/', '_')}.png"
            write_png(folder / name, strip(image, mask, pred, manifest.palette, manifest.ignore_index, errors=True))
            written.append(folder / name)
    log.info("the %d worst samples by per-image IoU (%s) drawn in %s", len(worst),
             ", ".join(f"{k} {image_ious[k]:.3f}" for k in worst[:5]) + (", ..." if len(worst) > 5 else ""), folder)
    return written


make_callable(__name__, evaluate_checkpoint)
