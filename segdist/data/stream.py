"""Reading shards: the training samples by position in canonical global batches, and an exact-once
evaluation stream.

Training (`TrainStream`, `GlobalBatches`, `train_loader`) is a pure function of the seed, the
manifest and the global batch G = processes x `data.batch_size` x `train.grad_accum`, never of how
the run is laid out:
- Pass p is a fixed order of the split's N samples (`PassOrder`): the shards in an order drawn from
  (seed, p), cut into blocks of whole shards holding at least `data.shuffle_buffer` samples, the
  samples shuffled within each block (from (seed, p, block)). So consecutive positions come from a
  bounded set of shards, read in turn. With rare-class sampling (segdist.data.sampling) a pass holds
  each sample as often as that pass's draw from (seed, p) says: still N positions.
- Position t of the run is position t mod N of pass t div N; global batch k is positions
  [kG, (k+1)G). Rank r takes the r-th of `world` equal consecutive shares of it, cut into
  `grad_accum` micro-batches of `data.batch_size` (`GlobalBatches`). So any (processes, per-process
  batch, accumulation) with the same G gives the same global batches, and the loader's workers only
  decide who decodes which micro-batch, never what it holds.
- Sample t is read by its offsets in the shard (segdist.data.sample.read_sample: one read, no scan),
  decoded, and augmented by the CPU pipeline with a generator seeded by (seed, t, 2). A preset's
  colour jitter takes its factors from position t's numbers of stream 3 (segdist.data.draws: drawn
  for the whole batch at once) and the batch carries them as a third tensor (N x 4), applied on the
  device (segdist.data.colour). With `data.geometry = "device"` the transform is a
  segdist.data.geometry.DeviceGeometry: sample t keeps its stored size, and its placement comes from
  t's numbers of stream 2, drawn for the batch; the trainer warps the batch on the device. A preset
  that shrinks frames first (segdist.data.augment.decode_reduction) has JPEGs decoded at a
  power-of-two fraction of their size.
- With `data.in_memory` the split is read and decoded once when the stream is made
  (segdist.data.held) and a batch of frames of one size is a single gather: the same samples at the
  same positions, so the same batches.
- Resuming at position T (a checkpoint records it, with G and the seed) starts the micro-batches at
  T: the samples that came next, on any layout with the same G, and nothing before T is read.

Evaluation (`EvalStream`): the slots (rank, DataLoader worker), S = world x workers of them, take
contiguous ranges of fixed-size groups of samples in manifest order, so its batches do not depend on S.

A sample's format (member names, the reader, decoding, the label check) is segdist.data.sample's.

Corrupt data (`data.on_corrupt`): a sample whose bytes are cut short or do not decode raises
`CorruptSample`, naming the shard and the key. With "fail" (the default) training stops there. With
"skip" a warning is logged for each broken sample (once per process, with the running counts) and position t takes
the next sample of its pass (t+1, t+2, ..., wrapping) that decodes, augmented with t's seed: still a
pure function of the seed and the data, whatever the layout. Masks that decode but hold a label that
is neither a class nor the ignore index, or that differ from the image in size, are not corruption
but wrong data or a wrong class count: they always fail. Evaluation never skips: its totals must be
exact.

The loaders are NOT passed to `accelerator.prepare` (docs/design-notes.md: it would dispatch or
re-split them); batches are moved to the device by the train step.
"""

from __future__ import annotations

import itertools
import logging
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from segdist.data.augment import seed_pipeline
from segdist.data.colour import ColourJitter
from segdist.data.draws import Draws, uniforms
from segdist.data.geometry import DeviceGeometry
from segdist.data.held import HeldSplit
from segdist.data.location import ShardSource
from segdist.data.manifest import Manifest, check_indexed
from segdist.data.sampling import draws
from segdist.data.collate import mask_tensor, pad_collate
from segdist.data.sample import CorruptSample, decode_sample, read_sample, read_shard
from segdist.distributed import init_loader_worker
from segdist.errors import UserError

log = logging.getLogger("segdist")

ON_CORRUPT = ("fail", "skip")


def _slot() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


