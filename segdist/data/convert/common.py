"""What every dataset converter shares: its options, sample keys, pairing images with masks, and
the one loop that encodes pairs (in parallel) and writes them with `ShardWriter`.

A converter only has to find its `Pair`s and say how a raw mask becomes train ids (`mask_fn`);
everything that must behave the same for every dataset — key rules, size checks, `--limit`,
`--image-format`, the progress bar, determinism for any `--workers` — lives here once.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from tqdm import tqdm

from segdist.data.convert import add_common_output, parallel_map
from segdist.data.convert.imageio import IMAGE_FORMATS, encode_image, fit_longest, load_image, load_mask
from segdist.data.shards import ShardWriter
from segdist.errors import UserError


@dataclass(frozen=True)
class Pair:
    key: str
    image: Path
    mask: Path


def add_converter_options(parser: argparse.ArgumentParser) -> None:
    """`add_common_output` plus the image and trial options of every dataset converter."""
    add_common_output(parser)
    parser.add_argument(
        "--image-format", choices=IMAGE_FORMATS, default="keep",
        help="keep = store the source bytes when they are an 8-bit RGB PNG or RGB JPEG, else convert "
        "to RGB and store PNG; jpeg/png = always re-encode; raw = uncompressed pixels (.npy): no decode "
        "when training reads them, for small frames where disk is cheaper than CPU (default keep)",
    )
    parser.add_argument(
        "--mask-format", choices=("png", "raw"), default="png",
        help="png = 8/16-bit PNG; raw = uncompressed (.npy): no decode when training reads them (default png)",
    )
    parser.add_argument(
        "--max-size", type=int, default=None, metavar="N",
        help="store frames with their longest side at most N pixels (images INTER_AREA, masks nearest): a "
        "tier at a recipe's training size; the manifest records stored and source sizes (default: as the source)",
    )
    parser.add_argument("--jpeg-quality", type=int, default=95, help="quality for --image-format jpeg (default 95)")
    parser.add_argument("--limit", type=int, default=None, help="convert only the first N samples (in key order), for quick trials")


def check_converter_options(args: argparse.Namespace) -> None:
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1, got {args.limit}")
    if args.max_size is not None and args.max_size < 8:
        raise UserError(f"--max-size must be >= 8 pixels, got {args.max_size}")
    if not 1 <= args.jpeg_quality <= 100:
        raise UserError(f"--jpeg-quality must be in 1..100, got {args.jpeg_quality}")
    if args.shard_size_mb is not None and args.shard_size_mb <= 0:
        raise UserError(f"--shard-size-mb must be > 0, got {args.shard_size_mb}")
    if args.samples_per_shard < 1:
        raise UserError(f"--samples-per-shard must be >= 1, got {args.samples_per_shard}")


def output_options(args: argparse.Namespace, **extra) -> dict:
    """Conversion options for the manifest. `--workers` is left out: it does not change the output."""
    return {
        "image_format": args.image_format,
        "jpeg_quality": args.jpeg_quality if args.image_format == "jpeg" or args.max_size else None,
        "max_size": args.max_size,
        "mask_format": args.mask_format,
        "limit": args.limit,
        "samples_per_shard": None if args.shard_size_mb else args.samples_per_shard,
        "shard_size_mb": args.shard_size_mb,
        **extra,
    }


# -- keys and files --------------------------------------------------------------------------------
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def sanitize_key(name: str) -> str:
    """A sample key from a source name: every character other than letters, digits, '_' and '-'
    becomes '_'. WebDataset cuts a key at its first '.', and '/' would make tar subfolders."""
    return _KEY_UNSAFE.sub("_", name)


def require_dir(path: Path, layout: str) -> Path:
    if not path.is_dir():
        raise UserError(f"{path} is not a folder; expected layout: {layout}")
    return path


def glob_files(pattern: str, option: str) -> list[Path]:
    """Files matching a user's glob (`**` recursive), sorted; none is a `UserError`."""
    files = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
    if not files:
        raise UserError(f"{option} {pattern!r} matches no files: check the pattern (quote it so the shell does not expand it)")
    return files


def glob_base(pattern: str) -> Path:
    """The fixed folder in front of a glob's first wildcard; meta paths are stored relative to it."""
    parts = Path(os.path.expanduser(pattern)).parts
    fixed = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _show(paths: list, n: int = 3) -> str:
    more = f" and {len(paths) - n} more" if len(paths) > n else ""
    return ", ".join(str(p) for p in paths[:n]) + more


def index_by_key(
    files: Iterable[Path], key_fn: Callable[[Path], str | None], what: str, hint: str = "sample keys must be unique"
) -> tuple[dict[str, Path], list[Path]]:
    """Map key → file; files whose key is None are returned apart. Two files, one key: `UserError`."""
    found: dict[str, Path] = {}
    nokey: list[Path] = []
    for f in files:
        key = key_fn(f)
        if key is None:
            nokey.append(f)
        elif key in found:
            raise UserError(f"{what} {found[key]} and {f} both have the key {key!r}: {hint}")
        else:
            found[key] = f
    return found, nokey


