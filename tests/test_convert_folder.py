"""Folder converter: PH2 and birds layouts, pairing, binary masks, image modes, errors."""

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segdist.errors import UserError
from shardtools import shard, read_split, decode

REPO = Path(__file__).resolve().parents[1]
H, W = 32, 48


def blob(rng, soft=True, size=(H, W)) -> np.ndarray:
    """A 0/255-style mask, with soft edges (values between) that thresholding must handle."""
    mask = np.zeros(size, np.uint8)
    y, x = rng.integers(4, size[0] - 12), rng.integers(4, size[1] - 12)
    mask[y : y + 10, x : x + 10] = 255
    if soft:
        mask[y - 1, x : x + 10] = rng.integers(0, 256)
    return mask


def make_ph2(root: Path, seed=0, size=(H, W)) -> tuple[dict, dict]:
    """`PH2 Dataset images/IMD*/IMD*_Dermoscopic_Image/IMD*.bmp` + `IMD*_lesion/IMD*_lesion.bmp` (+ roi)."""
    rng = np.random.default_rng(seed)
    images, masks = {}, {}
    for i, name in enumerate(["IMD002", "IMD003", "IMD010"]):
        case = root / "PH2 Dataset images" / name
        for sub in ("_Dermoscopic_Image", "_lesion", "_roi"):
            (case / f"{name}{sub}").mkdir(parents=True)
        images[name] = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(images[name]).save(case / f"{name}_Dermoscopic_Image" / f"{name}.bmp")
        masks[name] = blob(rng, size=size)
        lesion = Image.fromarray(masks[name])
        if i == 0:
            masks[name] = np.where(masks[name] > 127, 255, 0).astype(np.uint8)
            lesion = Image.fromarray(masks[name]).convert("1")  # some tools write 1-bit BMPs
        lesion.save(case / f"{name}_lesion" / f"{name}_lesion.bmp")
        Image.fromarray(masks[name]).save(case / f"{name}_roi" / f"{name}_R1_Label4.bmp")
    return images, masks


PH2_ARGS = [
    "--images", "{root}/PH2 Dataset images/*/*_Dermoscopic_Image/*.bmp",
    "--masks", "{root}/PH2 Dataset images/*/*_lesion/*.bmp",
    "--pair", r"(?P<key>IMD\d+)", "--binary-threshold", "127", "--classes", "background,lesion", "--dataset", "ph2",
]


def ph2_args(root):
    return [a.format(root=root) for a in PH2_ARGS]


def test_ph2_layout_with_pair_regex(tmp_path):
    images, masks = make_ph2(tmp_path / "PH2Dataset")
    assert shard("folder", *ph2_args(tmp_path / "PH2Dataset"), "--split", "train", "--out", tmp_path / "out") == 0
    manifest, samples = read_split(tmp_path / "out", "train")
    assert sorted(samples) == ["IMD002", "IMD003", "IMD010"]
    assert manifest["dataset"] == "ph2" and manifest["classes"] == ["background", "lesion"]
    totals = np.zeros(2, np.int64)
    for key, files in samples.items():
        want = (masks[key] > 127).astype(np.uint8)
        np.testing.assert_array_equal(decode(files["mask.png"]), want)
        totals += np.bincount(want.ravel(), minlength=2)
        # BMP is not kept as is: converted to RGB and stored as lossless PNG
        np.testing.assert_array_equal(decode(files["image.png"]), images[key])
        meta = json.loads(files["meta.json"])
        assert meta["image"] == f"{key}/{key}_Dermoscopic_Image/{key}.bmp" and meta["source_format"] == "BMP"
    assert manifest["class_pixels"] == totals.tolist()
    assert manifest["options"]["binary_threshold"] == 127 and manifest["options"]["pair"] == r"(?P<key>IMD\d+)"


