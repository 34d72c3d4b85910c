"""Training: checks a user can fail (before any process group), then the loop.

`train(recipe, resume)` is what `launch/train.py` calls. Every rank takes exactly
`steps x grad_accum` micro-batches from an endless stream, so the ranks stay in lockstep and DDP
never pairs gradients of different steps (FACTS: a stream that runs dry on one rank first
silently corrupts gradients, then hangs).

Faults: SIGTERM/SIGUSR1 end the run after a step all ranks agree on, with a checkpoint (exit 0;
`--resume auto` continues it); a step whose loss or gradient is not finite on any rank is skipped
on all ranks, and `train.max_bad_steps` of them in a row end the run with a checkpoint (exit 3).
Resuming restores weights, optimizer, schedule, every rank's RNG, the step (and so the data
position and the TensorBoard step): an interrupted run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from segdist.checkpoint import (latest_checkpoint, load_checkpoint, load_rng_state, load_scaler_state, prune_checkpoints,
                                publish_copy, save_checkpoint, set_rng_state)
from segdist.data.augment import build_augment
from segdist.data.manifest import Manifest, load_manifest
from segdist.data.stream import TrainStream, decode_sample, read_shard, train_loader
from segdist.distributed import StopSignal, local_world_size, make_accelerator, setup_logging, unused_devices_warning
from segdist.errors import TrainingDiverged, UserError, errors_are_per_rank, user_error_of
from segdist.evaluate import evaluate, predict, to_input
from segdist.fileio import atomic_write_json, atomic_write_text
from segdist.losses import build_loss
from segdist.metrics import format_table
from segdist.models import build_model, check_batch_norms_train, prepare_model
from segdist.models.ema import ModelEMA
from segdist.optim import build_optimizer, build_scheduler
from segdist.precision import Precision, resolve_precision
from segdist.recipe import ModelConfig, Recipe, dumps_toml
from segdist.tblog import TensorBoard
from segdist.telemetry import StepMeter, flops_per_sample, peak_tflops

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger("segdist")


def resolve_classes(cfg: ModelConfig, manifest: Manifest) -> int:
    """Model outputs: the manifest's class count, or 1 (one logit) for a 2-class binary split."""
    n = manifest.num_classes
    if cfg.classes is None:
        return n
    if cfg.classes == n or (cfg.classes == 1 and n == 2):
        return cfg.classes
    raise UserError(
        f"model.classes = {cfg.classes} but split {manifest.split!r} has {n} classes "
        f"({', '.join(manifest.classes[:6])}{', ...' if n > 6 else ''}); set model.classes = {n}"
        + (" (or 1 for one binary logit)" if n == 2 else "")
    )


@dataclass
class Setup:
    """Everything checked before anything is built, created or joined into a process group."""

    recipe: Recipe
    train_manifest: Manifest
    val_manifest: Manifest
    classes: int
    resume_from: Path | None
    start_step: int
    creates_run_dir: bool
    """The run folder did not exist: a run that fails before its first checkpoint removes it."""
    precision: Precision
    """train.precision resolved against this process's device (segdist.precision)."""

    @property
    def finished(self) -> bool:
        return self.resume_from is not None and self.start_step == self.recipe.train.steps


RESUME_MODES = ("no", "must", "auto")


def check_run(recipe: Recipe, resume: str = "no") -> Setup:
    """Fail on user errors with one line, before any process group exists (FACTS) and before
    anything is written (GUIDE: no partial output). `resume`: "no" (refuse a folder holding
    checkpoints), "must" (error without one) or "auto" (resume if there is one, else start)."""
    assert resume in RESUME_MODES, resume
    train_m = load_manifest(recipe.data.root, recipe.data.train_split)
    val_m = load_manifest(recipe.data.root, recipe.data.val_split)
    classes = resolve_classes(recipe.model, train_m)
    if val_m.classes != train_m.classes:
        raise UserError(f"splits {train_m.split!r} and {val_m.split!r} in {recipe.data.root} have different class lists")
    precision = resolve_precision(recipe.train.precision)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if recipe.data.batch_size == 1 and not (recipe.model.sync_bn and torch.cuda.is_available() and world > 1):
        check_batch_norms_train(recipe.model, classes, tuple(recipe.data.crop))
    if recipe.data.batch_size * world > train_m.num_samples:
        raise UserError(
            f"data.batch_size = {recipe.data.batch_size} on {world} process{'es' if world > 1 else ''} exceeds the "
            f"{train_m.num_samples} samples of split {train_m.split!r}; lower data.batch_size"
        )
    for manifest in (train_m, val_m):
        check_shard_sizes(manifest)
    run_dir = Path(recipe.train.run_dir)
    check_writable(run_dir)
    latest = latest_checkpoint(run_dir)
    if resume == "must" and latest is None:
        raise UserError(f"--resume: no complete checkpoint in {run_dir}/checkpoints; start without --resume")
    if resume == "no" and latest is not None:
        raise UserError(
            f"{run_dir} already holds checkpoints (latest {latest.name}): pass --resume to continue, "
            "or set train.run_dir to a new folder"
        )
    resume_from = latest if resume != "no" else None
    start = check_resumable(resume_from, recipe) if resume_from is not None else 0
    return Setup(recipe, train_m, val_m, classes, resume_from, start, creates_run_dir=not run_dir.exists(),
                 precision=precision)


