"""Prediction on image files: `launch/predict.py` and the notebook-style
`predict_probabilities(model, image)`.

An image is read like the converters read sources (segdist.data.convert.imageio): grayscale,
palette, RGBA, CMYK and 16-bit files become 8-bit RGB, as notebook 004's grayscale birds needed.
It goes through the model one at a time, in eval mode and fp32, the way evaluation runs frames
(segdist.inference): the recipe's `[eval]` mode (whole, slide or resize, with its scales and flip),
or resized to `size` — the training scale — with the scores resized back to the original size
(bilinear). Padding is black, to a multiple of 32, as the eval loader pads.

The model comes from `segdist.models.load_trained`, as evaluation loads it: built without
pretrained encoder weights (the checkpoint holds every weight), its EMA copy preferred when the
checkpoint has one. Class names and palette come from the manifest of the recipe's val split when
it exists; without the data folder generic names and the VOC palette stand in, and the number of
outputs then comes from `model.classes` alone.

Outputs per image `<stem>` in the output folder, each written atomically (temp file + rename):
`<stem>.png` label map (class ids; uint8, 16-bit beyond 256 classes), `<stem>_color.png` the label
map in palette colours, and the probabilities: binary (one logit) `<stem>_prob.npy` float32 HxW
sigmoid plus `<stem>_prob.png` (0-255 gray); multi-class `<stem>_prob.npy` float16 CxHxW softmax.
The label map is computed from the stored probabilities (prob > threshold; argmax of the float16
values), so the files always agree with each other.
"""

from __future__ import annotations

import glob
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from segdist import inference
from segdist.data.sample import to_uint8
from segdist.inference import InferenceMode
from segdist.errors import UserError
from segdist.models.trained import BINARY_CLASSES
from segdist.preprocess import normalise

log = logging.getLogger("segdist")

DEFAULT_THRESHOLD = 0.5
"""Binary label map: probability > threshold (0.5 is the eval's logit > 0)."""

ImageLike = str | os.PathLike | Image.Image | np.ndarray


@dataclass
class Predictor:
    """A loaded model and what is needed to write its predictions."""

    model: nn.Module
    """In eval mode, on `device`, with the checkpoint's (EMA) weights."""
    outputs: int
    """Logits of the model: 1 = binary (sigmoid), else one per class (softmax)."""
    classes: list[str]
    """Class names, from the val manifest or generic."""
    palette: list[list[int]]
    """RGB colour per class of `<stem>_color.png`."""
    ignore_index: int
    checkpoint: Path
    device: torch.device

    @property
    def binary(self) -> bool:
        return self.outputs == 1

    mode: InferenceMode = InferenceMode()
    """How images go through the model (the recipe's `[eval]` mode) when no size is given."""

    def predict_probabilities(self, image: ImageLike, size: Sequence[int] | None = None) -> np.ndarray:
        """`predict_probabilities(self.model, image, size, self.mode)`."""
        return predict_probabilities(self.model, image, size, self.mode)


# ---------------------------------------------------------------------------------------------
# Loading

def load_predictor(recipe, checkpoint: str | os.PathLike, device: str | torch.device | None = None) -> Predictor:
    """The recipe's model with a checkpoint's weights (EMA ones when it has them), ready to predict.

    `recipe` is a Recipe or the path of a recipe file; `checkpoint` a run folder (its best, else
    its latest checkpoint) or one `checkpoints/step-N` folder; `device` defaults to CUDA if there
    is one, else the CPU.
    """
    from segdist.models import load_trained
    from segdist.recipe import load_recipe

    if not hasattr(recipe, "model"):
        recipe = load_recipe(recipe)
    model, info = load_trained(recipe, checkpoint)
    if info.manifest is not None:
        m = info.manifest
        classes, palette, ignore_index = m.classes, m.palette, m.ignore_index
    else:
        classes = list(BINARY_CLASSES) if info.outputs == 1 else [f"class_{i}" for i in range(info.outputs)]
        palette, ignore_index = default_palette(len(classes)), 255
        log.info("no manifest of split %r in %s: generic class names and palette", recipe.data.val_split,
                 recipe.data.root)
    device = torch.device(device) if device is not None else default_device()
    model.to(device).eval()
    return Predictor(model, info.outputs, list(classes), [list(c) for c in palette], ignore_index, info.checkpoint,
                     device, InferenceMode.from_recipe(recipe))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_palette(n: int) -> list[list[int]]:
    """The PASCAL VOC colour map for `n` classes (what folder datasets get at conversion)."""
    from segdist.data.convert.imageio import voc_palette

    return voc_palette(n)