def test_keys_file_cuts_a_split_and_names_bad_keys(tmp_path):
    images, _ = make_ph2(tmp_path / "PH2Dataset")
    args = ph2_args(tmp_path / "PH2Dataset")
    keys = tmp_path / "test.txt"
    keys.write_text("# the PH2 lesion study's test split\nIMD010\n\nIMD002  # first case\n")
    assert shard("folder", *args, "--keys-file", keys, "--split", "test", "--out", tmp_path / "out") == 0
    manifest, samples = read_split(tmp_path / "out", "test")
    assert sorted(samples) == ["IMD002", "IMD010"] and manifest["options"]["keys_file"] == str(keys)
    np.testing.assert_array_equal(decode(samples["IMD010"]["image.png"]), images["IMD010"])
    lesion = tmp_path / "PH2Dataset" / "PH2 Dataset images" / "IMD003" / "IMD003_lesion" / "IMD003_lesion.bmp"
    lesion.unlink()  # IMD003 now has no mask: fine for a split without it, an error for one with it
    assert shard("folder", *args, "--keys-file", keys, "--split", "test2", "--out", tmp_path / "out") == 0
    for text, culprit in [("IMD002\nIMD003\n", "no mask for key 'IMD003'"),
                          ("IMD002\nIMD999\n", "no image for key 'IMD999'"),
                          ("IMD002\nIMD010\nIMD002\n", "key 'IMD002' is listed twice (lines 1 and 3)"),
                          ("# nothing\n", "lists no key")]:
        keys.write_text(text)
        with pytest.raises(UserError, match=re.escape(culprit)):
            shard("folder", *args, "--keys-file", keys, "--split", "bad", "--out", tmp_path / "out")
        assert not (tmp_path / "out" / "bad.json").exists()
    with pytest.raises(UserError, match="not found"):
        shard("folder", *args, "--keys-file", tmp_path / "none.txt", "--split", "bad", "--out", tmp_path / "out")


def test_ph2_without_pair_regex_lists_unpaired_files(tmp_path):
    make_ph2(tmp_path / "PH2Dataset")
    args = ph2_args(tmp_path / "PH2Dataset")
    del args[4:6]  # drop --pair
    with pytest.raises(UserError, match=r"3 image\(s\) without a mask \(.*IMD002.bmp, .*IMD003.bmp, .*IMD010.bmp\); "
                       r"3 mask\(s\) without an image .*--pair"):
        shard("folder", *args, "--split", "train", "--out", tmp_path / "out")


def make_birds(root: Path, seed=0, soft=True, size=(H, W)) -> tuple[dict, dict]:
    """`images/<species>/<name>.jpg` (grayscale and RGB) + `masks/<species>/<name>.png` (0/255)."""
    rng = np.random.default_rng(seed)
    images, masks = {}, {}
    for species, names in {"001.Black_footed_Albatross": ["Black_Footed_Albatross_0001_796111"],
                           "017.Cardinal": ["Cardinal_0001_17057", "Cardinal_0002_17061.v2"]}.items():
        (root / "images" / species).mkdir(parents=True)
        (root / "masks" / species).mkdir(parents=True)
        for i, name in enumerate(names):
            image = Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
            if i == 0:
                image = image.convert("L")
            image.save(root / "images" / species / f"{name}.jpg", quality=92)
            images[name] = np.asarray(Image.open(root / "images" / species / f"{name}.jpg"))
            masks[name] = blob(rng, soft, size)
            mask = Image.fromarray(masks[name])
            (mask.convert("RGB") if i else mask).save(root / "masks" / species / f"{name}.png")
    return images, masks


