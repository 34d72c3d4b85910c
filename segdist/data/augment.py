"""Albumentations presets that recipes name (`data.augment`) and tune (`data.augment_args`).

A preset is a function `(crop, ignore_index, **params) -> A.Compose`; its keyword parameters and
their defaults are the knobs a recipe may turn, e.g.

    [data]
    augment = "voc"
    augment_args = {scale = [0.75, 1.5], p_jitter = 0.8}

An unknown key, or a value of the wrong type or range, is a `UserError` that lists the preset's
parameters. Conventions: `p_*` are probabilities; `scale` is a [low, high] zoom range; `jitter` is
the brightness/contrast/saturation strength of the colour jitter and `hue` its hue strength.

Geometry runs here, on the CPU in the loader (`build_augment`), unless the recipe sets
`data.geometry = "device"`: then the loader only draws each sample's placement from the same
distributions and one batched warp applies it on the device (segdist.data.geometry). Colour jitter
never runs here: a preset's
`jitter`, `hue` and `p_jitter` are read by `build_colour` (the preset functions take them only so
they are the preset's knobs), the loader draws each sample's factors and the trainer applies them to
the batch on the device (segdist.data.colour), since four full-frame passes per sample on the CPU
are what keeps a GPU waiting.

Joint on image and mask, always: masks are resized and warped with nearest interpolation (no
invented label values) and every pixel that did not come from the photo (padding, a rotated-in
corner) is the ignore index in the mask (0 in the image), so it counts in neither loss nor metric.

Training only. Evaluation (segdist.data.stream.EvalStream) applies no transform at all: images and
masks are read at their stored, native resolution and metrics are computed there. A preset that
trains at a reduced resolution (e.g. `cityscapes` with `longest`) therefore trains at another
object scale than the one evaluated; predicting at the training scale is inference's job.

Seeding: `seed_pipeline(pipeline, seed)` gives each transform its own random stream (see there).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import cv2
import numpy as np

from segdist.data.colour import ColourJitter
from segdist.errors import UserError

LINEAR = cv2.INTER_LINEAR
# Masks: nearest neighbour. For resizing, cv2's INTER_NEAREST samples pixel floor(x * scale), half a
# source pixel off the centre-aligned grid INTER_LINEAR uses for the image: a 2x zoom shifted the mask
# against its image by half an output pixel. INTER_NEAREST_EXACT uses the image's grid. (Warps —
# Affine — map both through the same matrix and take INTER_NEAREST.)
NEAREST = cv2.INTER_NEAREST_EXACT


def _albu():
    # albumentations takes seconds to import; recipes validate `augment_args` without it.
    import albumentations as A

    return A


# -- building blocks -------------------------------------------------------------------------------
def _pad(crop: tuple[int, int], ignore_index: int, position: str = "center"):
    h, w = crop
    return _albu().PadIfNeeded(min_height=h, min_width=w, position=position, border_mode=cv2.BORDER_CONSTANT,
                               fill=0, fill_mask=ignore_index)


def _pad_crop(crop: tuple[int, int], ignore_index: int) -> list:
    return [_pad(crop, ignore_index), _albu().RandomCrop(height=crop[0], width=crop[1])]


def _fit(crop: tuple[int, int], ignore_index: int, keep_aspect: bool) -> list:
    """The whole image at the crop size: stretched, or scaled to fit and padded with ignore."""
    A = _albu()
    h, w = crop
    if not keep_aspect:
        return [A.Resize(height=h, width=w, interpolation=LINEAR, mask_interpolation=NEAREST)]
    return [A.LongestMaxSize(max_size_hw=(h, w), interpolation=LINEAR, mask_interpolation=NEAREST),
            _pad(crop, ignore_index)]


# -- presets ---------------------------------------------------------------------------------------
def shapes(crop, ignore_index, *, p_flip: float = 0.5, p_rot90: float = 0.5, jitter: float = 0.2,
           hue: float = 0.05, p_jitter: float = 0.5):
    """Synthetic shapes: random crop, flips and right-angle turns (the classes are invariant to both).
    A turn would change a non-square crop's shape (and break batching): there, a vertical flip instead."""
    A = _albu()
    turn = A.RandomRotate90(p=p_rot90) if crop[0] == crop[1] else A.VerticalFlip(p=p_rot90)
    return A.Compose([*_pad_crop(crop, ignore_index), A.HorizontalFlip(p=p_flip), turn])


def crop_only(crop, ignore_index):
    """No augmentation beyond a random crop to the training size (padded with ignore where smaller)."""
    return _albu().Compose(_pad_crop(crop, ignore_index))


def voc(crop, ignore_index, *, scale: tuple[float, float] = (0.5, 2.0), p_flip: float = 0.5,
        jitter: float = 0.2, hue: float = 0.1, p_jitter: float = 0.5):
    """Pascal VOC (the VOC model comparison and accumulation study): the image zoomed by a factor
    uniform in `scale`, padded with ignore to the crop where smaller, a random crop (512x512 in both), a horizontal flip,
    colour jitter (0.2, 0.2, 0.2, 0.1 as the model comparison; on the device)."""
    A = _albu()
    lo, hi = scale
    return A.Compose([
        A.RandomScale(scale_limit=(lo - 1.0, hi - 1.0), interpolation=LINEAR, mask_interpolation=NEAREST, p=1.0),
        *_pad_crop(crop, ignore_index),
        A.HorizontalFlip(p=p_flip),
    ])


