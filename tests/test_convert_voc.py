"""PASCAL VOC converter on a tiny VOCdevkit/VOC2012 tree in the official layout."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segdist.data.convert.imageio import voc_palette
from segdist.data.convert.voc import VOC_CLASSES
from segdist.errors import UserError
from shardtools import shard, read_split, decode

REPO = Path(__file__).resolve().parents[1]
H, W = 32, 48
TRAIN = ["2007_000032", "2007_000039", "2008_000123"]


def save_palette_png(indices: np.ndarray, path: Path) -> None:
    """As VOC ships its masks: mode P, the VOC colour map as palette."""
    img = Image.fromarray(indices.astype(np.uint8), mode="P")
    img.putpalette([v for rgb in voc_palette(256) for v in rgb])
    img.save(path)


def random_indices(rng, size=(H, W)) -> np.ndarray:
    mask = rng.integers(0, 21, size).astype(np.uint8)
    mask[::7, :] = 255  # object borders
    return mask


def make_voc(root: Path, seed=0, size=(H, W)) -> dict:
    rng = np.random.default_rng(seed)
    for sub in ("ImageSets/Segmentation", "JPEGImages", "SegmentationClass", "SegmentationObject", "Annotations"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(TRAIN) + "\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("2007_000033\n")
    masks = {}
    for i, image_id in enumerate(TRAIN + ["2007_000033"]):
        pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        if i == 1:
            image = image.convert("L")  # VOC has a few grayscale JPEGs
        image.save(root / "JPEGImages" / f"{image_id}.jpg", quality=90)
        masks[image_id] = random_indices(rng, size)
        save_palette_png(masks[image_id], root / "SegmentationClass" / f"{image_id}.png")
    return masks


def test_masks_are_palette_indices_and_totals_match(tmp_path):
    masks = make_voc(tmp_path / "VOC2012")
    assert shard("voc", "--root", tmp_path / "VOC2012", "--split", "train", "--out", tmp_path / "out") == 0
    manifest, samples = read_split(tmp_path / "out", "train")
    assert sorted(samples) == TRAIN
    assert manifest["classes"] == VOC_CLASSES and len(VOC_CLASSES) == 21
    assert manifest["palette"][:3] == [[0, 0, 0], [128, 0, 0], [0, 128, 0]]
    assert manifest["palette"][20] == [0, 64, 128] and manifest["ignore_index"] == 255
    totals = np.zeros(21, dtype=np.int64)
    for key, files in samples.items():
        np.testing.assert_array_equal(decode(files["mask.png"]), masks[key])
        totals += np.bincount(masks[key][masks[key] != 255], minlength=21)
    assert manifest["class_pixels"] == totals.tolist()
    # RGB JPEGs are kept byte for byte; the grayscale one becomes an RGB PNG of the same pixels
    assert samples["2007_000032"]["image.jpg"] == (tmp_path / "VOC2012/JPEGImages/2007_000032.jpg").read_bytes()
    gray_src = np.asarray(Image.open(tmp_path / "VOC2012/JPEGImages/2007_000039.jpg"))
    gray = decode(samples["2007_000039"]["image.png"])
    assert gray.shape == (H, W, 3) and (gray == gray_src[:, :, None]).all()
    assert json.loads(samples["2007_000039"]["meta.json"])["source_mode"] == "L"


def test_extra_masks_fill_in_and_official_masks_take_precedence(tmp_path):
    masks = make_voc(tmp_path / "VOC2012")
    aug = tmp_path / "SegmentationClassAug"
    aug.mkdir()
    rng = np.random.default_rng(1)
    extra_only = random_indices(rng)
    Image.new("RGB", (W, H), (1, 2, 3)).save(tmp_path / "VOC2012/JPEGImages/2011_000001.jpg")
    Image.fromarray(extra_only).save(aug / "2011_000001.png")  # Aug masks are plain gray index PNGs
    Image.fromarray(np.full((H, W), 7, np.uint8)).save(aug / "2007_000032.png")  # must lose to SegmentationClass
    ids = tmp_path / "train_aug.txt"
    ids.write_text("2007_000032\n2011_000001\n")
    shard("voc", "--root", tmp_path / "VOC2012", "--split", "train_aug", "--ids-file", ids,
          "--extra-masks", aug, "--out", tmp_path / "out")
    manifest, samples = read_split(tmp_path / "out", "train_aug")
    np.testing.assert_array_equal(decode(samples["2007_000032"]["mask.png"]), masks["2007_000032"])
    np.testing.assert_array_equal(decode(samples["2011_000001"]["mask.png"]), extra_only)
    assert manifest["options"]["extra_masks_precedence"] == "SegmentationClass first"


def test_workers_give_identical_bytes(tmp_path):
    make_voc(tmp_path / "VOC2012")
    for n in (1, 2):
        shard("voc", "--root", tmp_path / "VOC2012", "--split", "train", "--out", tmp_path / f"w{n}",
              "--samples-per-shard", "1", "--workers", n, "--image-format", "png")
    names = sorted(p.name for p in (tmp_path / "w1").iterdir())
    assert len(names) == 4 and names == sorted(p.name for p in (tmp_path / "w2").iterdir())
    for name in names:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name


def test_label_out_of_range_names_the_sample(tmp_path):
    masks = make_voc(tmp_path / "VOC2012")
    bad = masks["2008_000123"].copy()
    bad[3, 4] = 21
    save_palette_png(bad, tmp_path / "VOC2012/SegmentationClass/2008_000123.png")
    with pytest.raises(UserError, match=r"sample 2008_000123: mask holds label 21 but there are 21 classes"):
        shard("voc", "--root", tmp_path / "VOC2012", "--split", "train", "--out", tmp_path / "out")


def test_colour_mask_is_refused(tmp_path):
    masks = make_voc(tmp_path / "VOC2012")
    rgb = np.asarray(voc_palette(256), dtype=np.uint8)[masks["2007_000032"]]
    Image.fromarray(rgb).save(tmp_path / "VOC2012/SegmentationClass/2007_000032.png")
    with pytest.raises(UserError, match=r"2007_000032.png is a colour image"):
        shard("voc", "--root", tmp_path / "VOC2012", "--split", "train", "--out", tmp_path / "out")


def test_corrupt_jpeg_names_the_file(tmp_path):
    make_voc(tmp_path / "VOC2012")
    path = tmp_path / "VOC2012/JPEGImages/2007_000032.jpg"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError, match=r"image .*2007_000032.jpg is corrupt"):
        shard("voc", "--root", tmp_path / "VOC2012", "--split", "train", "--out", tmp_path / "out")


def test_missing_mask_lists_the_id(tmp_path):
    make_voc(tmp_path / "VOC2012")
    (tmp_path / "VOC2012/SegmentationClass/2007_000039.png").unlink()
    with pytest.raises(UserError, match=r"1 id\(s\) .* lack .*: 2007_000039"):
        shard("voc", "--root", tmp_path / "VOC2012", "--split", "train", "--out", tmp_path / "out")


def test_missing_split_list_exits_2_with_one_line(tmp_path):
    make_voc(tmp_path / "VOC2012")
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch/shard.py"), "voc", "--root", str(tmp_path / "VOC2012"),
         "--split", "trainval", "--out", str(tmp_path / "out")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "ImageSets/Segmentation/trainval.txt not found" in lines[0], proc.stderr
