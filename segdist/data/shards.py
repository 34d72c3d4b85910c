"""Writing a split as WebDataset tar shards plus its manifest, atomically and reproducibly.

Every shard of a conversion is written under a temporary name (`.<split>-NNNNNN.tar.tmp`) and
nothing under a final name changes until `close()`: it removes the old manifest, renames the new
shards into place, deletes the split's stale shards and writes the new manifest last. So an
interrupted conversion (exception, Ctrl-C, `abort()`) leaves the previous conversion — shards and
manifest — exactly as it was, and a crash inside `close()` leaves no manifest (readers refuse the
split) rather than a manifest that describes other shards. The price: old and new shards of a
split are on disk together until `close()`. The same samples in the same order give byte-identical
shards (fixed tar headers).
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from segdist.data.manifest import Manifest, ShardInfo, manifest_path, sha256_file
from segdist.data.sample import MASK_KIND, META_KIND, label_counts, member_name, split_member
from segdist.errors import UserError
from segdist.fileio import atomic_write_json, fsync_path


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of an HxW (uint8 or uint16) or HxWx3 uint8 array, deterministic."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def encode_jpeg(array: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    return buf.getvalue()


def encode_raw(array: np.ndarray) -> bytes:
    """Uncompressed pixels (an HxWx3 uint8 image, an HxW uint8/uint16 mask) as `.npy` bytes: numpy's
    header records the shape and dtype, so reading costs a header parse and one copy, no decode
    (`segdist.data.sample.decode_raw`)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


MASK_FORMATS = {"png": MASK_KIND, "raw": "mask.npy"}
"""--mask-format → the member kind it writes."""


def encode_mask(mask: np.ndarray, num_classes: int, mask_format: str = "png") -> bytes:
    """8-bit, or 16-bit when there are more than 255 classes (ignore stays in range): PNG, or raw."""
    dtype = np.uint8 if num_classes <= 255 else np.uint16
    mask = mask.astype(dtype, copy=False)
    return encode_raw(mask) if mask_format == "raw" else encode_png(mask)


def count_class_pixels(mask: np.ndarray, num_classes: int, ignore_index: int, key: str) -> np.ndarray:
    """Per-class pixel counts of a train-id mask; a value that is neither a class nor ignore is a UserError."""
    counts, bad = label_counts(mask.astype(np.int64, copy=False), num_classes, ignore_index)
    if bad is not None:
        raise UserError(
            f"sample {key}: mask holds label {bad} but there are {num_classes} classes "
            f"(valid: 0..{num_classes - 1} or ignore {ignore_index}); fix the mask or the class list"
        )
    return counts


