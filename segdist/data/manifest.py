"""The manifest `<root>/<split>.json` that describes a split's shards, and its checks."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from segdist.errors import UserError

FORMAT = "segdist-shards/1"


@dataclass
class ShardInfo:
    file: str
    samples: int
    sha256: str


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
    root: Path = Path(".")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def valid_pixels(self) -> int:
        return int(sum(self.class_pixels))

    def shard_paths(self) -> list[Path]:
        return [self.root / s.file for s in self.shards]

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "dataset": self.dataset,
            "split": self.split,
            "classes": self.classes,
            "palette": self.palette,
            "ignore_index": self.ignore_index,
            "num_samples": self.num_samples,
            "shards": [vars(s) for s in self.shards],
            "class_pixels": self.class_pixels,
            "valid_pixels": self.valid_pixels,
            "source": self.source,
            "options": self.options,
        }


def manifest_path(root: str | Path, split: str) -> Path:
    return Path(root) / f"{split}.json"


def load_manifest(root: str | Path, split: str, check_files: bool = True) -> Manifest:
    """Read and check `<root>/<split>.json`; every problem is a one-line `UserError`."""
    root = Path(root)
    path = manifest_path(root, split)
    if not root.is_dir():
        raise UserError(f"data root {root} does not exist: convert a dataset there with launch/shard.py")
    if not path.is_file():
        raise UserError(
            f"manifest {path} not found: split {split!r} was not converted "
            f"(run launch/shard.py ... --split {split} --out {root})"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("format") != FORMAT:
            raise ValueError(f"format {raw.get('format')!r}, expected {FORMAT!r}")
        manifest = Manifest(
            dataset=str(raw["dataset"]),
            split=str(raw["split"]),
            classes=[str(c) for c in raw["classes"]],
            palette=[[int(v) for v in c] for c in raw["palette"]],
            ignore_index=int(raw["ignore_index"]),
            num_samples=int(raw["num_samples"]),
            shards=[ShardInfo(str(s["file"]), int(s["samples"]), str(s["sha256"])) for s in raw["shards"]],
            class_pixels=[int(v) for v in raw["class_pixels"]],
            source=dict(raw.get("source", {})),
            options=dict(raw.get("options", {})),
            root=root,
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"manifest {path} is corrupt ({exc}): re-run the conversion") from None
    if manifest.num_samples == 0 or not manifest.shards:
        raise UserError(f"split {split!r} in {root} is empty: convert a split with samples")
    if sum(s.samples for s in manifest.shards) != manifest.num_samples:
        raise UserError(f"manifest {path}: shard sample counts do not add up to num_samples; re-run the conversion")
    if check_files:
        for shard in manifest.shard_paths():
            if not shard.is_file():
                raise UserError(f"shard {shard} listed in {path} is missing: re-run the conversion")
    return manifest


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
