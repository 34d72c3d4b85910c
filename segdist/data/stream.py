"""Reading shards: an endless, positionable training stream and an exact-once evaluation stream.

Both split the split over "slots" = (rank, DataLoader worker), S = world x workers of them. The
training stream's slot s reads shards[s::S] when there are at least S shards, else it reads every
shard and keeps every S-th sample; the evaluation stream's slots take contiguous ranges of
fixed-size groups of samples, so its batches do not depend on S (EvalStream). The loaders are NOT
passed to `accelerator.prepare` (docs/design-notes.md: it would dispatch or re-split the stream);
batches are moved to the device by the train step.

Training: each slot loops over passes forever (lockstep comes from the trainer taking exactly
`steps x grad_accum` batches on every rank, never from the data running out). Pass p shuffles the
shard order with (seed, p) and samples with a buffer seeded by (seed, rank, worker, p); sample n of
a slot is augmented with a generator seeded by (seed, rank, worker, n). The stream is therefore a
pure function of the seed, and resuming after B batches skips exactly the samples each worker had
produced, before decoding them. With `data.geometry = "device"` the transform is a
segdist.data.geometry.DeviceGeometry: sample n keeps its stored size and draws its placement from the
same generator, and the trainer warps the batch on the device. A preset's colour jitter is not applied here: sample n draws its
factors from (seed, rank, worker, n, 3) and the batch carries them as a third tensor (N x 4), which
the trainer applies on the device (segdist.data.colour). A preset that shrinks frames first
(segdist.data.augment.decode_reduction) has JPEGs decoded at a power-of-two fraction of their
size. With rare-class sampling (segdist.data.sampling) a pass yields
each sample as often as that pass's draw, seeded by (seed, p), says: the same on every rank.

A sample's format (member names, the tar reader, decoding, the label check) is segdist.data.sample's.

Corrupt data (`data.on_corrupt`): a shard that cannot be read to its end (truncated, a damaged tar
header, a missing end-of-archive marker) raises `ShardError`; a sample whose bytes are missing or
do not decode raises `CorruptSample`. Both name the shard and, where there is one, the sample key.
With "fail" (the default) training stops there. With "skip" the training stream logs a warning per
occurrence (with the worker's running count) and goes on: the rest of a broken shard is dropped
from the pass (the same samples every pass, so the stream stays a pure function of seed and
data), and a sample that does not decode gives its place to the next sample that does (augmented
with the skipped sample's seed), so sample n of a slot is still raw sample n and resuming stays
exact without decoding what it skips. Masks that decode but hold a label that is neither a class
nor the ignore index, or that differ from the image in size, are not corruption but wrong data
or a wrong class count: they always fail. Evaluation never skips: its totals must be exact.
"""

from __future__ import annotations

import itertools
import logging
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from segdist.data.augment import seed_pipeline
from segdist.data.colour import ColourJitter
from segdist.data.geometry import DeviceGeometry
from segdist.data.location import ShardSource
from segdist.data.sampling import draws
from segdist.data.collate import mask_tensor, pad_collate
from segdist.data.sample import CorruptSample, ShardError, decode_sample, read_shard
from segdist.distributed import init_loader_worker
from segdist.errors import UserError
from segdist.data.manifest import Manifest

log = logging.getLogger("segdist")

ON_CORRUPT = ("fail", "skip")
def _slot() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _read(path: str | ShardSource, on_bad_shard: Callable[[ShardError], None] | None) -> Iterator[dict]:
    """`read_shard`, where a broken shard ends early through `on_bad_shard` if given."""
    try:
        yield from read_shard(path)
    except ShardError as exc:
        if on_bad_shard is None:
            raise
        on_bad_shard(exc)


def _slot_indexed(shards: list[str | ShardSource], slot: int, slots: int,
                  on_bad_shard: Callable[[ShardError], None] | None = None) -> Iterator[tuple[int, int, dict]]:
    """(position of the shard in `shards`, index in its shard, raw sample) of one slot, in shard order."""
    if len(shards) >= slots:
        for j in range(slot, len(shards), slots):
            for i, sample in enumerate(_read(shards[j], on_bad_shard)):
                yield j, i, sample
    else:
        index = 0
        for j, path in enumerate(shards):
            for i, sample in enumerate(_read(path, on_bad_shard)):
                if index % slots == slot:
                    yield j, i, sample
                index += 1


