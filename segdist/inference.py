"""How a frame goes through a model, in one place for evaluation, the in-training evaluation and
prediction: the recipe's `[eval]` mode, scales and flip.

- "whole": the frame at its native size (padded to a multiple of 32 as the eval loader pads).
- "slide": overlapping `crop`-sized windows `stride` apart, the last ones flush with the border
  (mmsegmentation's grid); each pixel's scores are the sum over the windows that cover it divided
  by their number. A frame smaller than the window is padded (black in, nothing counted out).
  Windows go through the model `batch_size` at a time, and one score map per frame is allocated.
- "resize": the frame resized (bilinear) to `crop` — the scale a model trained on resized frames
  saw — and the scores resized back to the frame's size.

Test-time augmentation (more than one scale, or flip) averages **probabilities** (softmax, or
sigmoid for a one-logit model), as mmsegmentation's aug_test does: logits of different scales are
not on one scale, probabilities are. A single pass keeps the raw logits, so its labels are exactly
the argmax the model gives. Either way the labels are compared with the label map at its native
resolution: evaluation stays exact, whatever the mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from segdist.data.sample import PAD_MULTIPLE
from segdist.errors import UserError
from segdist.preprocess import MEAN, STD


@dataclass(frozen=True)
class InferenceMode:
    mode: str = "whole"
    crop: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    batch_size: int = 8
    """Windows per forward pass in slide mode."""

    @property
    def tta(self) -> bool:
        return self.flip or tuple(self.scales) != (1.0,)

    @classmethod
    def from_recipe(cls, recipe) -> "InferenceMode":
        """The recipe's `[eval]` settings, `crop` defaulting to `data.crop` and `stride` to two
        thirds of the crop."""
        e = recipe.eval
        crop = tuple(e.crop) if e.crop is not None else tuple(recipe.data.crop)
        stride = tuple(e.stride) if e.stride is not None else tuple(max(1, (2 * c) // 3) for c in crop)
        if any(s > c for s, c in zip(stride, crop)):
            raise UserError(f"eval.stride {list(stride)} is larger than the window {list(crop)} (eval.crop, or "
                            "data.crop when it is \"null\"): pixels would go unseen; use a stride <= the crop")
        return cls(e.mode, crop, stride, tuple(e.scales), e.flip, e.batch_size)

    def describe(self) -> str:
        where = {"whole": "whole frames", "slide": f"slide {self.crop} windows, stride {self.stride}",
                 "resize": f"resized to {self.crop}"}[self.mode]
        tta = f", scales {list(self.scales)}" + (", flip" if self.flip else "") if self.tta else ""
        return where + tta


@torch.no_grad()
def scores(model, x: torch.Tensor, mode: InferenceMode) -> torch.Tensor:
    """NxKxHxW scores of a normalised NxCxHxW batch: the model's logits for a single pass, the mean
    probabilities over the scales (and flips) with test-time augmentation."""
    if not mode.tta:
        return _one_pass(model, x, mode)
    total, passes = None, 0
    for scale in mode.scales:
        for flipped in (False, True) if mode.flip else (False,):
            xi = x.flip(-1) if flipped else x
            if scale != 1.0:
                xi = F.interpolate(xi, scale_factor=scale, mode="bilinear", align_corners=False)
            y = _one_pass(model, xi, mode)
            if y.shape[-2:] != x.shape[-2:]:
                y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
            p = probabilities(y.flip(-1) if flipped else y)
            total = p if total is None else total.add_(p)
            passes += 1
    return total.div_(passes)


def labels(model, x: torch.Tensor, mode: InferenceMode) -> torch.Tensor:
    """NxHxW label map of a normalised batch in `mode`."""
    return labels_of(scores(model, x, mode), mode.tta)


def labels_of(y: torch.Tensor, tta: bool, threshold: float = 0.5) -> torch.Tensor:
    """NxHxW class ids of NxKxHxW `scores`, the one rule evaluation and prediction share: the argmax
    over classes; for one output, a probability above `threshold`. Without test-time augmentation
    the scores are fp32 logits, compared as they are (the logit of `threshold`: 0 for 0.5): a
    softmax or sigmoid rounds near-equal logits to equal probabilities, which would break a tie
    towards the lower class id and make labels depend on the rounding, not on the model."""
    if y.shape[1] != 1:
        return y.argmax(dim=1)
    if tta:
        cut = threshold
    else:
        cut = -math.inf if threshold <= 0 else math.inf if threshold >= 1 else math.log(threshold / (1 - threshold))
    return (y[:, 0] > cut).to(torch.int64)


def probabilities(y: torch.Tensor) -> torch.Tensor:
    """Softmax over classes, or the sigmoid of a single logit."""
    return torch.sigmoid(y) if y.shape[1] == 1 else torch.softmax(y, dim=1)


def _one_pass(model, x: torch.Tensor, mode: InferenceMode) -> torch.Tensor:
    if mode.mode == "slide":
        return _slide(model, x, mode.crop, mode.stride, mode.batch_size)
    if mode.mode == "resize" and tuple(x.shape[-2:]) != tuple(mode.crop):
        y = _forward(model, F.interpolate(x, size=mode.crop, mode="bilinear", align_corners=False))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return _forward(model, x)


def _forward(model, x: torch.Tensor) -> torch.Tensor:
    """fp32 logits of a batch of any size: padded with black to a multiple of 32, cropped back. The
    model always gets a contiguous N x C x H x W batch: a conv's rounding follows the memory layout
    (a batch built from N x H x W x 3 frames is laid out so), and a near-tie between two logits
    follows the rounding, so evaluation, prediction and an exported model's card agree pixel for
    pixel however their batches were built."""
    h, w = x.shape[-2:]
    ph, pw = -h % PAD_MULTIPLE, -w % PAD_MULTIPLE
    if ph or pw:
        x = pad_black(x, h + ph, w + pw)
    return model(x.contiguous()).float()[:, :, :h, :w]


def pad_black(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A normalised batch padded at the bottom and right with what black pixels normalise to."""
    black = ((0 - MEAN) / STD).to(x.device, x.dtype).view(1, -1, 1, 1)
    out = black.expand(x.shape[0], x.shape[1], height, width).clone()
    out[:, :, : x.shape[-2], : x.shape[-1]] = x
    return out


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Window offsets along one side: every `stride`, the last flush with the border."""
    if size <= crop:
        return [0]
    return list(range(0, size - crop, stride)) + [size - crop]


def _slide(model, x: torch.Tensor, crop: tuple[int, int], stride: tuple[int, int], batch: int) -> torch.Tensor:
    n, _, h, w = x.shape
    ch, cw = crop
    if h < ch or w < cw:
        x = pad_black(x, max(h, ch), max(w, cw))
    hp, wp = x.shape[-2:]
    cells = [(r, c) for r in window_starts(hp, ch, stride[0]) for c in window_starts(wp, cw, stride[1])]
    windows = [(i, r, c) for i in range(n) for r, c in cells]
    count = torch.zeros(1, 1, hp, wp, device=x.device)
    for r, c in cells:
        count[:, :, r: r + ch, c: c + cw] += 1
    total = None
    for start in range(0, len(windows), batch):
        chunk = windows[start: start + batch]
        y = _forward(model, torch.stack([x[i, :, r: r + ch, c: c + cw] for i, r, c in chunk]))
        if total is None:  # the one score map of the batch's frames
            total = torch.zeros(n, y.shape[1], hp, wp, device=x.device)
        for (i, r, c), yi in zip(chunk, y):
            total[i, :, r: r + ch, c: c + cw] += yi
    return total.div_(count)[:, :, :h, :w]
