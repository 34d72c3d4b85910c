"""One shard sample, in one place: the names of its members, reading them from a shard's tar,
decoding the image and the mask, the label check, padding, and 8/16-bit handling.

A sample `<key>` of a shard is the tar members `<key>.image.png`, `<key>.image.jpg` (RGB) or
`<key>.image.npy` (uncompressed HxWx3 uint8 pixels, `--image-format raw`), `<key>.mask.png` or
`<key>.mask.npy` (uncompressed, `--mask-format raw`),
the mask 8-bit, or 16-bit beyond 255 classes, and optionally `<key>.meta.json`; a key
ends at the first dot of the file name (WebDataset's rule), and a sample's members are adjacent.
The writer (segdist.data.shards), the training and eval streams (segdist.data.stream), `verify`,
the benches, prediction and the TensorBoard strips all go through this module.

A sample is read either by scanning its shard (`read_shard`) or by position (`read_sample`), from
the member offsets the manifest records (`shard_members` finds them in a tar): one contiguous read
per sample, a positioned read (`os.preadv`) of a kept-open local file, a range request of a remote one.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import cv2
import numpy as np
from PIL import Image

from segdist.data.location import Fetch, ShardSource, read_range
from segdist.errors import UserError

IMAGE_KINDS = {"image.png": "PNG", "image.jpg": "JPEG", "image.npy": "NPY"}
"""Image members by kind, with the format they must hold (NPY: numpy's array file, not PIL's)."""
_NPY_MAGIC = b"\x93NUMPY"
MASK_KIND = "mask.png"
MASK_KINDS = (MASK_KIND, "mask.npy")
"""Mask members: PNG, or uncompressed (`--mask-format raw`)."""
META_KIND = "meta.json"
PAD_MULTIPLE = 32
"""Batches and single images are padded to a multiple of this (what smp encoders need): images with
0 (black), masks with the ignore index, so padded pixels never count."""

# cv2 decodes JPEG and PNG faster than PIL (BENCHMARKS.md) and straight into a writable RGB array.
# EXIF orientation is ignored, as PIL does: the mask was drawn on the stored pixels, not on a turned view.
_CV2_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)
_CV2_FLAGS = (cv2.IMREAD_COLOR if _CV2_RGB is None else _CV2_RGB) | cv2.IMREAD_IGNORE_ORIENTATION


class ShardError(UserError):
    """A shard that cannot be read to its end; the samples before the damage were read."""

    def __init__(self, path: str | Path, samples: int | None = None, reason: str | None = None) -> None:
        if reason is None:  # rebuilt from its message alone (a DataLoader worker's, by torch): keep its type
            self.path = self.samples = self.reason = None
            super().__init__(path)
            return
        self.path, self.samples, self.reason = str(path), samples, reason
        after = "" if samples is None else f" after {samples} samples"  # None: read by position, not scanned
        super().__init__(
            f"shard {path} is truncated or corrupt{after} ({reason}); "
            "run launch/shard.py verify on its folder and re-convert, or set data.on_corrupt = \"skip\""
        )


class CorruptSample(UserError):
    """A sample whose image or mask is missing or does not decode."""

    def __init__(self, key: str, url: str | None = None, reason: str | None = None) -> None:
        if reason is None:  # rebuilt from its message alone, as ShardError
            self.key = self.url = self.reason = None
            super().__init__(key)
            return
        self.key, self.url, self.reason = key, url, reason
        super().__init__(
            f"sample {key} in {url} {reason}; run launch/shard.py verify --deep and re-convert, "
            "or set data.on_corrupt = \"skip\""
        )


# -- member names -------------------------------------------------------------------------------
def member_name(key: str, kind: str) -> str:
    return f"{key}.{kind}"


def split_member(name: str) -> tuple[str, str] | None:
    """(key, kind) of a member name, as WebDataset's base_plus_ext splits it (the key ends at the
    first dot of the file name, and keeps its folder); None when there is no kind."""
    folder, _, file = name.rpartition("/")
    key, dot, kind = file.partition(".")
    if not key or not dot or not kind:
        return None
    return (f"{folder}/{key}" if folder else key), kind.lower()


# -- reading a shard ----------------------------------------------------------------------------
def read_members(shard: str | Path | ShardSource) -> Iterator[tuple[str, bytes | None]]:
    """(name, bytes) of every member of a shard's tar in file order (bytes None for a non-file member).

    A local shard (a path, or a source whose root is local or whose verified copy is in the cache)
    is read with `tarfile`; a remote one streams through `location.Fetch` and webdataset's tar
    iterator, and must match the manifest's sha256 once read whole. A missing or refused file is a
    `UserError`. A damaged tar raises `tarfile.TarError` (or EOFError/OSError) once the members
    before the damage were yielded. A local file that ends exactly between two members is caught
    too: our writer always ends a shard with tar's end-of-archive marker, and `tarfile` alone would
    take its absence for a normal end (a remote one fails its sha256).
    """
    if isinstance(shard, ShardSource):
        cached = shard.cached()
        if shard.remote and cached is None:
            yield from _fetched_members(shard)
            return
        shard = cached if cached is not None else shard.address
    try:
        f = open(shard, "rb")
    except OSError as exc:
        raise _cannot_open(shard, exc) from None
    with f:
        tar = tarfile.open(fileobj=f, mode="r:")
        for member in tar:
            yield member.name, (tar.extractfile(member).read() if member.isfile() else None)
        f.seek(tar.offset)
        end = f.read(2 * tarfile.BLOCKSIZE)
        if len(end) < 2 * tarfile.BLOCKSIZE or any(end):
            # tarfile stops silently at a damaged header or at a cut between members.
            raise tarfile.ReadError("no end-of-archive marker where the members end")


def _cannot_open(shard: str | Path, exc: OSError) -> UserError:
    return UserError(f"shard {shard} cannot be opened ({exc.strerror or exc}): re-run the conversion or fix data.root")


def _fetched_members(source: ShardSource) -> Iterator[tuple[str, bytes]]:
    from webdataset.tariterators import tar_file_iterator

    fetch = Fetch(source)
    try:
        for item in tar_file_iterator(fetch, skip_meta=None):
            yield item["fname"], item["data"]
        problem = fetch.finish()
        if problem is not None:
            raise tarfile.ReadError(problem)
    finally:
        fetch.close()


def read_shard(path: str | Path | ShardSource) -> Iterator[dict]:
    """Raw samples of one shard in file order: `__key__`, `__url__` and the bytes of each member
    under its kind (non-file members are passed over). A shard that breaks off is a `ShardError`
    once the complete samples before the damage were yielded (the sample in progress is dropped)."""
    url, done, current = str(path), 0, None
    try:
        for name, data in read_members(path):
            parts = split_member(name) if data is not None else None
            if parts is None:
                continue
            key, kind = parts
            if current is None or key != current["__key__"]:
                if current is not None:
                    yield current
                    done += 1
                current = {"__key__": key, "__url__": url}
            current[kind] = data
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise ShardError(path, done, str(exc) or type(exc).__name__) from None
    if current is not None:
        yield current


# -- reading one sample by position -------------------------------------------------------------
def shard_members(f: BinaryIO) -> list[list]:
    """The member offsets of a shard's tar as the manifest records them (`ShardInfo.members`): per
    sample in file order `[key, [[kind, offset, size], ...]]`, grouped and named as `read_shard`
    groups and names them (non-file members and names without a kind passed over). Reads `f` front
    to back once, never seeking, so the caller can hash what passes (`launch/shard.py index`); a
    damaged tar raises `tarfile.TarError` (or EOFError/OSError)."""
    samples: list[list] = []
    with tarfile.open(fileobj=f, mode="r|", bufsize=1 << 20) as tar:
        for member in tar:
            parts = split_member(member.name) if member.isfile() else None
            if parts is None:
                continue
            key, kind = parts
            if not samples or samples[-1][0] != key:
                samples.append([key, []])
            samples[-1][1].append([kind, member.offset_data, member.size])
    return samples


class _OpenShards:
    """Read-only descriptors of local shard files, the `size` most recently read kept open (an LRU
    keyed by the path as given): a sample read by position costs one `os.preadv`, not an open. The
    read goes into a scratch buffer kept for the next one, and the members are copied out of it: a
    fresh buffer per span is fresh memory from the allocator each time (glibc hands large blocks back
    to the system), and faulting its pages in cost more than the read itself (4.9 MB spans from the
    page cache: 82 samples/s so, 586 with the kept buffer, on a 2-core AMD EPYC VM). A forked child
    (a DataLoader worker) starts with none of its own (`forget`, run after every fork), and a lock
    makes it safe for threads (held for the read too: a descriptor is never closed, nor the buffer
    reused, under a reader)."""

    def __init__(self, size: int = 32) -> None:
        self.size = size
        self.forget()

    def forget(self) -> None:
        """Close every kept descriptor (in a forked child: its copies; the parent's stay open)."""
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._scratch = bytearray()
        self._lock = threading.Lock()

    def _fd(self, key: str) -> int:
        fd = self._fds.get(key)
        if fd is None:
            fd = os.open(key, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            self._fds[key] = fd
            while len(self._fds) > self.size:
                os.close(self._fds.popitem(last=False)[1])
        else:
            self._fds.move_to_end(key)
        return fd

    def read(self, path: str | Path, start: int, size: int, members: list) -> tuple[int, dict[str, bytes]]:
        """(bytes the file holds of the `size` from `start`, the `[kind, offset, size]` members cut
        out of them as {kind: bytes}, `_cut`); where the file ends first, the count is short and no
        member is cut. OSError when the file cannot be opened."""
        with self._lock:
            fd = self._fd(str(path))
            if len(self._scratch) < size:
                self._scratch = bytearray(size)
            view, done = memoryview(self._scratch)[:size], 0
            try:
                while done < size:  # a read may bring less than asked (the end of the file, or >2 GB)
                    got = os.preadv(fd, [view[done:]], start + done)
                    if not got:
                        break
                    done += got
                return done, (_cut(view, start, members) if done == size else {})
            finally:
                view.release()


def _cut(span: memoryview, start: int, members: list) -> dict[str, bytes]:
    """{kind: bytes} of the `[kind, offset, size]` members of a span read from byte `start`, which
    begins with the first member's tar header: each member's header (the 512 bytes before its data)
    must give its kind and size, else ValueError says which does not (a shard changed after the
    manifest recorded its offsets would otherwise hand over other bytes, which may even decode)."""
    out = {}
    for kind, offset, length in members:
        header = bytes(span[offset - start - tarfile.BLOCKSIZE: offset - start])
        name = header[:100].split(b"\0", 1)[0]
        prefix = header[345:500].split(b"\0", 1)[0]
        name = (prefix + b"/" + name if prefix else name).decode("utf-8", "replace")
        try:
            stored = int(header[124:136].strip(b"\0 ") or b"0", 8)
        except ValueError:
            stored = -1
        if not name.lower().endswith("." + kind) or stored != length:
            raise ValueError(f"the tar header before byte {offset} holds {name!r} of {stored} bytes, the manifest "
                             f"says a {kind} of {length}")
        out[kind] = bytes(span[offset - start: offset - start + length])
    return out


_OPEN_SHARDS = _OpenShards()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_OPEN_SHARDS.forget)


def read_sample(source: str | Path | ShardSource, key: str, members: list) -> dict:
    """The raw sample `key` of a shard, exactly as `read_shard` yields it (`__key__`, `__url__` =
    `str(source)`, the bytes of each member under its kind), from its `members` as the manifest
    records them (`[[kind, offset, size], ...]`), without scanning the shard: ONE contiguous read,
    from the first member's tar header to the last member's end, every member's header checked
    against the manifest (a changed shard is a `CorruptSample`), sliced into the members.

    - a local shard (a path, a local source, or a remote one whose verified copy is in the cache):
      one `os.preadv` on a descriptor kept open (`_OpenShards`); a missing file is a `UserError`;
    - a remote shard with a `cache_dir`: fetched whole once (sha256 checked, then kept there,
      `ShardSource.ensure_cached`) and read locally; a shard that is not the manifest's is a `ShardError`;
    - a remote shard without one: a range read (`location.read_range`; a `pipe:` root cannot).

    A read that comes back short (a truncated shard) is a `CorruptSample`; bytes that do not decode
    are `decode_sample`'s to find, as for a scanned sample.
    """
    url = str(source)
    sample = {"__key__": key, "__url__": url}
    if not members:
        return sample  # decode_sample names what it lacks
    first = min(offset for _, offset, _ in members)
    start = first - tarfile.BLOCKSIZE  # from the first member's tar header: `_cut` checks every header
    size = max(offset + length for _, offset, length in members) - start
    path: str | Path | None = source
    if isinstance(source, ShardSource):
        path = source.address if not source.remote else None
        if source.remote and source.cache_dir is not None and source.sha256 is not None:
            try:
                path = source.ensure_cached()
            except ValueError as exc:  # fetched whole, and not the manifest's shard
                raise ShardError(url, None, str(exc)) from None
    try:
        if path is None:
            span = read_range(source, start, size)
            got, parts = len(span), (_cut(memoryview(span), start, members) if len(span) == size else {})
        else:
            try:
                got, parts = _OPEN_SHARDS.read(path, start, size, members)
            except OSError as exc:
                raise _cannot_open(path, exc) from None
    except ValueError as exc:
        raise CorruptSample(key, url, f"does not match the manifest's offsets ({exc}): the shard changed since they "
                                      "were recorded; run launch/shard.py verify on its folder") from None
    if got < size:
        held = max(0, got - tarfile.BLOCKSIZE)
        raise CorruptSample(key, url, f"is cut short: the shard holds {held} of its {size - tarfile.BLOCKSIZE} bytes "
                                      f"from byte {first}")
    sample.update(parts)
    return sample


def make_sample(key: str, url: str, image: bytes, image_kind: str, mask: bytes) -> dict:
    """A raw sample as `read_shard` yields it, from bytes found elsewhere (a folder of files)."""
    return {"__key__": key, "__url__": url, image_kind: image, MASK_KIND: mask}


# -- decoding and the label check ---------------------------------------------------------------
_NPY_HEADER = re.compile(rb"\{'descr': '([<>|=][a-z]\d+)', 'fortran_order': (False|True), 'shape': \((\d+(?:, \d+)*),?\), \} *\n")


def _npy_header(data: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int] | None:
    """(shape, Fortran order, dtype, offset of the pixels) of `.npy` (format 1.0) bytes, or None.
    The header as `np.save` writes it is read with one regular expression (numpy's own reader, which
    evaluates the header as a Python literal, took ~40 us of the ~50 a raw 384x281 frame costs);
    any other spelling goes through numpy's reader."""
    if len(data) < 10 or data[:8] != _NPY_MAGIC + b"\x01\x00":
        return None
    offset = 10 + int.from_bytes(data[8:10], "little")
    found = _NPY_HEADER.fullmatch(data, 10, offset)
    if found is not None:
        shape = tuple(int(v) for v in found[3].split(b", "))
        return shape, found[2] == b"True", np.dtype(found[1].decode()), offset
    buf = io.BytesIO(data)
    try:
        np.lib.format.read_magic(buf)
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf)
    except ValueError:
        return None
    return shape, fortran, dtype, buf.tell()


