"""Geometry on the device (segdist.data.geometry): the same pixels as the CPU pipeline where a preset's
draw is fixed, labels never invented, the outside ignored, and batches through the real stream."""

import numpy as np
import pytest
import torch

from segdist.data.augment import build_augment, resolved_params
from segdist.data.draws import Draws
from segdist.data.geometry import DeviceGeometry, Frame, Placement, build_geometry, check_geometry, place
from segdist.errors import UserError

IGNORE = 255


def frame(h: int, w: int, seed: int = 0, classes: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """A smooth image (bilinear resampling is compared on it) and a blocky mask."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (h // 8 + 2, w // 8 + 2, 3)).astype(np.float32)
    import cv2

    image = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC).clip(0, 255).astype(np.uint8)
    mask = rng.integers(0, classes, (h // 4 + 1, w // 4 + 1)).astype(np.uint8).repeat(4, 0).repeat(4, 1)[:h, :w]
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)


def on_device(geometry: DeviceGeometry, samples, seed: int = 0):
    """Samples drawn and collated as the loader does, placed as the trainer does."""
    images, masks = zip(*samples)
    matrices = geometry.draw(Draws(seed, np.arange(len(samples)), 2), [m.shape[0] for m in masks],
                             [m.shape[1] for m in masks])
    images, masks, placement = geometry.collate(images, masks, matrices)
    assert isinstance(placement, Placement)
    return place(images, masks, placement, "cpu")


def on_cpu(preset: str, crop, args: dict, image: np.ndarray, mask: np.ndarray):
    out = build_augment(preset, crop, IGNORE, args)(image=image, mask=mask)
    return out["image"], out["mask"]


@pytest.mark.parametrize("preset, crop, args, size", [
    ("birds", (256, 256), {"keep_aspect": True, "p_flip": 0.0}, (150, 200)),   # fit and pad
    ("birds", (96, 96), {"keep_aspect": False, "p_flip": 0.0}, (150, 200)),    # stretched down
    ("ph2", (256, 256), {"keep_aspect": False, "p_flip": 0.0, "p_vflip": 0.0, "p_affine": 0.0, "p_blur": 0.0},
     (280, 384)),
    ("voc", (128, 128), {"scale": [1.28, 1.28], "p_flip": 0.0}, (100, 100)),   # zoomed to exactly the crop
    ("cityscapes", (64, 128), {"scale": [1.0, 1.0], "p_flip": 0.0}, (64, 128)),
    ("crop", (80, 80), {}, (60, 70)),                                           # padded: no crop left to draw
])
def test_fixed_draws_give_the_cpu_pipelines_pixels(preset, crop, args, size):
    """Where a preset draws nothing, device and CPU pipelines agree: labels exactly, images to the
    rounding of cv2's fixed-point bilinear weights."""
    image, mask = frame(*size)
    want_image, want_mask = on_cpu(preset, crop, args, image, mask)
    images, masks = on_device(build_geometry(preset, crop, IGNORE, args), [(image, mask)])
    assert images.shape == (1, *crop, 3) and images.dtype == torch.uint8
    assert torch.equal(masks[0], torch.from_numpy(want_mask))
    assert (images[0].int() - torch.from_numpy(want_image).int()).abs().max() <= 1


def test_shapes_turns_and_flips_only_rearrange_pixels():
    """At the crop's size a shapes draw is one of the square's eight symmetries: pixel for pixel."""
    image, mask = frame(64, 64, seed=3)
    geometry = build_geometry("shapes", (64, 64), IGNORE, {"p_flip": 0.5, "p_rot90": 1.0})
    symmetries = []
    for flip in (False, True):
        for k in range(4):
            im, m = (image[:, ::-1], mask[:, ::-1]) if flip else (image, mask)
            symmetries.append((np.rot90(im, k), np.rot90(m, k)))
    images, masks = on_device(geometry, [(image, mask)] * 16)
    seen = set()
    for im, m in zip(images.numpy(), masks.numpy()):
        hits = [i for i, (a, b) in enumerate(symmetries) if np.array_equal(im, a) and np.array_equal(m, b)]
        assert hits, "a placed sample is no symmetry of its frame"
        seen.add(hits[0])
    assert len(seen) > 3  # the draws vary


def test_a_rotated_frame_invents_no_label_and_ignores_what_came_from_outside():
    image, mask = frame(200, 300, seed=1)
    args = {"keep_aspect": True, "p_affine": 1.0, "rotate": 30.0, "shift": 0.1, "p_blur": 0.0}
    images, masks = on_device(build_geometry("ph2", (128, 128), IGNORE, args), [(image, mask)] * 4)
    assert set(masks.unique().tolist()) <= set(np.unique(mask).tolist()) | {IGNORE}
    outside = masks == IGNORE
    assert outside.any(dim=(1, 2)).all()  # the padding of a 2:3 frame, and the turned-in corners
    assert (images[outside] == 0).all()
    assert (images[~outside].float().mean() > 20)


def test_frames_of_different_sizes_share_a_batch():
    """Each frame is placed from its own stored size, whatever it shares the canvas with."""
    geometry = build_geometry("birds", (64, 64), IGNORE, {"keep_aspect": True, "p_flip": 0.0})
    samples = [frame(48, 64, seed=5), frame(100, 40, seed=6)]
    images, masks = on_device(geometry, samples)
    for (image, mask), got_image, got_mask in zip(samples, images, masks):
        alone_image, alone_mask = on_device(geometry, [(image, mask)])
        assert torch.equal(got_mask, alone_mask[0]) and torch.equal(got_image, alone_image[0])


def test_frame_maps_compose_back_to_the_stored_pixel():
    """Pixel centres through pad, crop, a turn and a flip land on the stored pixel they show."""
    f = Frame(10, 20)
    f.pad(12, 20)   # one row above
    f.crop(3, 5, 6, 8)
    f.turn(1)       # 8 high, 6 wide
    f.hflip()
    assert (f.h.item(), f.w.item()) == (8, 6)
    rows, cols = np.mgrid[0:12, 0:20]
    padded = np.full((12, 20), -1)
    padded[1:11] = np.arange(200).reshape(10, 20)
    want = np.rot90(padded[3:9, 5:13], 1)[:, ::-1]
    for i in range(8):
        for j in range(6):
            x, y, _ = f.m[0] @ (j + 0.5, i + 0.5, 1.0)
            assert want[i, j] == (int(y) * 20 + int(x) if 0 <= x < 20 and 0 <= y < 10 else -1)


def test_recipe_choices_are_checked():
    with pytest.raises(UserError, match="data.geometry must be"):
        check_geometry("gpu", "shapes", resolved_params("shapes", {}))
    with pytest.raises(UserError, match="p_blur"):
        check_geometry("device", "ph2", resolved_params("ph2", {}))  # the preset blurs by default
    check_geometry("device", "ph2", resolved_params("ph2", {"p_blur": 0.0}))
    check_geometry("cpu", "ph2", resolved_params("ph2", {}))


@pytest.mark.parametrize("workers", [0, 2])
def test_the_training_stream_carries_placements_that_land_on_the_device(shapes_root, workers):
    """Through TrainStream and train_loader (workers or not), batches hold the stored frames and
    their placements; on_device warps them to the crop; a resume gives the same batches."""
    from segdist.data.colour import ColourJitter
    from segdist.data.manifest import load_manifest
    from segdist.data.stream import GlobalBatches, TrainStream, train_loader
    from segdist.train.step import on_device

    manifest = load_manifest(shapes_root, "train")
    geometry = build_geometry("shapes", (24, 24), IGNORE, {})  # of 32x32 frames

    def batches(start: int, n: int) -> list:
        stream = TrainStream(manifest, seed=0, transform=geometry, shuffle_buffer=8,
                             colour=ColourJitter(0.2, 0.2, 0.2, 0.0, 1.0))
        it = iter(train_loader(stream, GlobalBatches(0, 1, 3, start=3 * start), workers, pin_memory=False))
        return [next(it) for _ in range(n)]

    full = batches(0, 5)
    images, masks, placement, colour = full[0]
    assert images.shape == (3, 32, 32, 3) and isinstance(placement, Placement) and colour.shape == (3, 4)
    (landed_images, landed_masks, landed_colour), = on_device([full[0]], "cpu")
    assert landed_images.shape == (3, 24, 24, 3) and landed_masks.shape == (3, 24, 24)
    assert landed_masks.dtype == torch.int64 and landed_colour is colour
    assert on_device([(landed_images, landed_masks, landed_colour)], "cpu")[0][1] is landed_masks  # lands once
    for want, got in zip(full[3:], batches(3, 2)):
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
        assert torch.equal(want[2].matrices, got[2].matrices)
