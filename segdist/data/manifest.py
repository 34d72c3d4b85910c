"""The manifest `<root>/<split>.json` that describes a split's shards, and its checks."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from segdist.data.location import (ShardSource, address, check_seekable, check_sources, is_remote, local_root,
                                   read_file)
from segdist.errors import UserError

FORMAT = "segdist-shards/1"


@dataclass
class ShardInfo:
    file: str
    samples: int
    sha256: str
    sample_classes: list[list[list[int]]] | None = None
    """Per sample, in shard order: [class, pixels] of each class it holds (what rare-class sampling
    reads); None in manifests converted before segdist recorded it."""
    members: list[list] | None = None
    """Per sample, in shard order: `[key, [[kind, offset, size], ...]]`, each member's kind as
    `read_shard` names it ("image.png", "mask.png", "meta.json", ...), the byte offset of its data in
    the shard file and its length: what reading one sample without scanning its shard needs
    (segdist.data.sample.read_sample). None in manifests converted before segdist recorded it
    (`launch/shard.py index` adds it)."""

    def to_json(self) -> dict:
        """The shard's entry in the manifest JSON; `members` only where recorded (absent, not null, in
        a manifest converted before it was)."""
        out = vars(self).copy()
        if out["members"] is None:
            del out["members"]
        return out


@dataclass
class Manifest:
    dataset: str
    split: str
    classes: list[str]
    palette: list[list[int]]
    ignore_index: int
    num_samples: int
    shards: list[ShardInfo]
    class_pixels: list[int]
    """Valid (non-ignored) mask pixels of each class over the whole split."""
    source: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    frame_sizes: dict | None = None
    """{"stored": {"min": [h, w], "max": [h, w]}, "source": {...}}: the frames' heights and widths as
    the shards store them and as the source had them (they differ under `--max-size`); None in
    manifests converted before segdist recorded them."""
    root: Path | str = Path(".")
    """The folder it was read from, or the remote data.root as given (segdist.data.location)."""
    cache_dir: str | None = None
    """Where remote shards read whole are kept (data.cache_dir); not part of the JSON."""
    fetch_retries: int = 5
    """How often a remote read that broke off is retried (data.fetch_retries); not part of the JSON."""
    fetch_timeout: float = 60.0
    """Seconds a remote read may bring no bytes before it counts as broken (data.fetch_timeout); not part of the JSON."""
    sha256: str | None = None
    """The sha256 of the manifest file as it was read (what names this exact split); not part of the JSON."""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def valid_pixels(self) -> int:
        return int(sum(self.class_pixels))

    @property
    def indexed(self) -> bool:
        """Every shard records its members' offsets: samples can be read by position."""
        return all(s.members is not None for s in self.shards)

    @property
    def address(self) -> str:
        """Where the manifest itself is read from: a path or a URL."""
        return address(self.root, manifest_name(self.split))

    def shard_paths(self) -> list[Path]:
        """The shard files of a local root (verify and conversion work on local folders only)."""
        if is_remote(self.root):
            raise UserError(f"{self.root} is not a local folder: this command reads local shards only; "
                            "copy the split to a folder first")
        return [Path(self.root) / s.file for s in self.shards]

    def sources(self) -> list[ShardSource]:
        """The shards to read, wherever the root is (what the streams take)."""
        root = str(self.root)
        cache = self.cache_dir if is_remote(root) else None
        return [ShardSource(root, s.file, s.sha256, cache, self.fetch_retries, self.fetch_timeout) for s in self.shards]

    def located(self) -> Located:
        """(shard source, key, member offsets) of every sample in manifest order, by index: what
        segdist.data.sample.read_sample takes. The split must be indexed (`check_indexed`)."""
        return Located(self.sources(), self.shards)

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "dataset": self.dataset,
            "split": self.split,
            "classes": self.classes,
            "palette": self.palette,
            "ignore_index": self.ignore_index,
            "num_samples": self.num_samples,
            "shards": [s.to_json() for s in self.shards],
            "class_pixels": self.class_pixels,
            "valid_pixels": self.valid_pixels,
            "source": self.source,
            "options": self.options,
            "frame_sizes": self.frame_sizes,
        }

    def stored_max(self) -> tuple[int, int] | None:
        """The largest stored (height, width) of the split's frames, None where not recorded."""
        if not self.frame_sizes or "stored" not in self.frame_sizes:
            return None
        h, w = self.frame_sizes["stored"]["max"]
        return int(h), int(w)


def manifest_name(split: str) -> str:
    return f"{split}.json"


def manifest_path(root: str | Path, split: str) -> Path:
    return local_root(root) / manifest_name(split)


