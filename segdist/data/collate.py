"""Batching samples: masks as tensors (`mask_tensor`), frames of any size padded into one batch
(`pad_batch`), and the evaluation batches built from them (`pad_collate`). Padding is 0 in images and
the ignore index in masks, so padded pixels never count."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from segdist.data.sample import PAD_MULTIPLE, padded_size


def mask_tensor(mask: np.ndarray) -> torch.Tensor:
    """uint8 masks stay uint8 (the train step casts on the device); 16-bit ones become int32."""
    return torch.from_numpy(mask if mask.dtype == np.uint8 else mask.astype(np.int32))


def _uint8_batch(ignore_index: int, all_uint8: bool) -> bool:
    """Whether a batch of masks stays uint8: every mask is, and so is the ignore index it is padded with."""
    return 0 <= ignore_index <= 255 and all_uint8


def stacked_masks(masks: np.ndarray, ignore_index: int) -> torch.Tensor:
    """N masks of one size (an N x H x W array) as one batch, stored as `pad_batch` stores them."""
    return torch.from_numpy(masks if _uint8_batch(ignore_index, masks.dtype == np.uint8) else masks.astype(np.int32))


def pad_batch(images, masks, ignore_index: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (H x W x 3 uint8) and masks of any sizes up to (height, width) in one batch each:
    images padded with 0 at the bottom and right, masks with the ignore index. Masks stay as small as
    their labels allow, as `mask_tensor` keeps them: uint8 when every mask is and the ignore index
    fits, else int32 (an eighth or half of an int64 batch to copy to the device and to count)."""
    small = _uint8_batch(ignore_index, all(m.dtype == torch.uint8 for m in masks))
    image_batch = torch.zeros(len(images), height, width, 3, dtype=torch.uint8)
    mask_batch = torch.full((len(masks), height, width), ignore_index, dtype=torch.uint8 if small else torch.int32)
    for i, (img, m) in enumerate(zip(images, masks)):
        image_batch[i, : img.shape[0], : img.shape[1]] = img
        mask_batch[i, : m.shape[0], : m.shape[1]] = m
    return image_batch, mask_batch


def pad_collate(ignore_index: int, multiple: int = PAD_MULTIPLE) -> Callable:
    """Batch samples of any size: pad images with 0 and masks with the ignore index up to a
    multiple of `multiple` (what encoders need), so padded pixels never count in metrics. The
    batch is (keys, images, masks, sizes): each sample's own (H, W), so that evaluation can run
    it at its own padded size, whatever it was batched with (`pad_batch` says how masks are stored)."""

    def collate(items):
        keys, images, masks = zip(*items)
        h = max(m.shape[0] for m in masks)
        w = max(m.shape[1] for m in masks)
        image_batch, mask_batch = pad_batch(images, masks, ignore_index, *padded_size(h, w, multiple))
        return list(keys), image_batch, mask_batch, [tuple(m.shape) for m in masks]

    return collate
