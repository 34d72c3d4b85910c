import logging
import tarfile

import numpy as np
import pytest
import torch

from segdist.data.augment import build_augment
from segdist.data.colour import ColourJitter
from segdist.data.manifest import load_manifest
from segdist.data.shards import ShardWriter, encode_png
from segdist.data.sample import CorruptSample, ShardError, read_shard
from segdist.data.stream import EvalStream, TrainStream, eval_loader, train_loader
from segdist.errors import UserError


def canonical_groups(manifest, group):
    """The split's keys in manifest order (shard by shard, in-shard order), cut into groups of `group`."""
    keys = [sample["__key__"] for path in manifest.shard_paths() for sample in read_shard(path)]
    return [keys[i: i + group] for i in range(0, len(keys), group)]


def eval_batches(manifest, world, workers, group):
    """The key list of every batch of every rank's eval loader (`workers` real DataLoader workers)."""
    batches = []
    for rank in range(world):
        stream = EvalStream.of(manifest, rank=rank, world=world, group=group)
        for keys, images, masks, sizes in eval_loader(stream, workers, pin_memory=False):
            assert masks.dtype == torch.uint8  # uint8 masks and ignore 255: an eighth of an int64 batch
            assert len(keys) == len(images) == len(sizes)
            batches.append(keys)
    return batches


