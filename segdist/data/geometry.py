"""Geometry on the device (`data.geometry = "device"`): the loader draws each sample's placement, one
batched warp applies it where the model runs.

Why: for light models the per-sample CPU pipeline is what keeps a GPU waiting. albumentations'
resize, pad, crop and flips cost 0.2-0.4 ms per sample even on 256x256 frames, and a model of 10-20
GFLOP per sample trains at 20k-35k samples/s on an H100 (`launch/bench.py feed`, BENCHMARKS.md).
Here the loader only reads the stored frame, and draws a 2x3 matrix per sample from the sample's own
numbers (segdist.data.draws: for the whole batch at once, by position). The batch holds the frames
as stored, padded into one canvas, and the matrices. The trainer warps the whole batch on the device
before the loss counts its pixels (segdist.train.step.on_device). The same code runs on the CPU in
the tests and in CPU training.

A preset's stages (resize, pad, crop, flips, right-angle turns, affine) draw their parameters from
the same distributions as the CPU pipeline (segdist.data.augment), composed into one map from each
output pixel back to the stored frame; `Frame` follows every frame of the batch at once (numpy
arrays). Pixel (row i, column j) has its centre at (j + 0.5, i + 0.5). The resampling follows the
CPU pipeline:
- masks take the label of the stored pixel under the mapped centre (nearest, as INTER_NEAREST_EXACT
  resizes), so no label is invented;
- images are bilinear, with the frame's edge pixels repeated at its border, as cv2's INTER_LINEAR
  resize does. Like it, a shrink has no antialiasing. The `cityscapes` preset's `longest` shrinks
  with INTER_AREA on the CPU; here it is bilinear, so store a tier at that size (the recipe's
  `# convert:` line) and nothing is left to shrink;
- every output pixel whose centre maps outside the stored frame is 0 in the image and the ignore
  index in the mask (padding, a rotated-in corner).

What the device path cannot do: the `ph2` preset's Gaussian blur. A recipe that asks for both is a
UserError at load.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import numpy as np
import torch

from segdist.data.collate import mask_tensor, pad_batch, stacked_masks
from segdist.data.draws import Draws
from segdist.errors import UserError

GEOMETRY = ("cpu", "device")


# -- following frames through a preset's stages -----------------------------------------------------
_TURNS = np.array([[1, 0, 0, 0, 0], [0, -1, 1, 1, 0], [-1, 0, 0, 1, 1], [0, 1, -1, 0, 1]], dtype=np.float64)
"""k quarter turns' back map (x, y) -> (a x + b y + cw w, d x + a y + fh h), as (a, b, d, cw, fh) by k."""


