"""TensorBoard on the main process: scalars, text, figures and input | truth | prediction strips
(drawn by segdist.report)."""

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

    def strip(self, tag: str, image: np.ndarray, truth: np.ndarray, pred: np.ndarray,
              palette: list[list[int]], ignore_index: int, step: int) -> None:
        """input | truth | prediction, each panel at least report.MIN_PANEL pixels high."""
        if self.writer is not None:
            from segdist.report import strip

            self.image(tag, strip(image, truth, pred, palette, ignore_index), step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """An HxWx3 uint8 image (a strip or a figure from segdist.report)."""
        if self.writer is not None:
            self.writer.add_image(tag, torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1), step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
