"""`launch/shard.py folder`: any dataset stored as image files plus mask files.

Images and masks are found with two globs and paired by a key: the file stem by default, or the
named group `key` of `--pair REGEX` searched in each file *name* (for layouts whose image and mask
names differ, e.g. PH2's `IMD002.bmp` / `IMD002_lesion.bmp` with `--pair '(?P<key>IMD\\d+)'`).
Masks hold class indices (255 = ignore) unless `--binary-threshold T` turns a 0/255-style mask
into 0/1 (value > T → 1), which is what most medical and foreground/background sets need.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from functools import partial
from pathlib import Path

import numpy as np

from segdist.data.convert.common import (
    add_converter_options, check_converter_options, glob_base, glob_files, identity_mask, index_by_key, output_options,
    pair_files, write_split,
)
from segdist.data.convert.imageio import voc_palette
from segdist.errors import UserError

IGNORE = 255


def add_parser(sub, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name, help="image files + mask files found by globs, paired by name",
        description="Pairs --images and --masks files by file stem, or by the named group 'key' of --pair "
        "searched in each file name. Masks hold class indices (255 = ignore), or 0/255-style binary masks "
        "with --binary-threshold. Quote the globs; '**' matches any depth.",
    )
    p.add_argument("--images", required=True, metavar="GLOB", help="glob of image files, e.g. 'data/images/*/*.jpg'")
    p.add_argument("--masks", required=True, metavar="GLOB", help="glob of mask files, e.g. 'data/masks/*/*.png'")
    p.add_argument("--pair", default=None, metavar="REGEX",
                   help="regex with a named group (?P<key>...) searched in image and mask file names; equal keys pair")
    p.add_argument("--binary-threshold", type=int, default=None, metavar="T",
                   help="binary masks: pixel > T becomes class 1, else class 0 (e.g. 127 for 0/255 masks)")
    names = p.add_mutually_exclusive_group()
    names.add_argument("--classes", default=None, metavar="NAME,NAME,...", help="class names in train-id order")
    names.add_argument("--classes-file", default=None, metavar="FILE", help="class names, one per line, in train-id order")
    p.add_argument("--keys-file", default=None, metavar="FILE",
                   help="convert only the keys listed in FILE, one per line (blank lines and # comments "
                   "skipped): a split cut from a list, as the PH2 lesion study's 100/50/50 split; a listed key "
                   "without an image or a mask, or listed twice, is an error")
    p.add_argument("--allow-unpaired", action="store_true", help="skip files without a partner instead of failing")
    p.add_argument("--dataset", default="folder", help="dataset name recorded in the manifest (default folder)")
    add_converter_options(p)
    return p


def class_names(args: argparse.Namespace) -> list[str]:
    if args.classes_file:
        path = Path(args.classes_file)
        if not path.is_file():
            raise UserError(f"--classes-file {path} not found")
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif args.classes:
        names = [n.strip() for n in args.classes.split(",") if n.strip()]
    elif args.binary_threshold is not None:
        names = ["background", "foreground"]
    else:
        raise UserError("give the class names with --classes NAME,NAME,... or --classes-file FILE")
    if len(set(names)) != len(names):
        raise UserError(f"class names must be unique, got {names}")
    if args.binary_threshold is not None and len(names) != 2:
        raise UserError(f"--binary-threshold makes two classes but {len(names)} names were given: {names}")
    if not 1 <= len(names) <= IGNORE:
        raise UserError(f"need 1..{IGNORE} class names (255 is the ignore index), got {len(names)}")
    return names


def key_function(pattern: str | None):
    """File → pairing key: its stem, or the `key` group of `pattern` in its name (None: no match)."""
    if pattern is None:
        return lambda path: path.stem
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise UserError(f"--pair {pattern!r} is not a valid regex: {exc}") from None
    if "key" not in rx.groupindex:
        raise UserError(f"--pair {pattern!r} needs a named group (?P<key>...) that picks the shared part of the names")

    def key(path: Path) -> str | None:
        m = rx.search(path.name)
        return m.group("key") if m else None

    return key


def read_keys(path: Path) -> list[str]:
    """The keys of a --keys-file, in order; a key listed twice is a `UserError` naming it and its lines."""
    if not path.is_file():
        raise UserError(f"--keys-file {path} not found: give a text file with one key per line")
    seen: dict[str, int] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        key = line.split("#", 1)[0].strip()
        if not key:
            continue
        if key in seen:
            raise UserError(f"--keys-file {path}: key {key!r} is listed twice (lines {seen[key]} and {number}); "
                            "list each sample once")
        seen[key] = number
    if not seen:
        raise UserError(f"--keys-file {path} lists no key: one key per line")
    return list(seen)


def select_keys(path: Path, images: dict, masks: dict) -> tuple[dict, dict]:
    """Images and masks of the keys `path` lists; a key without either is a `UserError` naming it."""
    keys = read_keys(path)
    for kind, found in (("image", images), ("mask", masks)):
        missing = [k for k in keys if k not in found]
        if missing:
            shown = ", ".join(map(repr, missing[:3])) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise UserError(f"--keys-file {path}: no {kind} for key {shown} among the --{kind}s files; "
                            "check the key (the file stem, or the --pair REGEX group) and the glob")
    return {k: images[k] for k in keys}, {k: masks[k] for k in keys}


def binarize(mask: np.ndarray, key: str, path: Path, threshold: int) -> np.ndarray:
    return (mask > threshold).astype(np.uint8)


def run(args: argparse.Namespace) -> int:
    check_converter_options(args)
    classes = class_names(args)
    key_fn = key_function(args.pair)
    image_files = glob_files(args.images, "--images")
    mask_files = glob_files(args.masks, "--masks")
    both = sorted(set(image_files) & set(mask_files))
    if both:
        raise UserError(f"{both[0]} matches both --images and --masks: make the globs disjoint")
    unique = "make the file names unique or choose a --pair REGEX whose key differs"
    images, image_nokey = index_by_key(image_files, key_fn, "images", unique)
    masks, mask_nokey = index_by_key(mask_files, key_fn, "masks", unique)
    nokey = image_nokey + mask_nokey
    if args.keys_file:  # only the listed keys: files outside the list (keyless ones too) are not this split's
        images, masks = select_keys(Path(args.keys_file), images, masks)
        nokey = []
    if nokey and not args.allow_unpaired:
        shown = ", ".join(map(str, nokey[:3])) + (f" and {len(nokey) - 3} more" if len(nokey) > 3 else "")
        raise UserError(f"--pair {args.pair!r} finds no key in {len(nokey)} file name(s): {shown}")
    hint = "pair them with --pair '(?P<key>...)' or skip them with --allow-unpaired"
    pairs = pair_files(images, masks, allow_unpaired=args.allow_unpaired, hint=hint)
    base = Path(os.path.commonpath([glob_base(args.images).absolute(), glob_base(args.masks).absolute()]))
    binary = args.binary_threshold is not None
    mask_fn = partial(binarize, threshold=args.binary_threshold) if binary else identity_mask
    manifest = write_split(
        pairs, args, base=base, dataset=args.dataset, classes=classes, palette=voc_palette(len(classes)),
        source={"format": "folder", "images": args.images, "masks": args.masks, "base": str(base)},
        options=output_options(args, pair=args.pair, binary_threshold=args.binary_threshold,
                               keys_file=args.keys_file), mask_fn=mask_fn,
    )
    if len(classes) > 1 and not any(manifest.class_pixels[1:]):
        print(
            f"warning: no pixel of classes 1..{len(classes) - 1} in split {args.split!r}; if the masks are "
            "0/255 binary masks, add --binary-threshold 127 (255 is the ignore index)", file=sys.stderr,
        )
    return 0