def load_split(data, split: str, check_files: bool = True, *, evaluation: bool = False) -> Manifest:
    """The manifest of a split of a recipe's `[data]`, with its cache and retries: from `data.root`
    for training, from `data.eval_root` (`data.val_root`, else `data.root`) for `evaluation`."""
    root = data.eval_root if evaluation else data.root
    return load_manifest(root, split, check_files, cache_dir=data.cache_dir, retries=data.fetch_retries,
                         timeout=data.fetch_timeout)


def check_same_labels(train: Manifest, val: Manifest) -> None:
    """The evaluated split labels pixels as the trained one does: the same classes, palette and
    ignore index; the first key that differs is a `UserError` naming it and both splits."""
    for key in ("classes", "palette", "ignore_index"):
        a, b = getattr(train, key), getattr(val, key)
        if a == b:
            continue
        if isinstance(a, list):
            i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            detail = (f"{len(b)} entries against {len(a)}" if i == min(len(a), len(b))
                      else f"entry {i} is {b[i]!r} against {a[i]!r}")
        else:
            detail = f"it has {b!r} against {a!r}"
        where = " (data.val_root)" if str(val.root) != str(train.root) else ""
        raise UserError(
            f"manifest key {key!r} differs: in split {val.split!r} of {val.root}{where} {detail} in split "
            f"{train.split!r} of {train.root} (data.root); convert both from the same dataset"
        )


def check_crop_fits(manifest: Manifest, crop) -> None:
    """A training crop whose longest side exceeds the longest side of every frame of a reduced tier
    (`--max-size`) means the recipe reads the wrong tier: a `UserError` naming both sizes. Only the
    longest sides: a preset may fit a landscape frame into a square crop (birds: 192x256 into 256x256)
    and pad it. Full-size splits may be smaller than the crop (presets zoom and pad them)."""
    stored, max_size = manifest.stored_max(), manifest.options.get("max_size")
    if stored is None or max_size is None:
        return
    if max(crop) > max(stored):
        raise UserError(
            f"data.crop {list(crop)} is larger than the frames split {manifest.split!r} in {manifest.root} stores "
            f"(at most {stored[0]}x{stored[1]}, converted with --max-size {max_size}): train from a tier converted "
            "with a larger --max-size, or lower data.crop"
        )


def load_manifest(root: str | Path, split: str, check_files: bool = True, *,
                  cache_dir: str | None = None, retries: int = 5, timeout: float = 60.0) -> Manifest:
    """Read and check `<root>/<split>.json`, from wherever the root is; every problem is a one-line
    `UserError`. `check_files` checks that a local root's shards exist (remote ones: the training setup,
    `check_reachable`)."""
    remote = is_remote(root)
    root = str(root) if remote else local_root(root)
    path = address(root, manifest_name(split)) if remote else manifest_path(root, split)
    if not remote and not root.is_dir():
        raise UserError(f"data root {root} does not exist: convert a dataset there with launch/shard.py")
    text = read_file(root, manifest_name(split), "manifest", retries, timeout)
    if text is None:
        raise UserError(
            f"manifest {path} not found: split {split!r} was not converted "
            f"(run launch/shard.py ... --split {split} --out {root})"
        )
    try:
        raw = json.loads(text.decode("utf-8"))
        if raw.get("format") != FORMAT:
            raise ValueError(f"format {raw.get('format')!r}, expected {FORMAT!r}")
        manifest = Manifest(
            dataset=str(raw["dataset"]),
            split=str(raw["split"]),
            classes=[str(c) for c in raw["classes"]],
            palette=[[int(v) for v in c] for c in raw["palette"]],
            ignore_index=int(raw["ignore_index"]),
            num_samples=int(raw["num_samples"]),
            shards=[ShardInfo(str(s["file"]), int(s["samples"]), str(s["sha256"]), _sample_classes(s), _members(s))
                    for s in raw["shards"]],
            class_pixels=[int(v) for v in raw["class_pixels"]],
            source=dict(raw.get("source", {})),
            options=dict(raw.get("options", {})),
            frame_sizes=_frame_sizes(raw.get("frame_sizes")),
            root=root,
            cache_dir=None if cache_dir is None else str(cache_dir),
            fetch_retries=retries,
            fetch_timeout=timeout,
            sha256=hashlib.sha256(text).hexdigest(),
        )
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise UserError(f"manifest {path} is corrupt ({exc}): re-run the conversion") from None
    if manifest.num_samples == 0 or not manifest.shards:
        raise UserError(f"split {split!r} in {root} is empty: convert a split with samples")
    if sum(s.samples for s in manifest.shards) != manifest.num_samples:
        raise UserError(f"manifest {path}: shard sample counts do not add up to num_samples; re-run the conversion")
    if check_files and not remote:
        for shard in manifest.shard_paths():
            if not shard.is_file():
                raise UserError(f"shard {shard} listed in {path} is missing: re-run the conversion")
    return manifest


