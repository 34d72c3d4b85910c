"""Albumentations presets that recipes name (`data.augment`), joint on image and mask.

Masks are always resized with nearest interpolation and padded with the ignore index, so no
invented label ever reaches the loss. Each preset is a function of (crop, ignore_index).
"""

from __future__ import annotations

from typing import Callable

import albumentations as A
import cv2

from segdist.errors import UserError


def _pad_crop(crop: tuple[int, int], ignore_index: int) -> list:
    h, w = crop
    return [
        A.PadIfNeeded(min_height=h, min_width=w, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=ignore_index),
        A.RandomCrop(height=h, width=w),
    ]


def shapes(crop: tuple[int, int], ignore_index: int) -> A.Compose:
    """Synthetic shapes: the classes are invariant to flips and right-angle turns."""
    return A.Compose(
        [
            *_pad_crop(crop, ignore_index),
            A.HorizontalFlip(p=0.5),
            A.RandomRotate90(p=0.5),
            A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05, p=0.5),
        ]
    )


def crop_only(crop: tuple[int, int], ignore_index: int) -> A.Compose:
    """No augmentation beyond a random crop to the training size (and padding)."""
    return A.Compose(_pad_crop(crop, ignore_index))


PRESETS: dict[str, Callable[[tuple[int, int], int], A.Compose]] = {
    "shapes": shapes,
    "crop": crop_only,
}


def build_augment(name: str, crop: tuple[int, int], ignore_index: int) -> A.Compose:
    if name not in PRESETS:
        raise UserError(f"data.augment: unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name](tuple(crop), ignore_index)
