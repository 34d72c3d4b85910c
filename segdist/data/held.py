"""A training split held in memory (`data.in_memory = true`): every sample read and decoded once when
training starts, each batch then gathered from memory.

Why: a small split on a light model asks more of the CPU per sample than any per-sample reader can
give. The shapes recipes' 1 GFLOP model takes ~350k samples/s on an H100 at 40 % MFU; reading,
decoding and label-checking a 64x64 PNG sample costs ~0.2 ms on one core, ~70 cores' worth
(`launch/bench.py feed`, BENCHMARKS.md). Held in memory, with the geometry on the device, a batch
costs one gather and its placement draws. Training reads the same samples at the same positions as
the streaming reader (segdist.data.stream), so a run is the same batch for batch either way.

What it costs: the decoded split in every training process's memory (`needed_bytes`), and reading
it all before the first step. The check before the run (`check_fits`) refuses a split that would
not fit. Broken samples: under `data.on_corrupt = "fail"` the first one stops the run at the start
(not when its position comes); under "skip" each is remembered and skipped when its position comes,
as the streaming reader does.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from segdist.data.manifest import Located, Manifest
from segdist.data.sample import CorruptSample, decode_sample, read_sample
from segdist.errors import UserError

log = logging.getLogger("segdist")

MEMORY_SHARE = 0.5
"""The share of the node's available memory the held copies of all local processes may take."""


def needed_bytes(manifest: Manifest) -> int | None:
    """An upper bound of one process's held copy: every sample at the split's largest stored frame
    (image, and a mask at the width its shards store); None where the manifest records no sizes."""
    stored = manifest.stored_max()
    if stored is None:
        return None
    mask_bytes = 1 if manifest.num_classes <= 255 else 2  # as segdist.data.shards.encode_mask stores them
    return manifest.num_samples * stored[0] * stored[1] * (3 + mask_bytes)


def available_bytes() -> int | None:
    """The node's available memory (Linux MemAvailable), None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_fits(manifest: Manifest, local_processes: int, available: int | None = None) -> None:
    """A `UserError` where `local_processes` held copies of the split would take more than
    `MEMORY_SHARE` of the node's available memory."""
    need = needed_bytes(manifest)
    available = available_bytes() if available is None else available
    if need is None or available is None:
        return
    if need * local_processes > MEMORY_SHARE * available:
        raise UserError(
            f"data.in_memory: split {manifest.split!r} of {manifest.root} takes up to {need / 2**20:,.1f} MiB decoded "
            f"per process ({manifest.num_samples} samples of up to {'x'.join(map(str, manifest.stored_max()))}), "
            f"x {local_processes} processes on this node, against {available / 2**20:,.1f} MiB available: set "
            "data.in_memory = false, or train from a smaller tier (launch/shard.py --max-size)")


class HeldSplit:
    """Every sample of a split decoded, by manifest index: one array of images and one of masks when
    all frames share a size (a batch is then one gather, `stacked`), else one array per sample. Every
    pass reads the same arrays: nothing may write into them (the CPU pipeline's transforms return new
    arrays; the gather copies).
    `errors[i]`: why sample i did not decode (on_corrupt = "skip"); `decoded(i)` raises it again."""

    def __init__(self, samples: Located, num_classes: int, ignore_index: int, reduce_for=None,
                 on_corrupt: str = "fail") -> None:
        started = time.perf_counter()
        images, masks, errors = [], [], {}
        for i in range(len(samples)):
            try:
                _, image, mask = decode_sample(read_sample(*samples[i]), num_classes, ignore_index, reduce_for)
            except CorruptSample as exc:
                if on_corrupt == "fail":
                    raise
                errors[i], image, mask = exc, None, None
            images.append(image)
            masks.append(mask)
        self.errors = errors
        shapes = {(im.shape, m.shape, m.dtype) for im, m in zip(images, masks) if im is not None}
        self.stacked = len(shapes) == 1 and not errors
        if self.stacked:
            self.images, self.masks = np.stack(images), np.stack(masks)
        else:
            self.images, self.masks = images, masks
        self.nbytes = sum(a.nbytes for a in (*images, *masks) if a is not None)
        log.info("data.in_memory: %d samples read and decoded in %.1f s, %.1f MiB held%s", len(images),
                 time.perf_counter() - started, self.nbytes / 2**20,
                 f", {len(errors)} broken (skipped when met)" if errors else "")

    def decoded(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(image, mask) of the sample at manifest index `index`."""
        if index in self.errors:
            raise self.errors[index]
        return self.images[index], self.masks[index]
