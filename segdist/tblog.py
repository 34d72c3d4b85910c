"""TensorBoard on the main process: scalars, text, images (input | truth | prediction strips and
figures, drawn by segdist.report) and the recipe as hyperparameters. The trainer reaches it through
segdist.tracking, which sends the same calls to the run's other trackers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class TensorBoard:
    """A SummaryWriter on the main process; every method is a no-op elsewhere."""

    def __init__(self, run_dir: str | Path, enabled: bool, purge_step: int | None = None) -> None:
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a crashed run logged past its last checkpoint.
            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=purge_step)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None and value is not None:
            self.writer.add_scalar(tag, float(value), step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """An HxWx3 uint8 image (a strip or a figure from segdist.report)."""
        if self.writer is not None:
            self.writer.add_image(tag, torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1), step)

    def hparams(self, values: dict, metrics: tuple[str, ...]) -> None:
        """`values` (str, int, float or bool) as the HPARAMS dashboard reads them, against the scalar
        tags `metrics` of this same run (no separate run folder, unlike SummaryWriter.add_hparams)."""
        if self.writer is not None:
            from torch.utils.tensorboard.summary import hparams

            for summary in hparams(values, dict.fromkeys(metrics, 0.0)):
                self.writer.file_writer.add_summary(summary)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
