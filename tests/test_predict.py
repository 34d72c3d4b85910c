"""segdist.predict (one frame, and `segdist.predict(...)`, the files of launch/predict.py) on real
checkpoints of short real trainings: conftest's 4-class smp model (`trained_run`) and a binary
own-UNet with EMA weights trained here on a 2-class shapes split. Every probability is compared
with a forward pass this test computes itself (its own padding and ImageNet normalisation), on a
grayscale PNG and an RGB PNG of sizes that need padding."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

import segdist
from conftest import launch
from segdist.checkpoint import resolve_checkpoint
from segdist.data.shapes import PALETTE
from segdist.errors import UserError
from segdist.predict import load_predictor, predict_probabilities
from segdist.models import build_model
from segdist.recipe import load_recipe
from test_convert_cityscapes import FRAMES, make_cityscapes

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32) * 255

pytestmark = pytest.mark.slow  # every test here trains or launches processes

BINARY_RECIPE = """
[data]
root = "{root}"
train_split = "train"
val_split = "val"
batch_size = 4
num_workers = 0
crop = [32, 32]
shuffle_buffer = 4

[model]
arch = "unet"
encoder = "null"
encoder_weights = "null"
classes = 1
arch_args = {{width = 8, depth = 2}}
ema_decay = 0.5

[loss]
terms = [{{name = "bce", weight = 1.0}}]

[train]
steps = 3
precision = "fp32"
ckpt_every = 3
run_dir = "{run_dir}"
seed = 5

[eval]
batch_size = 2
num_workers = 0

[log]
every = 1
images = 1
"""


@pytest.fixture(scope="module")
def binary_run(tmp_path_factory) -> tuple[Path, Path]:
    """(recipe, run folder) of a 3-step binary training (one logit, BCE, EMA) on a 2-class shapes split."""
    tmp = tmp_path_factory.mktemp("binary")
    root = tmp / "data"
    for split, count, seed in (("train", "8", "1"), ("val", "2", "2")):
        result = launch("shard.py", ["shapes", "--out", str(root), "--size", "32", "32", "--classes", "2",
                                     "--split", split, "--count", count, "--seed", seed])
        assert result.returncode == 0, result.stderr[-3000:]
    recipe = tmp / "binary.toml"
    recipe.write_text(BINARY_RECIPE.format(root=root, run_dir=tmp / "run"))
    result = launch("train.py", [str(recipe)])
    assert result.returncode == 0, result.stderr[-3000:]
    return recipe, tmp / "run"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """A grayscale (mode L) 45x37 PNG and an RGB 40x50 PNG: neither a multiple of 32."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    gray = np.kron(rng.integers(0, 256, (9, 8), dtype=np.uint8), np.ones((5, 5), np.uint8))[:45, :37]
    Image.fromarray(gray).save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(folder / "rgb.png")
    return {"gray": folder / "gray.png", "rgb": folder / "rgb.png"}


def rgb_of(path: Path) -> np.ndarray:
    arr = np.asarray(Image.open(path))
    return np.repeat(arr[:, :, None], 3, axis=2) if arr.ndim == 2 else arr


