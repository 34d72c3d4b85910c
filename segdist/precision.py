"""Which numeric precision a run trains and evaluates in: `train.precision`, resolved against the hardware.

"auto" (the default) picks what the device runs natively, because a precision it emulates is not
a saving but a loss: on an AVX2-only AMD EPYC the demo UNet's step took 4191 ms under bf16
autocast against 233 ms in fp32 (docs/design-notes.md), and V100 / T4 cards have no bf16 tensor cores.

- bf16 where it is native: CUDA with compute capability >= 8.0 (A100, H100, RTX 30xx/40xx, L4 …),
  or a CPU with AMX or AVX512-BF16;
- fp16 with dynamic loss scaling on CUDA without bf16 (V100, T4, P100 …): Accelerate's
  `mixed_precision="fp16"` and its GradScaler;
- fp32 everywhere else.

An explicit "bf16" runs wherever asked (autocast emulates it), with a warning where it is not
native; "fp16" is CUDA-only: on a CPU Accelerate would silently run fp32 (docs/design-notes.md), so it is an error.
The decision is a pure function of a `Hardware` description, so every device is testable as data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from segdist.errors import UserError
from segdist.recipe import PRECISIONS

ACCELERATE_NAME = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}
"""Accelerate's `mixed_precision` for each resolved precision."""


@dataclass(frozen=True)
class Hardware:
    """What the precision decision looks at; `detect_hardware()` fills it in for this process."""

    device: str
    """"cuda" or "cpu"."""
    name: str
    """The GPU's name, or the CPU's model name."""
    cuda_capability: tuple[int, int] | None = None
    """(major, minor) compute capability of the CUDA device."""
    cpu_capability: str = ""
    """torch.backends.cpu.get_cpu_capability(): the widest vector ISA torch's kernels use."""
    cpu_amx: bool = False
    """The CPU has AMX tiles (Sapphire Rapids and later)."""
    cpu_avx512_bf16: bool = False
    """The CPU has AVX512-BF16 (Cooper Lake, Zen 4 and later)."""

    def describe(self) -> str:
        if self.device == "cuda":
            major, minor = self.cuda_capability or (0, 0)
            return f"{self.name} (CUDA compute capability {major}.{minor})"
        flags = [f for f, on in (("AMX", self.cpu_amx), ("AVX512-BF16", self.cpu_avx512_bf16)) if on]
        return f"{self.name} (CPU, torch capability {self.cpu_capability or '?'}; {', '.join(flags) or 'no AMX, no AVX512-BF16'})"

    @property
    def native_bf16(self) -> bool:
        if self.device == "cuda":
            return self.cuda_capability is not None and self.cuda_capability >= (8, 0)
        return self.cpu_amx or self.cpu_avx512_bf16


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"


def detect_hardware() -> Hardware:
    """This process's device: the current CUDA device when there is one, else the CPU."""
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        return Hardware("cuda", torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index)))
    caps = dict(torch._C._cpu._get_cpu_capability()) if hasattr(torch._C, "_cpu") else {}
    return Hardware(
        "cpu", cpu_model(), None, torch.backends.cpu.get_cpu_capability(),
        cpu_amx=bool(caps.get("amx_tile") or caps.get("amx_bf16")),
        cpu_avx512_bf16=bool(caps.get("avx512_bf16")),
    )


@dataclass(frozen=True)
class Precision:
    """A resolved precision: bf16, fp16 or fp32, what was asked for, and why."""

    name: str
    requested: str
    reason: str
    warning: str | None = None
    """One line to log at start (an explicit bf16 that the hardware emulates)."""

    @property
    def accelerate(self) -> str:
        return ACCELERATE_NAME[self.name]

    @property
    def loss_scaling(self) -> bool:
        return self.name == "fp16"


def choose_precision(requested: str, hw: Hardware) -> Precision:
    """Resolve `train.precision` on `hw`; UserError for a precision the device cannot run."""
    where = hw.describe()
    if requested == "auto":
        if hw.native_bf16:
            return Precision("bf16", requested, f"auto: {where} runs bf16 natively")
        if hw.device == "cuda":
            return Precision("fp16", requested, f"auto: {where} has no bf16 tensor cores; fp16 with dynamic loss scaling")
        return Precision("fp32", requested, f"auto: {where} has no native bf16, where bf16 autocast is emulated and "
                                            "slower than fp32")
    if requested == "bf16":
        if hw.native_bf16:
            return Precision("bf16", requested, f"as set; {where} runs bf16 natively")
        return Precision("bf16", requested, f"as set; {where} emulates bf16",
                         warning=f"train.precision = \"bf16\" on {where}: bf16 is emulated here and can be many times "
                                 "slower than fp32 (18x measured on an AVX2 CPU); train.precision = \"auto\" picks the "
                                 "fast one")
    if requested == "fp16":
        if hw.device != "cuda":
            raise UserError(f"train.precision = \"fp16\" needs a CUDA GPU; on {where} Accelerate would silently run "
                            "fp32: set train.precision = \"auto\" (or \"fp32\")")
        return Precision("fp16", requested, f"as set; fp16 with dynamic loss scaling on {where}")
    if requested == "fp32":
        return Precision("fp32", requested, f"as set, on {where}")
    raise UserError(f"train.precision must be one of {', '.join(map(repr, PRECISIONS))}, got {requested!r}")


def resolve_precision(requested: str) -> Precision:
    return choose_precision(requested, detect_hardware())