def cityscapes(crop, ignore_index, *, scale: tuple[float, float] = (0.5, 2.0), longest: int = 0,
               p_flip: float = 0.5, jitter: float = 0.2, hue: float = 0.05, p_jitter: float = 0.5):
    """Cityscapes: scale jitter at the crop size, flip, colour jitter; optionally at a reduced
    resolution (the Cityscapes low-resolution study trained at 128x256 of the 1024x2048 frames:
    `longest = 256`).

    `longest` > 0 first resizes the frame so its longest side has that many pixels (0 = native).
    Scale jitter is RandomResizedCrop-like and cheap at 2048x1024: a window of height crop/s
    (uniform in pixels between crop/high and crop/low, the crop's aspect ratio) is cut from the
    frame and resized to the crop, so only the crop's pixels are ever resized — not a 2x-zoomed
    frame. Frames smaller than the largest window are padded with ignore first.
    """
    A = _albu()
    h, w = crop
    lo, hi = scale
    biggest = (int(np.ceil(h / lo)), int(np.ceil(w / lo)))
    reduce = [A.LongestMaxSize(max_size=longest, interpolation=cv2.INTER_AREA, mask_interpolation=NEAREST)] if longest else []
    return A.Compose([
        *reduce,
        _pad(biggest, ignore_index),
        A.RandomSizedCrop(min_max_height=(max(1, round(h / hi)), biggest[0]), size=(h, w), w2h_ratio=w / h,
                          interpolation=LINEAR, mask_interpolation=NEAREST),
        A.HorizontalFlip(p=p_flip),
    ])


def ph2(crop, ignore_index, *, keep_aspect: bool = False, p_flip: float = 0.5, p_vflip: float = 0.5,
        shift: float = 0.1, scale: tuple[float, float] = (0.85, 1.15), rotate: float = 15.0,
        p_affine: float = 0.5, blur: tuple[int, int] = (3, 7), p_blur: float = 0.25):
    """PH2 skin lesions (the PH2 lesion study: whole image to 256x256, random h/v flips;
    shift-scale-rotate 0.1/0.15/15 and blur as the VOC accumulation study's strong pipeline).
    Lesions have no up or left, so both flips. The corners a rotation or shift brings in are no skin photographed: ignore in the mask.
    `blur` is the range of odd Gaussian kernel sizes."""
    A = _albu()
    return A.Compose([
        *_fit(crop, ignore_index, keep_aspect),
        A.HorizontalFlip(p=p_flip),
        A.VerticalFlip(p=p_vflip),
        A.Affine(translate_percent=(-shift, shift), scale=scale, rotate=(-rotate, rotate), interpolation=LINEAR,
                 mask_interpolation=cv2.INTER_NEAREST, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=ignore_index,
                 p=p_affine),
        A.GaussianBlur(blur_limit=blur, p=p_blur),
    ])


def birds(crop, ignore_index, *, keep_aspect: bool = True, p_flip: float = 0.0):
    """Birds (the birds assignment): the whole image resized to the crop — scaled to fit and padded
    with ignore, or stretched with keep_aspect = false; a horizontal flip if p_flip > 0."""
    A = _albu()
    return A.Compose([*_fit(crop, ignore_index, keep_aspect), A.HorizontalFlip(p=p_flip)])


PRESETS: dict[str, Callable[..., Any]] = {
    "shapes": shapes,
    "crop": crop_only,
    "voc": voc,
    "cityscapes": cityscapes,
    "ph2": ph2,
    "birds": birds,
}


