"""`launch/export.py --format hf`: a folder others load without segdist. Real checkpoints of short
real trainings (conftest's smp Unet, and our UNet with EMA weights and our SegNet trained here) are
exported by the real command; then a fresh Python process, in which importing segdist is blocked,
runs the loader snippet of the folder's own README.md on a PNG whose size needs padding, and its
logits must equal segdist's predictor's (fp32, bit for bit). The card's facts are checked against
the run's own files (manifests, metrics, recipe)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import TINY_RECIPE, launch
from segdist.checkpoint import resolve_checkpoint
from segdist.data.manifest import sha256_file
from segdist.errors import UserError
from segdist.hfexport import MODELING_FILE, export_hf, load_folder, modeling_source, split_facts, write_own
from segdist.modelcard import FOLDER_LINE
from segdist.models.build import build_model
from segdist.predict import load_predictor, read_image
from segdist.predict.frame import forward_scores
from segdist.recipe import ModelConfig, load_recipe

OWN = {
    "unet_ema": ['model.arch="unet"', 'model.encoder="null"', "model.arch_args={width = 8, depth = 2}",
                 "model.ema_decay=0.5"],
    "segnet": ['model.arch="segnet"', 'model.encoder="null"', "model.arch_args={width = 8, depth = 3}"],
}
COMMON = ["train.steps=2", "train.eval_every=0", "train.ckpt_every=2", "log.images=0", "model.decoder_channels=null"]

BLOCK_SEGDIST = '''
import importlib.abc
import sys


class NoSegdist(importlib.abc.MetaPathFinder):
    """segdist is pip-installed (editable) here: this finder, first in line, makes it unimportable."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "segdist":
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: the folder must load without segdist)")
        return None


