"""Exact evaluation: world sizes 1, 2 and 3 give the same int64 confusion matrix, equal to a
plain numpy count in this test and summing to the manifest's valid pixels."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import launch
from segdist.checkpoint import resolve_checkpoint
from segdist.data.manifest import load_manifest
from segdist.preprocess import MEAN, STD
from segdist.models import build_model
from segdist.recipe import load_recipe
from segdist.report import image_iou
from safetensors.torch import load_file


def count_one_at_a_time(manifest, predict, per_image: dict | None = None) -> np.ndarray:
    """Decode every sample with PIL, predict one at a time (`predict`: normalised 1x3xHxW -> 1xHxW
    labels), count with numpy; `per_image` gets each key's own IoU."""
    cm = np.zeros((4, 4), dtype=np.int64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for path in manifest.shard_paths():
            with tarfile.open(path) as tar:
                files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
            for name in sorted(n for n in files if n.endswith(".mask.png")):
                key = name[: -len(".mask.png")]
                image = np.asarray(Image.open(io.BytesIO(files[f"{key}.image.png"])).convert("RGB"))
                mask = np.asarray(Image.open(io.BytesIO(files[name]))).astype(np.int64)
                x = (torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() - MEAN) / STD
                with torch.no_grad():
                    pred = predict(x)[0].numpy()
                valid = mask != 255
                np.add.at(cm, (mask[valid], pred[valid]), 1)
                if per_image is not None:
                    per_image[key] = image_iou(mask, pred, 4, 255)
    finally:
        torch.set_num_threads(threads)
    return cm


def numpy_reference(recipe_path, checkpoint, manifest, per_image: dict | None = None) -> np.ndarray:
    model = build_model(load_recipe(recipe_path).model, 4)
    model.load_state_dict(load_file(str(checkpoint / "model.safetensors")))
    model.eval()
    return count_one_at_a_time(manifest, lambda x: model(x).argmax(1), per_image)


@pytest.mark.slow
@pytest.mark.parametrize("split, worlds", [("val7", [1, 2, 3]), ("val7b", [3])])
def test_eval_is_exact_for_any_world_size(trained_run, tmp_path, split, worlds):
    recipe, run = trained_run
    manifest = load_manifest(load_recipe(recipe).data.root, split)
    per_image = {}
    reference = numpy_reference(recipe, resolve_checkpoint(run), manifest, per_image)
    assert reference.sum() == manifest.valid_pixels
    for world in worlds:
        out = tmp_path / f"m{world}.json"
        report = tmp_path / f"report{world}"
        shown = ["--report", str(report), "--show", "3"] if world == 2 else []
        result = launch("eval.py", [str(recipe), "--checkpoint", str(run), "--split", split, "--out", str(out),
                                    "--set", "eval.batch_size=1", *shown], nproc=world)
        assert result.returncode == 0, result.stderr[-3000:]
        metrics = json.loads(out.read_text())
        assert metrics["world_size"] == world
        assert metrics["num_samples"] == 7
        assert metrics["valid_pixels"] == manifest.valid_pixels
        assert np.array_equal(np.array(metrics["confusion_matrix"], dtype=np.int64), reference), world
        assert "mIoU" in result.stdout
        if shown:  # the report, and the worst samples by per-image IoU gathered from both ranks
            assert metrics["per_image_iou"] == pytest.approx(per_image, abs=1e-12)
            worst = sorted(per_image, key=lambda k: (per_image[k], k))[:3]
            assert sorted(p.name for p in report.iterdir()) == sorted(
                ["metrics.json", "per_class.csv", "per_class.md", "confusion.png"]
                + [f"worst-{i + 1}-{key}.png" for i, key in enumerate(worst)])
            strip = np.asarray(Image.open(report / f"worst-1-{worst[0]}.png"))
            assert strip.shape == (256, 4 * 256 + 3 * 4, 3)  # input | truth | prediction | errors, 32 px x 8


@pytest.mark.slow
def test_grouped_eval_predicts_alike_for_any_world_size_and_workers(trained_run, tmp_path):
    """Batches of 3 (groups that cross shard boundaries: val7 is 3 + 3 + 1 samples): every frame's
    IoU, and so the matrix, is the same bit for bit at 1, 2 and 3 processes with 0, 1 and 2 workers."""
    recipe, run = trained_run
    manifest = load_manifest(load_recipe(recipe).data.root, "val7")
    results = []
    for world, workers in ((1, 0), (2, 1), (3, 2)):
        out, report = tmp_path / f"m{world}.json", tmp_path / f"report{world}"
        result = launch("eval.py", [str(recipe), "--checkpoint", str(run), "--split", "val7", "--out", str(out),
                                    "--report", str(report), "--show", "1", "--set", "eval.batch_size=3",
                                    "--set", f"eval.num_workers={workers}"], nproc=world)
        assert result.returncode == 0, result.stderr[-3000:]
        metrics = json.loads(out.read_text())
        assert metrics["world_size"] == world and metrics["valid_pixels"] == manifest.valid_pixels
        results.append(metrics)
    assert len(results[0]["per_image_iou"]) == 7
    for metrics in results[1:]:
        assert metrics["per_image_iou"] == results[0]["per_image_iou"]
        assert metrics["confusion_matrix"] == results[0]["confusion_matrix"]


def test_eval_of_missing_checkpoint_exits_2(tiny_recipe, tmp_path):
    result = launch("eval.py", [str(tiny_recipe), "--checkpoint", str(tmp_path / "nope")])
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "nope" in result.stderr


@pytest.mark.slow
def test_eval_during_training_equals_eval_of_the_saved_checkpoint(tiny_recipe, tmp_path):
    """After a DDP step every rank holds its own BatchNorm statistics; evaluation must use rank 0's
    (the ones saved), or the in-training mIoU is not the checkpoint's."""
    result = launch("train.py", [str(tiny_recipe), "--set", "train.steps=3", "--set", "train.eval_every=0",
                                 "--set", "log.images=0"], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    during = json.loads((run / "metrics" / "step-3" / "metrics.json").read_text())
    out = tmp_path / "after.json"
    after = launch("eval.py", [str(tiny_recipe), "--checkpoint", str(run / "checkpoints" / "step-3"),
                               "--out", str(out)], nproc=2)
    assert after.returncode == 0, after.stderr[-3000:]
    assert json.loads(out.read_text())["confusion_matrix"] == during["confusion_matrix"]


SLIDE = ["--set", "eval.mode=slide", "--set", "eval.crop=[16, 16]", "--set", "eval.stride=[8, 8]",
         "--set", "eval.scales=[0.75, 1.0]", "--set", "eval.flip=true", "--set", "eval.batch_size=3"]


@pytest.mark.slow
def test_sliding_window_with_tta_is_exact_for_any_world_size(trained_run, tmp_path):
    """Slide + scales + flip: the same matrix for 1 and 3 processes, equal to one image at a time
    through segdist.inference counted with numpy, at the labels' native resolution."""
    from segdist.inference import InferenceMode, labels

    recipe, run = trained_run
    r = load_recipe(recipe, [a for a in SLIDE if a != "--set"])
    manifest = load_manifest(r.data.root, "val7")
    model = build_model(r.model, 4)
    model.load_state_dict(load_file(str(resolve_checkpoint(run) / "model.safetensors")))
    model.eval()
    mode = InferenceMode.from_recipe(r)
    reference = count_one_at_a_time(manifest, lambda x: labels(model, x, mode))
    assert reference.sum() == manifest.valid_pixels
    for world in (1, 3):  # 3 processes: 7 samples split unevenly
        out = tmp_path / f"slide{world}.json"
        result = launch("eval.py", [str(recipe), "--checkpoint", str(run), "--split", "val7", "--out", str(out),
                                    *SLIDE], nproc=world)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "slide (16, 16) windows, stride (8, 8), scales [0.75, 1.0], flip" in result.stderr
        metrics = json.loads(out.read_text())
        assert metrics["valid_pixels"] == manifest.valid_pixels and metrics["world_size"] == world
        assert np.array_equal(np.array(metrics["confusion_matrix"], dtype=np.int64), reference), world


@pytest.mark.slow
def test_a_frame_is_predicted_alike_whatever_it_is_batched_with(tmp_path):
    """Frames of different sizes: each runs at its own padded size, so the batch (which changes with
    the world size) cannot change its prediction; whole and slide alike."""
    from segdist.data.shards import ShardWriter, encode_png
    from segdist.distributed import make_accelerator
    from segdist.evaluate import evaluate
    from segdist.inference import InferenceMode
    from segdist.precision import resolve_precision

    rng = np.random.default_rng(3)
    writer = ShardWriter(tmp_path, "mixed", dataset="t", classes=["a", "b", "c"], palette=[[0, 0, 0]] * 3,
                         samples_per_shard=3)
    for i, (h, w) in enumerate([(40, 50), (96, 70), (33, 33), (64, 128), (50, 40)]):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        writer.write(f"s{i}", encode_png(image), "png", rng.integers(0, 3, (h, w)).astype(np.uint8))
    writer.close()
    manifest = load_manifest(tmp_path, "mixed")
    class GlobalContext(torch.nn.Module):  # as DeepLab's image pooling: each pixel sees the frame's mean
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.local, self.pooled = torch.nn.Conv2d(3, 3, 1), torch.nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.local(x) + 10 * self.pooled(x.mean(dim=(2, 3), keepdim=True))

    model = GlobalContext().eval()
    accelerator = make_accelerator(resolve_precision("fp32"))
    for mode in (InferenceMode(), InferenceMode("slide", (32, 32), (16, 16))):
        one = evaluate(model, manifest, accelerator, 1, 0, mode)
        many = evaluate(model, manifest, accelerator, 5, 0, mode)
        assert one["confusion_matrix"] == many["confusion_matrix"] and one["valid_pixels"] == manifest.valid_pixels


# -- evaluate_checkpoint's own checks (segdist.evaluate, launch/eval.py) -------------------------------

def test_show_needs_a_report_folder(tiny_recipe, tmp_path):
    import segdist
    from segdist.errors import UserError

    with pytest.raises(UserError, match="--report DIR"):
        segdist.evaluate(tiny_recipe, checkpoint=tmp_path / "run", show=3)
    with pytest.raises(UserError, match="--show must be"):
        segdist.evaluate(tiny_recipe, checkpoint=tmp_path / "run", report=tmp_path / "r", show=-1)
    assert not (tmp_path / "r").exists()


def test_a_report_folder_that_cannot_be_made_is_one_line(trained_run, tmp_path):
    import segdist
    from segdist.errors import UserError

    recipe, run = trained_run
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match=r"--report .*file/r: it is not a folder that can be created"):
        segdist.evaluate(recipe, checkpoint=run, report=blocker / "r")
    assert blocker.read_text() == "not a folder"