def _frame_sizes(raw) -> dict | None:
    if raw is None:
        return None
    return {which: {end: [int(v) for v in raw[which][end]] for end in ("min", "max")} for which in raw}


def _sample_classes(shard: dict) -> list[list[list[int]]] | None:
    raw = shard.get("sample_classes")
    if raw is None:
        return None
    out = [[[int(c), int(n)] for c, n in sample] for sample in raw]
    if len(out) != int(shard["samples"]):
        raise ValueError(f"shard {shard['file']} lists the classes of {len(out)} samples, not {shard['samples']}")
    return out


def _members(shard: dict) -> list[list] | None:
    raw = shard.get("members")
    if raw is None:
        return None
    out = []
    for key, members in raw:
        # a handful of kinds over the whole split: one string each, not one per member (~100 bytes a sample)
        spans = [[sys.intern(str(kind)), int(offset), int(size)] for kind, offset, size in members]
        if not spans or any(offset < 0 or size < 0 for _, offset, size in spans):
            raise ValueError(f"shard {shard['file']} records no members or a negative offset or size for sample {key}")
        out.append([str(key), spans])
    if len(out) != int(shard["samples"]):
        raise ValueError(f"shard {shard['file']} records the members of {len(out)} samples, not {shard['samples']}")
    return out


class Located:
    """Where each sample of a split lies, in manifest order: `located[i]` is (shard source, key,
    `[[kind, offset, size], ...]`), what segdist.data.sample.read_sample takes.

    Held as a few numpy arrays, not a Python list per sample: a loader worker forked from the
    training process reads them from the parent's pages, where lists of lists (about 850 bytes a
    sample) would be copied into every worker as the worker's garbage collector and reference counts
    touch them."""

    def __init__(self, sources: list[ShardSource], shards: list[ShardInfo]) -> None:
        self.sources = sources
        samples = [sample for shard in shards for sample in shard.members]
        self.shard = np.repeat(np.arange(len(shards), dtype=np.int32), [len(s.members) for s in shards])
        self.keys = np.array([key for key, _ in samples], dtype=str)
        self.kinds = sorted({kind for _, spans in samples for kind, _, _ in spans})
        code = {kind: n for n, kind in enumerate(self.kinds)}
        spans = [span for _, members in samples for span in members]
        self.kind = np.array([code[kind] for kind, _, _ in spans], dtype=np.int16)
        self.offset = np.array([offset for _, offset, _ in spans], dtype=np.int64)
        self.size = np.array([size for _, _, size in spans], dtype=np.int64)
        self.first = np.zeros(len(samples) + 1, dtype=np.int64)  # sample i's members: [first[i], first[i + 1])
        np.cumsum([len(members) for _, members in samples], out=self.first[1:])

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> tuple[ShardSource, str, list[list]]:
        members = range(int(self.first[i]), int(self.first[i + 1]))
        return (self.sources[int(self.shard[i])], str(self.keys[i]),
                [[self.kinds[self.kind[m]], int(self.offset[m]), int(self.size[m])] for m in members])


def check_indexed(manifest: Manifest) -> None:
    """The manifest records its members' offsets (what reading samples by position needs), or a
    one-line `UserError` saying how to add them."""
    if manifest.indexed:
        return
    if is_remote(manifest.root):
        how = (f"run launch/shard.py index on the local folder it was copied from and copy its "
               f"{manifest_name(manifest.split)} here again")
    else:
        how = f"run launch/shard.py index {manifest.root}"
    raise UserError(
        f"manifest {manifest.address} records no member offsets (converted before segdist recorded them), "
        f"which reading samples by position needs: re-run launch/shard.py, or {how}, a cheap pass that "
        "adds them without re-encoding"
    )


def check_random_access(manifest: Manifest) -> None:
    """Before training starts: samples of this split can be read by position. The manifest records
    the offsets (`check_indexed`), and a `pipe:` root, which cannot read part of a file, has a
    data.cache_dir to read whole shards into."""
    check_indexed(manifest)
    check_seekable(str(manifest.root), manifest.cache_dir)


def check_reachable(manifest: Manifest) -> None:
    """Before anything is written: a local split's shards are whole tar files (one stat each, not a
    hash: verify does that; a shard cut short by a failed copy almost always shows), a remote split's
    are there (segdist.data.location.check_sources)."""
    if is_remote(manifest.root):
        check_sources(manifest.sources())
        return
    for path in manifest.shard_paths():
        size = path.stat().st_size
        if size == 0 or size % 512:
            raise UserError(
                f"shard {path} is {size} bytes, not a whole number of 512-byte tar blocks: it is truncated; "
                f"run launch/shard.py verify {manifest.root} and re-convert"
            )


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
