"""Converters from datasets on disk into shards: one module per format, each with
`add_parser(subparsers)` and `run(args) -> int`. `launch/shard.py` lists them in CONVERTERS."""

from __future__ import annotations

import argparse
import importlib
from multiprocessing import get_context
from typing import Callable, Iterable, Iterator

# Subcommand name → module under segdist.data.convert (each has add_parser and run). `verify`,
# `index` and `show` are not converters but check, index and draw their output, subcommands of the
# same tool.
CONVERTERS = {
    "shapes": "segdist.data.convert.shapes",
    "cityscapes": "segdist.data.convert.cityscapes",
    "voc": "segdist.data.convert.voc",
    "ade20k": "segdist.data.convert.ade20k",
    "folder": "segdist.data.convert.folder",
    "verify": "segdist.data.convert.verify",
    "index": "segdist.data.convert.index",
    "show": "segdist.data.convert.show",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Convert a dataset into WebDataset tar shards plus a manifest "
        "(<out>/<split>-NNNNNN.tar and <out>/<split>.json).",
    )
    sub = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    for name, module in CONVERTERS.items():
        mod = importlib.import_module(module)
        p = mod.add_parser(sub, name)
        p.set_defaults(run=mod.run)
    return parser


def add_common_output(parser: argparse.ArgumentParser) -> None:
    """Options every converter shares: where to write and how to cut shards."""
    parser.add_argument("--out", required=True, help="output folder for shards and manifest")
    parser.add_argument("--split", required=True, help="split name, e.g. train or val")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar shard (default 1000)")
    size.add_argument("--shard-size-mb", type=float, default=None, help="cut shards at about this size instead")
    parser.add_argument("--workers", type=int, default=1, help="parallel encoder processes; output is identical for any N")


def parallel_map(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """`map` in input order over `workers` processes (1 = in this process): output order, and
    so the shards' bytes, never depend on the number of workers."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(fn, items, chunksize=8)
