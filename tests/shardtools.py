"""Helpers the converter tests share: run `launch/shard.py` in-process and read shards back."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
from PIL import Image

from segdist.data.convert import build_parser


def shard(*argv) -> int:
    """`launch/shard.py ARGV` in this process; returns its exit code (UserError propagates)."""
    args = build_parser().parse_args([str(a) for a in argv])
    return args.run(args)


def read_split(out, split):
    """(manifest dict, {key: {"image.png": bytes, "mask.png": bytes, ...}}) of a converted split."""
    manifest = json.loads((out / f"{split}.json").read_text())
    samples = {}
    for info in manifest["shards"]:
        with tarfile.open(out / info["file"]) as tar:
            for member in tar:
                key, _, kind = member.name.partition(".")
                samples.setdefault(key, {})[kind] = tar.extractfile(member).read()
    return manifest, samples


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))