@pytest.mark.parametrize("split, group", [("val7", 2), ("val7b", 3), ("val7", 8)])
@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_batches_are_the_canonical_groups_for_any_world_size_and_workers(shapes_root, split, group, world, workers):
    """Each batch is exactly one group of `group` consecutive samples in manifest order, each group
    once: groups cross shard boundaries (val7: 3 + 3 + 1, val7b: 4 + 3), some slots get none."""
    manifest = load_manifest(shapes_root, split)
    groups = canonical_groups(manifest, group)
    assert sum(map(len, groups)) == 7 and len(groups) == -(-7 // group)
    assert sorted(eval_batches(manifest, world, workers, group)) == sorted(groups)


def test_eval_slots_take_contiguous_balanced_ranges_of_groups(shapes_root):
    stream = EvalStream.of(load_manifest(shapes_root, "val7"), rank=0, world=1, group=2)  # 4 groups
    assert [stream.positions(s, 3) for s in range(3)] == [range(0, 2), range(2, 4), range(4, 7)]
    assert [stream.positions(s, 6) for s in range(6)] == [range(0, 0), range(0, 2), range(2, 4), range(4, 4),
                                                          range(4, 6), range(6, 7)]  # 2 slots of 6 idle


def test_an_eval_slot_reads_only_its_shards_and_decodes_only_its_samples(tmp_path):
    """Shards [k0, k1, bad2, k3] and [k4, k5]: the slot of k3..k5 passes over bad2 without decoding
    it; the slot of k4, k5 does not open the first shard at all (here: it is gone)."""
    m = write_split(tmp_path, ["k0", "k1", "bad2", "k3", "k4", "k5"])
    keys = [key for key, _, _ in EvalStream.of(m, rank=1, world=2, group=1)]
    assert keys == ["k3", "k4", "k5"]
    with pytest.raises(CorruptSample, match="sample bad2"):
        list(EvalStream.of(m, rank=0, world=2, group=1))
    m.shard_paths()[0].unlink()
    assert [key for key, _, _ in EvalStream.of(m, rank=2, world=3, group=2)] == ["k4", "k5"]


def test_a_shard_that_holds_another_count_than_its_manifest_is_named(tmp_path):
    m = write_split(tmp_path / "a", [f"k{i}" for i in range(6)], per_shard=3)
    more = write_split(tmp_path / "more", [f"m{i}" for i in range(4)], per_shard=4).shard_paths()[0]
    fewer = write_split(tmp_path / "fewer", ["f0", "f1"], per_shard=3).shard_paths()[0]
    first = m.shard_paths()[0]
    first.write_bytes(more.read_bytes())
    with pytest.raises(UserError, match=r"a/s-000000.tar holds more samples than the 3 its manifest says: "
                                        r"the shards changed since conversion; run launch/shard.py verify"):
        list(EvalStream.of(m, rank=0, world=1, group=2))
    # the check is the slot's that reads the shard's end (positions 2, 3), not the one before it (0, 1)
    assert [key for key, _, _ in EvalStream.of(m, rank=0, world=3, group=1)] == ["m0", "m1"]
    with pytest.raises(UserError, match="holds more samples than the 3"):
        list(EvalStream.of(m, rank=1, world=3, group=1))
    first.write_bytes(fewer.read_bytes())
    with pytest.raises(UserError, match="s-000000.tar holds 2 samples, its manifest says 3"):
        list(EvalStream.of(m, rank=0, world=1, group=2))


def test_eval_stream_without_sample_counts_reads_everything_in_one_slot_only(shapes_root):
    manifest = load_manifest(shapes_root, "val7")
    stream = EvalStream(manifest.shard_paths(), rank=0, world=1, num_classes=4, ignore_index=255, group=3)
    assert [keys for keys, *_ in eval_loader(stream, 0, pin_memory=False)] == canonical_groups(manifest, 3)
    with pytest.raises(ValueError, match="needs samples_per_shard to split a split over 2 slots"):
        list(EvalStream(manifest.shard_paths(), rank=0, world=2, num_classes=4, ignore_index=255))


def make_train(manifest, rank=0, world=1, start_batch=0, seed=0, colour=None):
    return TrainStream(
        manifest.shard_paths(), rank=rank, world=world, seed=seed,
        transform=build_augment("shapes", (32, 32), 255), num_classes=4, ignore_index=255,
        shuffle_buffer=8, batch_size=3, start_batch=start_batch, colour=colour,
    )


def take(stream, workers, n):
    it = iter(train_loader(stream, workers, pin_memory=False))
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("workers", [0, 2])
def test_train_stream_is_deterministic_and_resumes_at_the_exact_batch(shapes_root, workers):
    manifest = load_manifest(shapes_root, "train")
    full = take(make_train(manifest), workers, 7)
    again = take(make_train(manifest), workers, 7)
    for (a, am), (b, bm) in zip(full, again):
        assert torch.equal(a, b) and torch.equal(am, bm)
    for start in (3, 4):  # an odd start: the batch due next comes from worker 1, not 0
        resumed = take(make_train(manifest, start_batch=start), workers, 3)
        for (a, am), (b, bm) in zip(full[start:], resumed):
            assert torch.equal(a, b) and torch.equal(am, bm)
    assert full[0][0].shape == (3, 32, 32, 3) and full[0][1].shape == (3, 32, 32)


@pytest.mark.parametrize("workers", [0, 2])
def test_colour_factors_ride_with_the_batch_from_each_samples_seed_and_resume_exactly(shapes_root, workers):
    """The preset's colour jitter is drawn per sample (seed, rank, worker, n, 3) and travels as a third
    tensor; the CPU pipeline, and so the images and masks, are those of a stream without it."""
    manifest = load_manifest(shapes_root, "train")
    colour = ColourJitter(0.3, 0.3, 0.3, 0.1, 0.5)
    plain = take(make_train(manifest), workers, 5)
    full = take(make_train(manifest, colour=colour), workers, 5)
    for (a, am), (b, bm, factors) in zip(plain, full):
        assert torch.equal(a, b) and torch.equal(am, bm) and factors.shape == (3, 4) and factors.dtype == torch.float32
    first = np.random.default_rng([0, 0, 0, 0, 3])  # seed 0, rank 0, worker 0, sample 0
    assert torch.equal(full[0][2][0], torch.from_numpy(colour.draw(first)))
    assert len({tuple(f.tolist()) for batch in full for f in batch[2]}) > 5  # not one draw for all
    resumed = take(make_train(manifest, start_batch=3, colour=colour), workers, 2)
    for got, want in zip(resumed, full[3:]):
        assert all(torch.equal(x, y) for x, y in zip(got, want))


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


# -- corrupt data -----------------------------------------------------------------------------------


def write_split(root, samples, per_shard=4, split="s"):
    """Shards of 8x8 samples; `samples` lists keys, "bad*" keys get image bytes that do not decode."""
    w = ShardWriter(root, split, dataset="t", classes=["a", "b", "c", "d"], palette=[[0, 0, 0]] * 4,
                    samples_per_shard=per_shard)
    for i, key in enumerate(samples):
        image = encode_png(np.full((8, 8, 3), i * 5 % 256, np.uint8))
        mask = np.full((8, 8), i % 4, np.uint8)
        w.write(key, b"not an image" if key.startswith("bad") else image, "png", mask)
    return w.close()


def stream_of(manifest, on_corrupt, start_batch=0, batch_size=3):
    return TrainStream(
        manifest.shard_paths(), rank=0, world=1, seed=5, transform=build_augment("crop", (8, 8), 255),
        num_classes=4, ignore_index=255, shuffle_buffer=4, batch_size=batch_size, start_batch=start_batch,
        on_corrupt=on_corrupt,
    )


def test_a_shard_cut_between_two_members_is_caught(shapes_root, tmp_path):
    src = load_manifest(shapes_root, "val7").shard_paths()[0]  # 3 samples
    with tarfile.open(src) as tar:
        cut = [m.offset for m in tar.getmembers() if m.name.endswith(".image.png")][2]  # before sample 3
    bad = tmp_path / "val7-000000.tar"
    bad.write_bytes(src.read_bytes()[:cut])
    read = []
    with pytest.raises(ShardError, match="val7-000000.tar is truncated or corrupt after 1 samples") as err:
        for sample in read_shard(bad):
            read.append(sample["__key__"])
    # sample 2 was complete but unconfirmed when the file ended: dropped, like the rest of the shard
    assert len(read) == 1 and err.value.samples == 1
    with pytest.raises(UserError, match="val7-000000.tar"):
        list(EvalStream([bad], rank=0, world=1, num_classes=4, ignore_index=255))


def test_skip_drops_the_rest_of_a_truncated_shard_deterministically(tmp_path, caplog):
    m = write_split(tmp_path, [f"k{i}" for i in range(12)])
    broken = m.shard_paths()[1]  # k4..k7
    with tarfile.open(broken) as tar:
        cut = next(x.offset_data for x in tar.getmembers() if x.name == "k5.mask.png") + 10
    broken.write_bytes(broken.read_bytes()[:cut])  # k4 complete, k5 cut in its mask
    with pytest.raises(ShardError, match="s-000001.tar is truncated or corrupt after 1 samples"):
        take(stream_of(m, "fail"), 0, 4)
    with caplog.at_level(logging.WARNING, logger="segdist"):
        a = take(stream_of(m, "skip"), 0, 6)  # 18 samples: the 9 readable ones, twice
    warnings = [r.getMessage() for r in caplog.records]
    b = take(stream_of(m, "skip"), 0, 6)
    assert all(torch.equal(x, y) and torch.equal(xm, ym) for (x, xm), (y, ym) in zip(a, b))
    assert len(warnings) == 2 and all("skipping the rest of shard" in w and "s-000001.tar after 1 samples" in w
                                      for w in warnings)
    assert warnings[1].endswith("so far rank 0 worker 0 skipped 0 undecodable samples and the rest of 2 shards")
    # the pixel values identify samples (k_i is filled with 5 i): k5, k6, k7 never appear, k4 does
    seen = {int(img[j, 0, 0, 0]) // 5 for img, _ in a for j in range(len(img))}
    assert seen == {0, 1, 2, 3, 4, 8, 9, 10, 11}


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_replaces_an_undecodable_sample_and_resumes_exactly(tmp_path, workers):
    m = write_split(tmp_path, ["k0", "k1", "bad2", "k3", "k4", "bad5", "bad6", "k7"])
    with pytest.raises(CorruptSample, match="sample bad"):
        take(stream_of(m, "fail"), 0, 5)
    full = take(stream_of(m, "skip"), workers, 8)
    again = take(stream_of(m, "skip"), workers, 8)
    resumed = take(stream_of(m, "skip", start_batch=3), workers, 5)
    for (a, am), (b, bm) in zip(full, again):
        assert torch.equal(a, b) and torch.equal(am, bm)
    for (a, am), (b, bm) in zip(full[3:], resumed):
        assert torch.equal(a, b) and torch.equal(am, bm)
    assert full[0][0].shape == (3, 8, 8, 3)


def test_skip_names_the_sample_and_counts(tmp_path, caplog):
    m = write_split(tmp_path, ["k0", "bad1", "k2", "k3"])
    with caplog.at_level(logging.WARNING, logger="segdist"):
        take(stream_of(m, "skip", batch_size=4), 0, 2)  # two passes over 4 samples
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and all("skipping sample bad1 of shard" in msg for msg in messages)
    assert "s-000000.tar (it has an image that does not decode)" in messages[0]
    assert "skipped 1 undecodable samples" in messages[0] and "skipped 2 undecodable samples" in messages[1]


def test_skip_still_fails_when_nothing_decodes(tmp_path):
    m = write_split(tmp_path, ["bad0", "bad1"])
    with pytest.raises(UserError, match="no sample of training slot 0 decodes"):
        take(stream_of(m, "skip", batch_size=1), 0, 1)


def test_wrong_size_and_wrong_labels_fail_even_with_skip(tmp_path):
    w = ShardWriter(tmp_path, "s", dataset="t", classes=["a", "b"], palette=[[0, 0, 0]] * 2, samples_per_shard=1000)
    w.write("k0", encode_png(np.zeros((8, 8, 3), np.uint8)), "png", np.zeros((8, 8), np.uint8))
    w.write("k1", encode_png(np.zeros((8, 8, 3), np.uint8)), "png", np.ones((8, 8), np.uint8))
    w.write("wide2", encode_png(np.zeros((8, 8, 3), np.uint8)), "png", np.zeros((8, 9), np.uint8))
    m = w.close()

    def stream(classes):
        return TrainStream(m.shard_paths(), rank=0, world=1, seed=0, transform=build_augment("crop", (8, 8), 255),
                           num_classes=classes, ignore_index=255, shuffle_buffer=0, batch_size=1, on_corrupt="skip")

    with pytest.raises(UserError, match=r"sample wide2 in .*s-000000.tar: image \(8, 8\) and mask \(8, 9\) differ"):
        take(stream(2), 0, 3)
    with pytest.raises(UserError, match="sample k1 .* mask label 1 is not below 1 classes nor ignore 255"):
        take(stream(1), 0, 3)


def test_eval_never_skips(tmp_path):
    m = write_split(tmp_path, ["k0", "bad1", "k2"])
    with pytest.raises(CorruptSample, match="sample bad1 in .*s-000000.tar"):
        list(EvalStream(m.shard_paths(), rank=0, world=1, num_classes=4, ignore_index=255))


def test_read_shard_groups_samples_as_webdataset_does(shapes_root):
    from webdataset.tariterators import group_by_keys, tar_file_expander

    path = load_manifest(shapes_root, "val7").shard_paths()[0]
    ours = list(read_shard(path))
    with open(path, "rb") as stream:
        theirs = list(group_by_keys(tar_file_expander([{"url": str(path), "stream": stream}])))
    assert len(ours) == 3 and ours == theirs


def test_jpeg_frames_decode_reduced_for_a_preset_that_shrinks_them_first(tmp_path):
    """cityscapes with longest = 64 on 128x256 JPEG frames: decoded at 1/4 (32x64), the same crops as a
    full decode then LongestMaxSize, up to the scaled IDCT's rounding; evaluation reads full frames."""
    from segdist.bench.data import make_frame
    from segdist.data.augment import decode_reduction
    from segdist.data.shards import ShardWriter, encode_jpeg

    with ShardWriter(tmp_path, "train", dataset="t", classes=[f"c{i}" for i in range(8)], palette=[[0, 0, 0]] * 8,
                     samples_per_shard=4) as writer:
        for i in range(6):
            image, mask = make_frame(i, 128, 256)
            writer.write(f"f{i}", encode_jpeg(image, 90), "jpg", mask)
        writer.close()
    manifest = load_manifest(tmp_path, "train")
    args = {"scale": [1.0, 1.0], "longest": 64, "p_flip": 0.0, "p_jitter": 0.0}
    reduce_for = decode_reduction("cityscapes", (32, 64), args)
    assert reduce_for(128, 256) == 4

    def stream(reduce):
        return TrainStream(manifest.shard_paths(), rank=0, world=1, seed=0,
                           transform=build_augment("cityscapes", (32, 64), 255, args), num_classes=8, ignore_index=255,
                           shuffle_buffer=0, batch_size=3, reduce_for=reduce)

    reduced, full = take(stream(reduce_for), 0, 2), take(stream(None), 0, 2)
    for (a, am), (b, bm) in zip(reduced, full):
        assert a.shape == b.shape == (3, 32, 64, 3) and am.shape == bm.shape == (3, 32, 64)
        assert (a.float() - b.float()).abs().mean() < 12  # the same pictures, differently rounded
        assert (am == bm).float().mean() > 0.8  # the same labels, but where nearest picks a neighbour
    keys = [key for key, image, _ in EvalStream(manifest.shard_paths(), rank=0, world=1, num_classes=8, ignore_index=255)
            if image.shape == (128, 256, 3)]
    assert len(keys) == 6
