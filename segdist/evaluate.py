"""Exact distributed evaluation: `evaluate` (the metrics of a model on a split, for the trainer,
`segdist-eval` and the benches) and `predict_sample` (one frame as evaluation predicts it).

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

import numpy as np
import torch

from segdist.data.manifest import Manifest
from segdist.data.sample import pad_image, padded_size
from segdist.data.stream import EvalStream, eval_loader
from segdist.errors import UserError
from segdist.metrics import ConfusionMatrix, metrics_from_confusion
from segdist.inference import InferenceMode, labels
from segdist.preprocess import to_input
from segdist.report import image_iou


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
