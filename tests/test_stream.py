from collections import Counter

import pytest
import torch

from segdist.data.augment import build_augment
from segdist.data.manifest import load_manifest
from segdist.data.stream import EvalStream, TrainStream, eval_loader, train_loader
from segdist.errors import UserError


def eval_keys(manifest, world, workers):
    keys = []
    for rank in range(world):
        stream = EvalStream(manifest.shard_paths(), rank=rank, world=world, num_classes=4, ignore_index=255)
        for batch_keys, images, masks in eval_loader(stream, 2, workers, 255, pin_memory=False):
            keys += batch_keys
    return keys


@pytest.mark.parametrize("split", ["val7", "val7b"])
@pytest.mark.parametrize("world, workers", [(1, 0), (2, 0), (3, 0), (3, 2), (4, 2)])
def test_eval_stream_reads_every_sample_exactly_once(shapes_root, split, world, workers):
    manifest = load_manifest(shapes_root, split)
    keys = eval_keys(manifest, world, workers)
    assert len(keys) == 7 and len(set(keys)) == 7


def make_train(manifest, rank=0, world=1, start_batch=0, seed=0):
    return TrainStream(
        manifest.shard_paths(), rank=rank, world=world, seed=seed,
        transform=build_augment("shapes", (32, 32), 255), num_classes=4, ignore_index=255,
        shuffle_buffer=8, batch_size=3, start_batch=start_batch,
    )


def take(stream, workers, n):
    it = iter(train_loader(stream, workers, pin_memory=False))
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("workers", [0, 2])
def test_train_stream_is_deterministic_and_resumes_at_the_exact_batch(shapes_root, workers):
    manifest = load_manifest(shapes_root, "train")
    full = take(make_train(manifest), workers, 7)
    again = take(make_train(manifest), workers, 7)
    resumed = take(make_train(manifest, start_batch=4), workers, 3)
    for (a, am), (b, bm) in zip(full, again):
        assert torch.equal(a, b) and torch.equal(am, bm)
    for (a, am), (b, bm) in zip(full[4:], resumed):
        assert torch.equal(a, b) and torch.equal(am, bm)
    assert full[0][0].shape == (3, 32, 32, 3) and full[0][1].shape == (3, 32, 32)


def test_train_stream_is_endless_and_ranks_get_different_data(shapes_root):
    manifest = load_manifest(shapes_root, "train")
    r0 = take(make_train(manifest, rank=0, world=2), 0, 20)  # 60 samples > 24 per rank: wraps around
    r1 = take(make_train(manifest, rank=1, world=2), 0, 2)
    assert not torch.equal(r0[0][0], r1[0][0])


def test_truncated_shard_names_the_shard(shapes_root, tmp_path):
    manifest = load_manifest(shapes_root, "val7")
    bad = tmp_path / "val7-000000.tar"
    bad.write_bytes(manifest.shard_paths()[0].read_bytes()[:700])
    stream = EvalStream([bad], rank=0, world=1, num_classes=4, ignore_index=255)
    with pytest.raises(UserError, match="val7-000000.tar"):
        list(stream)


def test_label_out_of_range_at_read_names_the_sample(shapes_root):
    manifest = load_manifest(shapes_root, "val7")
    stream = EvalStream(manifest.shard_paths(), rank=0, world=1, num_classes=2, ignore_index=255)
    with pytest.raises(UserError, match="sample shapes_2_"):
        list(stream)
