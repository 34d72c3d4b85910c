"""The training loop: a `Trainer` holds every piece of a run and its typed `TrainState`.

Every stateful piece (model, optimizer, schedule, EMA, GradScaler, the trainer's own counters) is
registered once, in the run's `segdist.checkpoint.Pieces` (built by segdist.train.setup.build_parts,
the GradScaler added here once the accelerator made it): the same registry restores a resumed run and
saves every checkpoint. A new piece of training state is one more entry there.

Ordering rules that a resume's exactness depends on are the code's structure, not comments:
- `_start_data` makes the loader's iterator and only then restores the checkpoint's RNG state
  (iterating a DataLoader draws from it), and it is the last thing the constructor does;
- `evaluate` goes through segdist.evaluate.evaluate, which gives every rank rank 0's BatchNorm
  statistics before it counts.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from segdist import report
from segdist.checkpoint import load_rng_state, prune_checkpoints, publish_copy, save_checkpoint, seed_rng, set_rng_state
from segdist.data.manifest import Manifest
from segdist.data.sample import decode_sample, read_shard
from segdist.data.sampling import class_probabilities
from segdist.data.stream import GlobalBatches, TrainStream, train_loader
from segdist.distributed import StopSignal, loader_workers
from segdist.evaluate import evaluate, predict_sample
from segdist.fileio import atomic_write_text
from segdist.inference import InferenceMode
from segdist.metrics import format_table
from segdist.recipe import Recipe, dumps_toml
from segdist.telemetry import StepMeter
from segdist.tracking import Tracking
from segdist.train.setup import Parts, Setup
from segdist.train.state import TrainState, metrics_folder
from segdist.train.step import StepOutcome, train_step

log = logging.getLogger("segdist")


class Trainer:
    """One run's pieces, prepared for the accelerator, and the loop over them."""

    def __init__(self, r: Recipe, setup: Setup, parts: Parts, accelerator, stop: StopSignal, meter: StepMeter) -> None:
        """`setup` and `parts` were checked and built before the process group formed (segdist.train.setup)."""
        self.r, self.setup, self.accelerator, self.stop, self.meter = r, setup, accelerator, stop, meter
        self.state: TrainState = parts.state
        self.precision = setup.precision
        # Resolved once: the loader, the layout a resume compares and the log all see this count.
        self.num_workers, self.num_workers_reason = loader_workers(r.data.num_workers)
        self.world_changed = False
        # Samples per optimizer step over all ranks: the same as the checkpoint's (check_run refused another).
        self.state.global_batch = accelerator.num_processes * r.data.batch_size * r.train.grad_accum
        self.state.seed = r.train.seed
        self.state.manifests = {"train": setup.train_manifest.sha256, "val": setup.val_manifest.sha256}
        if setup.resume_from is not None:
            log.info("resumed from %s at step %d (sample %d of the run)", setup.resume_from, self.state.step,
                     self.state.position)
            if r.train.init_from is not None:
                log.info("train.init_from = %s not used: a resumed run continues from its own checkpoint "
                         "(init_from only starts a new run)", r.train.init_from)
            self._log_layout_change()
        elif setup.init_from is not None:
            log.info("model weights from %s (train.init_from); optimizer, schedule, step and data position start "
                     "afresh", setup.init_from)
        self.state.layout = {"world_size": accelerator.num_processes, "num_workers": self.num_workers,
                             "batch_size": r.data.batch_size, "grad_accum": r.train.grad_accum,
                             "precision": self.precision.name, "precision_reason": self.precision.reason}
        _check_ranks_agree(accelerator, self.state.step)
        # The scheduler is deliberately not prepared: a prepared one steps once per process (docs/design-notes.md).
        self.model, self.optimizer = accelerator.prepare(parts.model, parts.optimizer)
        self.scheduler, self.loss_fn, self.ema, self.transform = parts.scheduler, parts.loss_fn, parts.ema, parts.transform
        self.colour, self.reduce_for = parts.colour, parts.reduce_for
        self.scaler = accelerator.scaler  # Accelerate's GradScaler under fp16, else None
        self.pieces = parts.pieces  # restored before the group formed; saved from the prepared wrappers
        self.pieces.prepared(model=self.model, optimizer=self.optimizer)
        self.pieces.add(scaler=self.scaler)  # a piece like the others, restored now that it exists
        self.inference = InferenceMode.from_recipe(r)
        self.run_dir = Path(r.train.run_dir)
        self.recipe_toml = dumps_toml(r)
        # First: a tracker that does not start is one line on every rank, before the run folder is made.
        self.tracking = Tracking.open(r, accelerator, self.state.step, resumed=setup.resume_from is not None)
        if accelerator.is_main_process:
            atomic_write_text(self.run_dir / "recipe.toml", self.recipe_toml)
        self._log_start()
        self.shown = fixed_samples(setup.val_manifest, r.log.images) if accelerator.is_main_process else []
        self.batches = self._start_data()  # last: see the module's docstring

    # -- the loop ----------------------------------------------------------------------------------
    def fit(self) -> dict | None:
        """Optimizer steps up to train.steps, evaluations and checkpoints at fixed steps. A stop
        signal ends it after a step all ranks agree on, with a checkpoint; so do
        `train.max_bad_steps` consecutive non-finite steps (or fp16 overflows), which then raise
        TrainingDiverged. Returns the final val metrics, or None when stopped early."""
        r, state = self.r, self.state
        # A progress bar on a terminal; in a log file (SLURM) log_train writes a line instead.
        bar = tqdm(total=r.train.steps, initial=state.step, desc="train", dynamic_ncols=True,
                   disable=None if self.accelerator.is_main_process else True)
        window, counts = self._draw(), None  # the first step reduces its own counts; then each carries the next's
        losses, metrics = [], None
        try:
            for step in range(state.step + 1, r.train.steps + 1):
                out = self.step(window, counts, last=step == r.train.steps)
                window, counts = out.next_window, out.next_counts
                state.step = step
                bar.update()
                if not out.bad:
                    losses.append(out.loss)
                if step % r.log.every == 0 or step == r.train.steps:
                    self.log_train(bar, losses)
                    losses = []
                due = (r.train.eval_every and step % r.train.eval_every == 0) or step == r.train.steps
                metrics = self.evaluate(step) if due else None
                diverged = state.diverged(r.train.max_bad_steps)
                if metrics is not None or step % r.train.ckpt_every == 0 or diverged or out.stopping:
                    self.checkpoint(step, metrics, force=diverged or out.stopping)
                    self.meter.restart()  # throughput counts training only
                if diverged:
                    raise state.diverged_error(step, r.train.max_bad_steps)
                if out.stopping:
                    log.warning("stopping after step %d on %s", step, self.stop.describe())
                    break
        finally:
            bar.close()
            self.tracking.close()
        return self._finish(metrics)

    def step(self, window: list, counts: list[float] | None, last: bool) -> StepOutcome:
        """One optimizer step (segdist.train.step.train_step), the schedule's step, telemetry, counters."""
        r = self.r
        out = train_step(self.model, self.optimizer, self.loss_fn, window, self.accelerator, r.train.clip_grad_norm,
                         scaler=self.scaler, counts=counts, stop_requested=self.stop.received is not None,
                         fetch_next=None if last else self._draw)
        self.scheduler.step()  # once per optimizer step, applied or skipped: the LR follows the step count
        self.meter.waited(out.data_wait)
        self.meter.stepped(sum(len(m) for _, m, *_ in window), sum(m.numel() for _, m, *_ in window))
        self.state.record(out, self.state.step + 1, r.train.max_bad_steps)
        return out

    def evaluate(self, step: int) -> dict:
        """Exact val metrics; with an EMA the averaged weights are the ones evaluated, drawn and
        ranked for `best`."""
        model = self.ema.module if self.ema is not None else self.accelerator.unwrap_model(self.model)
        manifest = self.setup.val_manifest
        metrics = evaluate(model, manifest, self.accelerator, self.r.eval.batch_size, self.r.eval.num_workers,
                           self.inference)
        log_eval(self.tracking, metrics, manifest, step)
        draw_samples(self.tracking, model, self.shown, manifest, self.accelerator, step, self.inference)
        if self.accelerator.is_main_process:
            report_eval(self.tracking, metrics_folder(self.run_dir, step), metrics, manifest.classes, step)
        return metrics

    def checkpoint(self, step: int, metrics: dict | None, force: bool = False) -> None:
        """`step-N` every ckpt_every steps, at the end and when forced (a stop, a divergence);
        `best` whenever val mIoU improves."""
        r, accelerator = self.r, self.accelerator
        is_best = metrics is not None and metrics["miou"] > self.state.best_miou
        if is_best:
            self.state.best_miou = metrics["miou"]
        if force or step % r.train.ckpt_every == 0 or step == r.train.steps:
            path = save_checkpoint(accelerator, self.run_dir, f"step-{step}", self.pieces, self.recipe_toml)
            if accelerator.is_main_process:
                if is_best:
                    publish_copy(path, "best")
                prune_checkpoints(self.run_dir, r.train.keep_last)  # only now that the new one is complete
            accelerator.wait_for_everyone()
        elif is_best:
            save_checkpoint(accelerator, self.run_dir, "best", self.pieces, self.recipe_toml)

    # -- the pieces of the loop --------------------------------------------------------------------
    def _draw(self) -> list:
        try:
            return [next(self.batches) for _ in range(self.r.train.grad_accum)]
        except Exception:
            # Loader workers decode micro-batches ahead, each on its own: stop them before the error is
            # reported, so that nothing they print (a decoder's complaint about the next bad sample)
            # follows its one line.
            shutdown = getattr(self.batches, "_shutdown_workers", None)  # torch's multi-worker iterator
            if shutdown is not None:
                shutdown()
            raise

    def _start_data(self):
        """This rank's micro-batches from the position reached, then the RNG state: the checkpoint's
        (the one the uninterrupted run had right after it: dropout and drop-path draw from it),
        restored after making the loader's iterator, which draws from it too; on another world size,
        where ranks do not correspond, one derived from the seed, the position and the rank."""
        r, setup, accelerator = self.r, self.setup, self.accelerator
        stream = TrainStream(
            setup.train_manifest, seed=r.train.seed, transform=self.transform, colour=self.colour,
            reduce_for=self.reduce_for, shuffle_buffer=r.data.shuffle_buffer, on_corrupt=r.data.on_corrupt,
            probabilities=setup.draws, in_memory=r.data.in_memory,
        )
        batches = GlobalBatches(accelerator.process_index, accelerator.num_processes, r.data.batch_size,
                                r.train.grad_accum, start=self.state.position)
        loader = iter(train_loader(stream, batches, self.num_workers, pin_memory=accelerator.device.type == "cuda"))
        if setup.resume_from is not None:
            rng = None if self.world_changed else load_rng_state(setup.resume_from, accelerator.process_index)
            if rng is not None:
                set_rng_state(rng)
            else:
                seed_rng(r.train.seed, self.state.position, accelerator.process_index)
        return loader

    def _finish(self, metrics: dict | None) -> dict | None:
        r, accelerator, step = self.r, self.accelerator, self.state.step
        if step < r.train.steps:
            if accelerator.is_main_process:
                print(f"stopped after step {step} of {r.train.steps} on {self.stop.describe()}: checkpoint "
                      f"step-{step} saved in {self.run_dir}/checkpoints; continue with --resume auto", flush=True)
            return None
        if accelerator.is_main_process:
            print(format_table(metrics, self.setup.val_manifest.classes), flush=True)
            print(f"final val mIoU {metrics['miou']:.4f} on {metrics['num_samples']} samples "
                  f"({accelerator.num_processes} processes)", flush=True)
        return metrics

    def _log_start(self) -> None:
        r, accelerator, precision = self.r, self.accelerator, self.precision
        world = accelerator.num_processes
        effective = r.data.batch_size * r.train.grad_accum * world
        log.info("world size %d, effective batch %d = %d per process x %d accumulation x %d processes; device %s",
                 world, effective, r.data.batch_size, r.train.grad_accum, world, accelerator.device)
        log.info("precision %s (%s)", precision.name, precision.reason)
        log.info("data.num_workers %s -> %d loader worker%s per process (%s)", r.data.num_workers, self.num_workers,
                 "" if self.num_workers == 1 else "s", self.num_workers_reason)
        if precision.warning and accelerator.is_main_process:
            log.warning("%s", precision.warning)
        self.tracking.text("run/precision", f"{precision.name}: {precision.reason}", self.state.step)
        if self.setup.draws is not None:
            manifest, data = self.setup.train_manifest, r.data
            p_class = class_probabilities(manifest.class_pixels, data.rare_class_temperature)
            top = ", ".join(f"{manifest.classes[c]} {p_class[c]:.3f}" for c in np.argsort(-p_class)[:5])
            log.info("data.sampling = rare_class (T = %g, min %d pixels): classes picked most often: %s",
                     data.rare_class_temperature, data.rare_class_min_pixels, top)

    def log_train(self, bar, losses: list) -> None:
        tracking, state, accelerator, r, scaler = self.tracking, self.state, self.accelerator, self.r, self.scaler
        perf = self.meter.summary()
        step, lr = state.step, self.scheduler.get_last_lr()[0]
        # The same on every rank (the bad flag is agreed), so this small all-reduce is matched on
        # every rank; the only collective and host sync besides the step's own, and only at log steps.
        mean_loss = accelerator.reduce(torch.stack(losses).mean().detach(), reduction="mean").item() if losses else None
        if mean_loss is not None:
            tracking.scalar("train/loss", mean_loss, step)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", ms=f"{perf['step_time_ms']:.0f}")
        tracking.scalar("train/lr", lr, step)
        tracking.scalar("train/bad_steps", state.bad_steps, step)
        if scaler is not None:
            tracking.scalar("train/overflow_steps", state.overflow_steps, step)
            tracking.scalar("train/loss_scale", scaler.get_scale(), step)
        for key, value in perf.items():
            tracking.scalar(f"perf/{key}", value, step)
        tracking.flush()  # this step's scalars to the trackers now, not at the next log step
        if bar.disable:
            mfu = f", MFU {100 * perf['mfu']:.1f}%" if "mfu" in perf else ""
            log.info("step %d/%d: loss %s, lr %.2e, %.0f ms/step, data wait %.0f%%, %.1f samples/s, %.2f Mpx/s, "
                     "peak mem %.0f MiB%s%s", step, r.train.steps,
                     f"{mean_loss:.4f}" if mean_loss is not None else "-", lr, perf["step_time_ms"],
                     100 * perf["data_wait_share"], perf["samples_per_s"], perf["pixels_per_s"] / 1e6,
                     perf["peak_memory_mb"], mfu, f", {state.bad_steps} skipped steps" if state.bad_steps else "")

    def _log_layout_change(self) -> None:
        """A resume on another layout with the same global batch continues with exactly the samples
        that came next (the G check was check_run's); say what still differs."""
        saved, accelerator, r, precision = self.state.layout, self.accelerator, self.r, self.precision
        if saved.get("precision") not in (None, precision.name):
            log.warning("resuming in %s (%s); the checkpoint was trained in %s: training continues, but not "
                        "bit-identical to an uninterrupted run", precision.name, precision.reason, saved["precision"])
        now = (accelerator.num_processes, r.data.batch_size, r.train.grad_accum)
        before = tuple(saved.get(k) for k in ("world_size", "batch_size", "grad_accum"))
        self.world_changed = saved.get("world_size") != accelerator.num_processes
        if before != now:
            log.info(
                "resuming as %d processes x batch %d x accumulation %d (checkpoint: %s x %s x %s): the same global "
                "batches continue; float summation order and per-micro-batch BatchNorm statistics differ, and the "
                "RNG of dropout is re-derived per rank (docs/training.md)", *now, *before)


