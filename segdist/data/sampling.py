"""How often each training sample is drawn: `data.sampling`.

- "uniform": each pass over the split yields every sample once (in shuffled order).
- "rare_class": rare-class sampling as in DAFormer (Hoyer, Dai, Van Gool, "DAFormer: Improving
  Network Architectures and Training Strategies for Domain-Adaptive Semantic Segmentation",
  CVPR 2022, Sec. 3.3 "Rare Class Sampling", Eq. 6). With f_c the share of class c among the
  split's labelled pixels and T = `data.rare_class_temperature`, class c is picked with

      P(c) = exp((1 - f_c) / T) / sum_c' exp((1 - f_c') / T)

  and then one of the n_c samples that hold at least `data.rare_class_min_pixels` pixels of c,
  uniformly. So sample i is drawn with P(i) = sum over its classes c of P(c) / n_c. A smaller T
  favours rare classes more (DAFormer uses T = 0.01, and 3000 pixels at 1024x512); a large T
  tends to picking every class equally often, not to uniform sampling.

A pass still has N draws (N = the split's samples), made as one multinomial draw over the N
samples from a generator seeded by (seed, pass): the same on every rank and worker. The pass's
order (segdist.data.stream.PassOrder) holds each sample as often as it was drawn (0 times: passed
over), so a pass still has N positions and the run stays a pure function of the seed and the global
batch: deterministic, position-exact on resume, on any layout.
"""

from __future__ import annotations

import numpy as np

from segdist.errors import UserError

SAMPLING = ("uniform", "rare_class")


def class_probabilities(class_pixels, temperature: float, present=None) -> np.ndarray:
    """P(c) of DAFormer's Eq. 6 from the split's pixels per class. Classes in no sample (`present`
    False, by default: no pixels) get 0, and the rest are renormalised."""
    pixels = np.asarray(class_pixels, dtype=np.float64)
    present = pixels > 0 if present is None else np.asarray(present, dtype=bool)
    if not present.any():
        raise UserError("rare_class sampling: no class is present in the training split")
    logits = (1.0 - pixels / pixels.sum()) / temperature
    logits = np.where(present, logits, -np.inf)
    weights = np.exp(logits - logits[present].max())
    return weights / weights.sum()


def sample_probabilities(manifest, temperature: float, min_pixels: int = 0) -> np.ndarray:
    """P(i) of every sample of a split, in manifest order (shard by shard)."""
    missing = [s.file for s in manifest.shards if s.sample_classes is None]
    if missing:
        raise UserError(
            f"data.sampling = \"rare_class\" needs each sample's classes, which the manifest of split "
            f"{manifest.split!r} in {manifest.root} does not hold (shard {missing[0]}): re-run its conversion "
            "with this version of launch/shard.py, or set data.sampling = \"uniform\""
        )
    samples = [dict(map(tuple, classes)) for shard in manifest.shards for classes in shard.sample_classes]
    n = manifest.num_classes
    holds = np.zeros((len(samples), n), dtype=bool)
    for i, classes in enumerate(samples):
        for c, pixels in classes.items():
            holds[i, c] = pixels >= max(min_pixels, 1)
    per_class = holds.sum(0)
    p_class = class_probabilities(manifest.class_pixels, temperature, present=per_class > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(per_class > 0, p_class / np.maximum(per_class, 1), 0.0)
    return holds.astype(np.float64) @ share


def draws(probabilities: np.ndarray, seed: int, pass_index: int) -> np.ndarray:
    """How often each sample is drawn in pass `pass_index`: N draws in all, the same on every rank."""
    rng = np.random.default_rng([seed, pass_index, 3])
    p = probabilities / probabilities.sum()
    return rng.multinomial(len(p), p)


def training_draws(manifest, data) -> np.ndarray | None:
    """P(i) for a TrainStream under a recipe's `[data]`; None for uniform passes. Checked before
    training: a manifest without per-sample classes is a one-line UserError."""
    if data.sampling == "uniform":
        return None
    return sample_probabilities(manifest, data.rare_class_temperature, data.rare_class_min_pixels)
