"""`launch/shard.py show ROOT --split S [--count N] --out sheet.png`: look at converted data.

A contact sheet of the split's first N samples (in shard order, or every n-th with `--spread`):
each image with its mask overlaid half and half in the dataset's palette (ignored pixels left as
they are) and its key above it, then a bar chart of the split's class frequencies from the
manifest (the share of valid pixels of each class, on a log scale so rare classes show). Samples
are read through segdist.data.sample, as training reads them; the PNG is written atomically.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from segdist.errors import UserError


def add_parser(sub, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name, help="contact sheet of samples with their masks overlaid, and the class frequencies",
        description="Draw a contact sheet of a converted split: N samples with their masks overlaid in the "
        "palette and their keys, plus the class-frequency bar chart of the manifest.",
    )
    p.add_argument("root", metavar="ROOT", help="folder holding <split>.json and its shards")
    p.add_argument("--split", required=True, help="split to show, e.g. train")
    p.add_argument("--count", type=int, default=16, help="samples to show (default 16)")
    p.add_argument("--spread", action="store_true", help="every n-th sample of the split instead of the first N")
    p.add_argument("--out", required=True, metavar="FILE.png", help="the PNG to write (atomically)")
    return p


def overlay(image: np.ndarray, mask: np.ndarray, palette, ignore_index: int) -> np.ndarray:
    """The image with the mask's colours blended half and half; ignored pixels keep the image."""
    from segdist.report import colorize

    color = colorize(mask, palette, ignore_index)
    blend = ((image.astype(np.uint16) + color + 1) // 2).astype(np.uint8)
    keep = mask == ignore_index
    blend[keep] = image[keep]
    return blend


def pick_samples(manifest, count: int, spread: bool) -> list:
    """(key, image, mask) of the samples to show."""
    from segdist.data.sample import decode_sample, read_shard

    every = max(1, manifest.num_samples // count) if spread else 1
    out = []
    index = 0
    for path in manifest.sources():
        for sample in read_shard(path):
            if index % every == 0:
                out.append(decode_sample(sample, manifest.num_classes, manifest.ignore_index))
                if len(out) == count:
                    return out
            index += 1
    return out


def contact_sheet(samples: list, manifest) -> np.ndarray:
    from segdist.report import pyplot, render

    plt = pyplot()
    cols = min(4, len(samples))
    rows = math.ceil(len(samples) / cols)
    n = manifest.num_classes
    chart_height = max(2.5, 0.22 * n + 1)
    fig = plt.figure(figsize=(3.2 * cols + 1, 3 * rows + chart_height), dpi=100)
    grid = fig.add_gridspec(rows + 1, cols, height_ratios=[3] * rows + [chart_height])
    for i, (key, image, mask) in enumerate(samples):
        ax = fig.add_subplot(grid[i // cols, i % cols])
        ax.imshow(overlay(image, mask, manifest.palette, manifest.ignore_index), interpolation="nearest")
        ax.set_title(key if len(key) <= 32 else key[:15] + "…" + key[-16:], fontsize=8)
        ax.axis("off")
    ax = fig.add_subplot(grid[rows, :])
    pixels = np.asarray(manifest.class_pixels, dtype=np.float64)
    shares = pixels / max(pixels.sum(), 1)
    colours = np.asarray(manifest.palette[:n], dtype=np.float64) / 255
    ax.barh(range(n), np.where(shares > 0, shares, np.nan), color=colours, edgecolor="black", linewidth=0.3)
    ax.set_yticks(range(n), labels=manifest.classes, fontsize=7 if n > 40 else 8)
    ax.invert_yaxis()
    if (shares > 0).any():
        ax.set_xscale("log")
    ax.set_xlabel("share of the split's valid pixels (log scale; absent classes have no bar)")
    ax.set_title(f"{manifest.split}: {manifest.num_samples} samples, {manifest.valid_pixels} valid pixels, "
                 f"{n} classes", fontsize=9)
    fig.tight_layout()
    return render(fig)


def run(args: argparse.Namespace) -> int:
    from segdist.data.manifest import load_manifest
    from segdist.report import write_png

    if args.count < 1:
        raise UserError(f"--count must be >= 1, got {args.count}")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out}: give a file name ending in .png")
    if not out.resolve().parent.is_dir():
        raise UserError(f"--out {out}: its folder does not exist")
    manifest = load_manifest(args.root, args.split)
    samples = pick_samples(manifest, args.count, args.spread)
    write_png(out, contact_sheet(samples, manifest))
    print(f"wrote {out}: {len(samples)} sample(s) of split {args.split!r} and its class frequencies", flush=True)
    return 0
