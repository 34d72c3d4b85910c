"""One image at a time: a trained model, loaded once (`load_predictor`), on one image
(`predict_frame`: its label map and probabilities; `predict_probabilities`). segdist.predict.files
(`segdist.predict`, the `segdist-predict` command) writes its files with these functions.

An image is read like the converters read sources (segdist.data.convert.imageio): grayscale,
palette, RGBA, CMYK and 16-bit files become 8-bit RGB, as the birds assignment's grayscale images needed.
It goes through the model one at a time, in eval mode and fp32, the way evaluation runs frames
(segdist.inference): the recipe's `[eval]` mode (whole, slide or resize, with its scales and flip),
or resized to `size` — the training scale — with the scores resized back to the original size
(bilinear). Padding is black, to a multiple of 32, as the eval loader pads.

The model comes from `segdist.models.load_trained`, as evaluation loads it: built without
pretrained encoder weights (the checkpoint holds every weight), its EMA copy preferred when the
checkpoint has one. Class names and palette come from the manifest of the recipe's val split when
it exists; without the data folder generic names and the VOC palette stand in, and the number of
outputs then comes from `model.classes` alone.

The probabilities are float32 HxW (sigmoid) for a one-logit model and CxHxW (softmax) otherwise,
at the image's original size. The label map is not made from them: it comes from the fp32 scores by
evaluation's own rule (segdist.inference.labels_of), so a near-tie that a softmax rounds to a tie
still goes to the class the model scored higher. Prediction runs in fp32; evaluation runs under the
recipe's precision, so with `train.precision = "fp32"` a frame predicted here gets exactly the labels
`launch/eval.py` counted for it.
"""

from __future__ import annotations

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
from segdist.preprocess import to_input

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
    """RGB colour per class (of the colour map and the overlay)."""
    ignore_index: int
    checkpoint: Path
    device: torch.device

    @property
    def binary(self) -> bool:
        return self.outputs == 1

    mode: InferenceMode = InferenceMode()
    """How images go through the model (the recipe's `[eval]` mode) when no size is given."""
    ema: bool = False
    """The weights are the checkpoint's EMA copy (segdist.models.load_trained prefers it)."""

    def predict(self, image: ImageLike, size: Sequence[int] | None = None,
                threshold: float = DEFAULT_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
        """`predict_frame(self.model, image, size, self.mode, threshold)`: (label map, probabilities)."""
        return predict_frame(self.model, image, size, self.mode, threshold)

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
    from segdist.recipe import resolve_recipe

    recipe = resolve_recipe(recipe)
    model, info = load_trained(recipe, checkpoint)
    if info.manifest is not None:
        m = info.manifest
        classes, palette, ignore_index = m.classes, m.palette, m.ignore_index
    else:
        classes = list(BINARY_CLASSES) if info.outputs == 1 else [f"class_{i}" for i in range(info.outputs)]
        palette, ignore_index = default_palette(len(classes)), 255
        log.info("no manifest of split %r in %s: generic class names and palette", recipe.data.val_split,
                 recipe.data.eval_root)
    device = torch.device(device) if device is not None else default_device()
    model.to(device).eval()
    return Predictor(model, info.outputs, list(classes), [list(c) for c in palette], ignore_index, info.checkpoint,
                     device, InferenceMode.from_recipe(recipe), info.ema)


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
    x = to_input(torch.from_numpy(np.array(rgb, dtype=np.uint8))[None], device)  # as evaluation's batches
    return inference.scores(model, x, mode)


def to_probabilities(scores: torch.Tensor, mode: InferenceMode) -> np.ndarray:
    """1xKxHxW scores → float32 HxW sigmoid (one logit) or KxHxW softmax, on the CPU."""
    prob = scores if mode.tta else inference.probabilities(scores)
    return (prob[0, 0] if prob.shape[1] == 1 else prob[0]).cpu().numpy()


def _scores(model: nn.Module, image: ImageLike, size: Sequence[int] | None,
            mode: InferenceMode | None) -> tuple[torch.Tensor, InferenceMode]:
    """(1xKxHxW scores, the mode they were made in) of one image at its original size; the model in
    eval mode for the pass, its own mode restored after."""
    if size is not None:
        mode = InferenceMode("resize", crop=tuple(int(v) for v in size))
    mode = mode or InferenceMode()
    rgb = read_image(image)
    was_training = model.training
    model.eval()
    try:
        return forward_scores(model, rgb, mode), mode
    finally:
        model.train(was_training)


def predict_probabilities(model: nn.Module, image: ImageLike, size: Sequence[int] | None = None,
                          mode: InferenceMode | None = None) -> np.ndarray:
    """Probability map of one image at its original size, as the birds assignment's `predict(model, img_path)`:
    float32 HxW (probability of the foreground) for a one-logit model, CxHxW (softmax) otherwise.

    `image` is a file path, a PIL image or an array; `size` (H, W) resizes it for the forward pass
    (the scale the model was trained at: "resize" mode); otherwise `mode` (segdist.inference; a
    Predictor passes its recipe's `[eval]` mode) or the whole image. The model runs in eval mode
    under no_grad on its device (its train/eval mode is restored after). E.g.
    `predict_probabilities(load_predictor(recipe, run).model, "bird.jpg")`.
    """
    scores, mode = _scores(model, image, size, mode)
    return to_probabilities(scores, mode)


def predict_frame(model: nn.Module, image: ImageLike, size: Sequence[int] | None = None,
                  mode: InferenceMode | None = None,
                  threshold: float = DEFAULT_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """(label map, probabilities) of one image at its original size, from one pass of the model (as
    `predict_probabilities` runs it). The label map holds class ids (uint8; uint16 beyond 256 classes)
    taken from the fp32 scores as evaluation takes them: the argmax, or for one logit a probability
    above `threshold` (segdist.inference.labels_of)."""
    scores, mode = _scores(model, image, size, mode)
    ids = inference.labels_of(scores, mode.tta, threshold)[0].cpu().numpy()
    return ids.astype(np.uint8 if scores.shape[1] <= 256 else np.uint16), to_probabilities(scores, mode)
