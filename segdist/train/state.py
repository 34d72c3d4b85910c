"""The trainer's own counters (`TrainState`, saved in each checkpoint's state.json) and where a run
keeps its evaluations."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from segdist.errors import TrainingDiverged
from segdist.train.step import StepOutcome

log = logging.getLogger("segdist")

LAYOUT_KEYS = ("world_size", "num_workers", "batch_size", "grad_accum", "precision", "precision_reason")
COUNTERS = ("step", "best_miou", "bad_steps", "bad_in_a_row", "overflow_steps", "overflow_in_a_row", "global_batch", "seed")


@dataclass
class TrainState:
    """The trainer's own counters, saved in each checkpoint's state.json."""

    step: int = 0
    best_miou: float = -1.0
    bad_steps: int = 0
    """Steps skipped because the loss or the gradient was not finite (without loss scaling)."""
    bad_in_a_row: int = 0
    overflow_steps: int = 0
    """fp16 steps the GradScaler skipped for an overflow (not bad steps)."""
    overflow_in_a_row: int = 0
    global_batch: int = 0
    """G = processes x data.batch_size x train.grad_accum: samples per optimizer step over all ranks.
    A resume must keep it (segdist.train.setup.check_resumable); 0 in checkpoints from before."""
    seed: int = 0
    """train.seed, which with G and the position fixes the data that comes next."""
    manifests: dict = field(default_factory=dict)
    """{"train": sha256, "val": sha256} of the manifests this run read (segdist.data.manifest
    Manifest.sha256): the exact data a checkpoint was trained and evaluated on, which an export's
    model card names (segdist.hfexport)."""
    layout: dict = field(default_factory=dict)
    """World size, loader workers, per-process batch, accumulation and precision: of this run once it
    started, of the saved run right after a load (a resume with the same G on another layout continues
    with the same global batches; another precision continues, but not bit-identically)."""

    @property
    def position(self) -> int:
        """Training samples consumed, over all ranks: where the data continues (segdist.data.stream)."""
        return self.step * self.global_batch

    def state_dict(self) -> dict:
        return {**{k: getattr(self, k) for k in COUNTERS}, "position": self.position, "manifests": self.manifests,
                **self.layout}

    def load_state_dict(self, saved: dict) -> None:
        for name in COUNTERS:
            setattr(self, name, type(getattr(self, name))(saved.get(name, getattr(self, name))))
        self.layout = {k: saved.get(k) for k in LAYOUT_KEYS}
        self.manifests = saved.get("manifests") or {}

    def record(self, out: StepOutcome, step: int, max_bad_steps: int) -> None:
        """Count skipped steps: a bad one (non-finite loss, or gradient without loss scaling) and an
        fp16 overflow (the GradScaler's own skip, which lowers the scale) are counted apart; an
        applied step ends both runs. `train.max_bad_steps` in a row of either ends the training."""
        if out.applied:
            self.bad_in_a_row = self.overflow_in_a_row = 0
        elif out.bad:
            self.bad_steps += 1
            self.bad_in_a_row += 1
            log.warning("step %d: non-finite loss or gradient; update skipped (%d in a row, limit train.max_bad_steps "
                        "= %d)", step, self.bad_in_a_row, max_bad_steps)
        else:
            self.overflow_steps += 1
            self.overflow_in_a_row += 1
            if self.overflow_in_a_row > 1:
                log.warning("step %d: fp16 gradient overflow, update skipped and loss scale lowered (%d in a row, "
                            "limit train.max_bad_steps = %d)", step, self.overflow_in_a_row, max_bad_steps)

    def diverged(self, max_bad_steps: int) -> bool:
        """The same on every rank: the flags were summed over ranks by each step's collective."""
        return max(self.bad_in_a_row, self.overflow_in_a_row) >= max_bad_steps

    def diverged_error(self, step: int, max_bad_steps: int) -> TrainingDiverged:
        if self.bad_in_a_row >= max_bad_steps:
            n, what = self.bad_in_a_row, "had a non-finite loss or gradient"
        else:
            n, what = self.overflow_in_a_row, "overflowed in fp16 although the GradScaler kept lowering the loss scale"
        return TrainingDiverged(
            f"training diverged: steps {step - n + 1}-{step} all {what} (train.max_bad_steps = {max_bad_steps}); their "
            f"updates were skipped, so checkpoint step-{step} holds the weights of step {step - n}; lower optim.lr"
            + (" (or use train.precision = \"bf16\" or \"fp32\")" if what.startswith("overflowed") else "")
            + " and resume with --resume"
        )


def metrics_folder(run_dir: Path, step: int) -> Path:
    """Where the evaluation at `step` leaves its report (segdist.report.write_report)."""
    return Path(run_dir) / "metrics" / f"step-{step}"


def last_evaluation(run_dir: Path, step: int) -> tuple[int, dict] | None:
    """(M, metrics) of the run's latest evaluation at or before `step` (its
    `metrics/step-M/metrics.json`, written atomically): what a checkpoint saved at `step` was last
    measured by. None when the run kept none there, or that one does not read."""
    steps = [int(m.group(1)) for folder in (Path(run_dir) / "metrics").glob("step-*")
             if (m := re.fullmatch(r"step-(\d+)", folder.name)) and int(m.group(1)) <= step
             and (folder / "metrics.json").is_file()]
    if not steps:
        return None
    try:
        return max(steps), json.loads((metrics_folder(run_dir, max(steps)) / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
