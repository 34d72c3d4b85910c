"""A training split held in memory (segdist.data.held, `data.in_memory`): the same batches as the
streaming reader, broken samples handled as it handles them, and a split that would not fit refused."""

import logging

import numpy as np
import pytest
import torch

from segdist.data.augment import build_augment
from segdist.data.colour import ColourJitter
from segdist.data.geometry import build_geometry
from segdist.data.held import check_fits, needed_bytes
from segdist.data.manifest import load_manifest
from segdist.data.sample import CorruptSample
from segdist.data.shards import ShardWriter, encode_png
from segdist.data.stream import GlobalBatches, TrainStream, train_loader
from segdist.errors import UserError

from conftest import write_split

IGNORE = 255


def take(stream, workers, n, batch=3, start=0):
    it = iter(train_loader(stream, GlobalBatches(0, 1, batch, start=start), workers, pin_memory=False))
    return [next(it) for _ in range(n)]


def flat(batch):
    """A batch's tensors, the placement's fields unpacked."""
    out = []
    for part in batch:
        out.extend(t for t in part if isinstance(t, torch.Tensor)) if isinstance(part, tuple) else out.append(part)
    return out


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        fx, fy = flat(x), flat(y)
        assert len(fx) == len(fy) and all(torch.equal(p, q) and p.dtype == q.dtype for p, q in zip(fx, fy))


@pytest.mark.parametrize("geometry, workers", [("device", 0), ("device", 2), ("cpu", 0)])
def test_held_batches_are_the_streamed_ones(shapes_root, geometry, workers):
    manifest = load_manifest(shapes_root, "train")
    transform = (build_geometry("shapes", (24, 24), IGNORE, {}) if geometry == "device"
                 else build_augment("shapes", (24, 24), IGNORE))

    def stream(in_memory):
        return TrainStream(manifest, seed=4, transform=transform, shuffle_buffer=12, in_memory=in_memory,
                           colour=ColourJitter(0.2, 0.2, 0.2, 0.05, 0.5))

    held = stream(True)
    assert held.held.stacked and held.held.images.shape == (48, 32, 32, 3)
    streamed = take(stream(False), workers, 20)  # 60 positions: past the first pass of 48
    assert_same(streamed, take(held, workers, 20))
    assert_same(streamed[7:], take(stream(True), workers, 13, start=21))  # a resume
    if geometry == "device":
        assert streamed[0][2].matrices.shape == (3, 2, 3) and streamed[0][3].shape == (3, 4)


def test_frames_of_several_sizes_are_held_one_by_one(tmp_path):
    w = ShardWriter(tmp_path, "s", dataset="t", classes=["a", "b"], palette=[[0, 0, 0]] * 2, samples_per_shard=3)
    for i, (h, wd) in enumerate([(8, 8), (10, 6), (6, 12), (8, 8), (9, 9), (7, 5)]):
        w.write(f"k{i}", encode_png(np.full((h, wd, 3), 10 * i, np.uint8)), "png", np.full((h, wd), i % 2, np.uint8))
    manifest = w.close()
    geometry = build_geometry("crop", (8, 8), IGNORE, {})

    def stream(in_memory):
        return TrainStream(manifest, seed=1, transform=geometry, shuffle_buffer=3, in_memory=in_memory)

    held = stream(True)
    assert not held.held.stacked and len(held.held.images) == 6
    assert_same(take(stream(False), 0, 6, batch=2), take(held, 0, 6, batch=2))


def test_a_broken_sample_fails_at_the_start_or_is_skipped_as_the_stream_skips_it(tmp_path, caplog):
    m = write_split(tmp_path, ["k0", "k1", "bad2", "k3", "k4", "bad5", "k6", "k7"])
    crop = build_augment("crop", (8, 8), IGNORE)
    with pytest.raises(CorruptSample, match="sample bad2"):
        TrainStream(m, seed=5, transform=crop, shuffle_buffer=4, in_memory=True)  # before any batch
    with caplog.at_level(logging.INFO, logger="segdist"):
        held = TrainStream(m, seed=5, transform=crop, shuffle_buffer=4, on_corrupt="skip", in_memory=True)
    assert "8 samples read and decoded" in caplog.text and "2 broken (skipped when met)" in caplog.text
    streamed = TrainStream(m, seed=5, transform=crop, shuffle_buffer=4, on_corrupt="skip")
    assert_same(take(streamed, 0, 8), take(held, 0, 8))


def test_a_split_that_would_not_fit_is_refused(shapes_root):
    manifest = load_manifest(shapes_root, "train")
    need = needed_bytes(manifest)
    assert need == 48 * 32 * 32 * 4  # 48 frames of 32x32: 3 bytes of image and 1 of mask a pixel
    check_fits(manifest, 2, available=4 * need)
    with pytest.raises(UserError, match=r"data.in_memory: split 'train' of .* \(48 samples of up to 32x32\), x 2 "
                                        r"processes on this node, .* set data.in_memory = false"):
        check_fits(manifest, 2, available=3 * need)