def decode_raw(data: bytes, image: bool = True) -> np.ndarray | None:
    """The pixels of `.npy` bytes: an HxWx3 uint8 image (`image`), else an HxW uint8 or uint16 mask;
    None unless the header says such a C-order array and the bytes after it are exactly that many
    (a cut or padded member is corrupt, not reshaped)."""
    header = _npy_header(data)
    if header is None:
        return None
    shape, fortran, dtype, offset = header
    if image:
        ok = dtype == np.uint8 and len(shape) == 3 and shape[2] == 3
    else:
        ok = dtype in (np.uint8, np.uint16) and len(shape) == 2
    if fortran or not ok or min(shape) < 1 or len(data) - offset != int(np.prod(shape)) * dtype.itemsize:
        return None
    return np.frombuffer(data, dtype, offset=offset).reshape(shape).copy()  # writable, for torch


def decode_mask(data: bytes) -> np.ndarray:
    """An HxW mask of stored mask bytes (PNG or raw `.npy`); bytes that do not decode raise ValueError."""
    if data[:6] == _NPY_MAGIC:
        mask = decode_raw(data, image=False)
        if mask is None:
            raise ValueError("its bytes do not match the shape its header records")
        return mask
    return np.array(Image.open(io.BytesIO(data)))  # writable, for torch