sys.meta_path.insert(0, NoSegdist())
try:
    import segdist  # noqa: F401
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("segdist is still importable")
'''


@pytest.fixture(scope="module")
def runs(trained_run, shapes_root, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """name -> (recipe, run folder): conftest's smp Unet and our UNet (EMA) and SegNet, 2 steps each."""
    out = {"smp_unet": trained_run}
    for name, overrides in OWN.items():
        tmp = tmp_path_factory.mktemp(name)
        recipe = tmp / "tiny.toml"
        recipe.write_text(TINY_RECIPE.format(root=shapes_root, run_dir=tmp / "run"))
        result = launch("train.py", [str(recipe), *[a for o in COMMON + overrides for a in ("--set", o)]])
        assert result.returncode == 0, result.stderr[-3000:]
        out[name] = (tmp / "run" / "recipe.toml", tmp / "run")
    return out


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    """An RGB PNG of 45x37: neither side a multiple of 32."""
    path = tmp_path_factory.mktemp("image") / "frame.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 37, 3), dtype=np.uint8)).save(path)
    return path


def fresh_logits(folder: Path, image: Path, tmp: Path) -> np.ndarray:
    """The README's loader snippet, run in a new interpreter where segdist cannot be imported (cwd a
    temporary folder, no PYTHONPATH), on `image`: its logits."""
    card = (folder / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert FOLDER_LINE in snippet
    snippet = snippet.replace(FOLDER_LINE, f"folder, image = {str(folder)!r}, {str(image)!r}")
    out = tmp / "logits.npy"
    script = BLOCK_SEGDIST + snippet + textwrap.dedent(f"""
        np.save({str(out)!r}, logits.numpy())
        assert not [m for m in sys.modules if m.split(".")[0] == "segdist"]
        """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp, env={**env, "HF_HUB_OFFLINE": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return np.load(out)


@pytest.mark.slow  # trains two models, exports three through the command, starts fresh interpreters
@pytest.mark.parametrize("name", ["smp_unet", "unet_ema", "segnet"])
def test_the_folder_loads_without_segdist_and_gives_the_predictors_logits(name, runs, image, tmp_path):
    recipe_path, run = runs[name]
    out = tmp_path / "export"
    result = launch("export.py", [str(recipe_path), "--checkpoint", str(run), "--format", "hf", "--out", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {out}" in result.stdout and "max |logit diff| against the checkpoint's model: 0.00e+00" in result.stdout
    smp = name == "smp_unet"
    expected_files = {"README.md", "config.json", "model.safetensors", "segdist.json"} | ({MODELING_FILE} if not smp else set())
    assert {p.name for p in out.iterdir()} == expected_files
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in out.iterdir())

    predictor = load_predictor(load_recipe(recipe_path), run, device="cpu")
    expected = forward_scores(predictor.model, read_image(image), predictor.mode).numpy()
    got = fresh_logits(out, image, tmp_path)
    assert got.shape == expected.shape == (1, 4, 45, 37)
    assert np.array_equal(got, expected), f"max |diff| {np.abs(got - expected).max():.3g}"

    checkpoint = resolve_checkpoint(run)
    exported = load_file(str(out / "model.safetensors"))
    if name == "unet_ema":  # the EMA copy's weights, not the raw ones
        ema = torch.load(checkpoint / "ema.pt", weights_only=True)["module"]
        raw = load_file(str(checkpoint / "model.safetensors"))
        assert exported.keys() == ema.keys() and all(torch.equal(exported[k], ema[k]) for k in ema)
        assert any(not torch.equal(exported[k], raw[k]) for k in raw)
        assert json.loads((out / "segdist.json").read_text())["weights"] == "ema"
    if smp:  # exactly the folder smp's own save_pretrained writes for this model
        import segmentation_models_pytorch as smp_lib

        config = json.loads((out / "config.json").read_text())
        assert config["_model_class"] == "Unet" and config["encoder_weights"] is None
        rebuilt = getattr(smp_lib, config["_model_class"])(**{k: v for k, v in config.items() if k != "_model_class"})
        rebuilt.save_pretrained(tmp_path / "smp_own")
        assert (tmp_path / "smp_own" / "config.json").read_text() == (out / "config.json").read_text()
        check_card(out, recipe_path, run, checkpoint)


def check_card(out: Path, recipe_path: Path, run: Path, checkpoint: Path) -> None:
    """The card says what the run's own files say: data, metrics, recipe, classes, input."""
    card = (out / "README.md").read_text()
    recipe = load_recipe(recipe_path)
    root = Path(recipe.data.root)
    state = json.loads((checkpoint / "state.json").read_text())
    step = state["step"]
    # the manifests training read, as the checkpoint recorded them
    assert state["manifests"] == {"train": sha256_file(root / "train.json"), "val": sha256_file(root / "val7.json")}
    metrics = json.loads((run / "metrics" / f"step-{step}" / "metrics.json").read_text())
    for needle in ["library_name: segmentation-models-pytorch", "segmentation_models_pytorch `Unet`, encoder `resnet18`",
                   f"`shapes` split `train`, 48 samples (manifest `train.json`, sha256 `{sha256_file(root / 'train.json')}`)",
                   f"split `val7`, 7 samples (manifest `val7.json`, sha256 `{sha256_file(root / 'val7.json')}`)",
                   f"at step {step}", f"**mIoU {100 * metrics['miou']:.2f} %**",
                   "mean = (123.675, 116.28, 103.53) and std = (58.395, 57.12, 57.375)", "multiples of 32 with black",
                   (checkpoint / "recipe.toml").read_text().strip(), "the checkpoint's weights (it holds no EMA copy)"]:
        assert needle in card, needle
    palette = json.loads((root / "val7.json").read_text())["palette"]
    for i, (name, iou) in enumerate(zip(["background", "circle", "square", "triangle"], metrics["per_class_iou"])):
        shown = "n/a" if iou is None else f"{100 * iou:.2f}"
        assert f"| {i} | {name} | {', '.join(map(str, palette[i]))} | {shown} |" in card
    facts = json.loads((out / "segdist.json").read_text())
    assert facts["evaluation"]["miou"] == metrics["miou"] and facts["classes"][1] == "circle"
    assert facts["input"]["mean"] == (torch.tensor([0.485, 0.456, 0.406]) * 255).tolist()


@pytest.mark.slow  # one 2-step training (the runs fixture)
def test_an_existing_folder_is_refused_unless_empty_and_the_card_says_what_it_could_not_find(runs, tmp_path):
    recipe_path, run = runs["segnet"]
    recipe = load_recipe(recipe_path)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"--out .*taken is not empty \(it holds 'notes.txt'\)"):
        export_hf(recipe, str(run), str(taken))
    assert [p.name for p in taken.iterdir()] == ["notes.txt"] and (taken / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no temporary folder left

    # A checkpoint copied out of its run, the data elsewhere: exported into an empty folder, and the
    # card says what it could not find instead of guessing.
    lone = tmp_path / "lone"
    shutil.copytree(resolve_checkpoint(run), lone)
    nowhere = load_recipe(recipe_path, [f"data.root={tmp_path / 'nowhere'}", "model.classes=4"])
    (tmp_path / "empty").mkdir()
    result = export_hf(nowhere, str(lone), str(tmp_path / "empty"))
    card = (tmp_path / "empty" / "README.md").read_text()
    assert "Trained on not known: data root" in card and "No evaluation was found: checkpoint lone lies outside" in card
    assert len(result.gaps) == 3 and result.gaps[0].startswith("training data: data root")
    assert "| 1 | class_1 |" in card and not result.ema


@pytest.mark.parametrize("arch,args", [
    ("unet", {"width": 4, "depth": 3, "upsample": "maxunpool", "norm": "group"}),
    ("unet", {"width": 4, "depth": 2, "upsample": "bilinear", "skips": False, "norm": "instance"}),
    ("segnet", {"width": 4, "depth": 2, "norm": "none"}),
])
def test_the_modeling_file_rebuilds_our_architectures(arch, args, tmp_path):
    model = build_model(ModelConfig(arch=arch, encoder=None, arch_args=args), 3).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # not the initial values: the weights must really load
    config = {"architecture": arch, "in_channels": 3, "classes": 3, **args}
    write_own(tmp_path, model, config)
    loaded = load_folder(tmp_path, smp=False)
    x = torch.randn(2, 3, 40, 24)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_the_modeling_file_imports_nothing_of_segdist():
    import ast

    tree = ast.parse(modeling_source())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported == {"__future__", "math", "torch", "json", "pathlib", "safetensors"}
    assert ast.get_docstring(tree).startswith("segdist's own segmentation architectures")


def test_the_card_names_the_manifest_training_read_and_a_split_converted_again_since(shapes_root):
    data = load_recipe_text(shapes_root).data
    now = sha256_file(shapes_root / "train.json")
    same = split_facts(data, "train", False, now)
    assert same.sha256 == now and same.now is None and "converted again" not in same.describe()
    before = split_facts(data, "train", False, "0" * 64)
    assert before.sha256 == "0" * 64 and before.now == now
    assert f"sha256 `{'0' * 64}`); the manifest there now has sha256 `{now}`: the split was converted again" in before.describe()
    assert split_facts(data, "train", False, None).sha256 == now  # a checkpoint from before they were recorded
    gone = split_facts(data, "nosuchsplit", False, "1" * 64)
    assert isinstance(gone, str) and gone.endswith(f"training read a manifest nosuchsplit.json of sha256 {'1' * 64}")


def load_recipe_text(root: Path):
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.toml"
        path.write_text(TINY_RECIPE.format(root=root, run_dir=Path(tmp) / "run"))
        return load_recipe(path)
