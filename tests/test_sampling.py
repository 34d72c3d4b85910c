"""segdist.data.sampling: rare-class sampling's probabilities (DAFormer's Eq. 6), the drawn class
frequencies of a real TrainStream against them, and exactness on resume."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest
import torch

from segdist.data.augment import build_augment
from segdist.data.manifest import load_manifest
from segdist.data.sampling import class_probabilities, draws, sample_probabilities, training_draws
from segdist.data.shards import ShardWriter, encode_png
from segdist.data.stream import GlobalBatches, TrainStream, train_loader
from segdist.errors import UserError
from segdist.recipe import DataConfig

# 40 samples of 8x8 in 5 shards: class 0 (background) in all, class 1 in 20, class 2 in 6, class 3 in 2.
HOLDS = [(1,) if i < 20 else () for i in range(40)]
HOLDS = [h + ((2,) if i % 7 == 3 else ()) + ((3,) if i in (11, 30) else ()) for i, h in enumerate(HOLDS)]


@pytest.fixture(scope="module")
def rare_split(tmp_path_factory):
    root = tmp_path_factory.mktemp("rare")
    writer = ShardWriter(root, "train", dataset="t", classes=["bg", "a", "b", "c"], palette=[[0, 0, 0]] * 4,
                         samples_per_shard=8)
    for i, holds in enumerate(HOLDS):
        mask = np.zeros((8, 8), np.uint8)
        for k, c in enumerate(holds):
            mask[k, : 2 + c] = c  # class c covers 2 + c pixels of row k
        mask[7, :] = 255
        writer.write(f"s{i:02d}", encode_png(np.full((8, 8, 3), i, np.uint8)), "png", mask)
    writer.close()
    return load_manifest(root, "train")


def test_the_manifest_records_each_samples_classes(rare_split):
    classes = [dict(map(tuple, s)) for shard in rare_split.shards for s in shard.sample_classes]
    assert [sorted(set(c) - {0}) for c in classes] == [sorted(h) for h in HOLDS]
    totals = np.zeros(4, np.int64)
    for c in classes:
        for k, n in c.items():
            totals[k] += n
    assert totals.tolist() == rare_split.class_pixels  # the per-sample counts add up to the split's


def test_class_probabilities_follow_daformers_formula():
    pixels = np.array([700, 200, 90, 10, 0])
    f = pixels / pixels.sum()
    for t in (0.01, 0.1, 1.0):
        expected = np.exp((1 - f[:4]) / t) / np.exp((1 - f[:4]) / t).sum()
        assert np.allclose(class_probabilities(pixels, t), [*expected, 0.0])
    p = class_probabilities(pixels, 0.1)
    assert p[3] > p[2] > p[1] > p[0] and p[4] == 0  # rarer is likelier; absent is never picked
    assert np.allclose(class_probabilities(pixels, 1e6)[:4], 0.25)  # T -> inf: every class alike


def test_sample_probabilities_sum_class_shares(rare_split):
    p = sample_probabilities(rare_split, 0.1)
    pc = class_probabilities(rare_split.class_pixels, 0.1)
    n = np.array([40, 20, 6, 2])
    for i, holds in enumerate(HOLDS):
        assert p[i] == pytest.approx(pc[0] / n[0] + sum(pc[c] / n[c] for c in holds))
    assert p.sum() == pytest.approx(1.0)
    # min_pixels = 5: class 1 (3 pixels a sample) and class 2 (4) no longer count, class 3 (5) still does
    strict = sample_probabilities(rare_split, 0.1, min_pixels=5)
    assert strict[3] == pytest.approx(strict[4])  # sample 3 holds class 2 (4 pixels): no longer counted


def loader(manifest, probabilities, rank=0, world=1, start=0, workers=0, shuffle_buffer=6):
    stream = TrainStream(manifest, seed=4, transform=build_augment("crop", (8, 8), 255),
                         shuffle_buffer=shuffle_buffer, probabilities=probabilities)
    return iter(train_loader(stream, GlobalBatches(rank, world, 4, start=start), workers, pin_memory=False))


def drawn_keys(manifest, probabilities, batches, world=1, workers=0):
    """Which samples the streams of every rank yield (a sample's image is filled with its index)."""
    counts = Counter()
    for rank in range(world):
        it = loader(manifest, probabilities, rank, world, workers=workers)
        for _ in range(batches):
            images, _ = next(it)
            counts.update(int(v) for v in images[:, 0, 0, 0])
    return counts


def test_drawn_class_frequencies_match_the_formula(rare_split):
    p = sample_probabilities(rare_split, 0.1)
    draws_total = 2 * 150 * 4  # 2 ranks x 150 batches x 4: 30 passes of 40 draws
    counts = drawn_keys(rare_split, p, 150, world=2)
    assert sum(counts.values()) == draws_total
    holds = np.array([[c in h for c in (1, 2, 3)] for h in HOLDS])
    drawn = np.array([counts[i] for i in range(40)]) @ holds / draws_total
    expected = p @ holds
    print("class   drawn   formula   uniform")
    for c in range(3):
        print(f"{c + 1:>5} {drawn[c]:7.3f} {expected[c]:9.3f} {holds[:, c].mean():9.3f}")
    sd = np.sqrt(expected * (1 - expected) / draws_total)
    assert np.all(np.abs(drawn - expected) < 4 * sd + 1e-9), (drawn, expected)
    assert drawn[2] > 5 * holds[:, 2].mean()  # the rarest class is drawn far more often than uniformly


def test_rare_class_streams_are_deterministic_and_resume_exactly(rare_split):
    p = sample_probabilities(rare_split, 0.1)

    def take(start, n, workers):
        it = loader(rare_split, p, start=4 * start, workers=workers)
        return [next(it) for _ in range(n)]

    for workers in (0, 2):
        full = take(0, 24, workers)  # 96 samples: more than two passes
        for start in (5, 13):
            for (a, am), (b, bm) in zip(full[start:], take(start, 6, workers)):
                assert torch.equal(a, b) and torch.equal(am, bm)
    # the draw of a pass is the same whoever computes it: every rank and worker agree
    assert np.array_equal(draws(p, 4, 7), draws(p, 4, 7)) and draws(p, 4, 7).sum() == 40


def test_rare_class_needs_the_per_sample_classes(rare_split):
    old = dataclasses.replace(rare_split, shards=[dataclasses.replace(s, sample_classes=None) for s in rare_split.shards])
    with pytest.raises(UserError, match=r"re-run its conversion .* or set data.sampling = \"uniform\""):
        training_draws(old, DataConfig(sampling="rare_class"))
    assert training_draws(old, DataConfig()) is None
    with pytest.raises(UserError, match="data.sampling must be"):
        DataConfig(sampling="rare")
    with pytest.raises(UserError, match="rare_class_temperature must be > 0"):
        DataConfig(rare_class_temperature=0)


@pytest.mark.slow
def test_a_run_trains_with_rare_class_sampling(tiny_recipe):
    from conftest import launch

    result = launch("train.py", [str(tiny_recipe), "--set", "data.sampling=rare_class",
                                 "--set", "data.rare_class_temperature=0.1", "--set", "train.eval_every=0"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data.sampling = rare_class (T = 0.1, min 0 pixels): classes picked most often:" in result.stderr
