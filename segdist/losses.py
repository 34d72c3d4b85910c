"""Losses: a weighted sum of terms, with cross-entropy normalised exactly over the effective batch.

`loss(logits, target, ce_denominator)` returns a scalar. The CE term is the SUM of per-pixel CE
divided by `ce_denominator`: the engine passes (valid pixels of the whole effective batch, over all
ranks and accumulation micro-steps) / (world x accum), so that after DDP's mean over ranks and
accelerate's division by the accumulation steps, the gradient is exactly that of the mean CE over
every valid pixel of the effective batch, however unevenly the valid pixels fall.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from segdist.errors import UserError
from segdist.recipe import LossConfig


class CrossEntropy:
    def __init__(self, ignore_index: int, label_smoothing: float = 0.0) -> None:
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing

    def __call__(self, logits: torch.Tensor, target: torch.Tensor, ce_denominator: float | None) -> torch.Tensor:
        total = F.cross_entropy(
            logits, target, ignore_index=self.ignore_index, reduction="sum", label_smoothing=self.label_smoothing
        )
        if ce_denominator is None:
            ce_denominator = max(int((target != self.ignore_index).sum()), 1)
        return total / ce_denominator


class SmpTerm:
    """A mean-type loss from smp.losses, computed per micro-batch."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    def __call__(self, logits, target, ce_denominator):
        return self.fn(logits, target)


def _smp(name: str, classes: int, ignore_index: int) -> Callable:
    import segmentation_models_pytorch.losses as L

    mode = "binary" if classes == 1 else "multiclass"
    makers = {
        "dice": lambda: L.DiceLoss(mode, ignore_index=ignore_index),
        "focal": lambda: L.FocalLoss(mode, ignore_index=ignore_index),
        "jaccard": lambda: L.JaccardLoss(mode),
        "lovasz": lambda: L.LovaszLoss(mode, ignore_index=ignore_index),
        "tversky": lambda: L.TverskyLoss(mode, ignore_index=ignore_index),
    }
    return makers[name]()


TERMS = ("ce", "dice", "focal", "jaccard", "lovasz", "tversky")


class WeightedSum:
    def __init__(self, terms: list[tuple[str, float, Callable]]) -> None:
        self.terms = terms

    def __call__(self, logits, target, ce_denominator=None) -> torch.Tensor:
        return sum(w * fn(logits, target, ce_denominator) for _, w, fn in self.terms)


def build_loss(cfg: LossConfig, classes: int, ignore_index: int) -> WeightedSum:
    terms = []
    for i, term in enumerate(cfg.terms):
        name = term["name"]
        unknown = set(term) - {"name", "weight"}
        if unknown:
            raise UserError(f"loss.terms[{i}]: unknown key {sorted(unknown)[0]!r}; a term has name and weight")
        weight = term.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise UserError(f"loss.terms[{i}].weight must be a number, got {weight!r}")
        if name == "ce":
            fn = CrossEntropy(ignore_index, cfg.label_smoothing)
        elif name in TERMS:
            fn = SmpTerm(_smp(name, classes, ignore_index))
        else:
            raise UserError(f"loss.terms[{i}].name: unknown loss {name!r}; valid names: {', '.join(TERMS)}")
        terms.append((name, float(weight), fn))
    return WeightedSum(terms)
