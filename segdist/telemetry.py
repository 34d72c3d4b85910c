"""What a training run measures about itself: step time, data wait, throughput, peak memory, MFU.

`StepMeter` collects, between two log steps, the wall time of the optimizer steps, the time spent
blocked on the next batch (data wait) and the samples and pixels trained; `summary()` turns them
into the figures that go to TensorBoard (`perf/*`) and the log line. Peak memory is CUDA's
`max_memory_allocated` on a GPU, else the process's peak resident set size.

Model FLOPs utilisation (CUDA only) = achieved model FLOP/s / the device's peak. The model's FLOPs
per sample (forward + backward) are counted once with `torch.utils.flop_counter` on a copy of the
model built on the meta device: no memory, no compute, exact for the layers torch knows. The peak
comes from `PEAK_TFLOPS` (dense, per GPU, at the run's precision) or `log.peak_tflops`.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

log = logging.getLogger("segdist")

PEAK_TFLOPS: list[tuple[str, float, float]] = [
    # (name contains, dense bf16/fp16 tensor-core TFLOP/s, fp32 TFLOP/s (TF32 tensor cores where they exist))
    ("H200", 989.0, 494.0),
    ("H100 PCIe", 756.0, 378.0),
    ("H100", 989.0, 494.0),
    ("GH200", 989.0, 494.0),
    ("B200", 2250.0, 1100.0),
    ("A100", 312.0, 156.0),
    ("A800", 312.0, 156.0),
    ("L40S", 362.0, 183.0),
    ("L40", 181.0, 90.5),
    ("L4", 121.0, 60.0),
    ("A10G", 70.0, 35.0),
    ("A10", 125.0, 62.5),
    ("A6000", 155.0, 77.4),
    ("A40", 150.0, 74.8),
    ("RTX 4090", 165.0, 82.6),
    ("RTX 3090", 71.0, 35.6),
    ("V100", 125.0, 15.7),
    ("T4", 65.0, 8.1),
    ("P100", 18.7, 9.3),
]
"""Dense (no sparsity) peaks from the vendors' data sheets; the first entry whose name is in the
GPU's name wins, so more specific names come first. fp16 for cards without bf16 (V100, T4, P100)."""


def peak_tflops(gpu_name: str, precision: str, override: float = 0.0) -> float | None:
    """The peak for `gpu_name` at `precision` (bf16/fp16/fp32), `override` when > 0, None if unknown."""
    if override > 0:
        return override
    for needle, half, single in PEAK_TFLOPS:
        if needle.lower() in gpu_name.lower():
            return single if precision == "fp32" else half
    return None


def flops_per_sample(build: Callable[[], torch.nn.Module], crop: tuple[int, int]) -> int | None:
    """Forward + backward FLOPs of one training sample at `crop`, counted on a meta-device copy
    (`build` makes the model; it is called under `torch.device("meta")`). Two samples are run and
    halved: a batch of one would stop BatchNorm on a 1x1 map (an ASPP image-pooling branch).
    None for a model that cannot run on the meta device (one that reads a value, like smp's
    Segformer): MFU is then not reported."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.device("meta"):
            model = build()
            model.train()
            x = torch.empty(2, 3, *crop)
            with FlopCounterMode(display=False) as counter:
                model(x).float().sum().backward()
    except Exception as exc:  # noqa: BLE001 - best effort: only the MFU figure depends on it
        log.info("model FLOPs not counted (%s): no MFU figure", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    return counter.get_total_flops() // 2


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA's peak allocated bytes on a GPU, else this process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


@dataclass
class StepMeter:
    """Step time, data wait and throughput since the last `summary()` (on this rank)."""

    world: int
    device: torch.device
    flops_per_sample: int | None = None
    peak_tflops: float | None = None
    _steps: int = 0
    _wait: float = 0.0
    _samples: int = 0
    _pixels: int = 0
    _start: float = field(default_factory=time.perf_counter)

    def restart(self) -> None:
        """Forget the time since the last summary (evaluation and checkpoints are not training)."""
        self._steps, self._wait, self._samples, self._pixels = 0, 0.0, 0, 0
        self._start = time.perf_counter()

    def waited(self, seconds: float) -> None:
        self._wait += seconds

    def stepped(self, samples: int, pixels: int) -> None:
        """One optimizer step of this rank's `samples` and `pixels` (all ranks train as many)."""
        self._steps += 1
        self._samples += samples
        self._pixels += pixels

    def summary(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        out = {
            "step_time_ms": 1000 * elapsed / max(self._steps, 1),
            "data_wait_share": self._wait / elapsed,
            "samples_per_s": self._samples * self.world / elapsed,
            "pixels_per_s": self._pixels * self.world / elapsed,
            "peak_memory_mb": peak_memory_bytes(self.device) / 2**20,
        }
        if self.device.type == "cuda" and self.flops_per_sample and self.peak_tflops:
            out["mfu"] = self.flops_per_sample * out["samples_per_s"] / (self.peak_tflops * 1e12 * self.world)
        self.restart()
        return out