# -- training: which sample sits at each position --------------------------------------------------
class PassOrder:
    """The manifest index of the sample at each position of a pass; see the module docstring.

    `shard_samples`: the samples of each shard, in manifest order. `block`: a block of shards holds at
    least this many samples, shuffled together (0: no sample shuffle, the shards' own order).
    `probabilities`: rare-class sampling's P(i) in manifest order, None for uniform passes."""

    def __init__(self, shard_samples: list[int], seed: int, block: int,
                 probabilities: np.ndarray | None = None) -> None:
        self.shard_samples = [int(n) for n in shard_samples]
        self.starts = np.cumsum([0, *self.shard_samples])
        self.size = int(self.starts[-1])
        self.seed, self.block, self.probabilities = seed, block, probabilities
        self._cached: tuple[int, np.ndarray] | None = None

    def blocks(self, p: int) -> list[list[int]]:
        """Pass p's shards (manifest positions) in the order it reads them, cut into blocks."""
        order = np.random.default_rng([self.seed, p]).permutation(len(self.shard_samples))
        out, current, held = [], [], 0
        for shard in order.tolist():
            current.append(shard)
            held += self.shard_samples[shard]
            if held >= max(self.block, 1):
                out.append(current)
                current, held = [], 0
        if current:
            out.append(current)
        return out

    def __call__(self, p: int) -> np.ndarray:
        """The pass's N positions (manifest indices, int64); the last pass asked is kept."""
        if self._cached is not None and self._cached[0] == p:
            return self._cached[1]
        counts = draws(self.probabilities, self.seed, p) if self.probabilities is not None else None
        parts = []
        for b, shards in enumerate(self.blocks(p)):
            ids = np.concatenate([np.arange(self.starts[s], self.starts[s + 1]) for s in shards])
            if counts is not None:
                ids = np.repeat(ids, counts[ids])
            if self.block:
                ids = np.random.default_rng([self.seed, p, 1, b]).permutation(ids)
            parts.append(ids)
        order = np.concatenate(parts).astype(np.int64)
        assert len(order) == self.size, (len(order), self.size)
        self._cached = (p, order)
        return order

    def sample_at(self, t: int) -> int:
        """The manifest index of the sample at run position t."""
        p, i = divmod(t, self.size)
        return int(self(p)[i])