class ShardWriter:
    """Write samples into `<out>/<split>-NNNNNN.tar` and, on `close()`, `<out>/<split>.json`."""

    def __init__(
        self,
        out: str | os.PathLike,
        split: str,
        *,
        dataset: str,
        classes: list[str],
        palette: list[list[int]],
        ignore_index: int = 255,
        samples_per_shard: int,
        shard_size_mb: float | None = None,
        source: dict | None = None,
        options: dict | None = None,
        mask_format: str = "png",
    ) -> None:
        if mask_format not in MASK_FORMATS:
            raise ValueError(f"mask_format must be one of {sorted(MASK_FORMATS)}, got {mask_format!r}")
        self.mask_format = mask_format
        self.out = Path(out)
        self.split = split
        self.dataset = dataset
        self.classes = list(classes)
        self.palette = [list(map(int, c)) for c in palette]
        self.ignore_index = ignore_index
        self.samples_per_shard = samples_per_shard
        self.shard_bytes = int(shard_size_mb * 1e6) if shard_size_mb else None
        self.source = source or {}
        self.options = options or {}
        self.class_pixels = np.zeros(len(self.classes), dtype=np.int64)
        self.shards: list[ShardInfo] = []
        self._keys: set[str] = set()
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._done: list[Path] = []  # finished shards of this run, still under temporary names
        self._count = 0
        self._sample_classes: list[list[list[int]]] = []  # of the shard in progress
        self._members: list[list] = []  # of the shard in progress: [key, [[kind, offset, size], ...]] per sample
        self._sizes: dict[str, list[list[int]]] = {}  # "stored"/"source" -> [[min h, min w], [max h, max w]]
        self._own = re.compile(re.escape(split) + r"-\d{6}\.tar")  # train-000000.tar, not train-aug-000000.tar
        self._own_tmp = re.compile(r"\." + re.escape(split) + r"-\d{6}\.tar\.tmp")
        self.out.mkdir(parents=True, exist_ok=True)

    # -- writing -------------------------------------------------------------------------------
    def write(self, key: str, image: bytes, image_ext: str, mask: np.ndarray, meta: dict | None = None,
              source_size: tuple[int, int] | None = None) -> None:
        """Add one sample: encoded image bytes (`png`/`jpg`/`npy`), a train-id mask array, optional
        meta, and the (height, width) of the source frame when the stored one was resized."""
        if key in self._keys:
            raise UserError(f"sample key {key!r} occurs twice in split {self.split!r}: source file names must be unique")
        if "." in key:
            raise ValueError(f"sample key {key!r} must not contain '.'")
        self._keys.add(key)
        self._note_size("stored", mask.shape[:2])
        self._note_size("source", source_size or mask.shape[:2])
        counts = count_class_pixels(mask, len(self.classes), self.ignore_index, key)
        self.class_pixels += counts
        self._sample_classes.append([[int(c), int(counts[c])] for c in np.flatnonzero(counts)])
        files = {member_name(key, f"image.{image_ext}"): image,
                 member_name(key, MASK_FORMATS[self.mask_format]): encode_mask(mask, len(self.classes), self.mask_format)}
        if meta is not None:
            files[member_name(key, META_KIND)] = json.dumps(meta, sort_keys=True).encode()
        if self._tar is None:
            self._open()
        spans = []
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uname = info.gname = ""
            header = self._tar.offset
            self._tar.addfile(info, io.BytesIO(data))
            # The data follows the header (one 512-byte block in USTAR, which has no long-name
            # extension headers) and is padded to whole blocks: the tar's offset says where it went.
            padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            offset = self._tar.offset - padded
            assert offset == header + tarfile.BLOCKSIZE, f"{name}: a header of {offset - header} bytes"
            spans.append([split_member(name)[1], offset, len(data)])
        self._members.append([key, spans])
        self._count += 1
        full = self._count >= self.samples_per_shard
        if self.shard_bytes is not None:
            full = self._tar.fileobj.tell() >= self.shard_bytes
        if full:
            self._finish_shard()

    def _note_size(self, which: str, size) -> None:
        h, w = int(size[0]), int(size[1])
        low_high = self._sizes.setdefault(which, [[h, w], [h, w]])
        low_high[0] = [min(low_high[0][0], h), min(low_high[0][1], w)]
        low_high[1] = [max(low_high[1][0], h), max(low_high[1][1], w)]

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):06d}.tar"
        self._tmp = self.out / f".{name}.tmp"
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self._count = 0

    def _finish_shard(self) -> None:
        """Complete the shard in progress; it keeps its temporary name until `close()`."""
        assert self._tar is not None and self._tmp is not None
        self._tar.close()
        with open(self._tmp, "rb+") as f:
            os.fsync(f.fileno())
        # The hash of the temporary file is the hash of the final one: a rename keeps the bytes.
        self.shards.append(ShardInfo(self._tmp.name[1:-4], self._count, sha256_file(self._tmp), self._sample_classes,
                                     self._members))
        self._sample_classes, self._members = [], []
        self._done.append(self._tmp)
        self._tar, self._tmp = None, None

    # -- finishing -----------------------------------------------------------------------------
    def close(self) -> Manifest:
        """Finish the last shard, then swap the conversion in: old manifest out, new shards renamed
        into place, stale shards of this split removed, new manifest written last (atomically)."""
        if self._tar is not None and self._count:
            self._finish_shard()
        if not self.shards:
            self.abort()
            raise UserError(f"split {self.split!r} has no samples: check the source paths and split name")
        # From here until the manifest is written, the split has no manifest: a reader refuses it
        # instead of trusting a manifest that describes a mix of old and new shards.
        manifest_path(self.out, self.split).unlink(missing_ok=True)
        for tmp in self._done:
            os.replace(tmp, self.out / tmp.name[1:-4])
        self._done = []
        keep = {s.file for s in self.shards}
        for path in self.out.iterdir():
            stale_shard = self._own.fullmatch(path.name) and path.name not in keep
            if stale_shard or self._own_tmp.fullmatch(path.name):  # the latter: left by a killed run
                path.unlink()
        fsync_path(self.out)  # the renames durable before the manifest that describes them appears
        manifest = Manifest(
            dataset=self.dataset,
            split=self.split,
            classes=self.classes,
            palette=self.palette,
            ignore_index=self.ignore_index,
            num_samples=sum(s.samples for s in self.shards),
            shards=self.shards,
            class_pixels=[int(v) for v in self.class_pixels],
            source=self.source,
            options=self.options,
            frame_sizes={k: {"min": v[0], "max": v[1]} for k, v in self._sizes.items()},
            root=self.out,
        )
        atomic_write_json(manifest_path(self.out, self.split), manifest.to_json())
        return manifest

    def abort(self) -> None:
        """Delete every temporary shard of this run; the previous shards and manifest stay as they were."""
        if self._tar is not None:
            self._tar.close()
        for tmp in [*self._done, *([self._tmp] if self._tmp is not None else [])]:
            tmp.unlink(missing_ok=True)
        self._tar, self._tmp, self._done = None, None, []

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:  # also KeyboardInterrupt
            self.abort()

