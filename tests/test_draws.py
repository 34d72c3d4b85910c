"""Per-sample numbers drawn for a batch at once (segdist.data.draws): a function of (seed, position,
stream, draw) alone, uniform, and handed out as a per-sample generator would."""

import numpy as np
import pytest

from segdist.data.draws import Draws, uniforms


def test_a_positions_numbers_do_not_depend_on_its_batch():
    batch = uniforms(3, [10, 11, 12, 1 << 40], 2, 6)
    for row, t in zip(batch, [10, 11, 12, 1 << 40]):
        assert np.array_equal(row, uniforms(3, [t], 2, 6)[0])
        assert np.array_equal(row[:4], uniforms(3, [t], 2, 4)[0])  # draw j is draw j, however many are taken
    assert batch.shape == (4, 6) and batch.dtype == np.float64


def test_seeds_streams_and_positions_give_other_numbers():
    base = uniforms(0, np.arange(100), 2, 4)
    for other in (uniforms(1, np.arange(100), 2, 4), uniforms(0, np.arange(100), 3, 4),
                  uniforms(0, np.arange(100, 200), 2, 4)):
        assert not np.isclose(base, other).any()
    assert len(np.unique(base)) == base.size


def test_the_numbers_are_uniform_and_uncorrelated():
    u = uniforms(7, np.arange(20000), 2, 4)
    assert (u >= 0).all() and (u < 1).all()
    counts = np.histogram(u[:, 0], bins=20, range=(0, 1))[0]
    assert np.abs(counts - 1000).max() < 5 * np.sqrt(1000)  # each bin within 5 sigma of 1000
    corr = np.corrcoef(u.T)
    assert np.abs(corr - np.eye(4)).max() < 0.05
    neighbours = np.corrcoef(u[:-1, 0], u[1:, 0])[0, 1]  # consecutive positions
    assert abs(neighbours) < 0.05


def test_draws_hand_out_columns_in_turn_and_bound_integers():
    rng = Draws(5, np.arange(1000), 2, count=4)
    first = rng.random()
    assert np.array_equal(first, uniforms(5, np.arange(1000), 2, 4)[:, 0])
    k = rng.integers(4)
    assert set(k.tolist()) == {0, 1, 2, 3}
    highs = np.arange(1, 1001)
    x = rng.integers(10, highs + 10)  # per-sample bounds
    assert (x >= 10).all() and (x < highs + 10).all()
    f = rng.uniform(-2.0, 3.0)
    assert (f >= -2).all() and (f < 3).all()
    with pytest.raises(IndexError, match="more than the 4 numbers"):
        rng.random()
