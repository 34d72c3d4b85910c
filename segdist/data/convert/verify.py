"""`launch/shard.py verify DIR`: check converted splits against their manifests before training.

Always: every listed shard exists, its sha256 matches the manifest (a flipped byte or a truncated
copy shows up here), and no unlisted shard of the split lies beside them (a reader globbing
`<split>-*.tar` would pick it up). Where the manifest records member offsets (what reading samples
by position uses), the tar headers read in the same pass must give exactly those: each member's
kind, offset and size. With `--deep`: every shard is read with `tarfile` and every
sample decoded — each has an RGB image (`image.png`/`image.jpg`/`image.npy`) and a mask (`mask.png`/`mask.npy`) of the same
size, mask values are classes or the ignore index, sample counts per shard and keys are as the
manifest says, and the per-class pixel totals add up to the manifest's (eval relies on them).
The first problem is a `UserError` naming the shard and, where there is one, the sample key.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import tarfile
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
from PIL import Image
from tqdm import tqdm

from segdist.data.manifest import FORMAT, Manifest, load_manifest, manifest_path, sha256_file
from segdist.data.sample import (IMAGE_KINDS, MASK_KIND, MASK_KINDS, META_KIND, decode_raw, label_counts, read_members,
                                 shard_members, split_member)
from segdist.errors import UserError


def add_parser(sub, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name, help="check shards against their manifests (sha256; --deep decodes every sample)",
        description="Check converted splits: shard files and sha256 against the manifest; with --deep also "
        "decode every sample. Exit 0 and one line per split when all is well, else one error line and exit 2.",
    )
    p.add_argument("dir", metavar="DIR", help="folder holding <split>.json and <split>-NNNNNN.tar")
    p.add_argument("--split", default=None, help="check only this split (default: every manifest in DIR)")
    p.add_argument("--deep", action="store_true", help="also decode every sample and check masks and totals")
    return p


def find_splits(root: Path) -> list[str]:
    """Splits with a manifest in `root`; a `.json` that does not parse is kept so its error shows."""
    splits = []
    for path in sorted(root.glob("*.json")):
        try:
            fmt = json.loads(path.read_text(encoding="utf-8")).get("format", "")
        except (ValueError, AttributeError, UnicodeDecodeError):
            fmt = FORMAT
        if str(fmt).startswith(FORMAT.split("/")[0]):
            splits.append(path.stem)
    if not splits:
        raise UserError(f"no manifest (<split>.json) in {root}: convert a dataset there with launch/shard.py")
    return splits


class _Hashing:
    """A file read front to back whose bytes are hashed as they pass."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.digest = f, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.digest.update(data)
        return data

    def drain(self) -> str:
        """Read (and hash) what the tar reader left, then the whole file's sha256."""
        while self.read(1 << 20):
            pass
        return self.digest.hexdigest()


def scan_shard(path: Path) -> tuple[str, list[list] | str]:
    """(sha256 of the whole file, its members as the manifest records them or why its tar does not
    read), in one sequential read (`verify`, and `index`, which adds them)."""
    with open(path, "rb") as f:
        hashing = _Hashing(f)
        try:
            members: list[list] | str = shard_members(hashing)
        except (tarfile.TarError, EOFError, OSError) as exc:
            members = str(exc) or type(exc).__name__
        return hashing.drain(), members


def _spans(sample: list) -> str:
    return f"{sample[0]}: " + ", ".join(f"{kind} at {offset} ({size} bytes)" for kind, offset, size in sample[1])


def members_differ(recorded: list[list], found: list[list]) -> str | None:
    """Where the members a manifest records first differ from those found in the tar, or None."""
    for a, b in zip(recorded, found):
        if a != b:
            return f"it records {_spans(a)}; the tar holds {_spans(b)}"
    if len(recorded) != len(found):
        return f"it records the members of {len(recorded)} samples, the tar holds {len(found)}"
    return None


def _sha256_differs(path: Path, where: Path) -> UserError:
    return UserError(f"shard {path}: sha256 differs from {where} (changed, truncated or corrupt): re-run the conversion")


def scanned_members(path: Path, sha256: str, where: Path) -> list[list]:
    """A shard's members as `scan_shard` finds them, once its bytes hash to `sha256` (the manifest's,
    `where`) and read as a tar; else a one-line `UserError`."""
    found, members = scan_shard(path)
    if found != sha256:
        raise _sha256_differs(path, where)
    if isinstance(members, str):
        raise UserError(f"shard {path} is not a readable tar ({members}): re-run the conversion")
    return members


def check_files(manifest: Manifest) -> None:
    """sha256 of every listed shard (and its member offsets, where recorded), and no unlisted shard
    of this split in the folder."""
    where = manifest_path(manifest.root, manifest.split)
    if not (len(manifest.palette) == len(manifest.class_pixels) == manifest.num_classes):
        raise UserError(f"manifest {where}: classes, palette and class_pixels differ in length; re-run the conversion")
    for info, path in zip(manifest.shards, manifest.shard_paths()):
        if info.members is None:
            if sha256_file(path) != info.sha256:
                raise _sha256_differs(path, where)
            continue
        problem = members_differ(info.members, scanned_members(path, info.sha256, where))
        if problem is not None:
            raise UserError(f"shard {path}: member offsets in {where} differ from the tar ({problem}): "
                            "re-run the conversion")
    listed = {s.file for s in manifest.shards}
    own = re.compile(re.escape(manifest.split) + r"-\d{6}\.tar")
    for path in sorted(manifest.root.iterdir()):
        if own.fullmatch(path.name) and path.name not in listed:
            raise UserError(f"shard {path} is not listed in {where}: remove it or re-run the conversion")


