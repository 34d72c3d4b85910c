"""ONNX export of real checkpoints: our UNet, smp Unet, DeepLabV3Plus and Segformer, each trained
for a step here (the smp Unet is conftest's 4-step run). The file passes onnx.checker, takes
other batch sizes and frame sizes, and onnxruntime's logits match torch's on the checkpoint's
weights with the normalisation inside the graph."""

from __future__ import annotations

import io
import json
import sys
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import TINY_RECIPE, launch
from segdist.errors import UserError
from segdist.export import MAX_ABS_DIFF, _size_error, export_onnx
from segdist.predict import load_predictor
from segdist.preprocess import MEAN, STD
from segdist.recipe import load_recipe

pytestmark = pytest.mark.slow  # trains and exports models

ARCHS = {
    "own_unet": ['model.arch="unet"', 'model.encoder="null"', "model.arch_args={width = 8, depth = 2}"],
    "deeplabv3plus": ['model.arch="DeepLabV3Plus"'],
    "segformer": ['model.arch="Segformer"', 'model.encoder="mit_b0"'],
}
COMMON = ["train.steps=1", "train.eval_every=0", "train.ckpt_every=1", "log.images=0", "model.decoder_channels=null"]


def run_onnx(path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]


def check_export(recipe, run, tmp_path, name: str) -> None:
    out = tmp_path / f"{name}.onnx"
    result = launch("export.py", [str(recipe), "--checkpoint", str(run), "--out", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "max |logit diff| per input shape: 1x3x32x32: " in result.stdout and "2x3x64x96: " in result.stdout
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["segdist.classes"]) == ["background", "circle", "square", "triangle"]
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    # Against the checkpoint's model, normalised here by hand, at a size the export never saw.
    torch_model = load_predictor(load_recipe(recipe), run, device="cpu").model
    x = np.random.default_rng(0).uniform(0, 255, (3, 3, 96, 64)).astype(np.float32)
    with torch.no_grad():
        expected = torch_model((torch.from_numpy(x) - MEAN) / STD).numpy()
    got = run_onnx(out, x)
    assert got.shape == expected.shape == (3, 4, 96, 64)
    assert np.abs(got - expected).max() < MAX_ABS_DIFF, name


def test_smp_unet_exports_with_dynamic_sizes(trained_run, tmp_path):
    recipe, run = trained_run
    check_export(recipe, run, tmp_path, "smp_unet")


@pytest.mark.parametrize("name", list(ARCHS))
def test_other_architectures_export(name, shapes_root, tmp_path):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY_RECIPE.format(root=shapes_root, run_dir=tmp_path / "run"))
    overrides = [a for o in COMMON + ARCHS[name] for a in ("--set", o)]
    result = launch("train.py", [str(recipe), *overrides])
    assert result.returncode == 0, result.stderr[-3000:]
    check_export(tmp_path / "run" / "recipe.toml", tmp_path / "run", tmp_path, name)


def test_static_export_and_bad_arguments(trained_run, tmp_path):
    recipe, run = trained_run
    r = load_recipe(recipe)
    result = export_onnx(r, str(run), str(tmp_path / "static.onnx"), size=(64, 32), static=True)
    assert not result.dynamic and set(result.max_abs_diff) == {"1x3x64x32", "2x3x64x32"}
    dims = [d.dim_param or d.dim_value for d in onnx.load(str(result.path)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 64, 32]
    for kwargs, message in [({"out": str(tmp_path / "m.pt")}, "ending in .onnx"),
                            ({"out": str(tmp_path / "no" / "m.onnx")}, "folder must exist"),
                            ({"size": (30, 32)}, "multiples of 32"),
                            ({"opset": 3}, "opset")]:
        args = {"out": str(tmp_path / "bad.onnx"), **kwargs}
        with pytest.raises(UserError, match=message):
            export_onnx(r, str(run), **args)
        assert not (tmp_path / "bad.onnx").exists()


def test_a_size_fixed_at_tracing_is_named_by_its_operator():
    """A real onnxruntime failure of a graph whose reshape kept the traced size: the error names
    the operator onnxruntime names."""

    class FixedReshape(torch.nn.Module):
        def forward(self, x):
            return x.reshape(x.shape[0], 3, 32 * 32).reshape(x.shape[0], 3, 32, 32)

    buf = io.BytesIO()
    torch.onnx.export(FixedReshape(), (torch.rand(1, 3, 32, 32),), buf, dynamo=False, input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": {2: "height", 3: "width"}})
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception) as caught:
        session.run(None, {"image": np.zeros((1, 3, 64, 64), np.float32)})
    message = _size_error(SimpleNamespace(model=SimpleNamespace(arch="FixedReshape")), (1, 3, 64, 64), 32, 32, str(caught.value))
    assert "operator /Reshape_new_reshape (Reshape)" in message and "--static --size H W" in message and "\n" not in message



def test_without_the_export_extra_it_is_one_line(trained_run, tmp_path, monkeypatch):
    recipe, run = trained_run
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(UserError, match=r"onnxruntime is missing.*segdist\[export\]"):
        export_onnx(load_recipe(recipe), str(run), str(tmp_path / "m.onnx"))