class GlobalBatches(Sampler):
    """One rank's micro-batches of run positions, endless, from position `start` (a whole number of
    global batches): global batch k is [kG, (k+1)G), G = world x batch_size x grad_accum; rank r takes
    [kG + r*G/world, kG + (r+1)*G/world), in `grad_accum` micro-batches of `batch_size`."""

    def __init__(self, rank: int, world: int, batch_size: int, grad_accum: int = 1, start: int = 0) -> None:
        self.rank, self.world, self.batch_size, self.grad_accum = rank, world, batch_size, grad_accum
        self.global_batch = world * batch_size * grad_accum
        if start % self.global_batch:
            raise ValueError(f"start {start} is not a whole number of global batches of {self.global_batch}")
        self.start = start

    def __iter__(self) -> Iterator[list[int]]:
        share = self.batch_size * self.grad_accum
        for k in itertools.count(self.start // self.global_batch):
            first = k * self.global_batch + self.rank * share
            for a in range(self.grad_accum):
                yield list(range(first + a * self.batch_size, first + (a + 1) * self.batch_size))


class SampleAugment:
    """What the loader does to training samples: per sample, the CPU pipeline seeded by (seed, t, 2)
    (or, with geometry on the device, nothing: the frame stays as stored); per batch (`batch`), the
    samples stacked, with geometry on the device their placements drawn from each position's numbers
    (segdist.data.draws, stream 2), and the colour factors from stream 3 when the preset jitters colour."""

    def __init__(self, transform: Callable, seed: int, colour: ColourJitter | None = None) -> None:
        self.transform, self.seed, self.colour = transform, seed, colour
        self.device = isinstance(transform, DeviceGeometry)

    def __call__(self, image: np.ndarray, mask: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Decoded sample t as a batch takes it: (image, mask, t)."""
        if not self.device:
            rng = np.random.default_rng([self.seed, t, 2])
            seed_pipeline(self.transform, int(rng.integers(1 << 31)))
            out = self.transform(image=image, mask=mask)
            image, mask = np.ascontiguousarray(out["image"]), np.ascontiguousarray(out["mask"])
        return image, mask, t

    def collate(self, items: list[tuple[np.ndarray, np.ndarray, int]]) -> tuple:
        """A batch of what `__call__` returned."""
        images, masks, positions = zip(*items)
        return self.batch(images, masks, np.asarray(positions, np.int64))

    def batch(self, images, masks, positions: np.ndarray) -> tuple:
        """(images, masks) batched: stacked crops, or with geometry on the device the stored frames in
        one canvas and their placements (DeviceGeometry.collate); then the colour factors, if any.
        `images` and `masks`: sequences of arrays, or (geometry on the device) arrays of N frames of
        one size."""
        if self.device:
            if isinstance(masks, np.ndarray):  # N frames of one size
                heights, widths = np.full(len(masks), masks.shape[1]), np.full(len(masks), masks.shape[2])
            else:
                heights, widths = np.array([m.shape[0] for m in masks]), np.array([m.shape[1] for m in masks])
            matrices = self.transform.draw(Draws(self.seed, positions, 2), heights, widths)
            out = self.transform.collate(images, masks, matrices)
        else:
            out = (torch.stack([torch.from_numpy(i) for i in images]), torch.stack([mask_tensor(m) for m in masks]))
        if self.colour is None:
            return out
        return *out, torch.from_numpy(self.colour.factors(uniforms(self.seed, positions, 3, 5)))


class _Skips:
    """What one process skipped under on_corrupt = "skip": every skip counted, a warning for each
    sample the first time (a broken sample is met again every pass, and by the positions after it)."""

    def __init__(self) -> None:
        self.samples = 0
        self.warned: set[tuple[str, str]] = set()

    def sample(self, exc: CorruptSample) -> None:
        self.samples += 1
        if (exc.url, exc.key) in self.warned:
            return
        self.warned.add((exc.url, exc.key))
        log.warning("data.on_corrupt=skip: skipping sample %s of shard %s (it %s); %d broken samples met by this "
                    "process so far, %d skips", exc.key, exc.url, exc.reason, len(self.warned), self.samples)


class TrainStream(Dataset):
    """Training batches by run position (a map-style dataset: `train_loader` asks for the positions
    of each micro-batch by `GlobalBatches`, `__getitems__` returns the batch); see the module
    docstring. `manifest` must hold member offsets (segdist.data.manifest.check_indexed).
    `in_memory`: read and decode the whole split now and gather batches from memory
    (segdist.data.held); the batches are the same."""

    def __init__(
        self,
        manifest: Manifest,
        *,
        seed: int,
        transform: Callable,
        shuffle_buffer: int,
        on_corrupt: str = "fail",
        probabilities: np.ndarray | None = None,
        colour: ColourJitter | None = None,
        reduce_for: Callable[[int, int], int] | None = None,
        in_memory: bool = False,
    ) -> None:
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
        check_indexed(manifest)
        self.samples = manifest.located()  # (shard, key, member offsets) of every sample, in manifest order
        self.order = PassOrder([s.samples for s in manifest.shards], seed, shuffle_buffer, probabilities)
        self.augment = SampleAugment(transform, seed, colour)
        self.reduce_for = reduce_for  # JPEGs decoded at the scale the preset shrinks them to first
        self.num_classes, self.ignore_index = manifest.num_classes, manifest.ignore_index
        self.on_corrupt = on_corrupt
        self._skips = _Skips()
        self.held = (HeldSplit(self.samples, self.num_classes, self.ignore_index, reduce_for, on_corrupt)
                     if in_memory else None)

    def decoded(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(image, mask) of the sample at manifest index `index`, decoded for training."""
        if self.held is not None:
            return self.held.decoded(index)
        raw = read_sample(*self.samples[index])
        _, image, mask = decode_sample(raw, self.num_classes, self.ignore_index, self.reduce_for)
        return image, mask

    def __getitem__(self, t: int) -> tuple[np.ndarray, np.ndarray, int]:
        p, i = divmod(int(t), self.order.size)
        order = self.order(p)
        for step in range(self.order.size):
            try:
                image, mask = self.decoded(int(order[(i + step) % self.order.size]))
                break
            except CorruptSample as exc:
                if self.on_corrupt == "fail":
                    raise
                self._skips.sample(exc)
        else:
            raise UserError(f"no sample of the training split decodes ({self.order.size} tried): the shards are "
                            "broken; run launch/shard.py verify --deep and re-convert")
        return self.augment(image, mask, int(t))

    def gathered(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """(images, masks) at `positions` in one gather each, when the split is held, decodes whole,
        shares one frame size and goes to the device as stored; else None (sample by sample)."""
        if self.held is None or not self.held.stacked or not self.augment.device:
            return None
        passes, at = np.divmod(positions, self.order.size)
        if passes[0] == passes[-1]:  # a micro-batch is consecutive positions: mostly of one pass
            ids = self.order(int(passes[0]))[at]
        else:
            ids = np.empty_like(positions)
            for p in np.unique(passes).tolist():
                ids[passes == p] = self.order(p)[at[passes == p]]
        return self.held.images[ids], self.held.masks[ids]

    def __getitems__(self, positions: list[int]) -> tuple:
        """The batch of the samples at `positions`."""
        positions = np.asarray(positions, np.int64)
        frames = self.gathered(positions)
        if frames is not None:
            return self.augment.batch(*frames, positions)
        return self.augment.collate([self[t] for t in positions.tolist()])


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


def _as_batched(batch: tuple) -> tuple:
    """`TrainStream.__getitems__` returns whole batches: nothing is left to collate."""
    return batch


def train_loader(stream: TrainStream, batches: GlobalBatches, num_workers: int, pin_memory: bool) -> DataLoader:
    """This rank's micro-batches, endless, as `stream.__getitems__` makes them, in `batches`' order
    whatever the worker count (the DataLoader hands micro-batches to workers in turn and returns them
    in order)."""
    return DataLoader(
        stream, batch_sampler=batches, num_workers=num_workers, pin_memory=pin_memory,
        collate_fn=_as_batched, persistent_workers=False, prefetch_factor=4 if num_workers else None,
        worker_init_fn=init_loader_worker,  # signals are the training process's to handle
    )


def eval_loader(stream: EvalStream, num_workers: int, pin_memory: bool) -> DataLoader:
    """The stream's groups as batches (batch size = `stream.group`; each slot yields whole groups,
    so no batch mixes two), padded by `pad_collate` with the stream's ignore index."""
    return DataLoader(
        stream, batch_size=stream.group, num_workers=num_workers, pin_memory=pin_memory,
        collate_fn=pad_collate(stream.ignore_index), worker_init_fn=init_loader_worker,
    )
