"""One optimizer step of training, with one collective and one host sync (`train_step`).

The step's loss is normalised exactly over the effective batch (segdist.losses); the valid-pixel
counts of the NEXT window, the loss's non-finite flag and the stop flag travel in one packed
float64 all-reduce that runs during the last backward, so the ranks wait for each other once per
step (in DDP's gradient all-reduce); a step whose loss or gradient is not finite on any rank is
skipped on every rank and leaves no trace (BatchNorm statistics put back); under fp16 the
GradScaler's overflow is told apart from a bad step. What the loop does with the outcome is
segdist.train.trainer's.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass

import torch

from segdist.data.geometry import Placement, place
from segdist.distributed import start_sum
from segdist.preprocess import to_input


@dataclass
class StepOutcome:
    """What one optimizer step did; every flag was summed over the ranks by the step's one collective."""

    loss: torch.Tensor
    """This rank's mean micro-batch loss, left on the device (read at log steps only)."""
    applied: bool
    bad: bool
    """Some rank's loss, or (without loss scaling) the gradient, was not finite: update skipped on every rank."""
    overflow: bool
    """fp16: the scaled gradient overflowed; the GradScaler skipped the update and lowered its scale."""
    stopping: bool
    """Some rank received a stop signal: every rank stops after this step."""
    next_window: list | None
    """The window `fetch_next` drew, its labels already int64 on the device (`on_device`)."""
    next_counts: list[float] | None
    """The loss counts of `next_window`, summed over ranks (what the next step divides by)."""
    data_wait: float
    """Seconds this rank waited for `next_window`."""


class BufferSnapshot:
    """A model's buffers (the norm layers' running statistics), kept before each step so that a
    step that turns out non-finite can put them back. One per model, reused every step: one
    foreach copy into tensors allocated once, the buffers read from the modules that hold them.
    Walking the whole module tree (`model.buffers()`) and cloning each buffer cost 0.32 ms per
    step on the demo UNet (54 buffers); this costs about a tenth of that."""

    _of: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self, model: torch.nn.Module) -> None:
        self.holders = [m for m in model.modules() if m._buffers]
        self.live: list[torch.Tensor] = []
        self.saved: list[torch.Tensor] = []

    @classmethod
    def of(cls, model: torch.nn.Module) -> "BufferSnapshot":
        if model not in cls._of:
            cls._of[model] = cls(model)
        return cls._of[model]

    def keep(self) -> None:
        live = [b for m in self.holders for b in m._buffers.values() if b is not None]
        if len(live) != len(self.live) or any(a is not b for a, b in zip(live, self.live)):
            # first step, or the buffers were replaced (the model moved, say): storage to match
            self.live, self.saved = live, [torch.empty_like(b) for b in live]
        if live:
            torch._foreach_copy_(self.saved, live)

    def restore(self) -> None:
        if self.live:
            with torch.no_grad():
                torch._foreach_copy_(self.live, self.saved)


def on_device(window: list | None, device) -> list | None:
    """A window's labels as the loss reads them: int64 on `device`. A no-op for labels already so
    (the step before moved the next window's); the images stay as the loader gave them (to_input
    moves them). Done once per window, not twice: casting uint8 labels of 512x1024 took 0.35 ms
    for 4 of them and 14.7 ms for 8 (fresh pages every time) on one CPU thread. A batch whose
    geometry runs on the device (it carries a Placement) is warped to its crop here first, so the
    loss counts the placed pixels."""
    if not window:
        return window
    landed = []
    for images, masks, *rest in window:
        if rest and isinstance(rest[0], Placement):
            images, masks = place(images, masks, rest[0], device)
            rest = rest[1:]
        landed.append((images, masks.to(device, non_blocking=True).long(), *rest))
    return landed


def window_counts(loss_fn, masks: list[torch.Tensor]) -> torch.Tensor:
    """Per loss term, the (class-weighted) valid-pixel count of a window's masks (float64, on their device)."""
    return torch.stack([loss_fn.count(m) for m in masks]).sum(0)


def backward(loss: torch.Tensor, accelerator, scaler) -> None:
    """What `accelerator.backward` does for DDP, with the loss scaler explicit (so a real
    GradScaler can drive it anywhere): each micro-batch's loss / accumulation steps."""
    loss = loss / accelerator.gradient_accumulation_steps
    (scaler.scale(loss) if scaler is not None else loss).backward()


def grad_norm(model, clip: float) -> torch.Tensor:
    """The global gradient norm (left on the device), clipping to `clip` when > 0, as
    `accelerator.clip_grad_norm_` computes it for DDP (which would unscale a second time under fp16)."""
    from torch.nn.utils import clip_grads_with_norm_, get_total_norm

    params = [p for p in model.parameters() if p.grad is not None]
    norm = get_total_norm([p.grad for p in params])
    if clip > 0:
        clip_grads_with_norm_(params, clip, norm)
    return norm


