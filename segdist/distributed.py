"""The one place an Accelerator is made, so CPU runs really form a gloo process group.

FACTS: under `accelerate launch --multi_gpu` or `torchrun` on a CPU-only machine, a plain
`Accelerator()` reports DistributedType.NO in every process (independent runs, silently);
`Accelerator(cpu=True)` gives MULTI_CPU over gloo. The same code on GPUs gives NCCL DDP.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch

log = logging.getLogger("segdist")


def set_threads() -> None:
    """One share of the cores per local process, or the ranks fight over them (FACTS)."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local_world, 1)))


def make_accelerator(precision: str = "fp32", grad_accum: int = 1):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    set_threads()
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision="bf16" if precision == "bf16" else "no",
        gradient_accumulation_steps=grad_accum,
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=False),
            # A dead rank should end the job in minutes, not the default half hour.
            InitProcessGroupKwargs(timeout=timedelta(minutes=10)),
        ],
    )
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != expected:
        raise RuntimeError(
            f"launcher started {expected} processes but accelerate formed a group of "
            f"{accelerator.num_processes}: the run would silently train independent copies"
        )
    return accelerator


def setup_logging(is_main: bool) -> None:
    """One logger that speaks on the main process only; warnings from every rank."""
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
