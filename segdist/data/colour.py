"""Colour jitter on the device: the CPU draws each training sample's factors, the device applies them.

The loader's per-sample CPU work is what starves a GPU (BENCHMARKS.md, `bench feed`), and colour
jitter is four full-frame passes at the crop size, plus an HSV round trip for hue. Here the loader
only draws four numbers per sample, from the sample's own position (segdist.data.draws), and the
trainer applies them to the whole batch on the device, in float, right before normalisation
(segdist.preprocess.to_input). The same code runs on the CPU in the tests and in CPU training,
where it is no bargain: a batch of 8 at 512x512 took 225 ms on one EPYC thread with hue, 60 ms
without (the HSV round trip is skipped when no sample turns its hue); on a GPU it is a few
elementwise kernels.

The operations and their factors follow torchvision's `ColorJitter` (the same definitions of
brightness, contrast, saturation and hue), applied in that fixed order to pixel values in [0, 255],
each clamped to that range as uint8 pixels would be:
- brightness b: x * b;
- contrast c: blend with the mean of the sample's grayscale: m + (x - m) * c;
- saturation s: blend with each pixel's grayscale: g + (x - g) * s;
- hue h: the HSV hue turned by h (a fraction of the circle).
With probability `p` a sample is jittered, its factors uniform in [1 - strength, 1 + strength]
(hue in [-hue, hue]); otherwise its factors are the identity (1, 1, 1, 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IDENTITY = (1.0, 1.0, 1.0, 0.0)
GRAY = (0.2989, 0.587, 0.114)
"""torchvision's rgb_to_grayscale weights."""


@dataclass(frozen=True)
class ColourJitter:
    """A preset's colour jitter: brightness, contrast and saturation strengths, hue, probability."""

    brightness: float
    contrast: float
    saturation: float
    hue: float
    p: float

    @property
    def active(self) -> bool:
        return self.p > 0 and (self.brightness > 0 or self.contrast > 0 or self.saturation > 0 or self.hue > 0)

    def factors(self, u: np.ndarray) -> np.ndarray:
        """The factors (brightness, contrast, saturation, hue; N x 4 float32) of N samples from five
        uniform numbers each (N x 5, segdist.data.draws): the first decides whether a sample is
        jittered, the other four are its factors' positions in their ranges."""
        u = np.asarray(u, np.float64).reshape(-1, 5)
        moved = (2 * u[:, 1:] - 1) * (self.brightness, self.contrast, self.saturation, self.hue)
        moved[:, :3] += 1
        np.maximum(moved[:, :3], 0.0, out=moved[:, :3])
        return np.where(u[:, :1] < self.p, moved, IDENTITY).astype(np.float32)


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (GRAY[0] * r + GRAY[1] * g + GRAY[2] * b).unsqueeze(1)


def _turn_hue(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] → HSV, hue + h (mod 1), → RGB; per sample h of shape (B, 1, 1)."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    v = maxc
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(delta > 0, (hue / 6.0) % 1.0, torch.zeros_like(hue))
    hue = (hue + h) % 1.0
    i = torch.floor(hue * 6.0)
    f = hue * 6.0 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.long() % 6
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = [torch.zeros_like(v) for _ in range(3)]
    for k, channels in enumerate(choices):
        hit = i == k
        out = [torch.where(hit, c, o) for c, o in zip(channels, out)]
    return torch.stack(out, 1)


def apply_colour(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Float NCHW RGB pixel values in [0, 255], jittered by per-sample `factors` (N x 4: brightness,
    contrast, saturation, hue), on x's device; samples with the identity factors come back as they were."""
    # Whether any sample turns its hue, asked of the loader's CPU tensor (no device sync): the HSV
    # round trip is most of the work, and presets with hue = 0 never need it.
    turns = bool(factors[:, 3].any()) if factors.device.type == "cpu" else True
    f = factors.to(x.device, torch.float32, non_blocking=True).view(-1, 4, 1, 1)
    b, c, s, h = f[:, 0:1], f[:, 1:2], f[:, 2:3], f[:, 3:4]
    x = (x * b).clamp_(0, 255)
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = (mean + (x - mean) * c).clamp_(0, 255)
    gray = _gray(x)
    x = (gray + (x - gray) * s).clamp_(0, 255)
    if not turns:
        return x
    turned = _turn_hue(x / 255.0, h[:, 0]) * 255.0
    return torch.where((h != 0).view(-1, 1, 1, 1), turned, x)
