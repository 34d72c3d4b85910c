"""Exponential moving average of a model's weights (`model.ema_decay`).

After every real optimizer step (a post-step hook on the torch optimizer, so accumulation
micro-steps and skipped steps never count) each floating-point parameter and buffer of the copy
becomes `d * ema + (1 - d) * live`, with `d = min(ema_decay, (1 + n) / (10 + n))` at the n-th
update: the warm-up keeps the random initial weights from dominating short runs. Integer buffers
(BatchNorm's batch counter) are copied. The copy is evaluated instead of the live weights and saved
in checkpoints as `ema.pt` (plain tensors and numbers: loads with `weights_only=True`).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


class ModelEMA:
    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.source = model
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Fold the source model's current weights into the average."""
        d = self.current_decay()
        live = self.source.state_dict()
        for name, avg in self.module.state_dict().items():
            value = live[name].detach()
            if avg.device != value.device:  # the live model moved to the training device after the copy
                self.module.to(value.device)
                return self.update()
            if avg.is_floating_point():
                avg.mul_(d).add_(value.to(avg.dtype), alpha=1.0 - d)
            else:
                avg.copy_(value)
        self.updates += 1

    @torch.no_grad()
    def reset(self) -> None:
        """Restart the average from the source model's current weights."""
        self.module.load_state_dict(self.source.state_dict())
        self.updates = 0

    def attach(self, optimizer: torch.optim.Optimizer):
        """Update after every step of `optimizer` (the torch optimizer, before accelerate wraps it:
        accelerate's wrapper calls its step only when gradients were synchronised)."""
        return optimizer.register_step_post_hook(lambda *_: self.update())

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates,
                "module": {k: v.detach().cpu() for k, v in self.module.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