def _check_ranks_agree(accelerator, step: int) -> None:
    """Every rank picked its checkpoint on its own (before the group formed): make sure they agree,
    e.g. on a network filesystem that showed a just-written checkpoint to some nodes only."""
    steps = accelerator.gather(torch.tensor([step], device=accelerator.device))
    if bool((steps != step).any()):
        raise RuntimeError(f"ranks start from different steps {steps.tolist()}: do all nodes see the same run folder?")


def fixed_samples(manifest: Manifest, count: int) -> list:
    """The first `count` samples of a split: the same images at every evaluation."""
    out = []
    for path in manifest.sources():
        for sample in read_shard(path):
            if len(out) == count:
                return out
            out.append(decode_sample(sample, manifest.num_classes, manifest.ignore_index))
    return out


def report_eval(tracking: Tracking, folder: Path, metrics: dict, classes: list[str], step: int) -> None:
    """The main process's report of an evaluation: its folder (segdist.report) and, to the trackers,
    the confusion figure, per-class IoU chart and per-class table."""
    confusion = report.confusion_figure(metrics["confusion_matrix"], classes)
    report.write_report(folder, metrics, classes, confusion)
    tracking.image("val/confusion", confusion, step)
    tracking.image("val/per_class_iou", report.iou_bar_chart(metrics, classes), step)
    tracking.text("val/per_class", report.per_class_markdown(metrics, classes), step)
    tracking.flush()


def log_eval(tracking: Tracking, metrics: dict, manifest: Manifest, step: int) -> None:
    tracking.scalar("val/mIoU", metrics["miou"], step)
    tracking.scalar("val/pixel_accuracy", metrics["pixel_accuracy"], step)
    for name, iou in zip(manifest.classes, metrics["per_class_iou"]):
        tracking.scalar(f"val/IoU/{name}", iou, step)
    tracking.flush()
    log.info("step %d: val mIoU %.4f", step, metrics["miou"])


@torch.no_grad()
def draw_samples(tracking: Tracking, model, shown, manifest: Manifest, accelerator, step: int,
                 mode: InferenceMode) -> None:
    """input | truth | prediction strips of the fixed samples, predicted as evaluation predicts."""
    if not shown:
        return
    was_training = model.training
    model.eval()
    for i, (key, image, mask) in enumerate(shown):
        pred = predict_sample(model, image, accelerator, mode)
        tracking.strip(f"val/sample_{i}", image, mask, pred, manifest.palette, manifest.ignore_index, step)
    model.train(was_training)