def _slot_samples(shards: list[str | ShardSource], slot: int, slots: int,
                  on_bad_shard: Callable[[ShardError], None] | None = None) -> Iterator[dict]:
    """The raw samples of one slot, in shard order."""
    for _, _, sample in _slot_indexed(shards, slot, slots, on_bad_shard):
        yield sample


IDLE_PASSES = 100
"""Passes in a row in which rare-class sampling may draw none of a slot's samples before it is an error."""


class _Skips:
    """What one worker skipped under on_corrupt = "skip": counted, and a warning per occurrence."""

    def __init__(self, rank: int, worker: int) -> None:
        self.rank, self.worker = rank, worker
        self.samples = self.shards = 0

    def _where(self) -> str:
        return (f"so far rank {self.rank} worker {self.worker} skipped {self.samples} undecodable samples "
                f"and the rest of {self.shards} shards")

    def shard(self, exc: ShardError) -> None:
        self.shards += 1
        log.warning("data.on_corrupt=skip: skipping the rest of shard %s after %d samples (%s); %s",
                    exc.path, exc.samples, exc.reason, self._where())

    def sample(self, exc: CorruptSample) -> None:
        self.samples += 1
        log.warning("data.on_corrupt=skip: skipping sample %s of shard %s (it %s); %s",
                    exc.key, exc.url, exc.reason, self._where())


