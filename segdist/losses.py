"""Losses: a weighted sum of terms; cross-entropy terms normalised exactly over the effective batch.

`build_loss` returns a `WeightedSum`. Its contract with the train step (segdist.train.step.train_step):

    counts = sum over the window's micro-batches of loss_fn.count(target)   # one number per term
    counts = all-reduce(counts, sum)        # packed into the previous step's one collective
    denominators = loss_fn.denominators(counts, world * accum)
    loss = loss_fn(logits, target, denominators)                             # per micro-batch

The exact terms, `ce` (multi-class) and `bce` (binary), return the SUM of their per-pixel losses over
the micro-batch divided by their denominator = (sum over the effective batch of the weights of
the valid pixels) / (world x accum). After accelerate divides each micro-batch loss by `accum`
and DDP averages over ranks, the gradient is exactly that of sum(w_i l_i) / sum(w_i) over every
valid pixel i of the effective batch — the single-batch mean, however unevenly the valid (or
heavily weighted) pixels fall on micro-batches and ranks. Without class weights w_i = 1 and the
denominator counts valid pixels. (This equals PyTorch's `reduction="mean"` with `weight=`.)

The other terms are means over their micro-batch (Dice and Lovasz are not sums over pixels), so
the step averages them over micro-batches and ranks.

Binary models (`model.classes = 1`) output one logit per pixel; targets are 0/1 and the ignore
index. Class weights (given, or derived from the train manifest's per-class pixel counts) weigh
`ce` and `bce` per pixel by the pixel's true class; for a binary model they are [background, foreground].
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from segdist.errors import UserError
from segdist.recipe import LossConfig


def _per_device(weights: torch.Tensor | None, cache: dict, device: torch.device) -> torch.Tensor | None:
    if weights is None:
        return None
    if device not in cache:
        cache[device] = weights.to(device)
    return cache[device]


class _ExactTerm:
    """A per-pixel term whose sum the train step divides by the effective batch's (weighted) count."""

    exact = True

    def __init__(self, ignore_index: int, label_smoothing: float = 0.0, class_weights: torch.Tensor | None = None):
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.class_weights = class_weights
        self._weights: dict = {}


class CrossEntropy(_ExactTerm):
    """Multi-class cross-entropy with ignore index, label smoothing and class weights; exact."""

    def count(self, target: torch.Tensor) -> torch.Tensor:
        """The (weighted) number of valid pixels of `target`, float64."""
        valid = target != self.ignore_index
        w = _per_device(self.class_weights, self._weights, target.device)
        if w is None:
            return valid.sum().to(torch.float64)
        # No boolean indexing: its output size is data-dependent, a host sync on CUDA every step.
        return torch.where(valid, w.to(torch.float64)[torch.where(valid, target, 0)], 0.0).sum()

    def __call__(self, logits: torch.Tensor, target: torch.Tensor, denominator: float | None) -> torch.Tensor:
        total = F.cross_entropy(
            logits, target, weight=_per_device(self.class_weights, self._weights, logits.device),
            ignore_index=self.ignore_index, reduction="sum", label_smoothing=self.label_smoothing,
        )
        if denominator is None:  # alone: the mean over this batch
            denominator = _nonzero(float(self.count(target)))
        return total / denominator


class BinaryCrossEntropy(_ExactTerm):
    """BCE with logits for a one-logit model: ignore index, label smoothing, class weights; exact
    like `CrossEntropy` (the sum over valid pixels divided by the effective batch's weighted count)."""

    def _pixel_weights(self, target: torch.Tensor) -> torch.Tensor:
        """Each pixel's weight: its class's (1 without class weights), 0 where ignored."""
        valid = target != self.ignore_index
        w = _per_device(self.class_weights, self._weights, target.device)
        if w is None:
            return valid.float()
        return torch.where(valid, w[torch.where(valid, target, 0)], 0.0)

    def count(self, target: torch.Tensor) -> torch.Tensor:
        return self._pixel_weights(target).sum(dtype=torch.float64)

    def __call__(self, logits: torch.Tensor, target: torch.Tensor, denominator: float | None) -> torch.Tensor:
        weights = self._pixel_weights(target)
        y = torch.where(target != self.ignore_index, target, 0).to(logits.dtype)
        if self.label_smoothing:
            y = y * (1.0 - self.label_smoothing) + 0.5 * self.label_smoothing
        total = F.binary_cross_entropy_with_logits(logits[:, 0], y, weight=weights.to(logits.dtype), reduction="sum")
        if denominator is None:
            denominator = _nonzero(float(weights.sum(dtype=torch.float64)))
        return total / denominator