def check_shard_sizes(manifest: Manifest) -> None:
    """One stat per shard instead of hashing them all (verify does that): a tar file is a whole
    number of 512-byte blocks, so a shard cut short by a failed copy almost always shows here."""
    for path in manifest.shard_paths():
        size = path.stat().st_size
        if size == 0 or size % 512:
            raise UserError(
                f"shard {path} is {size} bytes, not a whole number of 512-byte tar blocks: it is truncated; "
                f"run launch/shard.py verify {manifest.root} and re-convert"
            )


def check_writable(run_dir: Path) -> None:
    """The run folder, or the folder it would be created in, takes files; nothing is left behind."""
    existing = run_dir.absolute()
    while not existing.exists():
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, f"{existing} is a file")
        with tempfile.TemporaryFile(dir=existing, prefix=".segdist-probe-"):
            pass
    except OSError as exc:
        raise UserError(f"train.run_dir {run_dir} is not writable ({exc.strerror}); choose another folder") from None


def check_resumable(path: Path, recipe: Recipe) -> int:
    """The step a checkpoint holds, if this recipe can continue from it (same model and optimizer)."""
    step = int(json.loads((path / "state.json").read_text())["step"])
    try:
        saved = tomllib.loads((path / "recipe.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        saved = {}
    for section, key in (("model", "arch"), ("model", "encoder"), ("model", "classes"), ("optim", "name")):
        before = saved.get(section, {}).get(key)
        now = getattr(getattr(recipe, section), key)
        before = None if isinstance(before, str) and before.lower() in ("null", "none") else before
        if key in saved.get(section, {}) and before != now:
            raise UserError(
                f"checkpoint {path} was trained with {section}.{key} = {before!r}, this recipe has {now!r}: "
                f"resume with {path.parent.parent / 'recipe.toml'}, or set train.run_dir to a new folder"
            )
    if step > recipe.train.steps:
        raise UserError(f"checkpoint {path} is at step {step}, past train.steps = {recipe.train.steps}: raise train.steps")
    return step


def fixed_samples(manifest: Manifest, count: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The first `count` samples of a split: the same images at every evaluation."""
    out = []
    for path in manifest.shard_paths():
        for sample in read_shard(path):
            if len(out) == count:
                return out
            out.append(decode_sample(sample, manifest.num_classes, manifest.ignore_index))
    return out


@dataclass
class Parts:
    """What training is made of, built before the process group forms (builders raise UserError)."""

    model: torch.nn.Module
    loss_fn: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    transform: object
    state: dict
    """Trainer state: step, best_miou, bad_steps, bad_in_a_row, overflow_steps, overflow_in_a_row (from the
    checkpoint when resuming)."""
    ema: ModelEMA | None = None
    """EMA of the weights (model.ema_decay > 0): updated by an optimizer hook, evaluated, checkpointed."""


def build_parts(r: Recipe, setup: Setup) -> Parts:
    torch.manual_seed(r.train.seed)  # the same initial weights on every rank and every run
    # Resuming, the weights come from the checkpoint: no pretrained download (the node may be offline).
    model_cfg = dataclasses.replace(r.model, encoder_weights=None) if setup.resume_from else r.model
    model = build_model(model_cfg, setup.classes)
    # The EMA copies the plain model, before compile (a copied compiled forward would call the original).
    ema = ModelEMA(model, r.model.ema_decay) if r.model.ema_decay > 0 else None
    model = prepare_model(model, r.model, "cuda" if torch.cuda.is_available() else "cpu",
                          int(os.environ.get("WORLD_SIZE", "1")))
    ignore = setup.train_manifest.ignore_index
    loss_fn = build_loss(r.loss, setup.classes, ignore, setup.train_manifest.class_pixels)
    optimizer = build_optimizer(model, r.optim)
    if ema is not None:
        ema.attach(optimizer)  # a post-step hook: only applied optimizer steps update the average
    scheduler = build_scheduler(optimizer, r.schedule, r.train.steps)
    transform = build_augment(r.data.augment, tuple(r.data.crop), ignore, r.data.augment_args)
    state = {"step": 0, "best_miou": -1.0, "bad_steps": 0, "bad_in_a_row": 0, "overflow_steps": 0, "overflow_in_a_row": 0}
    if setup.resume_from is not None:
        state.update(load_checkpoint(setup.resume_from, model, optimizer, scheduler, ema))
    return Parts(model, loss_fn, optimizer, scheduler, transform, state, ema)


def train(recipe: Recipe, resume: str | bool = "no") -> dict | None:
    """Train `recipe` (resume: "no", "must" or "auto", see check_run; True = "must"). Returns the
    final val metrics, or None when a stop signal ended the run early (after a checkpoint)."""
    setup = check_run(recipe, {True: "must", False: "no"}.get(resume, resume))
    if setup.finished:
        return report_finished(setup)
    parts = build_parts(recipe, setup)
    stop = StopSignal()  # from here on SIGTERM/SIGUSR1 mean: finish the step, agree, checkpoint, exit 0
    accelerator = make_accelerator(setup.precision, recipe.train.grad_accum)
    errors_are_per_rank()
    setup_logging(accelerator.is_main_process)
    try:
        return run(recipe, setup, parts, accelerator, stop)
    except Exception as exc:
        run_dir = Path(recipe.train.run_dir)
        if user_error_of(exc) and setup.creates_run_dir and latest_checkpoint(run_dir) is None:
            shutil.rmtree(run_dir, ignore_errors=True)  # bad data met mid-run: leave nothing behind
        raise
    finally:
        stop.restore()


def run(r: Recipe, setup: Setup, parts: Parts, accelerator, stop: StopSignal) -> dict | None:
    state = parts.state
    precision = setup.precision
    if setup.resume_from is not None:
        log.info("resumed from %s at step %d", setup.resume_from, state["step"])
        _warn_if_layout_changed(state, accelerator, r, precision)
    _check_ranks_agree(accelerator, state["step"])
    # The scheduler is deliberately not prepared: a prepared one steps once per process (FACTS).
    model, optimizer = accelerator.prepare(parts.model, parts.optimizer)
    scheduler, loss_fn = parts.scheduler, parts.loss_fn
    scaler = accelerator.scaler  # Accelerate's GradScaler under fp16, else None
    if scaler is not None and setup.resume_from is not None:
        load_scaler_state(setup.resume_from, scaler)

    run_dir = Path(r.train.run_dir)
    recipe_toml = dumps_toml(r)
    if accelerator.is_main_process:
        atomic_write_text(run_dir / "recipe.toml", recipe_toml)
    tb = TensorBoard(run_dir, accelerator.is_main_process, purge_step=state["step"] + 1 if state["step"] else None)
    world = accelerator.num_processes
    effective = r.data.batch_size * r.train.grad_accum * world
    log.info("world size %d, effective batch %d = %d per process x %d accumulation x %d processes; device %s",
             world, effective, r.data.batch_size, r.train.grad_accum, world, accelerator.device)
    log.info("precision %s (%s)", precision.name, precision.reason)
    if precision.warning and accelerator.is_main_process:
        log.warning("%s", precision.warning)
    tb.text("run/precision", f"{precision.name}: {precision.reason}", state["step"])
    meter = make_meter(r, setup, accelerator, precision)

    ignore = setup.train_manifest.ignore_index
    stream = TrainStream(
        setup.train_manifest.shard_paths(), rank=accelerator.process_index, world=world, seed=r.train.seed,
        transform=parts.transform,
        num_classes=setup.train_manifest.num_classes, ignore_index=ignore,
        shuffle_buffer=r.data.shuffle_buffer, batch_size=r.data.batch_size,
        start_batch=state["step"] * r.train.grad_accum, on_corrupt=r.data.on_corrupt,
    )
    batches = iter(train_loader(stream, r.data.num_workers, pin_memory=accelerator.device.type == "cuda"))
    shown = fixed_samples(setup.val_manifest, r.log.images) if accelerator.is_main_process else []

    def run_eval(step: int) -> dict:
        # With an EMA the averaged weights are the ones evaluated, drawn and ranked for `best`.
        shown_model = parts.ema.module if parts.ema is not None else accelerator.unwrap_model(model)
        metrics = evaluate(shown_model, setup.val_manifest, accelerator,
                           r.eval.batch_size, r.eval.num_workers)
        log_eval(tb, metrics, setup.val_manifest, step)
        draw_samples(tb, shown_model, shown, setup.val_manifest, accelerator, step)
        if accelerator.is_main_process:
            atomic_write_json(run_dir / "metrics" / f"step-{step}.json", metrics)
        return metrics

    def checkpoint(step: int, metrics: dict | None, force: bool = False) -> None:
        """`step-N` every ckpt_every steps, at the end and when forced (a stop, a divergence);
        `best` whenever val mIoU improves."""
        is_best = metrics is not None and metrics["miou"] > state["best_miou"]
        if is_best:
            state["best_miou"] = metrics["miou"]
        trainer_state = {**state, "step": step, "world_size": world, "num_workers": r.data.num_workers,
                         "precision": precision.name, "precision_reason": precision.reason}
        args = (model, optimizer, scheduler, trainer_state, recipe_toml)
        if force or step % r.train.ckpt_every == 0 or step == r.train.steps:
            path = save_checkpoint(accelerator, run_dir, f"step-{step}", *args, ema=parts.ema, scaler=scaler)
            if accelerator.is_main_process:
                if is_best:
                    publish_copy(path, "best")
                prune_checkpoints(run_dir, r.train.keep_last)  # only now that the new one is complete
            accelerator.wait_for_everyone()
        elif is_best:
            save_checkpoint(accelerator, run_dir, "best", *args, ema=parts.ema, scaler=scaler)

    # The RNG state last: iterating a DataLoader (above) draws from it, and the saved state is the
    # one the uninterrupted run had right after that checkpoint (dropout, drop-path draw from it).
    rng = load_rng_state(setup.resume_from, accelerator.process_index) if setup.resume_from else None
    if rng is not None:
        set_rng_state(rng)
    try:
        metrics = fit(r, model, optimizer, scheduler, loss_fn, batches, accelerator, tb, state,
                      run_eval, checkpoint, stop, scaler, meter)
    finally:
        tb.close()
    if state["step"] < r.train.steps:
        if accelerator.is_main_process:
            print(f"stopped after step {state['step']} of {r.train.steps} on {stop.describe()}: checkpoint "
                  f"step-{state['step']} saved in {run_dir}/checkpoints; continue with --resume auto", flush=True)
        accelerator.end_training()
        return None
    if accelerator.is_main_process:
        print(format_table(metrics, setup.val_manifest.classes), flush=True)
        print(f"final val mIoU {metrics['miou']:.4f} on {metrics['num_samples']} samples "
              f"({world} processes)", flush=True)
    accelerator.end_training()
    return metrics


def make_meter(r: Recipe, setup: Setup, accelerator, precision: Precision) -> StepMeter:
    """Telemetry of the loop; on CUDA also the model's FLOPs and the device's peak, for MFU."""
    device = accelerator.device
    flops = peak = None
    if device.type == "cuda":
        if accelerator.is_local_main_process:
            warning = unused_devices_warning(torch.cuda.device_count(), local_world_size())
            if warning:
                log.warning("%s", warning)
        model_cfg = dataclasses.replace(r.model, encoder_weights=None)
        flops = flops_per_sample(lambda: build_model(model_cfg, setup.classes), tuple(r.data.crop))
        peak = peak_tflops(torch.cuda.get_device_name(device), precision.name, r.log.peak_tflops)
        if flops:
            log.info("model: %.2f GFLOP per training sample (forward + backward); device peak %s TFLOP/s",
                     flops / 1e9, peak if peak else "unknown (set log.peak_tflops for MFU)")
    return StepMeter(accelerator.num_processes, device, flops, peak)


def fit(r: Recipe, model, optimizer, scheduler, loss_fn, batches, accelerator, tb, state: dict,
        run_eval, checkpoint, stop: StopSignal, scaler, meter: StepMeter) -> dict | None:
    """The loop: one optimizer step per iteration; evaluation and checkpoints at fixed steps. A stop
    signal ends it after a step all ranks agree on, with a checkpoint; so do `train.max_bad_steps`
    consecutive non-finite steps (or fp16 overflows), which then raise TrainingDiverged."""
    # A progress bar on a terminal; in a log file (SLURM) log_train writes a line instead.
    bar = tqdm(total=r.train.steps, initial=state["step"], desc="train", dynamic_ncols=True,
               disable=None if accelerator.is_main_process else True)

    def draw() -> list:
        return [next(batches) for _ in range(r.train.grad_accum)]

    tick = time.perf_counter()
    window, counts = draw(), None  # the first step reduces its own counts; each step then carries the next's
    meter.waited(time.perf_counter() - tick)
    losses, metrics = [], None
    for step in range(state["step"] + 1, r.train.steps + 1):
        out = train_step(model, optimizer, loss_fn, window, accelerator, r.train.clip_grad_norm, scaler=scaler,
                         counts=counts, stop_requested=stop.received is not None,
                         fetch_next=draw if step < r.train.steps else None)
        scheduler.step()  # once per optimizer step, applied or skipped: the LR follows the step count
        meter.waited(out.data_wait)
        meter.stepped(sum(len(m) for _, m in window), sum(m.numel() for _, m in window))
        window, counts = out.next_window, out.next_counts
        state["step"] = step
        bar.update()
        record_outcome(state, out, step, r.train.max_bad_steps)
        if not out.bad:
            losses.append(out.loss)
        if step % r.log.every == 0 or step == r.train.steps:
            log_train(tb, bar, losses, scheduler, state, accelerator, r, meter.summary(), scaler)
            losses = []
        metrics = None
        if (r.train.eval_every and step % r.train.eval_every == 0) or step == r.train.steps:
            metrics = run_eval(step)
        diverged = is_diverged(state, r.train.max_bad_steps)
        if metrics is not None or step % r.train.ckpt_every == 0 or diverged or out.stopping:
            checkpoint(step, metrics, force=diverged or out.stopping)
            meter.restart()  # throughput counts training only
        if diverged:
            raise diverged_error(state, step, r.train.max_bad_steps)
        if out.stopping:
            log.warning("stopping after step %d on %s", step, stop.describe())
            break
    bar.close()
    return metrics


def record_outcome(state: dict, out: "StepOutcome", step: int, max_bad_steps: int) -> None:
    """Count skipped steps: a bad one (non-finite loss, or gradient without loss scaling) and an fp16
    overflow (the GradScaler's own skip, which lowers the scale) are counted apart; an applied step
    ends both runs. `train.max_bad_steps` in a row of either ends the training."""
    if out.applied:
        state["bad_in_a_row"] = state["overflow_in_a_row"] = 0
    elif out.bad:
        state["bad_steps"] += 1
        state["bad_in_a_row"] += 1
        log.warning("step %d: non-finite loss or gradient; update skipped (%d in a row, limit train.max_bad_steps = %d)",
                    step, state["bad_in_a_row"], max_bad_steps)
    else:
        state["overflow_steps"] += 1
        state["overflow_in_a_row"] += 1
        if state["overflow_in_a_row"] > 1:
            log.warning("step %d: fp16 gradient overflow, update skipped and loss scale lowered (%d in a row, limit "
                        "train.max_bad_steps = %d)", step, state["overflow_in_a_row"], max_bad_steps)


def is_diverged(state: dict, max_bad_steps: int) -> bool:
    """The same on every rank: the flags were summed over ranks by each step's collective."""
    return max(state["bad_in_a_row"], state["overflow_in_a_row"]) >= max_bad_steps


def diverged_error(state: dict, step: int, max_bad_steps: int) -> TrainingDiverged:
    if state["bad_in_a_row"] >= max_bad_steps:
        n, what = state["bad_in_a_row"], "had a non-finite loss or gradient"
    else:
        n, what = state["overflow_in_a_row"], "overflowed in fp16 although the GradScaler kept lowering the loss scale"
    return TrainingDiverged(
        f"training diverged: steps {step - n + 1}-{step} all {what} (train.max_bad_steps = {max_bad_steps}); their "
        f"updates were skipped, so checkpoint step-{step} holds the weights of step {step - n}; lower optim.lr"
        + (" (or use train.precision = \"bf16\" or \"fp32\")" if what.startswith("overflowed") else "")
        + " and resume with --resume"
    )


def log_train(tb: TensorBoard, bar, losses: list, scheduler, state: dict, accelerator, r: Recipe,
              perf: dict, scaler) -> None:
    step, lr = state["step"], scheduler.get_last_lr()[0]
    # The same on every rank (the bad flag is agreed), so this small all-reduce is matched on every
    # rank; the only collective and host sync besides the step's own, and only at log steps.
    mean_loss = accelerator.reduce(torch.stack(losses).mean().detach(), reduction="mean").item() if losses else None
    if mean_loss is not None:
        tb.scalar("train/loss", mean_loss, step)
        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", ms=f"{perf['step_time_ms']:.0f}")
    tb.scalar("train/lr", lr, step)
    tb.scalar("train/bad_steps", state["bad_steps"], step)
    if scaler is not None:
        tb.scalar("train/overflow_steps", state["overflow_steps"], step)
        tb.scalar("train/loss_scale", scaler.get_scale(), step)
    for key, value in perf.items():
        tb.scalar(f"perf/{key}", value, step)
    if bar.disable:
        mfu = f", MFU {100 * perf['mfu']:.1f}%" if "mfu" in perf else ""
        log.info("step %d/%d: loss %s, lr %.2e, %.0f ms/step, data wait %.0f%%, %.1f samples/s, %.2f Mpx/s, "
                 "peak mem %.0f MiB%s%s", step, r.train.steps,
                 f"{mean_loss:.4f}" if mean_loss is not None else "-", lr, perf["step_time_ms"],
                 100 * perf["data_wait_share"], perf["samples_per_s"], perf["pixels_per_s"] / 1e6,
                 perf["peak_memory_mb"], mfu,
                 f", {state['bad_steps']} skipped steps" if state["bad_steps"] else "")


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
    next_counts: list[float] | None
    """The loss counts of `next_window`, summed over ranks (what the next step divides by)."""
    data_wait: float
    """Seconds this rank waited for `next_window`."""


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
    """One optimizer step over `len(window)` micro-batches, with ONE collective and ONE host sync.

    ce/bce terms are normalised by their (class-weighted) count of valid pixels over the whole
    effective batch (all micro-batches, all ranks: segdist.losses). Those counts must be known
    before the forward, so each step's collective carries the counts of the NEXT window (drawn
    with `fetch_next` while this step's kernels run) together with this step's flags: loss not
    finite, gradient not finite, stop requested. `counts` are this window's (from the step before);
    None (a first or standalone step) reduces them here, in a collective of their own.
    """
    device = accelerator.device
    masks = [m.to(device, non_blocking=True).long() for _, m in window]
    if counts is None:
        counts = accelerator.reduce(window_counts(loss_fn, masks), reduction="sum").tolist()
    denominators = loss_fn.denominators(counts, accelerator.num_processes * len(window))
    # A step that turns out non-finite must leave no trace: its forward passes also moved the
    # norm layers' running statistics (small: a few numbers per channel), so keep them to put back.
    kept = [b.detach().clone() for b in model.buffers()]
    total = torch.zeros((), device=device)
    for (images, _), target in zip(window, masks):
        # accumulate(): no gradient all-reduce until the window's last micro-batch.
        with accelerator.accumulate(model):
            logits = model(to_input(images, device))
            loss = loss_fn(logits.float(), target, denominators)
            backward(loss, accelerator, scaler)
        total += loss.detach()
    # On a GPU the kernels above are still running: fetch the next window meanwhile.
    tick = time.perf_counter()
    next_window = fetch_next() if fetch_next is not None else None
    next_masks = [m.to(device, non_blocking=True).long() for _, m in next_window] if next_window else []
    data_wait = time.perf_counter() - tick
    if scaler is not None:
        scaler.unscale_(getattr(optimizer, "optimizer", optimizer))  # clip and check the true gradient
    # The last backward all-reduced the gradients, so their norm is the same on every rank.
    norm = grad_norm(model, clip)
    n_terms = len(counts)
    next_local = (window_counts(loss_fn, next_masks) if next_masks
                  else torch.zeros(n_terms, dtype=torch.float64, device=device))
    flags = torch.stack([~torch.isfinite(total), ~torch.isfinite(norm),
                         torch.tensor(stop_requested, device=device)]).to(torch.float64)
    # THE collective of the step, and its one host sync (float64 sums of whole numbers and weights).
    summed = accelerator.reduce(torch.cat([next_local, flags]), reduction="sum").tolist()
    loss_bad, grad_bad, stopping = (v > 0 for v in summed[n_terms:])
    # Skip the update on all ranks or on none, else the replicas' weights drift apart. Under fp16 a
    # non-finite gradient with a finite loss is the scaler's overflow, not a bad step.
    bad = loss_bad or (grad_bad and scaler is None)
    overflow = grad_bad and not bad
    if bad:
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), kept):
                buffer.copy_(saved)
    elif not overflow:
        # Applies: sync_gradients is set after the window's last micro-batch. With a scaler the
        # gradients are unscaled and known finite, so step the optimizer itself: GradScaler.step
        # would read its inf flag back to the host, a second sync.
        (getattr(optimizer, "optimizer", optimizer) if scaler is not None else optimizer).step()
    if scaler is not None:
        scaler.update()  # grows the scale, or lowers it after an overflow; one update per unscale_
    optimizer.zero_grad(set_to_none=True)
    return StepOutcome(total / len(window), not bad and not overflow, bad, overflow, stopping,
                       next_window, summed[:n_terms] if next_window else None, data_wait)


def log_eval(tb: TensorBoard, metrics: dict, manifest: Manifest, step: int) -> None:
    tb.scalar("val/mIoU", metrics["miou"], step)
    tb.scalar("val/pixel_accuracy", metrics["pixel_accuracy"], step)
    for name, iou in zip(manifest.classes, metrics["per_class_iou"]):
        tb.scalar(f"val/IoU/{name}", iou, step)
    tb.flush()
    log.info("step %d: val mIoU %.4f", step, metrics["miou"])


@torch.no_grad()
def draw_samples(tb: TensorBoard, model, shown, manifest: Manifest, accelerator, step: int) -> None:
    if not shown:
        return
    was_training = model.training
    model.eval()
    for i, (key, image, mask) in enumerate(shown):
        h, w = mask.shape
        ph, pw = -(-h // 32) * 32, -(-w // 32) * 32
        padded = np.zeros((ph, pw, 3), dtype=np.uint8)
        padded[:h, :w] = image
        with accelerator.autocast():
            logits = model(to_input(torch.from_numpy(padded)[None], accelerator.device))
        pred = predict(logits.float())[0, :h, :w].cpu().numpy()
        tb.strip(f"val/sample_{i}", image, mask, pred, manifest.palette, manifest.ignore_index, step)
    model.train(was_training)


def _warn_if_layout_changed(state: dict, accelerator, r: Recipe, precision: Precision) -> None:
    if state.get("precision", precision.name) != precision.name:
        log.warning("resuming in %s (%s); the checkpoint was trained in %s: training continues, but not "
                    "bit-identical to an uninterrupted run", precision.name, precision.reason, state["precision"])
    if state.get("world_size") != accelerator.num_processes or state.get("num_workers") != r.data.num_workers:
        log.warning(
            "resuming with %d processes x %d workers (checkpoint: %s x %s): training continues, but the "
            "data order differs from an uninterrupted run", accelerator.num_processes, r.data.num_workers,
            state.get("world_size"), state.get("num_workers"),
        )


def _check_ranks_agree(accelerator, step: int) -> None:
    """Every rank picked its checkpoint on its own (before the group formed): make sure they agree,
    e.g. on a network filesystem that showed a just-written checkpoint to some nodes only."""
    steps = accelerator.gather(torch.tensor([step], device=accelerator.device))
    if bool((steps != step).any()):
        raise RuntimeError(f"ranks start from different steps {steps.tolist()}: do all nodes see the same run folder?")


def report_finished(setup: Setup) -> dict | None:
    """A resumed run whose latest checkpoint is at train.steps (a job requeued after its last step)."""
    run_dir = Path(setup.recipe.train.run_dir)
    if os.environ.get("RANK", "0") == "0":
        print(f"{run_dir} already finished: checkpoint {setup.resume_from.name} is at train.steps = "
              f"{setup.recipe.train.steps}; nothing to do", flush=True)
    metrics = run_dir / "metrics" / f"step-{setup.start_step}.json"
    return json.loads(metrics.read_text()) if metrics.is_file() else None