def read_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {kind: bytes}) per sample of a shard, as WebDataset groups consecutive members."""
    key, files, seen = None, {}, set()
    try:
        for name, data in read_members(path):
            parts = split_member(name) if data is not None else None
            if parts is None:
                raise UserError(f"shard {path}: member {name!r} is not a <key>.<kind> file")
            if parts[0] != key:
                if key is not None:
                    yield key, files
                key, files = parts[0], {}
                if key in seen:
                    raise UserError(f"shard {path}: sample {key} is split into non-adjacent parts")
                seen.add(key)
            if parts[1] in files:
                raise UserError(f"shard {path}: sample {key} has two {parts[1]} files")
            files[parts[1]] = data
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise UserError(f"shard {path} is not a readable tar ({exc}): re-run the conversion") from None
    if key is not None:
        yield key, files


def _decode(data: bytes, where: str, what: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (OSError, ValueError, SyntaxError) as exc:
        raise UserError(f"{where}: {what} does not decode ({exc})") from None
    return img


def check_sample(path: Path, key: str, files: dict[str, bytes], manifest: Manifest) -> np.ndarray:
    """Decode one sample and return its per-class pixel counts."""
    where = f"shard {path} sample {key}"
    kinds = [k for k in files if k in IMAGE_KINDS]
    masks = [k for k in files if k in MASK_KINDS]
    if len(kinds) != 1 or len(masks) != 1:
        raise UserError(f"{where}: needs one image.png, image.jpg or image.npy and one mask.png or mask.npy, "
                        f"has {sorted(files)}")
    if IMAGE_KINDS[kinds[0]] == "NPY":
        pixels = decode_raw(files[kinds[0]])
        if pixels is None:
            raise UserError(f"{where}: {kinds[0]} is not an HxWx3 uint8 array whose bytes match its recorded shape")
        size = (pixels.shape[1], pixels.shape[0])
    else:
        image = _decode(files[kinds[0]], where, kinds[0])
        if image.format != IMAGE_KINDS[kinds[0]] or image.mode != "RGB":
            raise UserError(f"{where}: {kinds[0]} is a {image.format} {image.mode} image, expected {IMAGE_KINDS[kinds[0]]} RGB")
        size = image.size
    if masks[0] == MASK_KIND:
        mask_img = _decode(files[MASK_KIND], where, MASK_KIND)
        if mask_img.format != "PNG" or mask_img.mode not in ("L", "I;16", "I"):
            raise UserError(f"{where}: mask.png is {mask_img.format} mode {mask_img.mode}, expected an 8/16-bit gray PNG")
        mask = np.asarray(mask_img)
    else:
        mask = decode_raw(files[masks[0]], image=False)
        if mask is None:
            raise UserError(f"{where}: {masks[0]} is not an HxW uint8/uint16 array whose bytes match its recorded shape")
    if (mask.shape[1], mask.shape[0]) != size:
        raise UserError(f"{where}: mask is {mask.shape[1]}x{mask.shape[0]} but image is {size[0]}x{size[1]}")
    n, ignore = manifest.num_classes, manifest.ignore_index
    counts, bad = label_counts(mask.astype(np.int64), n, ignore)
    if bad is not None:
        raise UserError(f"{where}: mask holds {bad}, but there are {n} classes and ignore is {ignore}")
    if META_KIND in files:
        try:
            json.loads(files[META_KIND])
        except ValueError as exc:
            raise UserError(f"{where}: meta.json is not JSON ({exc})") from None
    return counts


def deep_check(manifest: Manifest, bar: tqdm) -> None:
    totals = np.zeros(manifest.num_classes, dtype=np.int64)
    keys: set[str] = set()
    for info, path in zip(manifest.shards, manifest.shard_paths()):
        count = 0
        for key, files in read_samples(path):
            if key in keys:
                raise UserError(f"shard {path}: sample key {key} occurs twice in split {manifest.split!r}")
            keys.add(key)
            totals += check_sample(path, key, files, manifest)
            count += 1
            bar.update()
        if count != info.samples:
            raise UserError(f"shard {path} holds {count} samples, its manifest says {info.samples}: re-run the conversion")
    if totals.tolist() != list(manifest.class_pixels):
        cls = int(np.flatnonzero(totals != np.asarray(manifest.class_pixels))[0])
        raise UserError(
            f"split {manifest.split!r}: class {cls} ({manifest.classes[cls]}) has {int(totals[cls])} pixels in the shards "
            f"but {manifest.class_pixels[cls]} in the manifest: re-run the conversion"
        )


def run(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder: give the --out folder of launch/shard.py")
    splits = [args.split] if args.split else find_splits(root)
    manifests = [load_manifest(root, split) for split in splits]
    for manifest in manifests:
        check_files(manifest)
    total = sum(m.num_samples for m in manifests) if args.deep else 0
    with tqdm(total=total, desc="verify", unit="sample", disable=None if args.deep else True) as bar:
        for manifest in manifests:
            if args.deep:
                deep_check(manifest, bar)
            how = "every sample decoded" if args.deep else "sha256 matched"
            bar.write(
                f"ok {manifest.split}: {manifest.num_samples} samples in {len(manifest.shards)} shards, "
                f"{manifest.num_classes} classes, {manifest.valid_pixels} valid pixels ({how})"
            )
    return 0