class TrainStream(IterableDataset):
    """Endless augmented training samples for one rank; see the module docstring."""

    def __init__(
        self,
        shards: list[str | ShardSource],
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
        on_corrupt: str = "fail",
        probabilities: np.ndarray | None = None,
        offsets: list[int] | None = None,
        colour: ColourJitter | None = None,
        reduce_for: Callable[[int, int], int] | None = None,
    ) -> None:
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
        self.shards = list(shards)  # paths, or location.ShardSource for shards of any root
        self.rank, self.world, self.seed = rank, world, seed
        self.transform = transform
        self.colour = colour  # factors drawn here, applied on the device
        self.reduce_for = reduce_for  # JPEGs decoded at the scale the preset shrinks them to first
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.shuffle_buffer = shuffle_buffer
        self.batch_size = batch_size
        self.start_batch = start_batch
        self.on_corrupt = on_corrupt
        # Rare-class sampling (segdist.data.sampling): each sample's draw probability, in manifest
        # order, and the manifest index of each shard's first sample. None = uniform passes.
        self.probabilities, self.offsets = probabilities, offsets
        if (probabilities is None) != (offsets is None):
            raise ValueError("probabilities and offsets go together")

    def _skip(self, worker: int, workers: int) -> int:
        """Samples this worker had produced when the main process had taken `start_batch` batches
        (batches come round-robin from workers, each built from consecutive samples of one worker)."""
        batches = len(range(worker, self.start_batch, workers))
        return batches * self.batch_size

    def _raw(self, worker: int, workers: int, skips: _Skips | None) -> Iterator[tuple[int, dict]]:
        """(pass, raw sample) of this worker's slot, forever."""
        slot, slots = self.rank * workers + worker, self.world * workers
        on_bad_shard = skips.shard if skips is not None else None
        idle = 0
        for p in range(1 << 62):
            order = np.random.default_rng([self.seed, p]).permutation(len(self.shards))
            shards = [self.shards[i] for i in order]
            rng = np.random.default_rng([self.seed, self.rank, worker, p, 1])
            counts = draws(self.probabilities, self.seed, p) if self.probabilities is not None else None
            buffer: list[dict] = []
            empty, drawn = True, 0
            for j, i, raw in _slot_indexed(shards, slot, slots, on_bad_shard):
                empty = False
                times = 1 if counts is None else int(counts[self.offsets[order[j]] + i])
                drawn += times
                for sample in itertools.repeat(raw, times):
                    if self.shuffle_buffer == 0:  # shard order is still shuffled per pass
                        yield p, sample
                        continue
                    if len(buffer) < self.shuffle_buffer:
                        buffer.append(sample)
                        continue
                    k = int(rng.integers(len(buffer)))
                    buffer[k], sample = sample, buffer[k]
                    yield p, sample
            rng.shuffle(buffer)
            for sample in buffer:
                yield p, sample
            if empty:
                raise UserError(f"training slot {slot} of {slots} got no samples from {len(self.shards)} shards"
                                + (" (every one it reads is broken)" if skips is not None and skips.shards else ""))
            idle = 0 if drawn else idle + 1
            if idle >= IDLE_PASSES:
                raise UserError(
                    f"data.sampling = \"rare_class\" drew none of training slot {slot}'s samples in {idle} passes "
                    "in a row: too few of its samples hold a counted class; lower data.rare_class_min_pixels, "
                    "use fewer processes or workers, or set data.sampling = \"uniform\""
                )

    @property
    def collate(self) -> Callable:
        """How this stream's samples batch: stacked crops, or with geometry on the device the stored
        frames in one canvas and their placements (DeviceGeometry.collate)."""
        return self.transform.collate if isinstance(self.transform, DeviceGeometry) else default_collate

    def augment(self, image: np.ndarray, mask: np.ndarray, worker: int, n: int) -> tuple[torch.Tensor, ...]:
        """Sample n of loader worker `worker` after the CPU pipeline, seeded as the stream seeds it:
        (image, mask), plus the colour factors when the preset jitters colour. With geometry on the
        device (`transform` a DeviceGeometry): (stored image, stored mask, its placement matrix, ...)."""
        rng = np.random.default_rng([self.seed, self.rank, worker, n, 2])
        if isinstance(self.transform, DeviceGeometry):  # the frame as stored, and where its pixels go
            sample = (torch.from_numpy(image), mask_tensor(mask),
                      torch.from_numpy(self.transform.draw(rng, *mask.shape[:2])))
        else:
            seed_pipeline(self.transform, int(rng.integers(1 << 31)))
            out = self.transform(image=image, mask=mask)
            sample = torch.from_numpy(np.ascontiguousarray(out["image"])), mask_tensor(np.ascontiguousarray(out["mask"]))
        if self.colour is None:
            return sample
        return *sample, torch.from_numpy(self.colour.draw(np.random.default_rng([self.seed, self.rank, worker, n, 3])))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader_worker, workers = _slot()
        # The DataLoader takes batch j from worker j % workers, starting at worker 0 in every new
        # loader; batch start_batch + j of the uninterrupted run came from worker
        # (start_batch + j) % workers. So this worker plays that one's part (its slot, seeds, position).
        worker = (loader_worker + self.start_batch) % workers
        skip = self._skip(worker, workers)
        skips = _Skips(self.rank, worker) if self.on_corrupt == "skip" else None
        pending: list[int] = []  # positions of samples that did not decode, filled by the next one that does
        pending_pass = 0
        for n, (p, sample) in enumerate(self._raw(worker, workers, skips)):
            if n < skip:
                continue  # resuming: already consumed before the checkpoint; not decoded
            try:
                _, image, mask = decode_sample(sample, self.num_classes, self.ignore_index, self.reduce_for)
            except CorruptSample as exc:
                if skips is None:
                    raise
                skips.sample(exc)
                if not pending:
                    pending_pass = p
                elif p > pending_pass + 1:  # a whole pass went by without one sample that decodes
                    raise UserError(f"no sample of training slot {self.rank * workers + worker} decodes: "
                                    "the shards are broken; run launch/shard.py verify --deep") from None
                pending.append(n)
                continue
            for m in (*pending, n):
                yield self.augment(image, mask, worker, m)
            pending.clear()


def _group_range(groups: int, slot: int, slots: int) -> tuple[int, int]:
    """The groups [first, end) of evaluation slot `slot` of `slots`: contiguous, balanced (their
    numbers differ by at most one); with fewer groups than slots, some slots get none."""
    return slot * groups // slots, (slot + 1) * groups // slots


