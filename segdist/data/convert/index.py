"""`launch/shard.py index ROOT`: add member offsets to the manifests of splits converted before
segdist recorded them, without re-encoding a sample.

Reading a sample by position (segdist.data.sample.read_sample) needs each member's offset and size
in its shard (`ShardInfo.members`). The converters record them as they write; this pass finds them
in shards written before: each shard is read once, front to back, its tar headers parsed and every
byte hashed, and its sha256 must be the manifest's (a shard changed since its conversion would give
offsets that describe other bytes). Only when every shard of every split asked for is whole are the
manifests rewritten, each atomically, with nothing changed but the `members` added: a failure
leaves every manifest as it was. A split already indexed is left alone. A local folder only: the
manifest is rewritten where it lies.
"""

from __future__ import annotations

import argparse
import json

from tqdm import tqdm

from segdist.data.convert.verify import find_splits, scanned_members
from segdist.data.location import is_remote, local_root
from segdist.data.manifest import Manifest, load_manifest, manifest_path
from segdist.errors import UserError
from segdist.fileio import atomic_write_json


def add_parser(sub, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name, help="add member offsets to manifests converted without them (no re-encoding)",
        description="Add each sample's member offsets to the manifests of a local folder, so that samples can "
        "be read by position: every shard is read once, its tar headers parsed and its sha256 checked against "
        "the manifest. Splits already indexed are left alone. Exit 0 and one line per split, else one error "
        "line and exit 2 with no manifest changed.",
    )
    p.add_argument("dir", metavar="ROOT", help="folder holding <split>.json and <split>-NNNNNN.tar")
    p.add_argument("--split", nargs="+", action="extend", default=None, metavar="SPLIT",
                   help="index only these splits (default: every manifest in ROOT)")
    return p


def index_split(manifest: Manifest, bar: tqdm) -> list[list[list]]:
    """The members of each shard of a split; a shard whose sha256 is not the manifest's, that does
    not read as a tar or whose samples are not the manifest's count is a one-line `UserError`."""
    where = manifest_path(manifest.root, manifest.split)
    found = []
    for info, path in zip(manifest.shards, manifest.shard_paths()):
        members = scanned_members(path, info.sha256, where)
        if len(members) != info.samples:
            raise UserError(f"shard {path} holds {len(members)} samples, {where} says {info.samples}: "
                            "re-run the conversion")
        found.append(members)
        bar.update()
    return found


def run(args: argparse.Namespace) -> int:
    if is_remote(args.dir):
        raise UserError(f"{args.dir} is not a local folder: launch/shard.py index rewrites manifests where they lie; "
                        "index the folder the split was copied from, then copy its <split>.json again")
    root = local_root(args.dir)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder: give the --out folder of launch/shard.py")
    splits = list(dict.fromkeys(args.split)) if args.split else find_splits(root)
    manifests = [load_manifest(root, split) for split in splits]
    todo = [m for m in manifests if not m.indexed]
    with tqdm(total=sum(len(m.shards) for m in todo), desc="index", unit="shard", disable=None) as bar:
        found = {m.split: index_split(m, bar) for m in todo}  # every shard checked before any manifest changes
        for manifest in manifests:
            if manifest.split not in found:
                bar.write(f"ok {manifest.split}: already indexed ({manifest.num_samples} samples in "
                          f"{len(manifest.shards)} shards), left alone")
                continue
            path = manifest_path(root, manifest.split)
            raw = json.loads(path.read_text(encoding="utf-8"))
            for shard, members in zip(raw["shards"], found[manifest.split]):
                shard["members"] = members
            atomic_write_json(path, raw)
            bar.write(f"indexed {manifest.split}: member offsets of {manifest.num_samples} samples in "
                      f"{len(manifest.shards)} shards added to {path}")
    return 0
