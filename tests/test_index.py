"""`launch/shard.py index ROOT`: adds exactly the member offsets the writer records, checks every
shard's sha256 while reading it, and changes nothing when any shard is not the manifest's."""

import json
import shutil

import pytest

from segdist.data.manifest import load_manifest
from segdist.errors import UserError
from shardtools import shard


@pytest.fixture
def old(shapes_root, tmp_path):
    """A copy of the shapes splits as converted before the offsets were recorded (the key stripped),
    and the manifests as the converter wrote them."""
    root = tmp_path / "old"
    shutil.copytree(shapes_root, root)
    written = {}
    for path in sorted(root.glob("*.json")):
        written[path.stem] = path.read_bytes()
        raw = json.loads(written[path.stem])
        for info in raw["shards"]:
            del info["members"]
        path.write_text(json.dumps(raw, indent=1) + "\n")
    return root, written


def test_index_adds_exactly_what_the_writer_records(old, capsys):
    root, written = old
    assert not load_manifest(root, "train").indexed
    assert shard("index", root) == 0
    for split, data in written.items():
        assert json.loads((root / f"{split}.json").read_bytes()) == json.loads(data)
        assert (root / f"{split}.json").read_bytes() == data  # byte for byte, even
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [f"indexed {s}: member offsets of {n} samples in {k} shards added to {root}/{s}.json"
                     for s, n, k in (("train", 48, 4), ("val7", 7, 3), ("val7b", 7, 2))]
    assert shard("verify", root) == 0


def test_indexed_splits_are_left_alone_and_splits_can_be_chosen(old, capsys):
    root, written = old
    assert shard("index", root, "--split", "val7", "val7b") == 0
    assert load_manifest(root, "val7").indexed and not load_manifest(root, "train").indexed
    capsys.readouterr()
    before = (root / "val7.json").stat().st_mtime_ns
    assert shard("index", root, "--split", "val7", "--split", "train") == 0
    assert capsys.readouterr().out.strip().splitlines() == [  # in the order asked for
        "ok val7: already indexed (7 samples in 3 shards), left alone",
        f"indexed train: member offsets of 48 samples in 4 shards added to {root}/train.json",
    ]
    assert (root / "val7.json").stat().st_mtime_ns == before


def test_a_shard_that_is_not_the_manifests_is_one_line_and_nothing_is_written(old):
    root, _ = old
    changed = root / "val7b-000001.tar"
    data = bytearray(changed.read_bytes())
    data[len(data) // 2] ^= 0xFF
    changed.write_bytes(bytes(data))
    before = {p.name: p.read_bytes() for p in root.glob("*.json")}
    with pytest.raises(UserError) as err:
        shard("index", root)
    assert str(err.value) == (f"shard {changed}: sha256 differs from {root}/val7b.json (changed, truncated or "
                              "corrupt): re-run the conversion")
    assert {p.name: p.read_bytes() for p in root.glob("*.json")} == before  # train and val7 were fine: unchanged too


def test_a_remote_or_missing_root_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"^http://127.0.0.1:9/shards is not a local folder: launch/shard.py index "
                                        r"rewrites manifests where they lie"):
        shard("index", "http://127.0.0.1:9/shards")
    with pytest.raises(UserError, match="is not a folder"):
        shard("index", tmp_path / "nowhere")
