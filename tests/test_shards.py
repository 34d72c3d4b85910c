import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from conftest import shard
from segdist.data.manifest import load_manifest
from segdist.data.shards import ShardWriter, encode_png
from segdist.errors import UserError


def test_same_seed_byte_identical_shards(tmp_path):
    for out in ("a", "b"):
        shard(["shapes", "--out", str(tmp_path / out), "--split", "s", "--count", "9", "--size", "16", "24",
               "--seed", "4", "--samples-per-shard", "4", "--workers", "2" if out == "b" else "1"])
    for name in ("s-000000.tar", "s-000001.tar", "s-000002.tar", "s.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_manifest_matches_shards(tmp_path):
    shard(["shapes", "--out", str(tmp_path), "--split", "s", "--count", "9", "--size", "16", "24",
           "--seed", "4", "--samples-per-shard", "4"])
    m = load_manifest(tmp_path, "s")
    assert [s.samples for s in m.shards] == [4, 4, 1] and m.num_samples == 9
    counts = np.zeros(5, dtype=np.int64)
    for info in m.shards:
        data = (tmp_path / info.file).read_bytes()
        assert hashlib.sha256(data).hexdigest() == info.sha256
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".mask.png"):
                    mask = np.asarray(Image.open(tar.extractfile(member)))
                    counts += np.bincount(mask.ravel(), minlength=256)[:5]
    assert m.class_pixels == counts.tolist()
    assert json.loads((tmp_path / "s.json").read_text())["valid_pixels"] == int(counts.sum())


def test_label_out_of_range_names_sample(tmp_path):
    w = ShardWriter(tmp_path, "s", dataset="t", classes=["a", "b"], palette=[[0, 0, 0], [1, 1, 1]], samples_per_shard=1000)
    mask = np.zeros((4, 4), np.uint8)
    mask[0, 0] = 7
    with pytest.raises(UserError, match="sample k1"):
        w.write("k1", encode_png(np.zeros((4, 4, 3), np.uint8)), "png", mask)


def _write_some(w, n):
    for i in range(n):
        w.write(f"k{i}", encode_png(np.zeros((4, 4, 3), np.uint8)), "png", np.zeros((4, 4), np.uint8))


@pytest.mark.parametrize("how", [RuntimeError, KeyboardInterrupt, "abort"])
def test_interrupted_conversion_leaves_the_previous_one_intact(tmp_path, how):
    shard(["shapes", "--out", str(tmp_path), "--split", "s", "--count", "3", "--size", "16", "16"])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(before) == ["s-000000.tar", "s.json"]
    w = ShardWriter(tmp_path, "s", dataset="t", classes=["a"], palette=[[0, 0, 0]], samples_per_shard=2)
    if how == "abort":
        _write_some(w, 5)  # two finished shards and one in progress, all under temporary names
        assert len(list(tmp_path.glob(".s-*.tar.tmp"))) == 3
        w.abort()
    else:
        with pytest.raises(how):
            with w:
                _write_some(w, 5)
                raise how("interrupted")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp file, nothing changed
    assert load_manifest(tmp_path, "s").num_samples == 3
    shard(["verify", str(tmp_path), "--deep"])


def test_close_swaps_in_the_new_conversion_and_removes_leftovers(tmp_path):
    shard(["shapes", "--out", str(tmp_path), "--split", "s", "--count", "6", "--size", "16", "16", "--samples-per-shard", "2"])
    (tmp_path / ".s-000007.tar.tmp").write_bytes(b"left by a killed conversion")
    w = ShardWriter(tmp_path, "s", dataset="t", classes=["a"], palette=[[0, 0, 0]], samples_per_shard=4)
    _write_some(w, 5)
    # Until close(), readers still see the old conversion, consistent and complete.
    assert load_manifest(tmp_path, "s").num_samples == 6
    shard(["verify", str(tmp_path)])
    m = w.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s-000000.tar", "s-000001.tar", "s.json"]
    assert m.num_samples == 5 and load_manifest(tmp_path, "s").num_samples == 5
    shard(["verify", str(tmp_path), "--deep"])


def test_converting_a_split_leaves_splits_with_a_longer_name_alone(tmp_path):
    common = ["--out", str(tmp_path), "--size", "16", "16", "--samples-per-shard", "2"]
    shard(["shapes", *common, "--split", "train-aug", "--count", "3"])
    shard(["shapes", *common, "--split", "train", "--count", "3"])
    shard(["shapes", *common, "--split", "train", "--count", "1"])  # removes train-000001.tar only
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["train-000000.tar", "train-aug-000000.tar", "train-aug-000001.tar", "train-aug.json", "train.json"]
    shard(["verify", str(tmp_path), "--deep"])


def test_no_samples_is_a_user_error_and_changes_nothing(tmp_path):
    shard(["shapes", "--out", str(tmp_path), "--split", "s", "--count", "1", "--size", "16", "16"])
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(UserError, match="no samples"):
        ShardWriter(tmp_path, "s", dataset="t", classes=["a"], palette=[[0, 0, 0]], samples_per_shard=1000).close()
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_rerun_replaces_cleanly(tmp_path):
    args = ["shapes", "--out", str(tmp_path), "--split", "s", "--size", "16", "16", "--samples-per-shard", "2"]
    shard([*args, "--count", "6"])
    shard([*args, "--count", "3"])
    assert sorted(p.name for p in tmp_path.glob("s-*.tar")) == ["s-000000.tar", "s-000001.tar"]
    assert load_manifest(tmp_path, "s").num_samples == 3


def test_missing_manifest_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_manifest(tmp_path, "nope")


def test_recorded_member_offsets_hold_exactly_what_tarfile_extracts(tmp_path):
    """Every kind the writer stores (PNG, JPEG and raw images, PNG and raw masks, meta), across shard
    boundaries: each recorded span of the file is the member's bytes, and the spans name every member."""
    from segdist.data.shards import encode_jpeg, encode_raw

    rng = np.random.default_rng(5)
    for mask_format in ("png", "raw"):
        w = ShardWriter(tmp_path, mask_format, dataset="t", classes=["a", "b"], palette=[[0, 0, 0], [1, 1, 1]],
                        samples_per_shard=3, mask_format=mask_format)
        for i in range(7):
            image = rng.integers(0, 256, (9 + i, 13, 3), dtype=np.uint8)
            encoded, ext = [(encode_png(image), "png"), (encode_jpeg(image), "jpg"), (encode_raw(image), "npy")][i % 3]
            w.write(f"k{i}", encoded, ext, rng.integers(0, 2, (9 + i, 13)).astype(np.uint8),
                    meta={"i": i} if i % 2 else None)
        manifest = w.close()
        assert manifest.indexed and [len(s.members) for s in manifest.shards] == [3, 3, 1]
        for info in manifest.shards:
            data = (tmp_path / info.file).read_bytes()
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                extracted = {m.name: tar.extractfile(m).read() for m in tar}
            recorded = {f"{key}.{kind}": data[offset:offset + size] for key, spans in info.members for kind, offset, size in spans}
            assert recorded == extracted
        assert load_manifest(tmp_path, mask_format).shards[1].members == manifest.shards[1].members
