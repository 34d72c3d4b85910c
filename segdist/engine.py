"""Training: checks a user can fail (before any process group), then the loop.

`train(recipe, resume)` is what `launch/train.py` calls. Every rank takes exactly
`steps x grad_accum` micro-batches from an endless stream, so the ranks stay in lockstep and DDP
never pairs gradients of different steps (FACTS: a stream that runs dry on one rank first
silently corrupts gradients, then hangs).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from segdist.checkpoint import latest_checkpoint, load_checkpoint, publish_copy, save_checkpoint
from segdist.data.augment import build_augment
from segdist.data.manifest import Manifest, load_manifest
from segdist.data.stream import TrainStream, decode_sample, read_shard, train_loader
from segdist.distributed import make_accelerator, setup_logging
from segdist.errors import UserError
from segdist.evaluate import evaluate, predict, to_input
from segdist.fileio import atomic_write_json, atomic_write_text
from segdist.losses import build_loss
from segdist.metrics import format_table
from segdist.models import build_model
from segdist.optim import build_optimizer, build_scheduler
from segdist.recipe import ModelConfig, Recipe, dumps_toml
from segdist.tblog import TensorBoard

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
    """Everything checked and built before the process group forms."""

    recipe: Recipe
    train_manifest: Manifest
    val_manifest: Manifest
    classes: int
    resume_from: Path | None


def check_run(recipe: Recipe, resume: bool) -> Setup:
    """Fail on user errors with one line, before any process group exists (FACTS)."""
    train_m = load_manifest(recipe.data.root, recipe.data.train_split)
    val_m = load_manifest(recipe.data.root, recipe.data.val_split)
    classes = resolve_classes(recipe.model, train_m)
    if val_m.classes != train_m.classes:
        raise UserError(f"splits {train_m.split!r} and {val_m.split!r} in {recipe.data.root} have different class lists")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if recipe.data.batch_size * world > train_m.num_samples:
        raise UserError(
            f"data.batch_size = {recipe.data.batch_size} on {world} processes exceeds the "
            f"{train_m.num_samples} samples of split {train_m.split!r}; lower data.batch_size"
        )
    run_dir = Path(recipe.train.run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"train.run_dir {run_dir} is not writable ({exc.strerror}); choose another folder") from None
    latest = latest_checkpoint(run_dir)
    if resume and latest is None:
        raise UserError(f"--resume: no complete checkpoint in {run_dir}/checkpoints; start without --resume")
    if not resume and latest is not None:
        raise UserError(
            f"{run_dir} already holds checkpoints (latest {latest.name}): pass --resume to continue, "
            "or set train.run_dir to a new folder"
        )
    return Setup(recipe, train_m, val_m, classes, latest if resume else None)


def fixed_samples(manifest: Manifest, count: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The first `count` samples of a split: the same images at every evaluation."""
    out = []
    for path in manifest.shard_paths():
        for sample in read_shard(path):
            if len(out) == count:
                return out
            out.append(decode_sample(sample, manifest.num_classes, manifest.ignore_index))
    return out


def train(recipe: Recipe, resume: bool = False) -> dict:
    setup = check_run(recipe, resume)
    r = recipe
    torch.manual_seed(r.train.seed)  # the same initial weights on every rank and every run
    model = build_model(r.model, setup.classes)
    loss_fn = build_loss(r.loss, setup.classes, setup.train_manifest.ignore_index)
    optimizer = build_optimizer(model, r.optim)
    scheduler = build_scheduler(optimizer, r.schedule, r.train.steps)

    accelerator = make_accelerator(r.train.precision, r.train.grad_accum)
    setup_logging(accelerator.is_main_process)
    state = {"step": 0, "best_miou": -1.0}
    if setup.resume_from is not None:
        state = load_checkpoint(setup.resume_from, model, optimizer, scheduler, accelerator.process_index)
        log.info("resumed from %s at step %d", setup.resume_from, state["step"])
        _warn_if_layout_changed(state, accelerator, r)
    # The scheduler is deliberately not prepared: a prepared one steps once per process (FACTS).
    model, optimizer = accelerator.prepare(model, optimizer)

    run_dir = Path(r.train.run_dir)
    recipe_toml = dumps_toml(r)
    if accelerator.is_main_process:
        atomic_write_text(run_dir / "recipe.toml", recipe_toml)
    tb = TensorBoard(run_dir, accelerator.is_main_process, purge_step=state["step"] + 1 if state["step"] else None)
    world = accelerator.num_processes
    effective = r.data.batch_size * r.train.grad_accum * world
    log.info("world size %d, effective batch %d = %d per process x %d accumulation x %d processes; device %s, %s",
             world, effective, r.data.batch_size, r.train.grad_accum, world, accelerator.device, r.train.precision)

    ignore = setup.train_manifest.ignore_index
    stream = TrainStream(
        setup.train_manifest.shard_paths(), rank=accelerator.process_index, world=world, seed=r.train.seed,
        transform=build_augment(r.data.augment, tuple(r.data.crop), ignore),
        num_classes=setup.train_manifest.num_classes, ignore_index=ignore,
        shuffle_buffer=r.data.shuffle_buffer, batch_size=r.data.batch_size,
        start_batch=state["step"] * r.train.grad_accum,
    )
    batches = iter(train_loader(stream, r.data.num_workers, pin_memory=accelerator.device.type == "cuda"))
    shown = fixed_samples(setup.val_manifest, r.log.images) if accelerator.is_main_process else []

    def run_eval(step: int) -> dict:
        metrics = evaluate(accelerator.unwrap_model(model), setup.val_manifest, accelerator,
                           r.eval.batch_size, r.eval.num_workers)
        log_eval(tb, metrics, setup.val_manifest, step)
        draw_samples(tb, accelerator.unwrap_model(model), shown, setup.val_manifest, accelerator, step)
        if accelerator.is_main_process:
            atomic_write_json(run_dir / "metrics" / f"step-{step}.json", metrics)
        return metrics

    def checkpoint(step: int, metrics: dict | None) -> None:
        """`step-N` every ckpt_every steps and at the end; `best` whenever val mIoU improves."""
        is_best = metrics is not None and metrics["miou"] > state["best_miou"]
        if is_best:
            state["best_miou"] = metrics["miou"]
        trainer_state = {**state, "step": step, "world_size": world, "num_workers": r.data.num_workers}
        args = (model, optimizer, scheduler, trainer_state, recipe_toml)
        if step % r.train.ckpt_every == 0 or step == r.train.steps:
            path = save_checkpoint(accelerator, run_dir, f"step-{step}", *args)
            if is_best and accelerator.is_main_process:
                publish_copy(path, "best")
            accelerator.wait_for_everyone()
        elif is_best:
            save_checkpoint(accelerator, run_dir, "best", *args)

    metrics = fit(r, model, optimizer, scheduler, loss_fn, batches, accelerator, tb, state["step"],
                  ignore, run_eval, checkpoint)
    if accelerator.is_main_process:
        print(format_table(metrics, setup.val_manifest.classes), flush=True)
        print(f"final val mIoU {metrics['miou']:.4f} on {metrics['num_samples']} samples "
              f"({world} processes)", flush=True)
    tb.close()
    accelerator.end_training()
    return metrics


