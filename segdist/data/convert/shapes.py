"""`launch/shard.py shapes`: write the built-in synthetic dataset as shards."""

from __future__ import annotations

import argparse
from functools import partial

from tqdm import tqdm

from segdist.data.convert import add_common_output, parallel_map
from segdist.data.shapes import PALETTE, SHAPES, class_names, make_scene
from segdist.data.shards import ShardWriter, encode_png
from segdist.errors import UserError


def add_parser(sub, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        help="built-in synthetic scenes of shapes (class = geometry)",
        description="Synthetic scenes: textured backgrounds, overlapping shapes whose class is "
        "their geometry (colours are random), thin bands of ignore pixels. Same seed -> same bytes.",
    )
    add_common_output(p)
    p.add_argument("--count", type=int, required=True, help="number of samples")
    p.add_argument("--size", type=int, nargs=2, default=[64, 64], metavar=("H", "W"), help="image size (default 64 64)")
    p.add_argument("--classes", type=int, default=5, help=f"classes incl. background, 2..{len(SHAPES) + 1} (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed; use different seeds for different splits")
    return p


def _encode(index: int, seed: int, h: int, w: int, classes: int):
    image, mask = make_scene(seed, index, h, w, classes)
    return f"shapes_{seed}_{index:07d}", encode_png(image), mask


def run(args: argparse.Namespace) -> int:
    if not 2 <= args.classes <= len(SHAPES) + 1:
        raise UserError(f"--classes must be in 2..{len(SHAPES) + 1}, got {args.classes}")
    if args.count <= 0:
        raise UserError(f"--count must be > 0, got {args.count}")
    h, w = args.size
    if h < 8 or w < 8:
        raise UserError(f"--size must be at least 8 8, got {h} {w}")
    options = {"count": args.count, "size": [h, w], "seed": args.seed, "image_format": "png"}
    encode = partial(_encode, seed=args.seed, h=h, w=w, classes=args.classes)
    with ShardWriter(
        args.out, args.split, dataset="shapes", classes=class_names(args.classes),
        palette=PALETTE[: args.classes], samples_per_shard=args.samples_per_shard,
        shard_size_mb=args.shard_size_mb, source={"generator": "segdist.data.shapes"}, options=options,
    ) as writer:
        bar = tqdm(total=args.count, desc=f"shapes {args.split}", unit="img", disable=None)
        for key, image, mask in parallel_map(encode, range(args.count), args.workers):
            writer.write(key, image, "png", mask)
            bar.update()
        bar.close()
        manifest = writer.close()
    print(f"wrote {manifest.num_samples} samples in {len(manifest.shards)} shards to {args.out}/{args.split}-*.tar")
    return 0