def test_birds_layout_grayscale_images_and_binary_masks(tmp_path):
    images, masks = make_birds(tmp_path / "birds")
    shard("folder", "--images", tmp_path / "birds/images/*/*.jpg", "--masks", tmp_path / "birds/masks/*/*.png",
          "--binary-threshold", "127", "--split", "train", "--out", tmp_path / "out")
    manifest, samples = read_split(tmp_path / "out", "train")
    assert manifest["classes"] == ["background", "foreground"]
    # keys come from the file stem, dots replaced
    assert sorted(samples) == ["Black_Footed_Albatross_0001_796111", "Cardinal_0001_17057", "Cardinal_0002_17061_v2"]
    for name in images:
        files = samples[name.replace(".", "_")]
        np.testing.assert_array_equal(decode(files["mask.png"]), (masks[name] > 127).astype(np.uint8))
        if images[name].ndim == 2:  # grayscale JPEG → RGB PNG holding the same gray values
            rgb = decode(files["image.png"])
            assert rgb.shape == (H, W, 3) and (rgb == images[name][:, :, None]).all()
        else:  # RGB JPEG → the original bytes
            species = "017.Cardinal"
            assert files["image.jpg"] == (tmp_path / "birds/images" / species / f"{name}.jpg").read_bytes()


def test_image_modes_come_out_rgb_and_multiclass_masks(tmp_path):
    rng = np.random.default_rng(3)
    (tmp_path / "img").mkdir()
    (tmp_path / "lbl").mkdir()
    rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (H, W, 1), dtype=np.uint8)
    Image.fromarray(np.concatenate([rgb, alpha], axis=2)).save(tmp_path / "img/rgba.png")
    pal = Image.fromarray(rgb).quantize(16)
    pal.save(tmp_path / "img/palette.png")
    deep = rng.integers(0, 65536, (H, W), dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "img/sixteen.png")
    Image.fromarray(rgb).save(tmp_path / "img/plain.png")
    labels = {}
    for name in ("rgba", "palette", "sixteen", "plain"):
        labels[name] = rng.choice(np.array([0, 1, 2, 255], np.uint8), (H, W))
        Image.fromarray(labels[name]).save(tmp_path / f"lbl/{name}.png")
    classes = tmp_path / "classes.txt"
    classes.write_text("sky\nground\n\nwater\n")
    shard("folder", "--images", tmp_path / "img/*.png", "--masks", tmp_path / "lbl/*.png", "--classes-file", classes,
          "--split", "val", "--out", tmp_path / "out")
    manifest, samples = read_split(tmp_path / "out", "val")
    assert manifest["classes"] == ["sky", "ground", "water"]
    for name, files in samples.items():
        np.testing.assert_array_equal(decode(files["mask.png"]), labels[name])
        assert Image.open(io.BytesIO(files["image.png"])).mode == "RGB"
    np.testing.assert_array_equal(decode(samples["rgba"]["image.png"]), rgb)  # alpha dropped
    np.testing.assert_array_equal(decode(samples["palette"]["image.png"]), np.asarray(pal.convert("RGB")))
    want16 = np.round(deep / 257.0).astype(np.uint8)  # full 16-bit range scaled to 8 bits
    np.testing.assert_array_equal(decode(samples["sixteen"]["image.png"]), np.repeat(want16[:, :, None], 3, 2))
    assert samples["plain"]["image.png"] == (tmp_path / "img/plain.png").read_bytes()  # keep
    want = np.zeros(3, np.int64)
    for lab in labels.values():
        want += np.bincount(lab[lab != 255], minlength=3)
    assert manifest["class_pixels"] == want.tolist()


def test_workers_give_identical_bytes(tmp_path):
    make_birds(tmp_path / "birds")
    for n in (1, 2):
        shard("folder", "--images", tmp_path / "birds/images/**/*.jpg", "--masks", tmp_path / "birds/masks/**/*.png",
              "--binary-threshold", "127", "--split", "train", "--out", tmp_path / f"w{n}",
              "--samples-per-shard", "2", "--workers", n, "--image-format", "jpeg")
    names = sorted(p.name for p in (tmp_path / "w1").iterdir())
    assert len(names) == 3 and names == sorted(p.name for p in (tmp_path / "w2").iterdir())
    for name in names:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name