class Frame:
    """N frames' sizes through a preset's stages, and each one's map from the current stage's output
    pixel coordinates (x, y) back to its stored frame's (N x 3 x 3 affine matrices, float64). A stage
    given `where` (N booleans) changes only the frames it marks."""

    def __init__(self, heights, widths) -> None:
        self.h = np.atleast_1d(np.asarray(heights, np.int64)).copy()
        self.w = np.atleast_1d(np.asarray(widths, np.int64)).copy()
        self.m = np.broadcast_to(np.eye(3), (len(self.h), 3, 3))  # each stage makes a new one

    def _stage(self, back: list[list], height, width, where=None) -> None:
        """A stage whose output point (x, y) came from its input point `back` @ (x, y, 1); `back`'s six
        entries, and the new size, are numbers or N-arrays."""
        n = len(self.h)
        b = np.zeros((n, 3, 3))
        for i, row in enumerate(back):
            for j, v in enumerate(row):
                if isinstance(v, np.ndarray) or v:
                    b[:, i, j] = v
        b[:, 2, 2] = 1.0
        m = np.matmul(self.m, b)
        height = height if isinstance(height, np.ndarray) else np.full(n, height, np.int64)
        width = width if isinstance(width, np.ndarray) else np.full(n, width, np.int64)
        if where is None:
            self.m, self.h, self.w = m, height.astype(np.int64), width.astype(np.int64)
        else:
            self.m = np.where(where[:, None, None], m, self.m)
            self.h, self.w = np.where(where, height, self.h), np.where(where, width, self.w)

    def resize(self, height, width) -> None:
        self._stage([[self.w / width, 0, 0], [0, self.h / height, 0]], height, width)

    def pad(self, height: int, width: int) -> None:
        """Centred padding up to at least (height, width), as PadIfNeeded(position="center")."""
        if (self.h >= height).all() and (self.w >= width).all():
            return  # no frame needs any
        top, left = np.maximum(0, (height - self.h) // 2), np.maximum(0, (width - self.w) // 2)
        self._stage([[1, 0, -left], [0, 1, -top]], np.maximum(height, self.h), np.maximum(width, self.w))

    def crop(self, top, left, height, width) -> None:
        if not (np.any(top) or np.any(left) or np.any(self.h != height) or np.any(self.w != width)):
            return  # every frame is the window already
        self._stage([[1, 0, left], [0, 1, top]], height, width)

    def random_crop(self, rng: Draws, height, width) -> None:
        """A window of (height, width) at a uniformly drawn position, as RandomCrop."""
        if np.all(self.h == height) and np.all(self.w == width):
            rng.skip(2)  # every frame is the window: its two draws are 0
            return
        top = rng.integers(self.h - height + 1)
        left = rng.integers(self.w - width + 1)
        self.crop(top, left, height, width)

    def hflip(self, where=None) -> None:
        self._stage([[-1, 0, self.w], [0, 1, 0]], self.h, self.w, where)

    def vflip(self, where=None) -> None:
        self._stage([[1, 0, 0], [0, -1, self.h]], self.h, self.w, where)

    def turn(self, k) -> None:
        """k quarter turns counter-clockwise (np.rot90), per frame; k odd swaps height and width."""
        k = np.asarray(k, np.int64) % 4
        # One turn's output (x, y) came from input (w - y, x); k of them, composed, from:
        # k=1 (w - y, x), k=2 (w - x, h - y), k=3 (y, h - x).
        a, b, d, cw, fh = _TURNS[k].T
        odd = (k & 1).astype(bool)
        self._stage([[a, b, cw * self.w], [d, a, fh * self.h]], np.where(odd, self.w, self.h),
                    np.where(odd, self.h, self.w))

    def affine(self, shift: tuple, scale, degrees, where=None) -> None:
        """Shift (fractions of the width and height), zoom and rotation about the frame's centre, as
        albumentations' Affine; the size stays."""
        cx, cy = self.w / 2, self.h / 2
        tx, ty = shift[0] * self.w, shift[1] * self.h
        a = np.deg2rad(degrees)
        cos, sin = np.cos(a) / scale, np.sin(a) / scale
        # forward: out = c + t + s R(a) (in - c); back: in = c + R(-a) (out - c - t) / s
        ox, oy = cx + tx, cy + ty
        self._stage([[cos, sin, cx - cos * ox - sin * oy], [-sin, cos, cy + sin * ox - cos * oy]],
                    self.h, self.w, where)

    def fit(self, height: int, width: int, keep_aspect: bool) -> None:
        """The whole frame at (height, width): stretched, or scaled to fit and padded (LongestMaxSize
        then PadIfNeeded)."""
        if not keep_aspect:
            self.resize(height, width)
            return
        s = np.minimum(height / self.h, width / self.w)
        self.resize(np.maximum(1, np.round(self.h * s)), np.maximum(1, np.round(self.w * s)))
        self.pad(height, width)


# -- the presets on the device ----------------------------------------------------------------------
# Each takes the frames, their draws (segdist.data.draws.Draws: one number per sample per call, in a
# fixed sequence), the crop and the preset's resolved parameters (the colour jitter's are the device's
# colour module's, ignored here), as segdist.data.augment defines them.
def _flip(frame: Frame, rng: Draws, p: float, vertical: bool = False) -> None:
    hit = rng.random() < p
    frame.vflip(hit) if vertical else frame.hflip(hit)


def _shapes(frame, rng, crop, *, p_flip, p_rot90, **_):
    frame.pad(*crop)
    frame.random_crop(rng, *crop)
    _flip(frame, rng, p_flip)
    turns = rng.random() < p_rot90
    k = rng.integers(4)
    if crop[0] == crop[1]:
        frame.turn(np.where(turns, k, 0))  # RandomRotate90: 0 to 3 turns
    else:
        frame.vflip(turns)


def _crop(frame, rng, crop, **_):
    frame.pad(*crop)
    frame.random_crop(rng, *crop)


def _voc(frame, rng, crop, *, scale, p_flip, **_):
    s = rng.uniform(*scale)
    frame.resize(np.maximum(1, np.round(frame.h * s)), np.maximum(1, np.round(frame.w * s)))
    frame.pad(*crop)
    frame.random_crop(rng, *crop)
    _flip(frame, rng, p_flip)


def _cityscapes(frame, rng, crop, *, scale, longest, p_flip, **_):
    h, w = crop
    lo, hi = scale
    biggest = (int(np.ceil(h / lo)), int(np.ceil(w / lo)))
    if longest:
        r = longest / np.maximum(frame.h, frame.w)
        frame.resize(np.maximum(1, np.round(frame.h * r)), np.maximum(1, np.round(frame.w * r)))
    frame.pad(*biggest)
    # RandomSizedCrop: a window of the crop's aspect, its height uniform in pixels, resized to the crop
    wh = rng.integers(max(1, round(h / hi)), biggest[0] + 1)
    ww = np.minimum(frame.w, (wh * w / h).astype(np.int64))
    frame.random_crop(rng, wh, ww)
    frame.resize(h, w)
    _flip(frame, rng, p_flip)


def _ph2(frame, rng, crop, *, keep_aspect, p_flip, p_vflip, shift, scale, rotate, p_affine, **_):
    frame.fit(*crop, keep_aspect)
    _flip(frame, rng, p_flip)
    _flip(frame, rng, p_vflip, vertical=True)
    moves = rng.random() < p_affine
    frame.affine((rng.uniform(-shift, shift), rng.uniform(-shift, shift)), rng.uniform(*scale),
                 rng.uniform(-rotate, rotate), moves)


def _birds(frame, rng, crop, *, keep_aspect, p_flip, **_):
    frame.fit(*crop, keep_aspect)
    _flip(frame, rng, p_flip)


DEVICE_PRESETS: dict[str, Callable[..., None]] = {
    "shapes": _shapes, "crop": _crop, "voc": _voc, "cityscapes": _cityscapes, "ph2": _ph2, "birds": _birds,
}


def check_geometry(geometry: str, preset: str, params: dict[str, Any]) -> None:
    """`data.geometry` against the preset's resolved parameters; a UserError names what does not fit."""
    if geometry not in GEOMETRY:
        raise UserError(f"data.geometry must be \"cpu\" (albumentations in the loader) or \"device\" (one batched "
                        f"warp where the model runs), got {geometry!r}")
    if geometry == "device" and params.get("p_blur", 0) > 0:
        raise UserError(f"data.geometry = \"device\" has no blur, and preset {preset!r} blurs with p_blur = "
                        f"{params['p_blur']}: set data.augment_args.p_blur = 0, or data.geometry = \"cpu\"")


# -- batches ----------------------------------------------------------------------------------------------
class Placement(NamedTuple):
    """A batch's placements: where each output pixel comes from in its stored frame."""

    matrices: torch.Tensor
    """N x 2 x 3 float32: output pixel coordinates (x, y, 1) -> the stored frame's."""
    sizes: torch.Tensor
    """N x 2 int64: each stored frame's (height, width) in the canvas."""
    height: int
    width: int
    """The output (crop) size."""
    ignore_index: int


class DeviceGeometry:
    """A preset's geometry as placements: `draw` and `collate` per batch in the loader, and `place`
    (module level) on the device."""

    def __init__(self, preset: str, crop: tuple[int, int], ignore_index: int, params: dict[str, Any]) -> None:
        self.preset, self.crop, self.ignore_index = preset, (int(crop[0]), int(crop[1])), ignore_index
        self.params = params
        self._place = DEVICE_PRESETS[preset]

    def draw(self, rng: Draws, heights, widths) -> np.ndarray:
        """N samples' maps (N x 2 x 3 float32) from output pixel coordinates to their stored frames'
        (of `heights` x `widths`), each from its own numbers in `rng`."""
        frame = Frame(heights, widths)
        self._place(frame, rng, self.crop, **self.params)
        wrong = (frame.h != self.crop[0]) | (frame.w != self.crop[1])
        if wrong.any():
            i = int(np.argmax(wrong))
            raise AssertionError(f"preset {self.preset!r} placed a {frame.h[i]}x{frame.w[i]} frame, not {self.crop}")
        return frame.m[:, :2].astype(np.float32)

    def collate(self, images, masks, matrices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, Placement]:
        """(frames padded into one canvas, masks likewise, Placement): `images` and `masks` are lists
        of arrays, or arrays of N frames of one size (already a canvas)."""
        if isinstance(masks, np.ndarray):
            image_batch, mask_batch = torch.from_numpy(images), stacked_masks(masks, self.ignore_index)
            sizes = torch.from_numpy(np.tile(np.asarray(masks.shape[1:3], np.int64), (len(masks), 1)))
        else:
            height = max(m.shape[0] for m in masks)
            width = max(m.shape[1] for m in masks)
            image_batch, mask_batch = pad_batch([torch.from_numpy(i) for i in images],
                                                [mask_tensor(m) for m in masks], self.ignore_index, height, width)
            sizes = torch.tensor([m.shape[:2] for m in masks], dtype=torch.int64)
        return image_batch, mask_batch, Placement(torch.from_numpy(matrices), sizes, *self.crop, self.ignore_index)


def place(images: torch.Tensor, masks: torch.Tensor, placement: Placement,
          device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's canvases (uint8 N x H x W x 3, masks N x H x W) warped on `device` to the crop: uint8
    images N x h x w x 3 and masks of the canvas's dtype (see the module docstring)."""
    images = images.to(device, non_blocking=True)
    masks = masks.to(device, non_blocking=True)
    m = placement.matrices.to(device, non_blocking=True)
    sizes = placement.sizes.to(device, non_blocking=True)
    n, ch, cw = masks.shape
    ys = torch.arange(placement.height, device=device, dtype=torch.float32).add_(0.5).view(1, -1, 1)
    xs = torch.arange(placement.width, device=device, dtype=torch.float32).add_(0.5).view(1, 1, -1)
    m = m.view(n, 6, 1, 1)
    x = m[:, 0] * xs + m[:, 1] * ys + m[:, 2]  # N x h x w: each output centre in its stored frame
    y = m[:, 3] * xs + m[:, 4] * ys + m[:, 5]
    h = sizes[:, 0].view(n, 1, 1).float()
    w = sizes[:, 1].view(n, 1, 1).float()
    inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
    # masks: the stored label under the centre
    ix = x.floor().long().clamp_(0, cw - 1)
    iy = y.floor().long().clamp_(0, ch - 1)
    labels = masks.reshape(n, -1).gather(1, (iy * cw + ix).view(n, -1)).view(n, placement.height, placement.width)
    labels = torch.where(inside, labels, torch.full_like(labels, placement.ignore_index))
    # images: bilinear, the frame's edge repeated (centres clamped to its outermost pixel centres)
    xc = torch.minimum(x.clamp(min=0.5), w - 0.5)
    yc = torch.minimum(y.clamp(min=0.5), h - 0.5)
    grid = torch.stack([xc * (2.0 / cw) - 1.0, yc * (2.0 / ch) - 1.0], dim=-1)
    pixels = torch.nn.functional.grid_sample(images.permute(0, 3, 1, 2).float(), grid, mode="bilinear",
                                             padding_mode="border", align_corners=False)
    pixels = pixels.mul_(inside.unsqueeze(1)).round_().clamp_(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1), labels


def build_geometry(preset: str, crop: tuple[int, int], ignore_index: int, args: dict | None = None) -> DeviceGeometry:
    """Preset `name`'s geometry at `crop` for the device, tuned by `args` (data.augment_args)."""
    from segdist.data.augment import resolved_params

    params = resolved_params(preset, args)
    check_geometry("device", preset, params)
    return DeviceGeometry(preset, crop, ignore_index, params)