REDUCTIONS = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}
"""JPEG decodes at 1/2, 1/4 or 1/8 scale in the DCT (libjpeg's scaled IDCT): less work, and a smaller
frame for what follows; the result is ceil(H / k) x ceil(W / k)."""


def is_jpeg(data: bytes) -> bool:
    return data[:2] == b"\xff\xd8"


def decode_image(data: bytes, reduce: int = 1) -> np.ndarray | None:
    """HxWx3 uint8 RGB pixels of stored image bytes (PNG, JPEG or raw `.npy`), or None if they do not
    decode. `reduce` (2, 4 or 8) decodes a JPEG at that fraction of its size; other kinds ignore it."""
    if data[:6] == _NPY_MAGIC:
        return decode_raw(data)
    flags = _CV2_FLAGS
    if reduce > 1 and is_jpeg(data):
        flags = (REDUCTIONS[reduce] & ~cv2.IMREAD_COLOR) | (cv2.IMREAD_COLOR if _CV2_RGB is None else _CV2_RGB)
        flags |= cv2.IMREAD_IGNORE_ORIENTATION
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if image is not None and _CV2_RGB is None:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return image


def image_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's header alone (no decode), None when it cannot be read."""
    try:
        width, height = Image.open(io.BytesIO(data)).size
    except Exception:  # noqa: BLE001 - the decode that follows names the damage
        return None
    return height, width


