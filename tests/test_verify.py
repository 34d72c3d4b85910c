"""`launch/shard.py verify`: passes good output, names the shard (and sample) of every kind of damage."""

import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segdist.errors import UserError
from shardtools import shard

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def out(tmp_path):
    """Two shapes splits (PNG images, no meta) and a folder split (JPEG images + meta) in one folder."""
    d = tmp_path / "shards"
    shard("shapes", "--count", "6", "--size", "24", "32", "--samples-per-shard", "2", "--split", "train", "--out", d)
    shard("shapes", "--count", "3", "--seed", "1", "--size", "24", "32", "--split", "val", "--out", d)
    (tmp_path / "img").mkdir()
    (tmp_path / "lbl").mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(tmp_path / f"img/{name}.png")
        Image.fromarray(rng.choice(np.array([0, 1, 255], np.uint8), (24, 32))).save(tmp_path / f"lbl/{name}.png")
    shard("folder", "--images", tmp_path / "img/*.png", "--masks", tmp_path / "lbl/*.png", "--classes", "x,y",
          "--image-format", "jpeg", "--split", "photos", "--out", d)
    return d


def verify(*argv):
    return shard("verify", *argv)


def rewrite(path: Path, edit) -> None:
    """Rewrite a shard's members through `edit(list of (name, bytes))` and fix its sha256 and member
    offsets in the manifest, so that only --deep can notice what changed inside."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    members = edit(members)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    fix_sha(path)


def fix_sha(path: Path) -> None:
    """The manifest's sha256 of a shard, and its member offsets where it records them, made the shard's."""
    from segdist.data.convert.verify import scan_shard

    split = path.name.rsplit("-", 1)[0]
    manifest_file = path.parent / f"{split}.json"
    manifest = json.loads(manifest_file.read_text())
    for info in manifest["shards"]:
        if info["file"] == path.name:
            info["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
            members = scan_shard(path)[1]
            if "members" in info and not isinstance(members, str) and len(members) == info["samples"]:
                info["members"] = members
    manifest_file.write_text(json.dumps(manifest))


def strip_members(out: Path, split: str) -> None:
    """The split's manifest as converted before member offsets were recorded."""
    manifest = json.loads((out / f"{split}.json").read_text())
    for info in manifest["shards"]:
        del info["members"]
    (out / f"{split}.json").write_text(json.dumps(manifest))


def png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_good_output_passes_with_one_line_per_split(out, capsys):
    assert verify(out, "--deep") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["ok photos", "ok train", "ok val"]
    assert "6 samples in 3 shards" in lines[1] and "every sample decoded" in lines[1]
    assert verify(out, "--split", "val") == 0
    assert capsys.readouterr().out.strip().splitlines() == [
        next(line for line in lines if line.startswith("ok val")).replace("every sample decoded", "sha256 matched")
    ]


def test_flipped_byte_names_the_shard(out):
    path = out / "train-000001.tar"
    data = bytearray(path.read_bytes())
    data[700] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"shard .*train-000001.tar: sha256 differs"):
        verify(out, "--deep")


def test_truncated_tar_names_the_shard_even_with_a_matching_sha(out):
    path = out / "train-000002.tar"
    path.write_bytes(path.read_bytes()[:1500])
    with pytest.raises(UserError, match=r"shard .*train-000002.tar: sha256 differs"):
        verify(out, "--split", "train")
    fix_sha(path)  # a manifest rewritten after the damage: only reading the tar can tell
    # where the manifest records member offsets, the headers are read with the sha256
    with pytest.raises(UserError, match=r"shard .*train-000002.tar is not a readable tar \(unexpected end of data\)"):
        verify(out, "--split", "train")
    strip_members(out, "train")
    verify(out, "--split", "train")  # converted before they were recorded: only --deep reads the tar
    with pytest.raises(UserError, match=r"shard .*train-000002.tar (is not a readable tar|holds 0 samples)"):
        verify(out, "--split", "train", "--deep")


def test_missing_shard_names_the_shard(out):
    (out / "val-000000.tar").unlink()
    with pytest.raises(UserError, match=r"shard .*val-000000.tar listed in .*val.json is missing"):
        verify(out)


def test_stray_shard_is_reported(out):
    (out / "val-000007.tar").write_bytes((out / "val-000000.tar").read_bytes())
    with pytest.raises(UserError, match=r"shard .*val-000007.tar is not listed in .*val.json"):
        verify(out, "--split", "val")


