"""`launch/shard.py voc`: PASCAL VOC 2012 segmentation (21 classes, 255 = object borders/ignore).

Masks are palette PNGs: their *indices* are the class ids (the colours are only for viewing), so
they are read as indices, never as RGB. `--extra-masks` adds the augmented set (SBD converted to
index PNGs, e.g. `SegmentationClassAug/`): an id whose mask exists in `SegmentationClass/` uses
that official mask (it is the finer annotation with ignore borders); the extra folder only fills
in ids that have no official mask. `--ids-file` reads another id list (e.g. `train_aug.txt`).
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from segdist.data.convert.common import (
    Pair, add_converter_options, check_converter_options, output_options, require_dir, sanitize_key, write_split,
)
from segdist.data.convert.imageio import voc_palette
from segdist.errors import UserError

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]
LAYOUT = (
    "<root>/ImageSets/Segmentation/<split>.txt, <root>/JPEGImages/<id>.jpg and <root>/SegmentationClass/<id>.png "
    "(root = VOCdevkit/VOC2012)"
)


def add_parser(sub, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name, help="PASCAL VOC 2012 segmentation (21 classes)",
        description=f"PASCAL VOC 2012. Reads {LAYOUT}. Masks are read as palette indices; 255 stays ignore.",
    )
    p.add_argument("--root", required=True, help="the VOCdevkit/VOC2012 folder")
    p.add_argument(
        "--extra-masks", default=None, metavar="DIR",
        help="folder of augmented index masks <id>.png (SegmentationClassAug); used only for ids without "
        "a mask in SegmentationClass/, which takes precedence",
    )
    p.add_argument("--ids-file", default=None, metavar="FILE",
                   help="list of image ids to convert (default <root>/ImageSets/Segmentation/<split>.txt)")
    add_converter_options(p)
    return p


def read_ids(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"split list {path} not found; expected layout: {LAYOUT}")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    dups = [i for i, n in Counter(ids).items() if n > 1]
    if dups:
        raise UserError(f"split list {path} names image id {dups[0]!r} more than once")
    return ids


def find_pairs(root: Path, ids: list[str], extra: Path | None) -> list[Pair]:
    pairs, missing = [], []
    for image_id in sorted(ids):
        image = root / "JPEGImages" / f"{image_id}.jpg"
        mask = root / "SegmentationClass" / f"{image_id}.png"
        if not mask.is_file() and extra is not None:
            mask = extra / f"{image_id}.png"
        if not image.is_file() or not mask.is_file():
            missing.append(image_id)
        else:
            pairs.append(Pair(sanitize_key(image_id), image, mask))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        where = "SegmentationClass/" + (f" or {extra}" if extra is not None else "")
        raise UserError(
            f"{len(missing)} id(s) of the split list lack JPEGImages/<id>.jpg or a mask in {where}: "
            f"{', '.join(missing[:3])}{more}"
        )
    return pairs


def run(args: argparse.Namespace) -> int:
    check_converter_options(args)
    root = require_dir(Path(args.root), LAYOUT)
    require_dir(root / "JPEGImages", LAYOUT)
    require_dir(root / "SegmentationClass", LAYOUT)
    extra = require_dir(Path(args.extra_masks), "a folder of <id>.png index masks") if args.extra_masks else None
    ids_file = Path(args.ids_file) if args.ids_file else root / "ImageSets" / "Segmentation" / f"{args.split}.txt"
    pairs = find_pairs(root, read_ids(ids_file), extra)
    write_split(
        pairs, args, base=root, dataset="voc2012", classes=VOC_CLASSES, palette=voc_palette(len(VOC_CLASSES)),
        source={"format": "voc", "root": str(root.resolve()), "ids_file": str(ids_file.resolve()),
                "extra_masks": str(extra.resolve()) if extra else None},
        options=output_options(args, extra_masks_precedence="SegmentationClass first" if extra else None),
    )
    return 0