def label_counts(mask: np.ndarray, num_classes: int, ignore_index: int) -> tuple[np.ndarray, int | None]:
    """(pixels per class, the smallest label that is neither a class nor the ignore index, or None):
    the one label check, a single `bincount` (a few ms at 2048x1024)."""
    counts = np.bincount(mask.ravel(), minlength=max(num_classes, ignore_index + 1))
    bad = np.flatnonzero(counts)
    bad = bad[(bad >= num_classes) & (bad != ignore_index)]
    return counts[:num_classes], (int(bad[0]) if bad.size else None)


def stray_label(mask: np.ndarray, num_classes: int, ignore_index: int) -> int | None:
    """The smallest label of `mask` that is neither a class nor the ignore index, or None: the check
    every training sample passes. Only which labels occur matters here, so 8-bit masks take cv2's
    histogram (float32 counts, but a label that occurs never counts 0; 4x faster than `bincount`
    at 375x500); `label_counts` gives exact counts where they are kept (the manifest, verify)."""
    if mask.dtype != np.uint8:
        return label_counts(mask, num_classes, ignore_index)[1]
    # The usual answer, None, from the mask's maximum (one vectorised pass, ~2 us at 384x281 against
    # ~110 us for the histogram), and where the ignore index is that maximum, a count of the labels
    # between the classes and it; the histogram only finds which stray label a bad mask holds.
    top = int(mask.max())
    if top < num_classes:
        return None
    if top == ignore_index and not cv2.countNonZero(cv2.inRange(mask, num_classes, ignore_index - 1)):
        return None
    present = np.flatnonzero(cv2.calcHist([mask], [0], None, [256], [0, 256]).ravel())
    bad = present[(present >= num_classes) & (present != ignore_index)]
    return int(bad[0]) if bad.size else None