class StructuralSimilarity:
    """Correlation-maximised structural similarity loss (Zhao et al., 2019), binary, as the PH2 lesion
    study trained with it: target and (detached) prediction are standardised over each pixel's
    `window` x `window` neighbourhood, e = |difference|; pixels with e > beta * max(e) (per image)
    are the hard ones, and the loss is their BCE weighted by e, summed over the micro-batch and
    divided by the number of hard pixels. Ignored pixels take no part."""

    exact = False

    def __init__(self, ignore_index: int, *, window: int = 3, beta: float = 0.1, eps: float = 0.01) -> None:
        if window < 1 or window % 2 == 0:
            raise UserError(f"loss term structural: window must be an odd number >= 1, got {window}")
        self.ignore_index, self.window, self.beta, self.eps = ignore_index, window, beta, eps

    def _standardise(self, x: torch.Tensor) -> torch.Tensor:
        k = self.window
        mean = F.avg_pool2d(x, k, stride=1, padding=k // 2, count_include_pad=False)
        var = (F.avg_pool2d(x * x, k, stride=1, padding=k // 2, count_include_pad=False) - mean**2).clamp_min(0)
        return (x - mean + self.eps) / (var.sqrt() + self.eps)

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = (target != self.ignore_index)[:, None]
        y = torch.where(valid, target[:, None], 0).to(logits.dtype)
        with torch.no_grad():
            e = (self._standardise(y) - self._standardise(torch.sigmoid(logits))).abs() * valid
            hard = (e > self.beta * e.amax(dim=(1, 2, 3), keepdim=True)) & valid
        bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
        return (bce * e * hard).sum() / max(int(hard.sum()), 1)


class SmpTerm:
    """A loss from smp.losses, computed as the mean over its micro-batch."""

    exact = False

    def __init__(self, fn: Callable, binary: bool) -> None:
        self.fn = fn
        self.binary = binary

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # smp's binary losses want the target shaped like the logits (N, 1, H, W), as floats.
        return self.fn(logits, target[:, None].to(logits.dtype) if self.binary else target)


def _nonzero(x: float) -> float:
    return x if x > 0 else 1.0  # no valid pixel: the sum is 0 too, any denominator gives 0


# name → (smp.losses class name or None for ours, binary allowed, multi-class allowed)
TERMS: dict[str, tuple[str | None, bool, bool]] = {
    "ce": (None, False, True),
    "bce": (None, True, False),
    "structural": (None, True, False),
    "dice": ("DiceLoss", True, True),
    "focal": ("FocalLoss", True, True),
    "jaccard": ("JaccardLoss", True, True),
    "lovasz": ("LovaszLoss", True, True),
    "tversky": ("TverskyLoss", True, True),
    "soft_ce": ("SoftCrossEntropyLoss", False, True),
    "soft_bce": ("SoftBCEWithLogitsLoss", True, False),
}
SMP_RESERVED = {"mode", "ignore_index", "from_logits", "reduction"}
SMP_DEFAULTS = {"soft_ce": {"smooth_factor": 0.0}}
"""Where smp's own default fails: SoftCrossEntropyLoss() computes None / classes (smp 0.6.0)."""


class WeightedSum:
    """sum_t weight_t * term_t(logits, target); see the module docstring for `count`/`denominators`."""

    def __init__(self, terms: list[tuple[str, float, Any]]) -> None:
        self.terms = terms

    def count(self, target: torch.Tensor) -> torch.Tensor:
        """One float64 number per term: its weighted valid-pixel count in `target` (0 for mean terms)."""
        zero = torch.zeros((), dtype=torch.float64, device=target.device)
        return torch.stack([fn.count(target) if fn.exact else zero for _, _, fn in self.terms])

    def denominators(self, counts: torch.Tensor | list[float], parts: int) -> list[float | None]:
        """Per term: its count over the whole effective batch / (world x accum); None for mean terms.
        `counts` already on the host (a list) costs no device sync here."""
        counts = counts.tolist() if isinstance(counts, torch.Tensor) else counts
        return [_nonzero(float(c)) / parts if fn.exact else None for c, (_, _, fn) in zip(counts, self.terms)]

    def __call__(self, logits: torch.Tensor, target: torch.Tensor,
                 denominators: list[float | None] | None = None) -> torch.Tensor:
        total = torch.zeros((), dtype=logits.dtype, device=logits.device)
        for i, (_, weight, fn) in enumerate(self.terms):
            value = fn(logits, target, None if denominators is None else denominators[i]) if fn.exact else fn(logits, target)
            total = total + weight * value
        return total


def derive_class_weights(mode: str, class_pixels: list[int]) -> list[float]:
    """Weights from per-class pixel counts n_c (N = sum, C classes, f_c = n_c / N); 0 for absent classes:
    inverse = N / (C n_c); sqrt_inverse = its square root; median_frequency = median(f) / f_c (over
    present classes). Only their ratios matter: ce/bce divide by the weighted pixel count."""
    total = sum(class_pixels)
    present = [n for n in class_pixels if n > 0]
    if total <= 0:
        raise UserError("loss.class_weighting: the train manifest counts no valid pixel")
    if mode == "inverse":
        return [total / (len(class_pixels) * n) if n else 0.0 for n in class_pixels]
    if mode == "sqrt_inverse":
        return [math.sqrt(total / (len(class_pixels) * n)) if n else 0.0 for n in class_pixels]
    if mode == "median_frequency":
        freqs = sorted(n / total for n in present)
        mid = len(freqs) // 2
        median = freqs[mid] if len(freqs) % 2 else 0.5 * (freqs[mid - 1] + freqs[mid])
        return [median / (n / total) if n else 0.0 for n in class_pixels]
    raise ValueError(mode)  # LossConfig checked the name


def class_weights_of(cfg: LossConfig, num_classes: int, class_pixels: list[int] | None) -> torch.Tensor | None:
    """The ce/bce class weights: given, derived from `class_pixels`, or None (all 1)."""
    if cfg.class_weights is not None:
        if len(cfg.class_weights) != num_classes:
            raise UserError(f"loss.class_weights has {len(cfg.class_weights)} entries, the dataset has {num_classes} "
                            "classes (a binary model's are [background, foreground])")
        return torch.tensor(cfg.class_weights, dtype=torch.float32)
    if cfg.class_weighting == "none":
        return None
    if class_pixels is None or len(class_pixels) != num_classes:
        raise UserError("loss.class_weighting needs the train manifest's class_pixels: re-run the conversion")
    return torch.tensor(derive_class_weights(cfg.class_weighting, class_pixels), dtype=torch.float32)


def build_loss(cfg: LossConfig, classes: int, ignore_index: int, class_pixels: list[int] | None = None) -> WeightedSum:
    """`classes` = model outputs (1 = binary); `class_pixels` = the train manifest's per-class counts."""
    binary = classes == 1
    weights = class_weights_of(cfg, 2 if binary else classes, class_pixels)
    terms = []
    for i, term in enumerate(cfg.terms):
        name, where = term["name"], f"loss.terms[{i}]"
        if name not in TERMS:
            raise UserError(f"{where}.name: unknown loss {name!r}; valid names: {', '.join(TERMS)}")
        weight = term.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise UserError(f"{where}.weight must be a number, got {weight!r}")
        smp_name, for_binary, for_multiclass = TERMS[name]
        if binary and not for_binary:
            raise UserError(f"{where}: {name!r} is a multi-class loss but model.classes = 1 (binary): use "
                            + ("\"bce\"" if name == "ce" else "\"soft_bce\"" if name == "soft_ce" else "a binary loss"))
        if not binary and not for_multiclass:
            raise UserError(f"{where}: {name!r} needs a binary model (model.classes = 1); this one has {classes} "
                            "outputs" + (": use \"ce\"" if name == "bce" else ""))
        options = {k: v for k, v in term.items() if k not in ("name", "weight")}
        terms.append((name, float(weight), _make_term(name, smp_name, options, binary, ignore_index, cfg, weights, where)))
    return WeightedSum(terms)


def _make_term(name: str, smp_name: str | None, options: dict, binary: bool, ignore_index: int, cfg: LossConfig,
               weights: torch.Tensor | None, where: str):
    if name in ("ce", "bce"):
        if options:
            raise UserError(f"{where}: {name!r} takes no options ({', '.join(options)}); its label smoothing and "
                            "class weights are loss.label_smoothing, loss.class_weights and loss.class_weighting")
        cls = CrossEntropy if name == "ce" else BinaryCrossEntropy
        return cls(ignore_index, cfg.label_smoothing, weights)
    if name == "structural":
        _check_options(StructuralSimilarity, options, {"ignore_index"}, name, where)
        return StructuralSimilarity(ignore_index, **options)
    import segmentation_models_pytorch.losses as L

    cls = getattr(L, smp_name)
    _check_options(cls, options, SMP_RESERVED, name, where)
    params = inspect.signature(cls.__init__).parameters
    fixed: dict[str, Any] = {}
    if "mode" in params:
        fixed["mode"] = "binary" if binary else "multiclass"
    if "ignore_index" in params:
        fixed["ignore_index"] = ignore_index
    try:
        return SmpTerm(cls(**fixed, **{**SMP_DEFAULTS.get(name, {}), **options}), binary)
    except (TypeError, ValueError, AssertionError) as exc:
        raise UserError(f"{where}: smp's {smp_name} rejects {options}: {exc}") from None


def _check_options(cls: type, options: dict, reserved: set[str], name: str, where: str) -> None:
    params = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", *reserved)]
    for key in options:
        if key not in params:
            raise UserError(f"{where}: loss {name!r} has no option {key!r}; its options: {', '.join(params) or 'none'} "
                            "(besides name and weight)")
