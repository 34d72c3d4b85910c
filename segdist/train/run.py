"""`train(recipe, overrides, resume)`: `segdist.train` in Python (segdist.api) and what
`launch/train.py` calls. The run's setup (segdist.train.setup), then the loop
(segdist.train.trainer.Trainer, whose step is segdist.train.step.train_step).

Every rank takes exactly `steps x grad_accum` micro-batches from an endless stream, so the ranks
stay in lockstep and DDP never pairs gradients of different steps (docs/design-notes.md: a stream
that runs dry on one rank first silently corrupts gradients, then hangs).

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
import os
import shutil
from pathlib import Path
from typing import Sequence

import torch

from segdist.checkpoint import latest_checkpoint
from segdist.distributed import (StopSignal, forget_accelerator, local_world_size, make_accelerator, setup_logging,
                                 unused_devices_warning)
from segdist.errors import UserError, mark_per_rank, user_error_of
from segdist.models import build_model
from segdist.precision import Precision
from segdist.recipe import Recipe, resolve_recipe
from segdist.telemetry import StepMeter, flops_per_sample, peak_tflops
from segdist.train.setup import Setup, build_parts, check_run
from segdist.train.state import metrics_folder
from segdist.train.trainer import Trainer

log = logging.getLogger("segdist")


RESUME = {False: "no", True: "must", "auto": "auto"}
"""`resume` as the Python API takes it -> as check_run takes it."""


def train(recipe: Recipe | str | os.PathLike, overrides: Sequence[str] | str = (),
          resume: bool | str = False) -> dict | None:
    """Train `recipe` (a TOML path or a loaded Recipe) with `overrides` (`--set` strings) applied.
    `resume`: False starts a new run (refused where train.run_dir holds checkpoints), True
    continues the latest complete checkpoint there (an error without one), "auto" continues if there
    is one, else starts. Returns the final val metrics (what metrics/step-N/metrics.json holds),
    or None when a stop signal ended the run early (after a checkpoint). This is `segdist.train`."""
    mode = RESUME.get(resume) if isinstance(resume, (bool, str)) else None
    if mode is None:
        raise UserError(f"resume must be False, True or \"auto\", got {resume!r}")
    setup = check_run(resolve_recipe(recipe, overrides), mode)
    recipe = setup.recipe  # train.grad_accum resolved against the world size
    if setup.finished:
        return report_finished(setup)
    parts = build_parts(recipe, setup)
    stop = StopSignal()  # from here on SIGTERM/SIGUSR1 mean: finish the step, agree, checkpoint, exit 0
    accelerator = make_accelerator(setup.precision, recipe.train.grad_accum)
    setup_logging(accelerator.is_main_process)
    try:
        meter = make_meter(recipe, setup, accelerator, setup.precision)
        metrics = Trainer(recipe, setup, parts, accelerator, stop, meter).fit()
        accelerator.end_training()
        return metrics
    except Exception as exc:
        mark_per_rank(exc)  # the group exists: this error may be this rank's alone
        run_dir = Path(recipe.train.run_dir)
        if user_error_of(exc) and setup.creates_run_dir and latest_checkpoint(run_dir) is None:
            shutil.rmtree(run_dir, ignore_errors=True)  # bad data met mid-run: leave nothing behind
        raise
    finally:
        stop.restore()
        forget_accelerator()  # the next run in this interpreter makes its own


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


def report_finished(setup: Setup) -> dict | None:
    """A resumed run whose latest checkpoint is at train.steps (a job requeued after its last step)."""
    run_dir = Path(setup.recipe.train.run_dir)
    if setup.dist.is_main:
        print(f"{run_dir} already finished: checkpoint {setup.resume_from.name} is at train.steps = "
              f"{setup.recipe.train.steps}; nothing to do", flush=True)
    metrics = metrics_folder(run_dir, setup.start_step) / "metrics.json"
    return json.loads(metrics.read_text()) if metrics.is_file() else None
