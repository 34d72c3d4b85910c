"""Optimizer and LR schedule builders; each takes only its own recipe section."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from segdist.errors import UserError
from segdist.recipe import OptimConfig, ScheduleConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weights only: norms and biases (1-D tensors) are not decayed."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


OPTIMIZERS = ("adamw", "adam", "sgd")


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    raise UserError(f"optim.name: unknown optimizer {cfg.name!r}; valid names: {', '.join(OPTIMIZERS)}")


SCHEDULES = ("constant", "poly", "cosine")


def lr_factor(cfg: ScheduleConfig, base_lr: float, total_steps: int, step: int) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based): linear warmup, then decay."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.name == "constant":
        return 1.0
    span = max(total_steps - cfg.warmup_steps, 1)
    t = min((step - cfg.warmup_steps) / span, 1.0)
    floor = cfg.min_lr / base_lr
    if cfg.name == "poly":
        return floor + (1 - floor) * (1 - t) ** cfg.power
    if cfg.name == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    raise UserError(f"schedule.name: unknown schedule {cfg.name!r}; valid names: {', '.join(SCHEDULES)}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int) -> LambdaLR:
    """Stepped once per optimizer step by the engine (never prepared: a prepared scheduler steps
    once per process, FACTS)."""
    base = optimizer.param_groups[0]["lr"]
    lr_factor(cfg, base, total_steps, 0)  # unknown names fail now, not at the first step
    return LambdaLR(optimizer, lambda step: lr_factor(cfg, base, total_steps, step))
