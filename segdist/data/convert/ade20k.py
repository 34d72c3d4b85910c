"""`launch/shard.py ade20k`: ADE20K scene parsing (ADEChallengeData2016, 150 classes).

Annotation value 0 is "other objects" and is not scored by the benchmark, so it becomes the
ignore index; value k (1..150) becomes train id k-1. Layout read:
`<root>/images/<folder>/*.jpg` with `<root>/annotations/<folder>/*.png`, where the source folder
is `training` or `validation` (`--source-split`; by default train → training, val → validation,
and training / validation are themselves; so `--split` can name the output split freely).
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import numpy as np

from segdist.data.convert.ade20k_classes import OBJECT_INFO_150, PALETTE_150
from segdist.data.convert.common import (
    add_converter_options, check_converter_options, index_by_key, output_options, pair_files, require_dir, write_split,
)
from segdist.data.convert.imageio import remap
from segdist.errors import UserError

IGNORE = 255
SOURCE_SPLITS = {"train": "training", "val": "validation"}
LAYOUT = "<root>/images/<training|validation>/*.jpg and <root>/annotations/<training|validation>/*.png (root = ADEChallengeData2016)"


def value_to_train_lut() -> np.ndarray:
    """256-entry table annotation value → train id: 0 → ignore, k → k-1, above 150 → -1 (invalid)."""
    lut = np.full(256, -1, dtype=np.int16)
    lut[0] = IGNORE
    lut[1 : len(OBJECT_INFO_150) + 1] = np.arange(len(OBJECT_INFO_150))
    return lut


def add_parser(sub, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name, help="ADE20K scene parsing (150 classes, 0 = ignore)",
        description=f"ADE20K (ADEChallengeData2016). Reads {LAYOUT}. Value 0 becomes ignore (255), k becomes k-1.",
    )
    p.add_argument("--root", required=True, help="the ADEChallengeData2016 folder")
    p.add_argument(
        "--source-split", default=None, metavar="FOLDER",
        help="source folder under images/ and annotations/ (default: train → training, val → validation)",
    )
    add_converter_options(p)
    return p


def _map_mask(mask: np.ndarray, key: str, path: Path, lut: np.ndarray) -> np.ndarray:
    return remap(mask, lut, key, path, f"ADE20K annotation values 0..{len(OBJECT_INFO_150)}")


def _by_stem(folder: Path, suffix: str) -> dict[str, Path]:
    found, _ = index_by_key(sorted(folder.glob(f"*{suffix}")), lambda p: p.stem, "file")
    return found


def run(args: argparse.Namespace) -> int:
    check_converter_options(args)
    # The official folder names are split names too: --split validation reads images/validation.
    folder = args.source_split or SOURCE_SPLITS.get(args.split, args.split if args.split in SOURCE_SPLITS.values() else None)
    if folder is None:
        raise UserError(f"--split {args.split!r} has no default source folder: use train, val, training or validation, "
                        "or add --source-split training or validation")
    root = require_dir(Path(args.root), LAYOUT)
    images = require_dir(root / "images" / folder, LAYOUT)
    masks = require_dir(root / "annotations" / folder, LAYOUT)
    pairs = pair_files(_by_stem(images, ".jpg"), _by_stem(masks, ".png"), hint=f"expected {LAYOUT}")
    write_split(
        pairs, args, base=root, dataset="ade20k", classes=list(OBJECT_INFO_150), palette=PALETTE_150,
        source={"format": "ade20k", "root": str(root.resolve()), "images": f"images/{folder}",
                "masks": f"annotations/{folder}"},
        options=output_options(args, source_split=folder), mask_fn=partial(_map_mask, lut=value_to_train_lut()),
    )
    return 0