def fit(r: Recipe, model, optimizer, scheduler, loss_fn, batches, accelerator, tb, start: int,
        ignore: int, run_eval, checkpoint) -> dict:
    """The loop: one optimizer step per iteration; evaluation and checkpoints at fixed steps."""
    world, accum = accelerator.num_processes, r.train.grad_accum
    bar = tqdm(total=r.train.steps, initial=start, desc="train", disable=not accelerator.is_main_process,
               dynamic_ncols=True)
    losses, tick, metrics = [], time.perf_counter(), None
    for step in range(start + 1, r.train.steps + 1):
        window = [next(batches) for _ in range(accum)]
        losses.append(train_step(model, optimizer, loss_fn, window, accelerator, r.train.clip_grad_norm, ignore))
        scheduler.step()  # once per optimizer step, whatever the world size
        bar.update()
        if step % r.log.every == 0 or step == r.train.steps:
            # All ranks log at the same steps, so this small all-reduce is matched on every rank.
            mean_loss = accelerator.reduce(torch.stack(losses).mean().detach(), reduction="mean").item()
            elapsed = time.perf_counter() - tick
            tb.scalar("train/loss", mean_loss, step)
            tb.scalar("train/lr", scheduler.get_last_lr()[0], step)
            tb.scalar("perf/samples_per_s", len(losses) * r.data.batch_size * accum * world / elapsed, step)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            losses, tick = [], time.perf_counter()
        metrics = None
        if (r.train.eval_every and step % r.train.eval_every == 0) or step == r.train.steps:
            metrics = run_eval(step)
        if metrics is not None or step % r.train.ckpt_every == 0:
            checkpoint(step, metrics)
            tick = time.perf_counter()  # throughput counts training only
    bar.close()
    return metrics


def train_step(model, optimizer, loss_fn, window, accelerator, clip: float, ignore: int) -> torch.Tensor:
    """One optimizer step over `len(window)` micro-batches; returns the mean loss (detached)."""
    device = accelerator.device
    masks = [m.to(device, non_blocking=True).long() for _, m in window]
    # CE is normalised by the valid pixels of the whole effective batch (all micro-batches, all
    # ranks): one tiny all-reduce per optimizer step buys an exact mean (segdist.losses).
    valid = torch.stack([(m != ignore).sum() for m in masks]).sum().to(torch.int64)
    valid = accelerator.reduce(valid, reduction="sum")
    denominator = max(valid.item(), 1) / (accelerator.num_processes * len(window))
    total = torch.zeros((), device=device)
    for (images, _), target in zip(window, masks):
        # accumulate(): no gradient all-reduce until the window's last micro-batch.
        with accelerator.accumulate(model):
            logits = model(to_input(images, device))
            loss = loss_fn(logits.float(), target, denominator)
            accelerator.backward(loss)
            if accelerator.sync_gradients and clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()  # a no-op until sync_gradients (accelerate's prepared optimizer)
            optimizer.zero_grad(set_to_none=True)
        total += loss.detach()
    return total / len(window)


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


def _warn_if_layout_changed(state: dict, accelerator, r: Recipe) -> None:
    if state.get("world_size") != accelerator.num_processes or state.get("num_workers") != r.data.num_workers:
        log.warning(
            "resuming with %d processes x %d workers (checkpoint: %s x %s): training continues, but the "
            "data order differs from an uninterrupted run", accelerator.num_processes, r.data.num_workers,
            state.get("world_size"), state.get("num_workers"),
        )
