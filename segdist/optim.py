"""Optimizer and LR schedule builders; each takes only its own recipe section.

Parameter groups: weight decay on weights only (norms and biases, the 1-D tensors, are not decayed),
and the parameters under the model's `encoder` submodule at `optim.lr * optim.encoder_lr_mult`.

Schedules are multipliers of each group's peak LR at optimizer step t (0-based, the step the LR is
used for), with T = train.steps, W = schedule.warmup_steps, f = schedule.min_lr / optim.lr and
s = min((t - W) / (T - W), 1) the progress of the decay:

    warmup (t < W)   (t + 1) / W                      constant, poly, cosine
    constant         1
    poly             f + (1 - f) (1 - s)^power
    cosine           f + (1 - f) (1 + cos(pi s)) / 2
    onecycle         t <= W-1: 1/25 + (1 - 1/25) t / (W - 1); then linear from 1 at W-1 to f at T-1
                     (torch's OneCycleLR with anneal_strategy="linear", div_factor=25, no momentum cycling)

The warmup, poly and cosine curves equal torch's LinearLR → PolynomialLR / CosineAnnealingLR chained
by SequentialLR, and onecycle equals OneCycleLR; tests/test_optim.py checks all of them against
both the formulas and those torch schedulers. They are applied through one LambdaLR rather than
the torch schedulers themselves because those store their horizon (T_max, total_iters,
total_steps) in their state_dict: resuming a run with a larger train.steps then silently follows
the old curve (a cosine climbs back up after its old end; measured) or, for OneCycleLR, raises
once past the old total. Here the saved state is just the step; the curve comes from the recipe.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR

from segdist.errors import UserError
from segdist.recipe import OptimConfig, ScheduleConfig

ONECYCLE_DIV = 25.0
"""onecycle starts at lr / 25 (torch OneCycleLR's div_factor)."""


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float, encoder_lr_mult: float) -> list[dict]:
    """Up to four groups: (encoder or not) x (decayed weights or norms/biases); empty ones dropped.
    Each group records its `lr_mult`."""
    encoder = getattr(model, "encoder", None)
    if encoder_lr_mult != 1.0 and not isinstance(encoder, torch.nn.Module):
        raise UserError(f"optim.encoder_lr_mult = {encoder_lr_mult} but the model has no `encoder` submodule; set it to 1.0")
    in_encoder = {id(p) for p in encoder.parameters()} if isinstance(encoder, torch.nn.Module) else set()
    buckets: dict[tuple[bool, bool], list] = {(e, d): [] for e in (False, True) for d in (True, False)}
    for p in model.parameters():
        if p.requires_grad:
            buckets[(id(p) in in_encoder, p.ndim > 1)].append(p)
    groups = []
    for (is_encoder, decay), params in buckets.items():
        if params:
            mult = encoder_lr_mult if is_encoder else 1.0
            groups.append({"params": params, "weight_decay": weight_decay if decay else 0.0,
                           "lr": lr * mult, "lr_mult": mult})
    return groups


OPTIMIZERS = ("adamw", "adam", "sgd")

IMPLEMENTATION_ARGS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}
"""optim.implementation as torch's constructor arguments. torch's own default on CPU is the
for-loop; fused took 1.4-1.7 ms against 5.2-8.1 ms per AdamW step of the demo UNet (1.9 M
parameters, 64 tensors, 1 thread) and made its whole train step 2-5 % faster (BENCHMARKS.md)."""


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.lr, cfg.encoder_lr_mult)
    how = IMPLEMENTATION_ARGS[cfg.implementation]
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), **how)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas), **how)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, **how)
    raise UserError(f"optim.name: unknown optimizer {cfg.name!r}; valid names: {', '.join(OPTIMIZERS)}")


SCHEDULES = ("constant", "poly", "cosine", "onecycle")


def lr_factor(cfg: ScheduleConfig, floor: float, total_steps: int, step: int) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based); `floor` = min_lr / lr."""
    w, t = cfg.warmup_steps, step
    if cfg.name == "onecycle":
        if t <= w - 1:
            return 1 / ONECYCLE_DIV + (1 - 1 / ONECYCLE_DIV) * t / (w - 1)
        s = min((t - (w - 1)) / max(total_steps - w, 1), 1.0)
        return 1.0 + (floor - 1.0) * s
    if t < w:
        return (t + 1) / w
    if cfg.name == "constant":
        return 1.0
    s = min((t - w) / max(total_steps - w, 1), 1.0)
    if cfg.name == "poly":
        return floor + (1 - floor) * (1 - s) ** cfg.power
    if cfg.name == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * s))
    raise ValueError(cfg.name)  # build_scheduler checked the name


class RecipeLR(LambdaLR):
    """LambdaLR whose curve and peak LRs always come from the recipe: loading a state restores
    only the step count, then sets every group's LR from the curve (LambdaLR alone would keep the
    saved LRs for one step, and the saved peak LRs for good)."""

    def load_state_dict(self, state_dict: dict) -> None:
        base_lrs = list(self.base_lrs)
        super().load_state_dict(state_dict)
        self.base_lrs = base_lrs
        values = [base * fn(self.last_epoch) for base, fn in zip(self.base_lrs, self.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, values):
            group["lr"] = lr
        self._last_lr = values


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int) -> LambdaLR:
    """Stepped once per optimizer step by the trainer (never prepared: a prepared scheduler steps
    once per process, docs/design-notes.md). `optimizer.defaults["lr"]` is optim.lr (build_optimizer's default)."""
    if cfg.name not in SCHEDULES:
        raise UserError(f"schedule.name: unknown schedule {cfg.name!r}; valid names: {', '.join(SCHEDULES)}")
    if cfg.name == "onecycle" and not 2 <= cfg.warmup_steps < total_steps:
        raise UserError(f"schedule.warmup_steps = {cfg.warmup_steps}: onecycle needs 2 <= warmup_steps < train.steps "
                        f"({total_steps})")
    base = optimizer.defaults["lr"]
    if cfg.min_lr > base:
        raise UserError(f"schedule.min_lr = {cfg.min_lr} exceeds optim.lr = {base}")
    # A partial of a module-level function: LambdaLR saves nothing of it in its state_dict (only
    # callable objects' __dict__), so the curve always comes from the recipe, also on resume.
    return RecipeLR(optimizer, partial(lr_factor, cfg, cfg.min_lr / base, total_steps))
