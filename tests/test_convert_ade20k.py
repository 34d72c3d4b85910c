"""ADE20K converter on a tiny ADEChallengeData2016 tree in the official layout."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segdist.data.convert.ade20k_classes import OBJECT_INFO_150, PALETTE_150
from segdist.errors import UserError
from shardtools import shard, read_split, decode

REPO = Path(__file__).resolve().parents[1]
H, W = 32, 48
NAMES = {"training": ["ADE_train_00000001", "ADE_train_00000002", "ADE_train_00000003"],
         "validation": ["ADE_val_00000001"]}


def make_ade(root: Path, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    raw = {}
    for folder, names in NAMES.items():
        (root / "images" / folder).mkdir(parents=True)
        (root / "annotations" / folder).mkdir(parents=True)
        for i, name in enumerate(names):
            image = Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
            if i == 2:
                image = image.convert("L")  # ADE20K has grayscale JPEGs among its images
            image.save(root / "images" / folder / f"{name}.jpg", quality=90)
            raw[name] = rng.integers(0, 151, (H, W)).astype(np.uint8)
            Image.fromarray(raw[name]).save(root / "annotations" / folder / f"{name}.png")
    (root / "objectInfo150.txt").write_text("Idx\tRatio\tTrain\tVal\tName\n")
    (root / "sceneCategories.txt").write_text("")
    return raw


def test_zero_is_ignore_and_k_becomes_k_minus_1(tmp_path):
    raw = make_ade(tmp_path / "ADEChallengeData2016")
    assert shard("ade20k", "--root", tmp_path / "ADEChallengeData2016", "--split", "train", "--out", tmp_path / "out") == 0
    manifest, samples = read_split(tmp_path / "out", "train")
    assert sorted(samples) == NAMES["training"]
    assert manifest["classes"] == OBJECT_INFO_150 and manifest["palette"] == PALETTE_150
    assert manifest["options"]["source_split"] == "training"
    totals = np.zeros(150, dtype=np.int64)
    for key, files in samples.items():
        want = np.where(raw[key] == 0, 255, raw[key].astype(np.int64) - 1)
        np.testing.assert_array_equal(decode(files["mask.png"]), want)
        totals += np.bincount(want[want != 255], minlength=150)
    assert manifest["class_pixels"] == totals.tolist()
    gray = decode(samples["ADE_train_00000003"]["image.png"])  # grayscale JPEG: converted, stored as RGB PNG
    assert gray.shape == (H, W, 3) and (gray[:, :, 0] == gray[:, :, 2]).all()


def test_class_table_is_complete():
    assert len(OBJECT_INFO_150) == len(set(OBJECT_INFO_150)) == 150
    assert OBJECT_INFO_150[0] == "wall" and OBJECT_INFO_150[149] == "flag"
    assert OBJECT_INFO_150[12].startswith("person;") and OBJECT_INFO_150[20].startswith("car;")
    assert len(PALETTE_150) == 150 and all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in PALETTE_150)


def test_source_split_option_names_the_output_freely(tmp_path):
    make_ade(tmp_path / "ade")
    with pytest.raises(UserError, match=r"--split 'holdout' has no default source folder"):
        shard("ade20k", "--root", tmp_path / "ade", "--split", "holdout", "--out", tmp_path / "out")
    shard("ade20k", "--root", tmp_path / "ade", "--split", "holdout", "--source-split", "validation", "--out", tmp_path / "out")
    manifest, samples = read_split(tmp_path / "out", "holdout")
    assert list(samples) == ["ADE_val_00000001"] and manifest["source"]["images"] == "images/validation"
    # The official folder's name as the split's name.
    shard("ade20k", "--root", tmp_path / "ade", "--split", "validation", "--out", tmp_path / "out")
    manifest, samples = read_split(tmp_path / "out", "validation")
    assert list(samples) == ["ADE_val_00000001"] and manifest["source"]["images"] == "images/validation"


def test_workers_give_identical_bytes(tmp_path):
    make_ade(tmp_path / "ade")
    for n in (1, 2):
        shard("ade20k", "--root", tmp_path / "ade", "--split", "train", "--out", tmp_path / f"w{n}",
              "--shard-size-mb", "0.005", "--workers", n)
    names = sorted(p.name for p in (tmp_path / "w1").iterdir())
    assert len(names) > 2 and names == sorted(p.name for p in (tmp_path / "w2").iterdir())
    for name in names:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name


def test_value_above_150_names_the_sample_and_value(tmp_path):
    raw = make_ade(tmp_path / "ade")
    bad = raw["ADE_train_00000002"].copy()
    bad[0, 0] = 151
    Image.fromarray(bad).save(tmp_path / "ade/annotations/training/ADE_train_00000002.png")
    with pytest.raises(UserError, match=r"sample ADE_train_00000002: .* holds value 151; expected ADE20K annotation values 0..150"):
        shard("ade20k", "--root", tmp_path / "ade", "--split", "train", "--out", tmp_path / "out")


def test_missing_annotations_folder_exits_2_with_one_line(tmp_path):
    make_ade(tmp_path / "ade")
    (tmp_path / "ade/annotations/validation").rename(tmp_path / "ade/annotations/val")
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch/shard.py"), "ade20k", "--root", str(tmp_path / "ade"),
         "--split", "val", "--out", str(tmp_path / "out")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "annotations/validation is not a folder" in lines[0], proc.stderr
