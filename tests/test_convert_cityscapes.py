"""Cityscapes converter on a tiny dataset in the official on-disk layout."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cityscapesscripts.helpers.labels import id2label, trainId2label
from PIL import Image

from segdist.errors import UserError
from shardtools import shard, read_split, decode

REPO = Path(__file__).resolve().parents[1]
H, W = 32, 48
FRAMES = {"aachen": ["aachen_000000_000019", "aachen_000001_000019"], "bochum": ["bochum_000000_000313"]}


def make_cityscapes(root: Path, split="train", seed=0, size=(H, W)) -> dict:
    """leftImg8bit + gtFine (labelIds plus the color/instance/polygon files that must be ignored),
    frames of `size` (height, width)."""
    rng = np.random.default_rng(seed)
    raw = {}
    valid_ids = np.array(sorted(id2label))  # includes -1 (license plate), which never appears in a file
    valid_ids = valid_ids[valid_ids >= 0]
    for city, names in FRAMES.items():
        (root / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
        (root / "gtFine" / split / city).mkdir(parents=True, exist_ok=True)
        for name in names:
            image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            ids = rng.choice(valid_ids, size=size).astype(np.uint8)
            Image.fromarray(image).save(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png")
            gt = root / "gtFine" / split / city
            Image.fromarray(ids).save(gt / f"{name}_gtFine_labelIds.png")
            Image.fromarray(image).save(gt / f"{name}_gtFine_color.png")
            Image.fromarray(ids.astype(np.uint16) * 1000).save(gt / f"{name}_gtFine_instanceIds.png")
            (gt / f"{name}_gtFine_polygons.json").write_text("{}")
            raw[name] = ids
    return raw


def expected_train_ids(ids: np.ndarray) -> np.ndarray:
    """Independently of the converter's lookup table: one dict lookup per distinct id."""
    out = np.empty_like(ids)
    for value in np.unique(ids):
        train_id = id2label[int(value)].trainId
        out[ids == value] = train_id if 0 <= train_id < 255 else 255
    return out


def test_train_ids_names_palette_and_totals(tmp_path):
    raw = make_cityscapes(tmp_path / "cs")
    assert shard("cityscapes", "--root", tmp_path / "cs", "--split", "train", "--out", tmp_path / "out",
                 "--samples-per-shard", "2") == 0
    manifest, samples = read_split(tmp_path / "out", "train")
    assert sorted(samples) == sorted(raw) and manifest["num_samples"] == 3 and len(manifest["shards"]) == 2
    assert manifest["classes"] == [trainId2label[i].name for i in range(19)]
    assert manifest["palette"] == [list(trainId2label[i].color) for i in range(19)]
    totals = np.zeros(19, dtype=np.int64)
    for key, files in samples.items():
        want = expected_train_ids(raw[key])
        got = decode(files["mask.png"])
        np.testing.assert_array_equal(got, want)
        totals += np.bincount(want[want != 255], minlength=19)
        # --image-format keep: the source PNG's bytes, untouched
        city = key.split("_")[0]
        assert files["image.png"] == (tmp_path / "cs/leftImg8bit/train" / city / f"{key}_leftImg8bit.png").read_bytes()
        meta = json.loads(files["meta.json"])
        assert meta["image"] == f"leftImg8bit/train/{city}/{key}_leftImg8bit.png"
        assert (meta["height"], meta["width"]) == (H, W)
    assert manifest["class_pixels"] == totals.tolist()
    assert manifest["source"]["format"] == "cityscapes" and manifest["options"]["image_format"] == "keep"


def test_workers_give_identical_bytes_and_jpeg_option(tmp_path):
    make_cityscapes(tmp_path / "cs")
    for n in (1, 2):
        shard("cityscapes", "--root", tmp_path / "cs", "--split", "train", "--out", tmp_path / f"w{n}",
              "--samples-per-shard", "2", "--workers", n, "--image-format", "jpeg", "--jpeg-quality", "80")
    names = sorted(p.name for p in (tmp_path / "w1").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "w2").iterdir())
    for name in names:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name
    _, samples = read_split(tmp_path / "w1", "train")
    image = Image.open(io.BytesIO(samples["bochum_000000_000313"]["image.jpg"]))
    assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (W, H))


def test_limit_takes_the_first_keys_and_a_rerun_replaces_the_split(tmp_path):
    make_cityscapes(tmp_path / "cs")
    common = ["cityscapes", "--root", tmp_path / "cs", "--split", "train", "--out", tmp_path / "out", "--samples-per-shard", "1"]
    shard(*common)
    assert len(list((tmp_path / "out").glob("train-*.tar"))) == 3
    shard(*common, "--limit", "2")
    manifest, samples = read_split(tmp_path / "out", "train")
    assert sorted(samples) == ["aachen_000000_000019", "aachen_000001_000019"] and manifest["options"]["limit"] == 2
    assert sorted(p.name for p in (tmp_path / "out").glob("train-*.tar")) == ["train-000000.tar", "train-000001.tar"]
    assert shard("verify", tmp_path / "out", "--deep") == 0


def test_unknown_label_id_names_the_sample(tmp_path):
    make_cityscapes(tmp_path / "cs")
    bad = tmp_path / "cs/gtFine/train/bochum/bochum_000000_000313_gtFine_labelIds.png"
    Image.fromarray(np.full((H, W), 40, dtype=np.uint8)).save(bad)
    with pytest.raises(UserError, match=r"sample bochum_000000_000313: .* holds value 40"):
        shard("cityscapes", "--root", tmp_path / "cs", "--split", "train", "--out", tmp_path / "out")
    assert not (tmp_path / "out" / "train.json").exists()


