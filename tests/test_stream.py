import logging
import tarfile

import numpy as np
import pytest
import torch

from segdist.data.augment import build_augment
from segdist.data.colour import ColourJitter
from segdist.data.draws import uniforms
from segdist.data.manifest import load_manifest
from segdist.data.shards import ShardWriter, encode_png
from segdist.data.sample import CorruptSample, ShardError, read_shard
from segdist.data.stream import EvalStream, GlobalBatches, PassOrder, TrainStream, eval_loader, train_loader
from segdist.errors import UserError

from conftest import write_split


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


def make_train(manifest, seed=0, colour=None, shuffle_buffer=8, **kw):
    return TrainStream(manifest, seed=seed, transform=build_augment("shapes", (32, 32), 255),
                       shuffle_buffer=shuffle_buffer, colour=colour, **kw)


def take(stream, workers, n, rank=0, world=1, batch=3, accum=1, start=0):
    it = iter(train_loader(stream, GlobalBatches(rank, world, batch, accum, start), workers, pin_memory=False))
    return [next(it) for _ in range(n)]


def same(a, b):
    return len(a) == len(b) and all(all(torch.equal(x, y) for x, y in zip(p, q)) for p, q in zip(a, b))


@pytest.mark.parametrize("workers", [0, 2])
def test_train_stream_is_deterministic_and_resumes_at_the_exact_batch(shapes_root, workers):
    manifest = load_manifest(shapes_root, "train")
    full = take(make_train(manifest), workers, 7)
    assert same(full, take(make_train(manifest), workers, 7))
    for start in (3, 4):  # an odd start: with 2 workers the batch due next came from worker 1
        assert same(full[start:start + 3], take(make_train(manifest), workers, 3, start=3 * start))
    assert full[0][0].shape == (3, 32, 32, 3) and full[0][1].shape == (3, 32, 32)
    assert not same(full[:1], take(make_train(manifest, seed=1), 0, 1))


def global_batches(manifest, world, batch, accum, workers, steps, start=0):
    """The global batches of `steps` optimizer steps from `start`: every rank's micro-batches of a step,
    rank by rank, concatenated."""
    per_rank = [take(make_train(manifest), workers, steps * accum, rank, world, batch, accum, start)
                for rank in range(world)]
    return [tuple(torch.cat([m[i] for r in range(world) for m in per_rank[r][k * accum:(k + 1) * accum]])
                  for i in range(2)) for k in range(steps)]


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_global_batches_are_the_same_on_every_layout(shapes_root, workers):
    """G = 8 as (processes, batch, accumulation) = (1, 4, 2), (2, 2, 2), (2, 4, 1), (4, 2, 1): the same
    samples, augmented the same, in the same places of every global batch; 5 steps wrap past a pass
    (24 samples)."""
    manifest = load_manifest(shapes_root, "train")
    reference = global_batches(manifest, 1, 8, 1, 0, 5)
    assert reference[0][0].shape == (8, 32, 32, 3)
    for world, batch, accum in ((1, 4, 2), (2, 2, 2), (2, 4, 1), (4, 2, 1)):
        assert same(reference, global_batches(manifest, world, batch, accum, workers, 5)), (world, batch, accum)


@pytest.mark.parametrize("before, after", [((2, 2, 2), (1, 4, 2)), ((1, 4, 2), (2, 4, 1))])
def test_a_resume_on_another_layout_continues_with_the_samples_that_came_next(shapes_root, before, after):
    """2 -> 1 and 1 -> 2 processes mid-pass (after 2 steps of G = 8: position 16 of 24)."""
    manifest = load_manifest(shapes_root, "train")
    uninterrupted = global_batches(manifest, *before, 0, 4)
    resumed = global_batches(manifest, *after, 2, 2, start=16)
    assert same(uninterrupted[2:], resumed)