def test_deep_finds_a_label_out_of_range(out):
    def bad_mask(members):
        return [(n, png(np.full((24, 32), 9, np.uint8)) if n == "shapes_0_0000003.mask.png" else d) for n, d in members]

    rewrite(out / "train-000001.tar", bad_mask)
    verify(out, "--split", "train")
    with pytest.raises(UserError, match=r"shard .*train-000001.tar sample shapes_0_0000003: mask holds 9, but there are 5 classes"):
        verify(out, "--split", "train", "--deep")


def test_deep_finds_a_missing_mask(out):
    rewrite(out / "photos-000000.tar", lambda members: [(n, d) for n, d in members if n != "b.mask.png"])
    with pytest.raises(UserError, match=r"shard .*photos-000000.tar sample b: needs one image.png, image.jpg or image.npy and one mask.png or mask.npy"):
        verify(out, "--deep")


def test_deep_finds_a_size_mismatch(out):
    def small_mask(members):
        return [(n, png(np.zeros((20, 32), np.uint8)) if n == "a.mask.png" else d) for n, d in members]

    rewrite(out / "photos-000000.tar", small_mask)
    with pytest.raises(UserError, match=r"shard .*photos-000000.tar sample a: mask is 32x20 but image is 32x24"):
        verify(out, "--split", "photos", "--deep")


def test_deep_finds_a_wrong_sample_count(out):
    rewrite(out / "train-000000.tar", lambda members: [(n, d) for n, d in members if not n.startswith("shapes_0_0000001.")])
    with pytest.raises(UserError, match=r"shard .*train-000000.tar: member offsets in .*train.json differ from the tar "
                                        r"\(it records the members of 2 samples, the tar holds 1\)"):
        verify(out, "--split", "train")
    strip_members(out, "train")
    with pytest.raises(UserError, match=r"shard .*train-000000.tar holds 1 samples, its manifest says 2"):
        verify(out, "--split", "train", "--deep")


def test_deep_finds_wrong_pixel_totals(out):
    manifest = json.loads((out / "val.json").read_text())
    manifest["class_pixels"][2] += 1
    (out / "val.json").write_text(json.dumps(manifest))
    verify(out, "--split", "val")
    with pytest.raises(UserError, match=r"split 'val': class 2 \(square\) has \d+ pixels in the shards but \d+ in the manifest"):
        verify(out, "--split", "val", "--deep")


def test_empty_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"no manifest"):
        verify(tmp_path)


def test_damage_exits_2_with_one_line(out):
    path = out / "val-000000.tar"
    path.write_bytes(path.read_bytes()[:-600])
    proc = subprocess.run([sys.executable, str(REPO / "launch/shard.py"), "verify", str(out), "--deep"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "val-000000.tar" in lines[0], proc.stderr


def test_deep_finds_a_raw_image_whose_bytes_do_not_match_its_shape(out):
    root = out.parent
    shard("folder", "--images", root / "img/*.png", "--masks", root / "lbl/*.png", "--classes", "x,y",
          "--image-format", "raw", "--split", "raw", "--out", out)
    verify(out, "--deep")
    rewrite(out / "raw-000000.tar", lambda members: [(n, d[:-3] if n == "b.image.npy" else d) for n, d in members])
    with pytest.raises(UserError, match=r"raw-000000.tar sample b: image.npy is not an HxWx3 uint8 array whose bytes "
                                        r"match its recorded shape"):
        verify(out, "--deep")


def test_member_offsets_that_are_not_the_tars_name_the_shard_and_the_sample(out):
    manifest = json.loads((out / "val.json").read_text())
    key, spans = manifest["shards"][0]["members"][1]
    spans[1][1] += 512  # the mask recorded one block later than it lies
    (out / "val.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=rf"^shard .*val-000000.tar: member offsets in .*val.json differ from the tar "
                                        rf"\(it records {key}: image.png at \d+ \(\d+ bytes\), mask.png at {spans[1][1]} "
                                        rf"\(\d+ bytes\); the tar holds {key}: .*mask.png at {spans[1][1] - 512} "):
        verify(out, "--split", "val")
    strip_members(out, "val")  # a manifest converted before offsets were recorded: the sha256 alone
    assert verify(out, "--split", "val") == 0