# -- checking and building -------------------------------------------------------------------------
def preset_params(name: str) -> dict[str, Any]:
    """The tunable parameters of a preset and their defaults."""
    return {p.name: p.default for p in inspect.signature(PRESETS[name]).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _number(value: Any, integer: bool) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if integer else isinstance(value, (int, float))


def check_augment(name: str, args: dict) -> dict[str, Any]:
    """The preset's keyword arguments from `data.augment_args`, checked; a problem is a `UserError`
    naming the key and listing the preset's parameters. Needs no albumentations import."""
    if name not in PRESETS:
        raise UserError(f"data.augment: unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    params = preset_params(name)
    listing = ", ".join(f"{k} = {list(v) if isinstance(v, tuple) else v}" for k, v in params.items()) or "none"
    kwargs = {}
    for key, value in args.items():
        where = f"data.augment_args.{key}"
        if key not in params:
            raise UserError(f"{where}: preset {name!r} has no parameter {key!r}; its parameters (defaults): {listing}")
        default = params[key]
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, tuple):
            ok = (isinstance(value, (list, tuple)) and len(value) == len(default)
                  and all(_number(v, isinstance(d, int)) for v, d in zip(value, default)))
            value = tuple(float(v) if isinstance(d, float) else v for v, d in zip(value, default)) if ok else value
        else:
            ok = _number(value, isinstance(default, int))
            value = float(value) if ok and isinstance(default, float) else value
        if not ok:
            raise UserError(f"{where} must be like the default {list(default) if isinstance(default, tuple) else default!r} "
                            f"of preset {name!r}, got {value!r}")
        if not isinstance(value, bool) and any(v < 0 for v in (value if isinstance(value, tuple) else (value,))):
            raise UserError(f"{where} must not be negative, got {value!r}")
        if key.startswith("p_") and not 0.0 <= value <= 1.0:
            raise UserError(f"{where} is a probability: give a value in [0, 1], got {value!r}")
        if isinstance(value, tuple) and not value[0] <= value[1]:
            raise UserError(f"{where} is a [low, high] range: low must not exceed high, got {list(value)}")
        if key == "scale" and value[0] <= 0:
            raise UserError(f"{where}: zoom factors must be > 0, got {list(value)}")
        kwargs[key] = value
    return kwargs


def build_augment(name: str, crop: tuple[int, int], ignore_index: int, args: dict | None = None):
    """The CPU training pipeline (geometry) of preset `name` at `crop` = (height, width), tuned by
    `args` (data.augment_args)."""
    kwargs = check_augment(name, args or {})
    try:
        return PRESETS[name](tuple(crop), ignore_index, **kwargs)
    except ValueError as exc:  # albumentations validates its arguments with pydantic (a ValueError)
        first = str(exc).strip().splitlines()
        raise UserError(f"data.augment_args {args} are invalid for preset {name!r}: "
                        f"{' '.join(first[:3])}") from None


def resolved_params(name: str, args: dict | None) -> dict[str, Any]:
    """Every parameter of the preset: its defaults, overridden by `args` (checked)."""
    checked = check_augment(name, args or {})  # an unknown preset is named here first
    return {**preset_params(name), **checked}


def build_colour(name: str, args: dict | None = None) -> ColourJitter | None:
    """The colour jitter of a preset that has `jitter`, `hue` and `p_jitter`, applied on the device
    (segdist.data.colour), never in the CPU pipeline; None when it has none or it is off."""
    kw = resolved_params(name, args)
    if "p_jitter" not in kw:
        return None
    colour = ColourJitter(brightness=kw["jitter"], contrast=kw["jitter"], saturation=kw["jitter"], hue=kw["hue"],
                          p=kw["p_jitter"])
    return colour if colour.active else None


@dataclass(frozen=True)
class DecodeReduction:
    """How much a preset shrinks a frame before anything else, as the JPEG decode reduction that
    allows (segdist.data.sample.decode_sample's `reduce_for`): the largest of 1, 2, 4, 8 that is not
    more than the shrink, so the reduced frame is never smaller than what the preset makes of it.
    Training only: evaluation always decodes full frames."""

    longest: int = 0
    """The frame's longest side is resized to this first (the cityscapes preset's `longest`)."""
    fit: tuple[int, int] | None = None
    """The whole frame is resized to this crop first (ph2, birds), keeping its aspect or stretched."""
    keep_aspect: bool = True

    def __call__(self, height: int, width: int) -> int:
        if self.longest:
            shrink = max(height, width) / self.longest
        elif self.keep_aspect:  # fitted inside the crop: the tighter side decides
            shrink = max(height / self.fit[0], width / self.fit[1])
        else:  # stretched: each side on its own; the gentler shrink bounds both
            shrink = min(height / self.fit[0], width / self.fit[1])
        return max(k for k in (1, 2, 4, 8) if k <= shrink)


def decode_reduction(name: str, crop: tuple[int, int], args: dict | None = None) -> DecodeReduction | None:
    """The preset's first shrink (see DecodeReduction), by its parameters: `longest` > 0 resizes the
    frame's longest side first, `keep_aspect` fits the whole frame to the crop first; None for
    presets that crop or zoom first."""
    kw = resolved_params(name, args)
    if kw.get("longest"):
        return DecodeReduction(longest=kw["longest"])
    if "keep_aspect" in kw:
        return DecodeReduction(fit=tuple(crop), keep_aspect=kw["keep_aspect"])
    return None


def seed_pipeline(pipeline, seed: int) -> None:
    """Seed a pipeline for one sample, with a separate random stream for each transform.

    albumentations 2.0.8's `Compose.set_random_seed(s)` gives every transform the same seed `s`,
    so transforms decide together: with HorizontalFlip(p=0.5) and VerticalFlip(p=0.5), seeds 0..39
    gave only "both" or "neither", never one flip alone. Here child i of a pipeline gets its own
    seed spawned from `seed` (numpy SeedSequence), recursively for nested pipelines.
    """

    compose = _albu().BaseCompose

    def walk(transform, seq: np.random.SeedSequence) -> None:
        transform.set_random_seed(int(seq.generate_state(1)[0]))
        if isinstance(transform, compose):
            for child, sub in zip(transform.transforms, seq.spawn(len(transform.transforms))):
                walk(child, sub)

    walk(pipeline, np.random.SeedSequence(seed))