def pair_files(
    images: dict[str, Path], masks: dict[str, Path], allow_unpaired: bool = False, hint: str = ""
) -> list[Pair]:
    """Pairs in sorted key order (so shard contents never depend on directory listing order).

    An image without a mask or a mask without an image is a `UserError` listing the first few,
    unless `allow_unpaired`, when they are skipped with a one-line warning on stderr.
    """
    lone_images = [images[k] for k in sorted(images.keys() - masks.keys())]
    lone_masks = [masks[k] for k in sorted(masks.keys() - images.keys())]
    if lone_images or lone_masks:
        parts = []
        if lone_images:
            parts.append(f"{len(lone_images)} image(s) without a mask ({_show(lone_images)})")
        if lone_masks:
            parts.append(f"{len(lone_masks)} mask(s) without an image ({_show(lone_masks)})")
        if not allow_unpaired:
            raise UserError("; ".join(parts) + (f"; {hint}" if hint else ""))
        print(f"warning: skipping {'; '.join(parts)}", file=sys.stderr)
    return [Pair(sanitize_key(k), images[k], masks[k]) for k in sorted(images.keys() & masks.keys())]


# -- encoding --------------------------------------------------------------------------------------
def identity_mask(mask: np.ndarray, key: str, path: Path) -> np.ndarray:
    """Masks already in train ids; the writer still checks every value."""
    return mask


def encode_pair(pair: Pair, base: Path, image_format: str, jpeg_quality: int, mask_fn: Callable,
                max_size: int | None = None):
    """Read, check, shrink (`--max-size`) and encode one pair; runs in a worker process, so
    everything is picklable."""
    src = load_image(pair.image)
    raw = load_mask(pair.mask)
    h, w = src.rgb.shape[:2]
    if raw.shape[:2] != (h, w):
        raise UserError(
            f"sample {pair.key}: mask {pair.mask} is {raw.shape[1]}x{raw.shape[0]} but image {pair.image} "
            f"is {w}x{h} (width x height): fix or remove this pair"
        )
    mask = mask_fn(raw, pair.key, pair.mask)
    rgb, mask = fit_longest(src.rgb, mask, max_size)
    data, ext = encode_image(src, image_format, jpeg_quality, None if rgb is src.rgb else rgb)
    meta = {
        "image": _relative(pair.image, base),
        "mask": _relative(pair.mask, base),
        "height": h,
        "width": w,
        "source_format": src.format,
        "source_mode": src.mode,
    }
    return pair.key, data, ext, mask, meta


def _relative(path: Path, base: Path) -> str:
    # Relative to the dataset root, so shards are byte-identical wherever the dataset lives.
    try:
        return Path(os.path.relpath(path, base)).as_posix()
    except ValueError:  # another drive on Windows
        return Path(path).as_posix()


def write_split(
    pairs: list[Pair],
    args: argparse.Namespace,
    *,
    base: Path,
    dataset: str,
    classes: list[str],
    palette: list[list[int]],
    source: dict,
    options: dict,
    mask_fn: Callable = identity_mask,
    ignore_index: int = 255,
):
    """Encode `pairs` (first `--limit` only) with `--workers` processes and write shards + manifest."""
    if args.limit is not None:
        pairs = pairs[: args.limit]
    if not pairs:
        raise UserError(f"no samples found for split {args.split!r} in {base}: check the paths and the split name")
    encode = partial(encode_pair, base=base, image_format=args.image_format, jpeg_quality=args.jpeg_quality,
                     mask_fn=mask_fn, max_size=args.max_size)
    with ShardWriter(
        args.out, args.split, dataset=dataset, classes=classes, palette=palette, ignore_index=ignore_index,
        samples_per_shard=args.samples_per_shard, shard_size_mb=args.shard_size_mb, source=source, options=options,
        mask_format=args.mask_format,
    ) as writer:
        # disable=None: a bar on a terminal, nothing in a log file or a pipe.
        with tqdm(total=len(pairs), desc=f"{dataset} {args.split}", unit="img", disable=None) as bar:
            for key, data, ext, mask, meta in parallel_map(encode, pairs, args.workers):
                writer.write(key, data, ext, mask, meta, source_size=(meta["height"], meta["width"]))
                bar.update()
        manifest = writer.close()
    print(
        f"wrote {manifest.num_samples} {dataset} samples in {len(manifest.shards)} shards to "
        f"{args.out}/{args.split}-*.tar ({manifest.valid_pixels} valid pixels)"
    )
    return manifest
