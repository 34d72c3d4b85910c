"""The built-in synthetic dataset: textured scenes of overlapping shapes whose class is their geometry.

Colours are random per shape and drawn from the same distribution as the background's, so colour
alone cannot solve the task; each sample also carries thin bands of ignore-index pixels. Sample
`i` of a split depends only on (seed, i), so any number of workers writes the same bytes.
"""

from __future__ import annotations

import numpy as np

SHAPES = ("circle", "square", "triangle", "ring", "cross", "hexagon", "half-disc")
AREA_SCALE = {"triangle": 1.45, "square": 1.05, "cross": 1.3, "half-disc": 1.35}
PALETTE = [
    [0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
    [245, 130, 48], [145, 30, 180], [70, 240, 240],
]


def class_names(num_classes: int) -> list[str]:
    return ["background", *SHAPES[: num_classes - 1]]


def _inside(kind: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Membership of rotated, centred coordinates (u, v) in a shape of radius r."""
    d2 = u * u + v * v
    if kind == "circle":
        return d2 <= r * r
    if kind == "square":
        s = r * 0.85
        return (np.abs(u) <= s) & (np.abs(v) <= s)
    if kind == "triangle":
        # Equilateral triangle of circumradius r: three half-planes.
        inside = np.ones_like(u, dtype=bool)
        for a in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3):
            inside &= u * np.cos(a) + v * np.sin(a) <= r / 2
        return inside
    if kind == "ring":
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if kind == "cross":
        w = r / 3
        return ((np.abs(u) <= r) & (np.abs(v) <= w)) | ((np.abs(v) <= r) & (np.abs(u) <= w))
    if kind == "hexagon":
        inside = np.ones_like(u, dtype=bool)
        for k in range(6):
            a = k * np.pi / 3
            inside &= u * np.cos(a) + v * np.sin(a) <= r * np.sqrt(3) / 2
        return inside
    if kind == "half-disc":
        return (d2 <= r * r) & (v >= 0)
    raise ValueError(kind)


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth random colour field plus pixel noise, HxWx3 float in [0, 255]."""
    coarse = rng.uniform(0, 255, size=(4, 4, 3))
    ys = np.linspace(0, 3, h)
    xs = np.linspace(0, 3, w)
    y0 = np.clip(ys.astype(int), 0, 2)
    x0 = np.clip(xs.astype(int), 0, 2)
    fy = (ys - y0)[:, None, None]
    fx = (xs - x0)[None, :, None]
    c00 = coarse[y0][:, x0]
    c01 = coarse[y0][:, x0 + 1]
    c10 = coarse[y0 + 1][:, x0]
    c11 = coarse[y0 + 1][:, x0 + 1]
    field = (c00 * (1 - fx) + c01 * fx) * (1 - fy) + (c10 * (1 - fx) + c11 * fx) * fy
    return field + rng.normal(0, 12, size=(h, w, 3))


def make_scene(
    seed: int, index: int, height: int, width: int, num_classes: int, ignore_index: int = 255
) -> tuple[np.ndarray, np.ndarray]:
    """Image (HxWx3 uint8) and train-id mask (HxW uint8) of sample `index` of a split."""
    if not 2 <= num_classes <= len(SHAPES) + 1:
        raise ValueError(f"shapes supports 2..{len(SHAPES) + 1} classes")
    rng = np.random.default_rng([seed, index])
    image = _texture(rng, height, width)
    mask = np.zeros((height, width), dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    size = min(height, width)
    for _ in range(int(rng.integers(1, 4))):
        cls = int(rng.integers(1, num_classes))
        r = rng.uniform(0.12, 0.24) * size
        # Centres keep most of the shape in view, so its geometry can be seen (a disc cut by the
        # border would look like a half-disc).
        cy, cx = rng.uniform(0.7 * r, height - 0.7 * r), rng.uniform(0.7 * r, width - 0.7 * r)
        a = rng.uniform(0, 2 * np.pi)
        u = (xx - cx) * np.cos(a) + (yy - cy) * np.sin(a)
        v = -(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a)
        # Radii scaled so every kind covers a similar area (a triangle of circumradius r has
        # less than half a disc's): no class is learned from size, or lost for lack of pixels.
        inside = _inside(SHAPES[cls - 1], u, v, r * AREA_SCALE.get(SHAPES[cls - 1], 1.0))
        # A random colour that stands out from the background under the shape: random colours
        # keep colour from giving the class away; contrast keeps the shape visible at all.
        ground = image[int(np.clip(cy, 0, height - 1)), int(np.clip(cx, 0, width - 1))]
        colour = rng.uniform(0, 255, size=3)
        for _ in range(20):
            if np.linalg.norm(colour - ground) >= 100:
                break
            colour = rng.uniform(0, 255, size=3)
        image[inside] = colour + rng.normal(0, 12, size=(int(inside.sum()), 3))
        mask[inside] = cls
    for _ in range(int(rng.integers(0, 3))):
        # A thin band of pixels nobody labelled: they must not count in loss or metrics.
        thick = int(rng.integers(1, 4))
        if rng.random() < 0.5:
            y = int(rng.integers(0, height - thick + 1))
            mask[y : y + thick, :] = ignore_index
        else:
            x = int(rng.integers(0, width - thick + 1))
            mask[:, x : x + thick] = ignore_index
    return np.clip(image, 0, 255).astype(np.uint8), mask