def train_step(model, optimizer, loss_fn, window, accelerator, clip: float, *, scaler=None,
               counts: list[float] | None = None, stop_requested: bool = False, fetch_next=None) -> StepOutcome:
    """One optimizer step over `len(window)` micro-batches, with ONE collective and ONE host sync
    besides DDP's gradient all-reduce.

    ce/bce terms are normalised by their (class-weighted) count of valid pixels over the whole
    effective batch (all micro-batches, all ranks: segdist.losses). Those counts must be known
    before the forward, so each step's collective carries the counts of the NEXT window (drawn
    with `fetch_next` once the last micro-batch's forward is issued) together with this step's
    flags: loss not finite, stop requested. It starts before the last backward and travels while
    that runs (segdist.distributed.start_sum), so the ranks meet once per step, in DDP's gradient
    all-reduce, not a second time after it. The gradient needs no flag of its own: DDP left the
    same summed gradient on every rank, so every rank finds the same norm. `counts` are this
    window's (from the step before); None (a first or standalone step) reduces them here, in a
    collective of their own.
    """
    device = accelerator.device
    window = on_device(window, device)
    masks = [m for _, m, *_ in window]
    if counts is None:
        counts = accelerator.reduce(window_counts(loss_fn, masks), reduction="sum").tolist()
    n_terms = len(counts)
    denominators = loss_fn.denominators(counts, accelerator.num_processes * len(window))
    # A step that turns out non-finite must leave no trace: its forward passes also moved the
    # norm layers' running statistics (small: a few numbers per channel), so keep them to put back.
    kept = BufferSnapshot.of(model)
    kept.keep()
    total = torch.zeros((), device=device)
    next_window, data_wait, summed = None, 0.0, None
    for i, ((images, _, *colour), target) in enumerate(zip(window, masks)):
        # accumulate(): no gradient all-reduce until the window's last micro-batch.
        with accelerator.accumulate(model):
            logits = model(to_input(images, device, *colour))  # colour: the jitter factors, if any
            loss = loss_fn(logits.float(), target, denominators)
            total += loss.detach()
            if i == len(window) - 1:
                if not accelerator.sync_gradients:  # the optimizer is stepped directly, past Accelerate's check
                    raise RuntimeError(f"a window of {len(window)} micro-batches did not end an accumulation of "
                                       f"{accelerator.gradient_accumulation_steps}: its gradients would not be "
                                       "all-reduced")
                # On a GPU the forward's kernels are still running: fetch the next window meanwhile.
                tick = time.perf_counter()
                # Its labels go to the device once: the next step gets them there (as `window`).
                next_window = on_device(fetch_next(), device) if fetch_next is not None else None
                next_masks = [m for _, m, *_ in next_window] if next_window else []
                data_wait = time.perf_counter() - tick
                next_local = (window_counts(loss_fn, next_masks) if next_masks
                              else torch.zeros(n_terms, dtype=torch.float64, device=device))
                # Filled on the device: torch.tensor(flag, device=cuda) is a blocking copy, a host sync.
                flags = torch.stack([~torch.isfinite(total), torch.full((), stop_requested, device=device)])
                # THE collective of the step (float64 sums of whole numbers and weights), under way
                # during the backward below.
                summed = start_sum(torch.cat([next_local, flags.to(torch.float64)]))
            backward(loss, accelerator, scaler)
    if scaler is not None:
        scaler.unscale_(getattr(optimizer, "optimizer", optimizer))  # clip and check the true gradient
    # The last backward all-reduced the gradients, so their norm is the same on every rank.
    norm = grad_norm(model, clip)
    # The step's one host sync.
    host = torch.cat([summed(), (~torch.isfinite(norm)).to(torch.float64).reshape(1)]).tolist()
    loss_bad, stopping, grad_bad = (v > 0 for v in host[n_terms:])
    # Skip the update on all ranks or on none, else the replicas' weights drift apart. Under fp16 a
    # non-finite gradient with a finite loss is the scaler's overflow, not a bad step.
    bad = loss_bad or (grad_bad and scaler is None)
    overflow = grad_bad and not bad
    if bad:
        kept.restore()
    elif not overflow:
        # Applies: the window's last micro-batch synced the gradients (checked above), so step the
        # optimizer itself, not Accelerate's wrapper: with a
        # scaler the gradients are unscaled and known finite, and GradScaler.step would read its inf
        # flag back to the host, a second sync; without one the wrapper only adds two package
        # look-ups per step (is_lomo_available, about 70 us).
        getattr(optimizer, "optimizer", optimizer).step()
    if scaler is not None:
        scaler.update()  # grows the scale, or lowers it after an overflow; one update per unscale_
    optimizer.zero_grad(set_to_none=True)
    return StepOutcome(total / len(window), not bad and not overflow, bad, overflow, stopping,
                       next_window, host[:n_terms] if next_window else None, data_wait)