def test_size_mismatch_and_label_out_of_range_name_the_sample(tmp_path):
    make_birds(tmp_path / "birds")
    args = ["folder", "--images", tmp_path / "birds/images/*/*.jpg", "--masks", tmp_path / "birds/masks/*/*.png",
            "--classes", "background,bird,branch", "--split", "train", "--out", tmp_path / "out"]
    bad = tmp_path / "birds/masks/017.Cardinal/Cardinal_0001_17057.png"
    Image.fromarray(np.full((H, W), 3, np.uint8)).save(bad)
    with pytest.raises(UserError, match=r"sample Cardinal_0001_17057: mask holds label 3 but there are 3 classes"):
        shard(*args)
    Image.fromarray(np.zeros((H + 1, W), np.uint8)).save(bad)
    with pytest.raises(UserError, match=r"sample Cardinal_0001_17057: mask .* is 48x33 but image .* is 48x32"):
        shard(*args)
    assert not (tmp_path / "out/train.json").exists()


def test_corrupt_image_names_the_file(tmp_path):
    make_birds(tmp_path / "birds")
    (tmp_path / "birds/images/017.Cardinal/Cardinal_0001_17057.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(UserError, match=r"image .*Cardinal_0001_17057.jpg is corrupt or not an image"):
        shard("folder", "--images", tmp_path / "birds/images/*/*.jpg", "--masks", tmp_path / "birds/masks/*/*.png",
              "--binary-threshold", "127", "--split", "train", "--out", tmp_path / "out")


def test_allow_unpaired_skips_and_binary_masks_without_threshold_warn(tmp_path, capsys):
    make_birds(tmp_path / "birds", soft=False)
    (tmp_path / "birds/masks/017.Cardinal/Cardinal_0001_17057.png").unlink()
    shard("folder", "--images", tmp_path / "birds/images/*/*.jpg", "--masks", tmp_path / "birds/masks/*/*.png",
          "--classes", "background,bird", "--allow-unpaired", "--split", "train", "--out", tmp_path / "out")
    _, samples = read_split(tmp_path / "out", "train")
    assert sorted(samples) == ["Black_Footed_Albatross_0001_796111", "Cardinal_0002_17061_v2"]
    err = capsys.readouterr().err
    assert "skipping 1 image(s) without a mask" in err and "add --binary-threshold 127" in err


def test_unpaired_files_exit_2_with_one_line(tmp_path):
    make_birds(tmp_path / "birds")
    (tmp_path / "birds/masks/017.Cardinal/Cardinal_0001_17057.png").unlink()
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch/shard.py"), "folder", "--images", str(tmp_path / "birds/images/*/*.jpg"),
         "--masks", str(tmp_path / "birds/masks/*/*.png"), "--binary-threshold", "127",
         "--split", "train", "--out", str(tmp_path / "out")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "1 image(s) without a mask" in lines[0] and "Cardinal_0001_17057.jpg" in lines[0], proc.stderr


def test_duplicate_stems_and_bad_pair_regex_are_user_errors(tmp_path):
    make_birds(tmp_path / "birds")
    other = tmp_path / "birds/images/999.Other"
    other.mkdir()
    (tmp_path / "birds/images/017.Cardinal/Cardinal_0001_17057.jpg").rename(other / "Cardinal_0002_17061.v2.jpg")
    base = ["folder", "--images", tmp_path / "birds/images/*/*.jpg", "--masks", tmp_path / "birds/masks/*/*.png",
            "--binary-threshold", "127", "--split", "train", "--out", tmp_path / "out"]
    with pytest.raises(UserError, match=r"images .*Cardinal_0002_17061.v2.jpg and .*999.Other.* both have the key"):
        shard(*base)
    with pytest.raises(UserError, match=r"needs a named group \(\?P<key>...\)"):
        shard(*base, "--pair", r"Cardinal_\d+")