def test_pass_order_is_a_block_shuffled_permutation(shapes_root):
    sizes = [5, 5, 5, 5, 4]
    order = PassOrder(sizes, seed=3, block=10)
    starts = np.cumsum([0, *sizes])
    shard_of = np.searchsorted(starts, np.arange(24), side="right") - 1
    for p in range(3):
        ids = order(p)
        assert sorted(ids.tolist()) == list(range(24))
        done = 0
        for block in order.blocks(p):  # a block's positions hold exactly its shards' samples
            held = sum(sizes[s] for s in block)
            assert set(shard_of[ids[done:done + held]]) == set(block)
            assert held >= 10 or block is order.blocks(p)[-1]
            done += held
    assert not np.array_equal(order(0), order(1))
    assert order.sample_at(24 + 7) == int(order(1)[7])
    plain = PassOrder(sizes, seed=3, block=0)  # no sample shuffle: whole shards in a shuffled order
    ids, done = plain(0), 0
    for block in plain.blocks(0):
        (shard,) = block
        assert ids[done:done + sizes[shard]].tolist() == list(range(starts[shard], starts[shard + 1]))
        done += sizes[shard]


def test_colour_factors_ride_with_the_batch_from_each_positions_seed(shapes_root):
    """The preset's colour jitter is drawn per position (stream 3 of segdist.data.draws) and travels as a third tensor;
    the CPU pipeline, and so the images and masks, are those of a stream without it."""
    manifest = load_manifest(shapes_root, "train")
    colour = ColourJitter(0.3, 0.3, 0.3, 0.1, 0.5)
    plain = take(make_train(manifest), 0, 5)
    full = take(make_train(manifest, colour=colour), 2, 5)
    for (a, am), (b, bm, factors) in zip(plain, full):
        assert torch.equal(a, b) and torch.equal(am, bm) and factors.shape == (3, 4) and factors.dtype == torch.float32
    first = uniforms(0, [0], 3, 5)  # seed 0, position 0
    assert torch.equal(full[0][2][0], torch.from_numpy(colour.factors(first)[0]))
    assert len({tuple(f.tolist()) for batch in full for f in batch[2]}) > 5  # not one draw for all
    assert same(full[3:], take(make_train(manifest, colour=colour), 0, 2, start=9))


