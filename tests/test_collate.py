"""Batching samples of any size (segdist.data.collate)."""

import torch

from segdist.data.collate import pad_collate


def test_pad_collate_keeps_masks_small_and_pads_with_the_ignore_index():
    image = torch.zeros(5, 7, 3, dtype=torch.uint8)
    small, wide = torch.ones(5, 7, dtype=torch.uint8), torch.full((5, 7), 300, dtype=torch.int32)
    _, _, masks, sizes = pad_collate(255, multiple=8)([("a", image, small), ("b", image, small)])
    assert masks.dtype == torch.uint8 and masks.shape == (2, 8, 8) and sizes == [(5, 7), (5, 7)]
    assert int(masks[0, 4, 6]) == 1 and int(masks[0, 5, 0]) == 255 and int(masks[1, 0, 7]) == 255
    _, _, masks, _ = pad_collate(255, multiple=8)([("a", image, small), ("b", image, wide)])
    assert masks.dtype == torch.int32 and int(masks[1, 0, 0]) == 300 and int(masks[0, 0, 0]) == 1
    _, _, masks, _ = pad_collate(1000, multiple=8)([("a", image, small)])
    assert masks.dtype == torch.int32 and int(masks[0, 7, 7]) == 1000
