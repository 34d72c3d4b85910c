"""Reading shards: an endless, positionable training stream and an exact-once evaluation stream.

Both split the shards over "slots" = (rank, DataLoader worker): with S = world x workers slots,
slot s reads shards[s::S] when there are at least S shards, else it reads every shard and keeps
every S-th sample. The loaders are NOT passed to `accelerator.prepare` (FACTS: it would dispatch
or re-split the stream); batches are moved to the device by the engine.

Training: each slot loops over passes forever (lockstep comes from the engine taking exactly
`steps x grad_accum` batches on every rank, never from the data running out). Pass p shuffles the
shard order with (seed, p) and samples with a buffer seeded by (seed, rank, worker, p); sample n of
a slot is augmented with a generator seeded by (seed, rank, worker, n). The stream is therefore a
pure function of the seed, and resuming after B batches skips exactly the samples each worker had
produced, before decoding them.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from segdist.errors import UserError


def read_shard(path: str | Path) -> Iterator[dict]:
    """Raw samples (`__key__` plus bytes per extension) of one tar shard, in file order."""
    try:
        with open(path, "rb") as stream:
            yield from group_by_keys(tar_file_expander([{"url": str(path), "stream": stream}]))
    except UserError:
        raise
    except Exception as exc:  # tarfile.ReadError, truncated stream, missing file
        raise UserError(f"shard {path} is unreadable ({type(exc).__name__}: {exc}); run launch/shard.py verify") from None


def decode_sample(sample: dict, num_classes: int, ignore_index: int) -> tuple[str, np.ndarray, np.ndarray]:
    """(key, HxWx3 uint8 RGB image, HxW int64 mask) of a raw sample; bad samples name their key."""
    key = sample["__key__"]
    image_bytes = sample.get("image.png") or sample.get("image.jpg")
    if image_bytes is None or "mask.png" not in sample:
        raise UserError(f"sample {key} in {sample.get('__url__')} lacks an image or a mask: re-run the conversion")
    try:
        image = np.asarray(Image.open(io.BytesIO(image_bytes)).convert("RGB"))
        mask = np.asarray(Image.open(io.BytesIO(sample["mask.png"]))).astype(np.int64)
    except Exception as exc:
        raise UserError(f"sample {key} in {sample.get('__url__')} does not decode ({exc}); run launch/shard.py verify --deep") from None
    if image.shape[:2] != mask.shape:
        raise UserError(f"sample {key}: image {image.shape[:2]} and mask {mask.shape} differ in size; re-run the conversion")
    labels = mask[mask != ignore_index]
    if labels.size and (labels.max() >= num_classes or labels.min() < 0):
        raise UserError(
            f"sample {key} in {sample.get('__url__')}: mask label {int(labels.max())} is not below "
            f"{num_classes} classes nor ignore {ignore_index}; fix model.classes or the data"
        )
    return key, image, mask


def _slot() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _slot_samples(shards: list[str], slot: int, slots: int) -> Iterator[dict]:
    """The raw samples of one slot, in shard order."""
    if len(shards) >= slots:
        for path in shards[slot::slots]:
            yield from read_shard(path)
    else:
        index = 0
        for path in shards:
            for sample in read_shard(path):
                if index % slots == slot:
                    yield sample
                index += 1


class TrainStream(IterableDataset):
    """Endless augmented training samples for one rank; see the module docstring."""

    def __init__(
        self,
        shards: list[str],
        *,
        rank: int,
        world: int,
        seed: int,
        transform: Callable,
        num_classes: int,
        ignore_index: int,
        shuffle_buffer: int,
        batch_size: int,
        start_batch: int = 0,
    ) -> None:
        self.shards = [str(s) for s in shards]
        self.rank, self.world, self.seed = rank, world, seed
        self.transform = transform
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.shuffle_buffer = shuffle_buffer
        self.batch_size = batch_size
        self.start_batch = start_batch

    def _skip(self, worker: int, workers: int) -> int:
        """Samples this worker had produced when the main process had taken `start_batch` batches
        (batches come round-robin from workers, each built from consecutive samples of one worker)."""
        batches = len(range(worker, self.start_batch, workers))
        return batches * self.batch_size

    def _raw(self, worker: int, workers: int) -> Iterator[dict]:
        slot, slots = self.rank * workers + worker, self.world * workers
        for p in range(1 << 62):
            order = np.random.default_rng([self.seed, p]).permutation(len(self.shards))
            shards = [self.shards[i] for i in order]
            rng = np.random.default_rng([self.seed, self.rank, worker, p, 1])
            buffer: list[dict] = []
            empty = True
            for sample in _slot_samples(shards, slot, slots):
                empty = False
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(sample)
                    continue
                i = int(rng.integers(len(buffer)))
                buffer[i], sample = sample, buffer[i]
                yield sample
            rng.shuffle(buffer)
            yield from buffer
            if empty:
                raise UserError(f"training slot {slot} of {slots} got no samples from {len(self.shards)} shards")

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker, workers = _slot()
        skip = self._skip(worker, workers)
        for n, sample in enumerate(self._raw(worker, workers)):
            if n < skip:
                continue  # resuming: already consumed before the checkpoint; not decoded
            _, image, mask = decode_sample(sample, self.num_classes, self.ignore_index)
            self.transform.set_random_seed(int(np.random.default_rng([self.seed, self.rank, worker, n, 2]).integers(1 << 31)))
            out = self.transform(image=image, mask=mask)
            yield torch.from_numpy(np.ascontiguousarray(out["image"])), torch.from_numpy(np.ascontiguousarray(out["mask"]))


class EvalStream(IterableDataset):
    """Every sample of a split exactly once across all ranks and workers, un-augmented."""

    def __init__(self, shards: list[str], *, rank: int, world: int, num_classes: int, ignore_index: int) -> None:
        self.shards = [str(s) for s in shards]
        self.rank, self.world = rank, world
        self.num_classes, self.ignore_index = num_classes, ignore_index

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        worker, workers = _slot()
        for sample in _slot_samples(self.shards, self.rank * workers + worker, self.world * workers):
            key, image, mask = decode_sample(sample, self.num_classes, self.ignore_index)
            yield key, torch.from_numpy(image.copy()), torch.from_numpy(mask)


def pad_collate(ignore_index: int, multiple: int = 32) -> Callable:
    """Batch samples of any size: pad images with 0 and masks with the ignore index up to a
    multiple of `multiple` (what encoders need), so padded pixels never count in metrics."""

    def collate(items):
        keys, images, masks = zip(*items)
        h = max(m.shape[0] for m in masks)
        w = max(m.shape[1] for m in masks)
        h, w = -(-h // multiple) * multiple, -(-w // multiple) * multiple
        image_batch = torch.zeros(len(items), h, w, 3, dtype=torch.uint8)
        mask_batch = torch.full((len(items), h, w), ignore_index, dtype=torch.int64)
        for i, (img, m) in enumerate(zip(images, masks)):
            image_batch[i, : img.shape[0], : img.shape[1]] = img
            mask_batch[i, : m.shape[0], : m.shape[1]] = m
        return list(keys), image_batch, mask_batch

    return collate


def train_loader(stream: TrainStream, num_workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(
        stream, batch_size=stream.batch_size, num_workers=num_workers, pin_memory=pin_memory,
        persistent_workers=False, prefetch_factor=4 if num_workers else None,
    )


def eval_loader(stream: EvalStream, batch_size: int, num_workers: int, ignore_index: int, pin_memory: bool) -> DataLoader:
    return DataLoader(
        stream, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
        collate_fn=pad_collate(ignore_index),
    )