def test_a_manifest_without_member_offsets_is_refused(shapes_root, tmp_path):
    import json
    import shutil

    for path in shapes_root.iterdir():
        if path.name.startswith("train"):
            shutil.copy(path, tmp_path / path.name)
    raw = json.loads((tmp_path / "train.json").read_text())
    for shard in raw["shards"]:
        shard.pop("members")
    (tmp_path / "train.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match="launch/shard.py index"):
        make_train(load_manifest(tmp_path, "train"))


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


def stream_of(manifest, on_corrupt):
    return TrainStream(manifest, seed=5, transform=build_augment("crop", (8, 8), 255), shuffle_buffer=4,
                       on_corrupt=on_corrupt)


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


def test_skip_passes_over_the_samples_a_truncated_shard_lost_deterministically(tmp_path, caplog):
    m = write_split(tmp_path, [f"k{i}" for i in range(12)])
    broken = m.shard_paths()[1]  # k4..k7
    with tarfile.open(broken) as tar:
        cut = next(x.offset_data for x in tar.getmembers() if x.name == "k5.mask.png") + 10
    broken.write_bytes(broken.read_bytes()[:cut])  # k4 complete, k5 cut in its mask, k6 and k7 gone
    with pytest.raises(CorruptSample, match=r"sample k[567] in .*s-000001.tar is cut short"):
        take(stream_of(m, "fail"), 0, 4)
    with caplog.at_level(logging.WARNING, logger="segdist"):
        a = take(stream_of(m, "skip"), 0, 8)  # 24 positions: two passes
    warnings = [r.getMessage() for r in caplog.records]
    assert same(a, take(stream_of(m, "skip"), 2, 8))
    assert len(warnings) == 3 and all("s-000001.tar (it is cut short" in w for w in warnings)
    assert {w.split()[3] for w in warnings} == {"k5", "k6", "k7"}  # each broken sample once
    assert "3 broken samples met by this process so far" in warnings[-1]
    # the pixel values identify samples (k_i is filled with 5 i): k5, k6, k7 never appear, k4 does
    seen = {int(img[j, 0, 0, 0]) // 5 for img, _ in a for j in range(len(img))}
    assert seen == {0, 1, 2, 3, 4, 8, 9, 10, 11}


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_replaces_an_undecodable_sample_and_resumes_exactly(tmp_path, workers):
    m = write_split(tmp_path, ["k0", "k1", "bad2", "k3", "k4", "bad5", "bad6", "k7"])
    with pytest.raises(CorruptSample, match="sample bad"):
        take(stream_of(m, "fail"), 0, 5)
    full = take(stream_of(m, "skip"), workers, 8)
    assert same(full, take(stream_of(m, "skip"), workers, 8))
    assert same(full[3:], take(stream_of(m, "skip"), workers, 5, start=9))
    assert full[0][0].shape == (3, 8, 8, 3)
    seen = {int(img[j, 0, 0, 0]) // 5 for img, _ in full for j in range(len(img))}
    assert seen == {0, 1, 3, 4, 7}


def test_skip_names_the_sample_and_counts(tmp_path, caplog):
    m = write_split(tmp_path, ["k0", "bad1", "k2", "k3"])
    with caplog.at_level(logging.WARNING, logger="segdist"):
        take(stream_of(m, "skip"), 0, 2, batch=4)  # two passes over 4 samples
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "skipping sample bad1 of shard" in messages[0]  # met twice, said once
    assert "s-000000.tar (it has an image that does not decode)" in messages[0]
    assert messages[0].endswith("1 broken samples met by this process so far, 1 skips")


def test_skip_still_fails_when_nothing_decodes(tmp_path):
    m = write_split(tmp_path, ["bad0", "bad1"])
    with pytest.raises(UserError, match="no sample of the training split decodes"):
        take(stream_of(m, "skip"), 0, 1, batch=1)


def test_wrong_size_and_wrong_labels_fail_even_with_skip(tmp_path):
    w = ShardWriter(tmp_path, "s", dataset="t", classes=["a", "b"], palette=[[0, 0, 0]] * 2, samples_per_shard=1000)
    w.write("k0", encode_png(np.zeros((8, 8, 3), np.uint8)), "png", np.zeros((8, 8), np.uint8))
    w.write("k1", encode_png(np.zeros((8, 8, 3), np.uint8)), "png", np.ones((8, 8), np.uint8))
    w.write("wide2", encode_png(np.zeros((8, 8, 3), np.uint8)), "png", np.zeros((8, 9), np.uint8))
    m = w.close()

    def stream(classes):
        m.classes = m.classes[:classes]  # the class count the recipe gives
        return TrainStream(m, seed=0, transform=build_augment("crop", (8, 8), 255), shuffle_buffer=0, on_corrupt="skip")

    with pytest.raises(UserError, match=r"sample wide2 in .*s-000000.tar: image \(8, 8\) and mask \(8, 9\) differ"):
        take(stream(2), 0, 3, batch=1)
    with pytest.raises(UserError, match="sample k1 .* mask label 1 is not below 1 classes nor ignore 255"):
        take(stream(1), 0, 3, batch=1)


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
        return TrainStream(manifest, seed=0, transform=build_augment("cityscapes", (32, 64), 255, args),
                           shuffle_buffer=0, reduce_for=reduce)

    reduced, full = take(stream(reduce_for), 0, 2), take(stream(None), 0, 2)
    for (a, am), (b, bm) in zip(reduced, full):
        assert a.shape == b.shape == (3, 32, 64, 3) and am.shape == bm.shape == (3, 32, 64)
        assert (a.float() - b.float()).abs().mean() < 12  # the same pictures, differently rounded
        assert (am == bm).float().mean() > 0.8  # the same labels, but where nearest picks a neighbour
    keys = [key for key, image, _ in EvalStream(manifest.shard_paths(), rank=0, world=1, num_classes=8, ignore_index=255)
            if image.shape == (128, 256, 3)]
    assert len(keys) == 6