def direct_logits(model: torch.nn.Module, rgb: np.ndarray, size: tuple[int, int] | None = None) -> torch.Tensor:
    """1xKxHxW logits: (resize,) black padding to a multiple of 32, ImageNet normalisation, crop (, resize back)."""
    h, w = rgb.shape[:2]
    x = torch.from_numpy(rgb.astype(np.float32)).permute(2, 0, 1)[None]
    if size is not None:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    th, tw = x.shape[-2:]
    canvas = torch.zeros(1, 3, -(-th // 32) * 32, -(-tw // 32) * 32)
    canvas[:, :, :th, :tw] = x
    canvas = (canvas - torch.from_numpy(MEAN).view(1, 3, 1, 1)) / torch.from_numpy(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = model.eval()(canvas)[:, :, :th, :tw]
    if size is not None:
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
    return logits


def loaded_model(recipe_path: Path, checkpoint: Path, outputs: int, ema: bool) -> torch.nn.Module:
    recipe = load_recipe(recipe_path)
    model = build_model(dataclasses.replace(recipe.model, encoder_weights=None), outputs)
    model.load_state_dict(load_file(str(checkpoint / "model.safetensors")))
    if ema:
        model.load_state_dict(torch.load(checkpoint / "ema.pt", weights_only=True)["module"])
    return model.eval()


def read_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_binary_predict_matches_direct_forward_with_ema_weights(binary_run, images, tmp_path):
    recipe, run = binary_run
    checkpoint = resolve_checkpoint(run)
    assert (checkpoint / "ema.pt").exists()
    ema_model = loaded_model(recipe, checkpoint, 1, ema=True)
    live_model = loaded_model(recipe, checkpoint, 1, ema=False)
    expected = {k: torch.sigmoid(direct_logits(ema_model, rgb_of(p)))[0, 0].numpy() for k, p in images.items()}
    live = torch.sigmoid(direct_logits(live_model, rgb_of(images["gray"])))[0, 0].numpy()
    assert np.abs(live - expected["gray"]).max() > 1e-4  # so matching the EMA forward below means something
    # Both labels appear in the gray image's map, and no pixel sits at the threshold: labels come from
    # the logits (evaluation's rule), so a pixel there could go either way against the stored prob.
    values = np.unique(expected["gray"])
    middle = values[len(values) // 4: 3 * len(values) // 4 + 1]
    k = int(np.argmax(np.diff(middle)))
    threshold = float((middle[k] + middle[k + 1]) / 2)

    out = tmp_path / "out"
    result = launch("predict.py", [str(recipe), "--checkpoint", str(run), str(images["gray"]),
                                   str(images["rgb"].parent / "rgb*.png"), "--out", str(out),
                                   "--threshold", repr(threshold)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(  # nothing else, no temporary files left
        f"{k}{suffix}" for k in images for suffix in (".png", "_color.png", "_prob.npy", "_prob.png"))
    for key, path in images.items():
        h, w = rgb_of(path).shape[:2]
        prob = np.load(out / f"{key}_prob.npy")
        assert prob.dtype == np.float32 and prob.shape == (h, w)
        assert prob.min() >= 0.0 and prob.max() <= 1.0
        np.testing.assert_allclose(prob, expected[key], atol=1e-5)
        label = read_png(out / f"{key}.png")
        assert label.dtype == np.uint8 and label.shape == (h, w)
        np.testing.assert_array_equal(label, (prob > threshold).astype(np.uint8))
        np.testing.assert_array_equal(read_png(out / f"{key}_prob.png"), np.round(prob * 255).astype(np.uint8))
        np.testing.assert_array_equal(read_png(out / f"{key}_color.png"), np.asarray(PALETTE[:2], np.uint8)[label])
    assert set(np.unique(read_png(out / "gray.png"))) == {0, 1}


def test_binary_python_api(binary_run, images, tmp_path):
    recipe, run = binary_run
    model = loaded_model(recipe, resolve_checkpoint(run), 1, ema=True)
    predictor = load_predictor(recipe, run, device="cpu")
    assert predictor.binary and predictor.classes == ["background", "circle"]
    gray = rgb_of(images["gray"])
    prob = predict_probabilities(predictor.model, images["gray"])  # the birds assignment: predict(model, img_path) -> HxW
    assert prob.shape == gray.shape[:2] and prob.dtype == np.float32
    np.testing.assert_allclose(prob, torch.sigmoid(direct_logits(model, gray))[0, 0].numpy(), atol=1e-5)
    # --size: the forward at the training scale, probabilities back at the original size.
    rgb = rgb_of(images["rgb"])
    scaled = predict_probabilities(predictor.model, Image.open(images["rgb"]), size=(32, 32))
    assert scaled.shape == rgb.shape[:2]
    np.testing.assert_allclose(scaled, torch.sigmoid(direct_logits(model, rgb, (32, 32)))[0, 0].numpy(), atol=1e-5)
    assert np.abs(scaled - predict_probabilities(predictor.model, rgb)).max() > 1e-4
    # 16-bit gray and RGBA files become the same RGB the converters make.
    sixteen = tmp_path / "sixteen.png"
    Image.fromarray(gray[:, :, 0].astype(np.uint16) * 257).save(sixteen)
    assert Image.open(sixteen).mode.startswith("I")
    np.testing.assert_allclose(predict_probabilities(predictor.model, sixteen), prob, atol=1e-6)
    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])).save(rgba)
    np.testing.assert_allclose(predict_probabilities(predictor.model, rgba), predict_probabilities(predictor.model, rgb), atol=1e-6)

    # Without the data folder: generic names and palette, the same probabilities.
    bare = load_predictor(load_recipe(recipe, [f"data.root={tmp_path / 'nowhere'}"]), run, device="cpu")
    assert bare.classes == ["background", "foreground"] and len(bare.palette) == 2
    np.testing.assert_allclose(bare.predict_probabilities(images["gray"]), prob, atol=1e-6)
    with pytest.raises(UserError, match="model.classes"):
        load_predictor(load_recipe(recipe, [f"data.root={tmp_path / 'nowhere'}", "model.classes=null"]), run)


def test_multiclass_predict_two_processes_each_file_once(trained_run, images, tmp_path):
    """Two ranks split a file, a glob and a folder (with a subfolder) between them; every output
    is written once and equals the direct forward pass."""
    recipe, run = trained_run
    checkpoint = resolve_checkpoint(run)
    model = loaded_model(recipe, checkpoint, 4, ema=(checkpoint / "ema.pt").exists())
    folder = tmp_path / "more"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (33, 30, 3), dtype=np.uint8)).save(folder / "sub" / "deep.jpg", quality=95)
    (folder / "notes.txt").write_text("not an image")
    inputs = {**images, "deep": folder / "sub" / "deep.jpg"}
    out = tmp_path / "out"
    result = launch("predict.py", [str(recipe), "--checkpoint", str(run), str(images["gray"]),
                                   str(images["rgb"].parent / "rgb*.png"), str(folder), "--out", str(out),
                                   "--format", "labels,color", "--format", "prob", "--format", "overlay"], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote predictions of 3 image(s)" in result.stdout and "(2 processes: 2 + 1)" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{k}{suffix}" for k in inputs for suffix in (".png", "_color.png", "_prob.npy", "_overlay.png"))
    for key, path in inputs.items():
        rgb = rgb_of(path)
        h, w = rgb.shape[:2]
        prob = np.load(out / f"{key}_prob.npy")
        assert prob.dtype == np.float16 and prob.shape == (4, h, w)
        assert prob.min() >= 0.0 and prob.max() <= 1.0
        np.testing.assert_allclose(prob.astype(np.float32).sum(0), 1.0, atol=5e-3)
        expected = torch.softmax(direct_logits(model, rgb), dim=1)[0].numpy()
        np.testing.assert_allclose(prob.astype(np.float32), expected, atol=1e-3)
        label = read_png(out / f"{key}.png")
        assert label.dtype == np.uint8 and label.shape == (h, w)
        # The argmax of the logits (not of the float16 file), wherever this test's own forward pass
        # is not itself at a near-tie (its float rounding differs from segdist's).
        logits = direct_logits(model, rgb)[0]
        top = logits.topk(2, dim=0).values
        clear = (top[0] - top[1] > 1e-4).numpy()
        np.testing.assert_array_equal(label[clear], logits.argmax(0).numpy()[clear])
        color = np.asarray(PALETTE[:4], np.uint8)[label]
        np.testing.assert_array_equal(read_png(out / f"{key}_color.png"), color)
        blend = (rgb.astype(np.uint16) + color + 1) // 2
        np.testing.assert_array_equal(read_png(out / f"{key}_overlay.png"), blend.astype(np.uint8))
    with pytest.raises(UserError, match="--threshold is for binary"):
        segdist.predict(recipe, images["rgb"], checkpoint=run, out=tmp_path / "t", threshold=0.3)
    with pytest.raises(UserError, match="'probs' is not a format"):
        segdist.predict(recipe, images["rgb"], checkpoint=run, out=tmp_path / "t", formats=["probs"])
    with pytest.raises(UserError, match="cannot share its folder"):
        segdist.predict(recipe, images["rgb"], checkpoint=run, out=tmp_path / "t", formats="cityscapes,labels")
    with pytest.raises(UserError, match="Cityscapes' 19 train classes"):
        segdist.predict(recipe, images["rgb"], checkpoint=run, out=tmp_path / "t", formats=["cityscapes"])
    assert not (tmp_path / "t").exists()


def test_bad_inputs_fail_before_anything_is_written(binary_run, images, tmp_path):
    recipe, run = binary_run
    out = tmp_path / "out"
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    # Two ranks: the corrupt file is rank 1's to decode; rank 0 must not write its own share either.
    result = launch("predict.py", [str(recipe), "--checkpoint", str(run), str(images["gray"]), str(corrupt),
                                   "--out", str(out)], nproc=2)
    # Measured (docs/design-notes.md): under torchrun the launcher exits 1 and adds its own box; the script's line comes once.
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(corrupt) in errors[0], result.stderr[-2000:]
    assert "UserError" not in result.stderr
    assert not out.exists()

    missing = tmp_path / "missing.png"
    twin = tmp_path / "twin"
    twin.mkdir()
    Image.open(images["gray"]).save(twin / "gray.jpg")
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("no images here")
    cases = [
        ([str(images["gray"]), str(missing)], "missing.png"),
        ([str(tmp_path / "none*.png")], "none\\*.png"),
        ([str(images["gray"]), str(corrupt)], "corrupt.png"),
        ([str(images["gray"]), str(twin)], "gray.jpg"),  # both would write gray.png
        ([str(images["gray"]), str(empty)], "holds no image file"),
    ]
    for inputs, culprit in cases:
        with pytest.raises(UserError, match=culprit):
            segdist.predict(recipe, inputs, checkpoint=run, out=out)
        assert not out.exists()
    with pytest.raises(UserError, match="overwrite the input"):
        segdist.predict(recipe, [images["gray"]], checkpoint=run, out=images["gray"].parent)
    assert sorted(p.name for p in images["gray"].parent.iterdir()) == ["gray.png", "rgb.png"]


CITYSCAPES_RECIPE = """
[data]
root = "{root}"
train_split = "train"
val_split = "val"
batch_size = 2
num_workers = 0
crop = [32, 48]
shuffle_buffer = 2

[model]
arch = "unet"
encoder = "null"
encoder_weights = "null"
classes = 19
arch_args = {{width = 8, depth = 2}}

[train]
steps = 3
precision = "fp32"
ckpt_every = 3
run_dir = "{run_dir}"
seed = 2

[eval]
batch_size = 1
num_workers = 0
"""


def test_cityscapes_format_agrees_with_the_official_evaluator(tmp_path, monkeypatch):
    """Cityscapes layout → shards → 3 training steps → eval.py and predict.py --format cityscapes →
    cityscapesscripts' evalPixelLevelSemanticLabeling on the PNGs: the same class IoUs and mIoU."""
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official
    from cityscapesscripts.helpers.labels import trainId2label

    cs, shards = tmp_path / "cityscapes", tmp_path / "shards"
    make_cityscapes(cs, "train", seed=0)
    make_cityscapes(cs, "val", seed=1)
    for split in ("train", "val"):
        result = launch("shard.py", ["cityscapes", "--root", str(cs), "--split", split, "--out", str(shards)])
        assert result.returncode == 0, result.stderr[-3000:]
    recipe = tmp_path / "cs.toml"
    recipe.write_text(CITYSCAPES_RECIPE.format(root=shards, run_dir=tmp_path / "run"))
    assert launch("train.py", [str(recipe)]).returncode == 0
    ours = tmp_path / "metrics.json"
    result = launch("eval.py", [str(recipe), "--checkpoint", str(tmp_path / "run"), "--out", str(ours)])
    assert result.returncode == 0, result.stderr[-3000:]
    pred = tmp_path / "pred"
    result = launch("predict.py", [str(recipe), "--checkpoint", str(tmp_path / "run"), str(cs / "leftImg8bit" / "val"),
                                   "--out", str(pred), "--format", "cityscapes"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in pred.iterdir()) == sorted(
        f"{name}_pred_labelIds.png" for names in FRAMES.values() for name in names)

    # The official evaluator, as its main() sets it up, on our files; instance-level scores
    # (nIoU) need instanceIds ground truth and are not what eval.py reports.
    args = official.args
    monkeypatch.setattr(args, "predictionPath", str(pred))
    monkeypatch.setattr(args, "predictionWalk", None)
    monkeypatch.setattr(args, "evalInstLevelScore", False)
    monkeypatch.setattr(args, "JSONOutput", False)
    monkeypatch.setattr(args, "quiet", True)
    truth = sorted(str(p) for p in (cs / "gtFine" / "val").glob("*/*_gtFine_labelIds.png"))
    result = official.evaluateImgLists([official.getPrediction(args, t) for t in truth], truth, args)

    metrics = json.loads(ours.read_text())
    for train_id, iou in enumerate(metrics["per_class_iou"]):
        theirs = result["classScores"][trainId2label[train_id].name]
        if iou is None:
            assert np.isnan(theirs)
        else:
            assert abs(theirs - iou) <= 1e-9, (trainId2label[train_id].name, theirs, iou)
    assert any(iou for iou in metrics["per_class_iou"])  # the model predicts something right somewhere
    assert abs(result["averageScoreClasses"] - metrics["miou"]) <= 1e-9



def test_predicted_labels_are_evaluations_pixel_for_pixel(trained_run, tmp_path):
    """A barely trained model (4 steps), where near-ties are common: the label files predict writes
    equal evaluation's predictions of the same frames (segdist.evaluate.predict_sample, as
    launch/eval.py counts them), not the argmax of rounded probabilities."""
    from accelerate import Accelerator

    from segdist.data.manifest import load_split
    from segdist.data.sample import decode_sample, read_shard
    from segdist.evaluate import predict_sample
    from segdist.inference import InferenceMode

    recipe_path, run = trained_run
    recipe = load_recipe(recipe_path)
    manifest = load_split(recipe.data, recipe.data.val_split, evaluation=True)
    frames = {}
    for shard in manifest.sources():
        for sample in read_shard(shard):
            key, image, _ = decode_sample(sample, manifest.num_classes, manifest.ignore_index)
            frames[key.replace("/", "_")] = image
    inputs = tmp_path / "in"
    inputs.mkdir()
    for key, image in frames.items():
        Image.fromarray(image).save(inputs / f"{key}.png")
    segdist.predict(recipe, inputs, checkpoint=run, out=tmp_path / "out", formats=["labels"])

    predictor = load_predictor(recipe, run)
    accelerator, mode = Accelerator(cpu=True), InferenceMode.from_recipe(recipe)
    rounded_differ = 0
    for key, image in frames.items():
        want = predict_sample(predictor.model, image, accelerator, mode)
        got = np.asarray(Image.open(tmp_path / "out" / f"{key}.png"))
        np.testing.assert_array_equal(got, want, err_msg=key)
        prob = predictor.predict_probabilities(image)
        rounded_differ += int((prob.astype(np.float16).argmax(0) != want).sum())
    print(f"pixels where the float16 probabilities' argmax differs from evaluation's label: {rounded_differ}")