# ---------------------------------------------------------------------------------------------
# Images and the forward pass

def read_image(image: ImageLike) -> np.ndarray:
    """HxWx3 uint8 RGB from a file path, a PIL image or an array (HxW, HxWx1/3/4, uint8 or uint16).

    Files and PIL images follow the converters' rules (segdist.data.convert.imageio): gray,
    palette, RGBA (alpha dropped), CMYK and 16-bit (scaled to 8 bits) become RGB; a file that does
    not decode is a `UserError` naming it.
    """
    from segdist.data.convert import imageio

    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise UserError(f"image {path} not found: give the path of an image file")
        return imageio.load_image(path).rgb
    if isinstance(image, Image.Image):
        return imageio.to_rgb(image, Path(getattr(image, "filename", "") or "<PIL image>"))
    arr = np.asarray(image)
    if arr.dtype == np.uint16:
        arr = to_uint8(arr)
    if arr.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8 or uint16, got {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"image arrays must be HxW, HxWx1, HxWx3 or HxWx4, got shape {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr[:, :, :3])


@torch.no_grad()
def forward_scores(model: nn.Module, rgb: np.ndarray, mode: InferenceMode) -> torch.Tensor:
    """1xKxHxW scores of an HxWx3 uint8 image at its own size H, W (on the model's device), through
    segdist.inference as evaluation runs it: logits for a single pass, mean probabilities with
    test-time augmentation."""
    device = next(model.parameters()).device
    x = torch.from_numpy(np.array(rgb, dtype=np.uint8)).to(device).permute(2, 0, 1)[None].float()
    return inference.scores(model, normalise(x), mode)


def to_probabilities(scores: torch.Tensor, mode: InferenceMode) -> np.ndarray:
    """1xKxHxW scores → float32 HxW sigmoid (one logit) or KxHxW softmax, on the CPU."""
    prob = scores if mode.tta else inference.probabilities(scores)
    return (prob[0, 0] if prob.shape[1] == 1 else prob[0]).cpu().numpy()


def predict_probabilities(model: nn.Module, image: ImageLike, size: Sequence[int] | None = None,
                          mode: InferenceMode | None = None) -> np.ndarray:
    """Probability map of one image at its original size, as notebook 004's `predict(model, img_path)`:
    float32 HxW (probability of the foreground) for a one-logit model, CxHxW (softmax) otherwise.

    `image` is a file path, a PIL image or an array; `size` (H, W) resizes it for the forward pass
    (the scale the model was trained at: "resize" mode); otherwise `mode` (segdist.inference; a
    Predictor passes its recipe's `[eval]` mode) or the whole image. The model runs in eval mode
    under no_grad on its device (its train/eval mode is restored after). E.g.
    `predict_probabilities(load_predictor(recipe, run).model, "bird.jpg")`.
    """
    if size is not None:
        mode = InferenceMode("resize", crop=tuple(int(v) for v in size))
    mode = mode or InferenceMode()
    rgb = read_image(image)
    was_training = model.training
    model.eval()
    try:
        return to_probabilities(forward_scores(model, rgb, mode), mode)
    finally:
        model.train(was_training)


def label_map(prob: np.ndarray, threshold: float, num_classes: int) -> np.ndarray:
    """Class ids from `predict_probabilities`' output: prob > threshold (binary), else argmax over classes."""
    if prob.ndim == 2:
        return (prob > threshold).astype(np.uint8)
    return prob.argmax(axis=0).astype(np.uint8 if num_classes <= 256 else np.uint16)


# ---------------------------------------------------------------------------------------------
# `launch/predict.py`

def expand_inputs(patterns: Sequence[str]) -> list[Path]:
    """Image files named by paths and globs, in order, without duplicates; a missing file, a
    folder or a glob matching no file is a `UserError` naming it."""
    paths: list[Path] = []
    for pattern in patterns:
        literal = Path(os.path.expanduser(pattern))
        if literal.is_file():
            found = [literal]
        elif literal.is_dir():
            raise UserError(f"input {pattern} is a folder: give image files or a quoted glob like '{pattern}/*.png'")
        elif any(c in pattern for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
            if not found:
                raise UserError(f"no file matches {pattern!r}: check the pattern (quote it so the shell leaves it)")
        else:
            raise UserError(f"image {pattern} not found: give existing image files or a quoted glob like 'img/*.jpg'")
        paths.extend(found)
    return list(dict.fromkeys(p.resolve() for p in paths))


def output_names(stem: str, binary: bool) -> dict[str, str]:
    names = {"label": f"{stem}.png", "color": f"{stem}_color.png", "prob": f"{stem}_prob.npy"}
    if binary:
        names["prob_png"] = f"{stem}_prob.png"
    return names


def _check_outputs(paths: list[Path], out: Path, binary: bool) -> None:
    """No two inputs may write the same file, and no output may overwrite an input."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a folder (it is created if missing)")
    owner: dict[str, Path] = {}
    inputs = set(paths)
    for path in paths:
        for name in output_names(path.stem, binary).values():
            if name in owner:
                raise UserError(f"{owner[name]} and {path} would both write {out / name}: "
                                "rename one, or predict them into different --out folders")
            owner[name] = path
            if (out / name).resolve() in inputs:
                raise UserError(f"predicting {path} would overwrite the input {out / name}: choose another --out")


def _check_size(size: Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if len(size) != 2 or any(int(s) <= 0 for s in size):
        raise UserError(f"--size must be two positive integers H W, got {' '.join(map(str, size))}")
    return int(size[0]), int(size[1])


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def write_prediction(predictor: Predictor, prob: np.ndarray, out: Path, stem: str, threshold: float) -> list[Path]:
    """Write one image's label map, colour map and probabilities into `out`, each atomically."""
    from segdist.data.shards import encode_png
    from segdist.fileio import atomic_write_bytes
    from segdist.tblog import colorize

    names = output_names(stem, predictor.binary)
    if predictor.binary:
        stored = prob.astype(np.float32)
    else:
        stored = prob.astype(np.float16)
    label = label_map(stored, threshold, len(predictor.classes))
    files = {
        names["label"]: encode_png(label),
        names["color"]: encode_png(colorize(label, predictor.palette, predictor.ignore_index)),
        names["prob"]: _npy_bytes(stored),
    }
    if predictor.binary:
        files[names["prob_png"]] = encode_png(np.round(stored * 255).astype(np.uint8))
    for name, data in files.items():
        atomic_write_bytes(out / name, data)
    return [out / name for name in files]


def predict_files(recipe, checkpoint: str, inputs: Sequence[str], out: str, size: Sequence[int] | None = None,
                  threshold: float | None = None) -> list[Path]:
    """`launch/predict.py`: every input checked (exists, decodes) before anything is written, then
    one image at a time through the model; returns the files written."""
    from tqdm import tqdm

    from segdist.distributed import setup_logging

    setup_logging(True)
    size = _check_size(size)
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise UserError(f"--threshold must be in [0, 1], got {threshold}")
    paths = expand_inputs(inputs)
    predictor = load_predictor(recipe, checkpoint)
    if threshold is not None and not predictor.binary:
        raise UserError(f"--threshold is for binary (model.classes = 1) models; this one has {predictor.outputs} "
                        "classes and takes the argmax")
    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    out_dir = Path(out)
    _check_outputs(paths, out_dir.resolve(), predictor.binary)
    for path in paths:
        read_image(path)  # decode every input now: a bad file fails the run before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("predicting %d image(s) with %s on %s (%s: %s)", len(paths), predictor.checkpoint, predictor.device.type,
             "binary" if predictor.binary else f"{predictor.outputs} classes", ", ".join(predictor.classes[:8])
             + (", ..." if len(predictor.classes) > 8 else ""))
    written: list[Path] = []
    for path in tqdm(paths, desc="predict", unit="img", disable=None):
        prob = predictor.predict_probabilities(path, size)
        written += write_prediction(predictor, prob, out_dir, path.stem, threshold)
    print(f"wrote predictions of {len(paths)} image(s) to {out_dir}", flush=True)
    return written