def test_size_mismatch_names_the_sample(tmp_path):
    make_cityscapes(tmp_path / "cs")
    bad = tmp_path / "cs/gtFine/train/aachen/aachen_000001_000019_gtFine_labelIds.png"
    Image.fromarray(np.zeros((H, W + 2), dtype=np.uint8)).save(bad)
    with pytest.raises(UserError, match=r"sample aachen_000001_000019: mask .* is 50x32 but image .* is 48x32"):
        shard("cityscapes", "--root", tmp_path / "cs", "--split", "train", "--out", tmp_path / "out")


def test_image_without_annotation_is_listed(tmp_path):
    make_cityscapes(tmp_path / "cs")
    (tmp_path / "cs/gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(UserError, match=r"1 image\(s\) without a mask \(.*aachen_000000_000019_leftImg8bit.png\)"):
        shard("cityscapes", "--root", tmp_path / "cs", "--split", "train", "--out", tmp_path / "out")


def test_missing_split_folder_exits_2_with_one_line(tmp_path):
    make_cityscapes(tmp_path / "cs", split="train")
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch/shard.py"), "cityscapes", "--root", str(tmp_path / "cs"),
         "--split", "val", "--out", str(tmp_path / "out")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "leftImg8bit/val" in lines[0] and "expected layout" in lines[0], proc.stderr


def test_max_size_stores_the_presets_frames_and_records_both_sizes(tmp_path):
    """--max-size: images INTER_AREA, masks nearest, to the size (and pixels) albumentations'
    LongestMaxSize makes of the full frame; class totals are the stored masks'; sizes recorded."""
    import albumentations as A
    import cv2

    make_cityscapes(tmp_path / "cs")
    assert shard("cityscapes", "--root", tmp_path / "cs", "--split", "train", "--out", tmp_path / "out",
                 "--max-size", "24") == 0
    manifest, samples = read_split(tmp_path / "out", "train")
    preset = A.LongestMaxSize(max_size=24, interpolation=cv2.INTER_AREA, mask_interpolation=cv2.INTER_NEAREST_EXACT)
    counts = np.zeros(19, dtype=np.int64)
    for key, files in samples.items():
        city = key.split("_")[0]
        full = np.asarray(Image.open(tmp_path / "cs" / "leftImg8bit" / "train" / city / f"{key}_leftImg8bit.png"))
        ids = np.asarray(Image.open(tmp_path / "cs" / "gtFine" / "train" / city / f"{key}_gtFine_labelIds.png"))
        want = preset(image=full, mask=expected_train_ids(ids))
        assert decode(files["image.png"]).shape == (16, 24, 3)
        assert np.array_equal(decode(files["image.png"]), want["image"])
        assert np.array_equal(decode(files["mask.png"]), want["mask"])
        assert json.loads(files["meta.json"])["height"] == H  # the source's size stays in the meta
        counts += np.bincount(want["mask"].ravel(), minlength=256)[:19]
    assert manifest["class_pixels"] == counts.tolist()
    assert manifest["frame_sizes"] == {"stored": {"min": [16, 24], "max": [16, 24]},
                                       "source": {"min": [H, W], "max": [H, W]}}
    assert manifest["options"]["max_size"] == 24


def test_raw_stores_the_pixels_uncompressed_and_reads_back_exactly(tmp_path):
    from segdist.data.sample import decode_sample

    make_cityscapes(tmp_path / "cs")
    assert shard("cityscapes", "--root", tmp_path / "cs", "--split", "train", "--out", tmp_path / "out",
                 "--image-format", "raw") == 0
    _, samples = read_split(tmp_path / "out", "train")
    for key, files in samples.items():
        assert set(files) == {"image.npy", "mask.png", "meta.json"} and len(files["image.npy"]) == 128 + H * W * 3
        city = key.split("_")[0]
        full = np.asarray(Image.open(tmp_path / "cs" / "leftImg8bit" / "train" / city / f"{key}_leftImg8bit.png"))
        _, image, mask = decode_sample({"__key__": key, **files}, 19, 255)
        assert np.array_equal(image, full) and image.flags.writeable and mask.shape == (H, W)
    assert shard("verify", tmp_path / "out", "--deep") == 0


def test_max_size_below_8_is_refused(tmp_path):
    make_cityscapes(tmp_path / "cs")
    with pytest.raises(UserError, match="--max-size must be >= 8"):
        shard("cityscapes", "--root", tmp_path / "cs", "--split", "train", "--out", tmp_path / "out", "--max-size", "4")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_raw_masks_store_the_train_ids_uncompressed(tmp_path):
    from segdist.data.sample import decode_sample

    raw = make_cityscapes(tmp_path / "cs")
    assert shard("cityscapes", "--root", tmp_path / "cs", "--split", "train", "--out", tmp_path / "out",
                 "--image-format", "raw", "--mask-format", "raw") == 0
    manifest, samples = read_split(tmp_path / "out", "train")
    for key, files in samples.items():
        assert set(files) == {"image.npy", "mask.npy", "meta.json"} and len(files["mask.npy"]) == 128 + H * W
        _, _, mask = decode_sample({"__key__": key, **files}, 19, 255)
        assert np.array_equal(mask, expected_train_ids(raw[key])) and mask.dtype == np.uint8
    assert manifest["options"]["mask_format"] == "raw"
    assert shard("verify", tmp_path / "out", "--deep") == 0
