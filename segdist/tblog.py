"""TensorBoard on the main process: scalars and input | truth | prediction image strips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def colorize(mask: np.ndarray, palette: list[list[int]], ignore_index: int) -> np.ndarray:
    """HxW label map → HxWx3 uint8 using the dataset palette; ignore pixels white."""
    lut = np.zeros((max(256, ignore_index + 1, len(palette)), 3), dtype=np.uint8)
    lut[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    lut[ignore_index] = 255
    return lut[np.clip(mask, 0, len(lut) - 1)]


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
        if self.writer is None:
            return
        row = np.concatenate(
            [image, colorize(truth, palette, ignore_index), colorize(pred, palette, ignore_index)], axis=1
        )
        self.writer.add_image(tag, torch.from_numpy(row).permute(2, 0, 1), step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