def _shard_ranges(counts: list[int], start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(shard, first, end) in-shard index ranges that hold the manifest positions [start, end),
    shards in manifest order."""
    offset = 0
    for j, n in enumerate(counts):
        first, last = max(start - offset, 0), min(end - offset, n)
        if first < last:
            yield j, first, last
        offset += n


class EvalStream(IterableDataset):
    """Every sample of a split exactly once across all ranks and workers, un-augmented: images and
    masks at their stored (native) resolution, whatever the training preset did. Never skips.

    Batches that never depend on the world size: group g of the split is the samples at manifest
    positions [g*group, (g+1)*group) (manifest order: shard by shard, in-shard order; the last group
    may be shorter). The S = world x workers slots take contiguous, balanced ranges of groups
    (`_group_range`; a slot may get none), so with `eval_loader`'s batch size of `group` every batch
    is exactly one group, and which frames share a forward pass is a function of the manifest and
    `group` alone. A slot reads only the shards that hold its samples, sequentially from the shard
    of its first sample, passing over (not decoding) the samples before it. A shard read to its last
    sample must hold exactly the manifest's count, else a `UserError` names it (the shards changed
    since conversion).

    `samples_per_shard` (the manifest's counts; `EvalStream.of` takes them from a manifest) is
    needed to split the split over several slots; without it the only slot reads every shard whole,
    in groups of `group`."""

    def __init__(self, shards: list[str | ShardSource], *, rank: int, world: int, num_classes: int, ignore_index: int,
                 group: int = 1, samples_per_shard: list[int] | None = None) -> None:
        if group < 1:
            raise ValueError(f"group must be >= 1, got {group}")
        if samples_per_shard is not None and len(samples_per_shard) != len(shards):
            raise ValueError(f"{len(samples_per_shard)} sample counts for {len(shards)} shards")
        self.shards = list(shards)
        self.rank, self.world = rank, world
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.group = group
        self.samples_per_shard = None if samples_per_shard is None else [int(n) for n in samples_per_shard]

    @classmethod
    def of(cls, manifest: Manifest, *, rank: int, world: int, group: int) -> EvalStream:
        """The stream of a split's shards, wherever its root is, in groups of `group`."""
        return cls(manifest.sources(), rank=rank, world=world, num_classes=manifest.num_classes,
                   ignore_index=manifest.ignore_index, group=group,
                   samples_per_shard=[s.samples for s in manifest.shards])

    def positions(self, slot: int, slots: int) -> range:
        """The manifest positions that slot `slot` of `slots` reads: whole groups, contiguous (needs
        `samples_per_shard`)."""
        total = sum(self.samples_per_shard)
        first, end = _group_range(-(-total // self.group), slot, slots)
        return range(first * self.group, min(end * self.group, total))

    def _raw(self, slot: int, slots: int) -> Iterator[dict]:
        """The raw samples of one slot, in manifest order."""
        if self.samples_per_shard is None:
            if slots > 1:
                raise ValueError(f"EvalStream needs samples_per_shard to split a split over {slots} slots "
                                 "(EvalStream.of takes them from the manifest)")
            for path in self.shards:
                yield from read_shard(path)
            return
        span = self.positions(slot, slots)
        for j, first, last in _shard_ranges(self.samples_per_shard, span.start, span.stop):
            expected, samples, read = self.samples_per_shard[j], read_shard(self.shards[j]), 0
            try:
                for sample in samples:
                    read += 1
                    if read > first:  # the samples before `first` are read past, not decoded
                        yield sample
                    if read == last:
                        break
                if read < last:
                    raise UserError(f"shard {self.shards[j]} holds {read} samples, its manifest says {expected}: "
                                    "the shards changed since conversion; run launch/shard.py verify")
                if last == expected and next(samples, None) is not None:  # this slot reads the shard's end
                    raise UserError(f"shard {self.shards[j]} holds more samples than the {expected} its manifest "
                                    "says: the shards changed since conversion; run launch/shard.py verify")
            finally:
                samples.close()

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        worker, workers = _slot()
        for sample in self._raw(self.rank * workers + worker, self.world * workers):
            key, image, mask = decode_sample(sample, self.num_classes, self.ignore_index)
            yield key, torch.from_numpy(image), mask_tensor(mask)


def train_loader(stream: TrainStream, num_workers: int, pin_memory: bool) -> DataLoader:
    """The stream's batches, as `stream.collate` makes them."""
    return DataLoader(
        stream, batch_size=stream.batch_size, num_workers=num_workers, pin_memory=pin_memory,
        collate_fn=stream.collate,
        persistent_workers=False, prefetch_factor=4 if num_workers else None,
        worker_init_fn=init_loader_worker,  # signals are the training process's to handle
    )


def eval_loader(stream: EvalStream, num_workers: int, pin_memory: bool) -> DataLoader:
    """The stream's groups as batches (batch size = `stream.group`; each slot yields whole groups,
    so no batch mixes two), padded by `pad_collate` with the stream's ignore index."""
    return DataLoader(
        stream, batch_size=stream.group, num_workers=num_workers, pin_memory=pin_memory,
        collate_fn=pad_collate(stream.ignore_index), worker_init_fn=init_loader_worker,
    )