def _member(sample: dict, kinds) -> bytes:
    data = next((sample[kind] for kind in kinds if kind in sample), None)
    if data is None:
        raise CorruptSample(sample["__key__"], sample.get("__url__"),
                            "lacks an image (image.png/image.jpg/image.npy) or a mask (mask.png/mask.npy)")
    return data


def sample_image(sample: dict, reduce_for: Callable[[int, int], int] | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """(HxWx3 uint8 RGB image, the frame's full (height, width)): the image half of `decode_sample`."""
    data = _member(sample, IMAGE_KINDS)
    _member(sample, MASK_KINDS)  # a sample without its mask is named before any decoding
    reduce, size = 1, None
    if reduce_for is not None and is_jpeg(data):
        size = image_size(data)
        reduce = reduce_for(*size) if size is not None else 1
    image = decode_image(data, reduce)
    if image is None:
        raise CorruptSample(sample["__key__"], sample.get("__url__"), "has an image that does not decode")
    return image, (size if reduce > 1 else image.shape[:2])


def sample_mask(sample: dict, num_classes: int, ignore_index: int, full: tuple[int, int],
                shape: tuple[int, int]) -> np.ndarray:
    """The mask half of `decode_sample`: decoded, checked against the image's full size `full` and the
    label set, then (when the image was decoded reduced, to `shape`) shrunk with nearest neighbour."""
    key, url = sample["__key__"], sample.get("__url__")
    data = _member(sample, MASK_KINDS)
    try:
        mask = decode_mask(data)
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... on damaged bytes
        raise CorruptSample(key, url, f"has a mask that does not decode ({exc})") from None
    if mask.ndim != 2 or mask.dtype not in (np.uint8, np.uint16):
        raise UserError(f"sample {key} in {url}: mask is not 8- or 16-bit single-channel; re-run the conversion")
    if tuple(full) != mask.shape:
        raise UserError(f"sample {key} in {url}: image {tuple(full)} and mask {mask.shape} differ in size; "
                        "re-run the conversion")
    bad = stray_label(mask, num_classes, ignore_index)
    if bad is not None:
        raise UserError(
            f"sample {key} in {url}: mask label {bad} is not below "
            f"{num_classes} classes nor ignore {ignore_index}; fix model.classes or the data"
        )
    if tuple(shape) != mask.shape:  # the grid INTER_AREA / INTER_LINEAR use, as everywhere masks are resized
        mask = cv2.resize(mask, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST_EXACT)
    return mask


def decode_sample(sample: dict, num_classes: int, ignore_index: int,
                  reduce_for: Callable[[int, int], int] | None = None) -> tuple[str, np.ndarray, np.ndarray]:
    """(key, HxWx3 uint8 RGB image, HxW uint8 mask — uint16 when the shard stores 16-bit masks).

    Missing or undecodable bytes raise `CorruptSample`; a mask of another size than its image, or
    with a value that is neither a class nor the ignore index, raises `UserError`. All name the key.
    `reduce_for(height, width)` (training only: the factor the preset shrinks a frame of that size by
    first, as a power of two, segdist.data.augment.decode_reduction) decodes a JPEG image at that
    fraction; its mask, checked at full size, is then shrunk to the image with nearest neighbour.
    """
    image, full = sample_image(sample, reduce_for)
    return sample["__key__"], image, sample_mask(sample, num_classes, ignore_index, full, image.shape[:2])


# -- padding and bit depth ----------------------------------------------------------------------
def padded_size(height: int, width: int, multiple: int = PAD_MULTIPLE) -> tuple[int, int]:
    """The size a batch of this size is padded to."""
    return -(-height // multiple) * multiple, -(-width // multiple) * multiple


def pad_image(image: np.ndarray, multiple: int = PAD_MULTIPLE) -> np.ndarray:
    """HxWx3 image padded with black at the bottom and right to a multiple of `multiple`."""
    h, w = image.shape[:2]
    out = np.zeros((*padded_size(h, w, multiple), *image.shape[2:]), dtype=image.dtype)
    out[:h, :w] = image
    return out


def to_uint8(values: np.ndarray) -> np.ndarray:
    """16-bit pixel values scaled to 8 bits over the full 0..65535 range, rounded (PIL would clip)."""
    return ((np.clip(values.astype(np.int64), 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
