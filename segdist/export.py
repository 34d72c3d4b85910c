"""ONNX export of a trained model: `launch/export.py RECIPE --checkpoint RUN --out model.onnx`.

The model comes back through `segdist.predict.load_predictor` (so `segdist.models.load_trained`:
EMA weights preferred, class names and palette from the val manifest) and is exported with the
ImageNet normalisation inside the graph:

- input `image`: float32 N x 3 x H x W, RGB values in [0, 255], H and W multiples of 32 (pad at the
  bottom and right with black, as segdist does);
- output `logits`: float32 N x K x H x W (K = 1 for a binary model: sigmoid, threshold 0).

Batch, height and width are dynamic unless `static` is asked for. The file is checked with
`onnx.checker`, then onnxruntime runs it on random inputs at the traced size and at another size
and batch, against torch: the largest absolute logit difference is reported, and a graph that
cannot take the other size (a size fixed when the model was traced) is an error naming the
operator onnxruntime names. The model's metadata holds the class names, the palette, the input
convention and the checkpoint. The file is written atomically. `onnx` and `onnxruntime` come
with the `export` extra (`pip install 'segdist[export]'`).
"""

from __future__ import annotations

import io
import json
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from segdist.data.sample import padded_size
from segdist.errors import UserError
from segdist.preprocess import normalise

log = logging.getLogger("segdist")

DEFAULT_OPSET = 17
MAX_ABS_DIFF = 1e-3
"""Largest |onnxruntime - torch| logit difference accepted (fp32 kernels differ in summation order)."""


class Normalised(nn.Module):
    """The model behind the ImageNet normalisation: what the exported graph computes."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(normalise(image))


@dataclass
class ExportResult:
    path: Path
    outputs: int
    dynamic: bool
    opset: int
    max_abs_diff: dict[str, float]
    """|onnxruntime - torch| per checked input shape ("NxCxHxW")."""


def _onnx_modules():
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise UserError(f"ONNX export needs onnx and onnxruntime ({exc.name} is missing): "
                        "pip install 'segdist[export]'") from None
    return onnx, onnxruntime


def check_size(size, multiple: int = 32) -> tuple[int, int]:
    h, w = (int(v) for v in size)
    if h <= 0 or w <= 0 or h % multiple or w % multiple:
        raise UserError(f"--size {h} {w}: height and width must be positive multiples of {multiple}")
    return h, w


def export_onnx(recipe, checkpoint: str, out: str, opset: int = DEFAULT_OPSET, size=None,
                static: bool = False) -> ExportResult:
    """Export, check and verify; see the module's docstring. `size` (H, W) is the traced input's
    size (default: `data.crop` rounded up to a multiple of 32); with `static` it is the only one
    the graph takes (batch stays dynamic)."""
    onnx, ort = _onnx_modules()
    from segdist.fileio import atomic_write_bytes
    from segdist.predict import load_predictor

    out_path = Path(out)
    if out_path.suffix != ".onnx":
        raise UserError(f"--out {out}: give a file name ending in .onnx")
    if out_path.is_dir() or not out_path.resolve().parent.is_dir():
        raise UserError(f"--out {out}: its folder must exist and it must not be a folder")
    if not 7 <= opset <= 23:
        raise UserError(f"--opset {opset}: use an ONNX opset from 7 to 23 (default {DEFAULT_OPSET})")
    if size is None:
        size = padded_size(*map(int, recipe.data.crop))
    h, w = check_size(size)
    predictor = load_predictor(recipe, checkpoint, device="cpu")
    wrapped = Normalised(predictor.model).eval()
    example = torch.rand(1, 3, h, w) * 255
    axes = {0: "batch"} if static else {0: "batch", 2: "height", 3: "width"}
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python branches: checked below on another size
        try:
            torch.onnx.export(wrapped, (example,), buf, dynamo=False, opset_version=opset, input_names=["image"],
                              output_names=["logits"], dynamic_axes={"image": axes, "logits": axes})
        except Exception as exc:  # an operator with no ONNX form at this opset, mostly
            raise UserError(f"{recipe.model.arch} cannot be exported to ONNX opset {opset}: "
                            f"{_first_line(exc)} (try another --opset)") from None
    proto = onnx.load_from_string(buf.getvalue())
    meta = {"segdist.classes": json.dumps(predictor.classes), "segdist.palette": json.dumps(predictor.palette),
            "segdist.outputs": str(predictor.outputs), "segdist.checkpoint": str(predictor.checkpoint),
            "segdist.input": "float32 Nx3xHxW RGB in [0, 255], H and W multiples of 32; normalised inside",
            "segdist.output": "float32 NxKxHxW logits" + (" (one logit: sigmoid, threshold 0)" if predictor.outputs == 1 else "")}
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto, full_check=True)
    data = proto.SerializeToString()

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    shapes = [(1, 3, h, w)] if static else [(1, 3, h, w), (2, 3, h + 32, w + 64)]
    if static:
        shapes.append((2, 3, h, w))
    diffs: dict[str, float] = {}
    gen = torch.Generator().manual_seed(0)
    for shape in shapes:
        x = torch.rand(*shape, generator=gen) * 255
        with torch.no_grad():
            expected = wrapped(x).float().numpy()
        try:
            got = session.run(None, {"image": x.numpy()})[0]
        except Exception as exc:
            raise UserError(_size_error(recipe, shape, h, w, str(exc))) from None
        if got.shape != expected.shape:
            raise UserError(f"{recipe.model.arch}: the ONNX graph gives {list(got.shape)} for input {list(shape)}, torch "
                            f"{list(expected.shape)}: a size was fixed at tracing; export with --static --size H W")
        diff = float(np.abs(got - expected).max())
        diffs["x".join(map(str, shape))] = diff
        if not diff <= MAX_ABS_DIFF:
            raise UserError(f"{recipe.model.arch}: onnxruntime's logits differ from torch's by {diff:.3g} at input "
                            f"{list(shape)} (more than {MAX_ABS_DIFF}): a size or a branch was fixed at tracing; "
                            "export with --static --size H W")
    atomic_write_bytes(out_path, data)
    return ExportResult(out_path, predictor.outputs, not static, opset, diffs)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _size_error(recipe, shape, h: int, w: int, message: str) -> str:
    """One line naming the operator onnxruntime failed in (its node name is the layer's path)."""
    node = re.search(r"running (\w+) node\. Name:'([^']*)'", message)  # onnxruntime's wording
    where = f"operator {node.group(2)} ({node.group(1)})" if node else "one operator"
    return (f"{recipe.model.arch} exported with dynamic sizes fails at input {list(shape)} in {where} "
            f"(traced at {h}x{w}): that layer fixed a size when traced; export with --static --size H W "
            f"[onnxruntime: {message.strip().splitlines()[0][:200]}]")
