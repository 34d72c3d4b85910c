"""Per-sample random numbers for a whole batch at once: the j-th number of training position t in a
stream is a function of (seed, t, stream, j) alone.

Why not one `np.random.default_rng([seed, t, stream])` per sample: building that generator costs
~9 us, and the draws made through it ~10-25 us more, per sample. A light model on an H100 takes
~350k samples/s (`launch/bench.py feed`), so 30 us per sample is ~10 CPU cores by itself. Here a
batch's numbers come from a few vectorised integer operations on all its positions together.

The generator is a counter-based hash: SplitMix64's finaliser (Steele, Lea and Flood, "Fast
splittable pseudorandom number generators", 2014) of the position under a key made from the seed,
then again of that plus a distinct odd-multiple counter per (stream, draw index). It has no state,
so the numbers of position t are the same whichever batch, worker, rank or resume asks for them.
Quality: enough for augmentation parameters (each output is a full 64-bit avalanche of distinct
inputs); not for cryptography or statistics that need a certified generator.
"""

from __future__ import annotations

import functools

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MANTISSA = 2.0 ** -53
_MASK = 0xFFFFFFFFFFFFFFFF


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _mix_int(x: int) -> int:
    """`_mix` of one Python int."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


@functools.lru_cache(maxsize=64)
def _counters(stream: int, count: int) -> np.ndarray:
    """The counters of a stream's first `count` draws: distinct for every (stream, draw index)."""
    return (np.arange(count, dtype=np.uint64) + np.uint64((stream & 0xFFFF) << 32)) * _GOLDEN


def uniforms(seed: int, positions, stream: int, count: int) -> np.ndarray:
    """(N, count) float64 in [0, 1): column j holds the j-th number of each position's `stream`."""
    t = np.asarray(positions, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        key = _mix(t * _GOLDEN ^ np.uint64(_mix_int((seed + 0x9E3779B97F4A7C15) & _MASK)))  # one key per position
        bits = _mix(key[:, None] + _counters(stream, count))  # and one number per (position, stream, draw)
    return (bits >> np.uint64(11)).astype(np.float64) * _MANTISSA


class Draws:
    """A batch's numbers handed out column by column, as a per-sample generator hands out its draws:
    each call takes the next number of every sample, whether or not a sample then uses it (so a
    sample's later draws never depend on an earlier outcome)."""

    def __init__(self, seed: int, positions, stream: int, count: int = 8) -> None:
        self.u = uniforms(seed, positions, stream, count)
        self._next = 0

    def random(self) -> np.ndarray:
        """The next number of every sample, uniform in [0, 1)."""
        if self._next >= self.u.shape[1]:
            raise IndexError(f"a preset drew more than the {self.u.shape[1]} numbers per sample it was given")
        column = self.u[:, self._next]
        self._next += 1
        return column

    def skip(self, n: int) -> None:
        """Pass over the next `n` numbers (a draw whose outcome is known)."""
        self._next += n

    def integers(self, low, high=None) -> np.ndarray:
        """Integers uniform in [low, high) (or [0, low)), per sample; bounds may be arrays."""
        if high is None:
            low, high = 0, low
        low, high = np.asarray(low, np.int64), np.asarray(high, np.int64)
        return low + np.minimum((self.random() * (high - low)).astype(np.int64), high - low - 1)

    def uniform(self, low: float, high: float) -> np.ndarray:
        """Floats uniform in [low, high), per sample."""
        return low + (high - low) * self.random()
