"""`launch/shard.py cityscapes`: Cityscapes fine annotations as shards with the 19 train ids.

The id → train id mapping, class names and colours come from the official `cityscapesscripts`
label table, so they match the benchmark's evaluation exactly; ids whose train id is 255 or -1
(void, parking, caravan, ...) become the ignore index. Layout read:
`<root>/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png` and
`<root>/gtFine/<split>/<city>/<name>_gtFine_labelIds.png`.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import numpy as np
from cityscapesscripts.helpers.labels import labels as CITYSCAPES_LABELS

from segdist.data.convert.common import (
    add_converter_options, check_converter_options, index_by_key, output_options, pair_files, require_dir, write_split,
)
from segdist.data.convert.imageio import remap

IGNORE = 255
IMAGE_SUFFIX = "_leftImg8bit.png"
MASK_SUFFIX = "_gtFine_labelIds.png"
LAYOUT = "<root>/leftImg8bit/<split>/<city>/*_leftImg8bit.png and <root>/gtFine/<split>/<city>/*_gtFine_labelIds.png"


def train_classes() -> tuple[list[str], list[list[int]]]:
    """Names and colours of the train ids 0..18, in train-id order, from the official table."""
    train = sorted((l for l in CITYSCAPES_LABELS if 0 <= l.trainId < IGNORE), key=lambda l: l.trainId)
    assert [l.trainId for l in train] == list(range(len(train))), "cityscapesscripts train ids are not 0..N-1"
    return [l.name for l in train], [list(l.color) for l in train]


def id_to_train_lut() -> np.ndarray:
    """256-entry table label id → train id (255 = ignore, -1 = an id not in the label table)."""
    lut = np.full(256, -1, dtype=np.int16)
    for label in CITYSCAPES_LABELS:
        if 0 <= label.id < 256:
            lut[label.id] = label.trainId if 0 <= label.trainId < IGNORE else IGNORE
    return lut


def add_parser(sub, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name, help="Cityscapes (gtFine labelIds → 19 train ids)",
        description=f"Cityscapes fine annotations. Reads {LAYOUT}; label ids become the 19 train ids of "
        "cityscapesscripts' label table, everything else the ignore index 255.",
    )
    p.add_argument("--root", required=True, help="folder holding leftImg8bit/ and gtFine/")
    add_converter_options(p)
    return p


def _map_mask(mask: np.ndarray, key: str, path: Path, lut: np.ndarray) -> np.ndarray:
    return remap(mask, lut, key, path, "Cityscapes label ids (is this a *_gtFine_labelIds.png?)")


def _files(folder: Path, suffix: str) -> dict[str, Path]:
    """`<city>/<name><suffix>` by `<name>`; the name already starts with the city, so it is unique."""
    found, _ = index_by_key(sorted(folder.glob(f"*/*{suffix}")), lambda p: p.name[: -len(suffix)], "file")
    return found


def run(args: argparse.Namespace) -> int:
    check_converter_options(args)
    root = require_dir(Path(args.root), LAYOUT)
    images = require_dir(root / "leftImg8bit" / args.split, LAYOUT)
    masks = require_dir(root / "gtFine" / args.split, LAYOUT)
    pairs = pair_files(_files(images, IMAGE_SUFFIX), _files(masks, MASK_SUFFIX), hint=f"expected {LAYOUT}")
    classes, palette = train_classes()
    write_split(
        pairs, args, base=root, dataset="cityscapes", classes=classes, palette=palette,
        source={"format": "cityscapes", "root": str(root.resolve()), "images": f"leftImg8bit/{args.split}",
                "masks": f"gtFine/{args.split}", "label_table": "cityscapesscripts.helpers.labels"},
        options=output_options(args), mask_fn=partial(_map_mask, lut=id_to_train_lut()),
    )
    return 0
