"""The one place that reads the rank and world size (`launch_context`) and the one place an
Accelerator is made, so CPU runs really form a gloo process group.

As measured (docs/design-notes.md): under `accelerate launch --multi_gpu` or `torchrun` on a CPU-only machine, a plain
`Accelerator()` reports DistributedType.NO in every process (independent runs, silently);
`Accelerator(cpu=True)` gives MULTI_CPU over gloo. The same code on GPUs gives NCCL DDP.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch

log = logging.getLogger("segdist")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands among the run's processes."""

    rank: int
    world: int
    local_rank: int
    local_world: int
    """Processes started on this node."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0 and self.local_rank == 0


def launch_context() -> DistContext:
    """What the launcher (accelerate launch, torchrun, SLURM through them) says, before any
    process group exists: the only reader of RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE.

    A launcher that forms the group itself and sets no RANK (Accelerate's `debug_launcher` forks
    its processes and joins them into a gloo group through a file, with only WORLD_SIZE set) is
    read from that group: its processes all run on this node."""
    env = os.environ
    if "RANK" not in env and _group_alive():
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()
        return DistContext(rank=rank, world=world, local_rank=rank, local_world=world)
    world = int(env.get("WORLD_SIZE", "1"))
    return DistContext(rank=int(env.get("RANK", "0")), world=world, local_rank=int(env.get("LOCAL_RANK", "0")),
                       local_world=int(env.get("LOCAL_WORLD_SIZE", str(world))))


def set_threads() -> None:
    """One share of the usable cores per local process, or the ranks fight over them
    (docs/design-notes.md); the same cores `loader_workers` shares out."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    torch.set_num_threads(max(1, usable_cores() // max(local_world_size(), 1)))


def make_accelerator(precision, grad_accum: int = 1):
    """The run's Accelerator; `precision` is a resolved segdist.precision.Precision (fp16 brings
    Accelerate's GradScaler, `accelerator.scaler`)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    if "RANK" not in os.environ and _group_alive():
        # A group formed by the launcher (launch_context): Accelerate reads the rank from the
        # environment for a CPU group and, finding none, would make every process rank 0 of a node
        # of one (its thread count follows from that); so the environment says what the group says.
        ctx = launch_context()
        os.environ.update(RANK=str(ctx.rank), LOCAL_RANK=str(ctx.local_rank), LOCAL_WORLD_SIZE=str(ctx.local_world))
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=precision.accelerate,
        gradient_accumulation_steps=grad_accum,
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=False),
            # A dead rank should end the job in minutes, not the default half hour.
            InitProcessGroupKwargs(timeout=timedelta(minutes=10)),
        ],
    )
    set_threads()  # after: Accelerate sets its own count for a CPU group when OMP_NUM_THREADS is unset
    global _gloo_formed
    _gloo_formed = _gloo_formed or _gloo_alive()
    expected = launch_context().world
    if accelerator.num_processes != expected:
        raise RuntimeError(
            f"launcher started {expected} processes but accelerate formed a group of "
            f"{accelerator.num_processes}: the run would silently train independent copies"
        )
    return accelerator


def start_sum(tensor: torch.Tensor):
    """Start summing `tensor` in place over the process group and return at once, so the caller's
    next work (a backward pass) runs while it travels; the returned callable waits and gives the
    sum. One process, or no group: nothing to sum. The same all-reduce as `accelerator.reduce(t,
    "sum")` on the default group: on gloo it runs on the group's worker thread, on NCCL on its own
    stream, and the next collective issued (DDP's gradient buckets) queues behind it in order."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return lambda: tensor
    work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True)

    def finish() -> torch.Tensor:
        work.wait()
        return tensor

    return finish


def unused_devices_warning(devices: int, local_processes: int, script: str = "launch/train.py") -> str | None:
    """One line when this node shows more CUDA devices than processes were started on it, with
    the command that uses them all (`accelerate launch` with no config file starts one process)."""
    if devices <= local_processes:
        return None
    return (f"{devices} CUDA devices are visible but {local_processes} process{'es' if local_processes > 1 else ''} "
            f"started on this node: `accelerate launch --multi_gpu --num_processes {devices} {script} ...` uses "
            "them all (or run `accelerate config` once)")


_gloo_formed = False
"""A gloo group was formed in this process (make_accelerator), alive or destroyed since."""


def _group_alive() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _gloo_alive() -> bool:
    import torch.distributed as dist

    return _group_alive() and dist.get_backend() == "gloo"


def forget_accelerator() -> None:
    """Clear Accelerate's state, which it keeps for the whole interpreter, once a run is over: the
    next run in this interpreter (the Python API called again, in a notebook say) then makes its
    own Accelerator. Otherwise a second run with another precision fails ("AcceleratorState has
    already been initialized and cannot be changed"), and a fork-based launcher's processes would
    inherit the first run's one-process state. The process group, if any, is left as it is."""
    from accelerate.state import AcceleratorState, GradientState

    # Accelerate's own tests clear it the same way; it has no public call for this.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def release_gloo_group() -> bool:
    """Destroy a gloo default process group this process still holds, as it exits; returns whether
    this process formed a gloo group at all (alive, or destroyed since by `end_training`), for
    `segdist.errors.leave`, which then leaves without the interpreter's teardown. NCCL's group is
    left to the exit: destroying one whose peer still waits in a collective can hang.

    A collective's Work is released on gloo's worker thread just after wait() returns; when it held
    the last reference to a Python tensor that thread needs the GIL to free it, and a thread that
    asks for the GIL while the interpreter finalizes is torn down mid-C++: std::terminate, SIGABRT
    (seen in a core dump: ProcessGroupGloo::runLoop -> ~AsyncBroadcastWork -> THPVariable_dealloc
    -> take_gil -> pthread_exit). The sleep before destroying a live group lets the worker finish
    first; it matters for the one way out that still goes through the teardown, a bug's traceback.
    """
    formed = _gloo_formed or _gloo_alive()
    if _gloo_alive():
        import torch.distributed as dist

        time.sleep(0.05)
        dist.destroy_process_group()
    return formed


def free_port() -> int:
    """A TCP port free on this host now, for a launcher's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(script: str, args: list[str], nproc: int, module: bool = False) -> list[str]:
    """argv that runs the Python file `script` (with `module`, the module named `script`, as
    `python -m` runs it: e.g. "segdist.cli.train") with `nproc` real processes on this node: the
    interpreter itself for one, `accelerate launch --multi_gpu` for several (docs/design-notes.md: `--cpu` would
    start one), which forms a gloo group on CPUs and NCCL on GPUs. Benches and tests use it."""
    target = ["-m", script] if module else [script]
    if nproc == 1:
        return [sys.executable, *target, *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), *target, *args]


def local_world_size() -> int:
    """Processes started on this node by the launcher (1 without one)."""
    return launch_context().local_world


def usable_cores() -> int:
    """The cores this process may run on: its affinity mask where the OS has one (taskset, a cgroup
    cpuset, SLURM's --cpus-per-task narrow it; os.cpu_count() counts the whole machine)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def loader_workers(setting: int | str, cores: int | None = None, local_world: int | None = None) -> tuple[int, str]:
    """`data.num_workers` as a count of DataLoader workers per training process, and why, for the
    run's log. "auto": the node's usable cores (`cores`, default usable_cores()) shared among its
    training processes (`local_world`, default the launcher's), less one per process for the
    trainer itself, which decodes nothing but runs the step: `max(0, cores // local_world - 1)`.
    0 reads in the training process, which is then all the machine has to give it. A count is taken
    as it is. The one resolver: the trainer and the benches both come here."""
    if setting != "auto":
        return setting, "as the recipe sets it"
    cores = usable_cores() if cores is None else cores
    local_world = max(local_world_size() if local_world is None else local_world, 1)
    workers = max(0, cores // local_world - 1)
    return workers, (f"{cores} core{'s' if cores != 1 else ''} / {local_world} local "
                     f"process{'es' if local_world != 1 else ''}, less 1 for the trainer")


def setup_logging(is_main: bool) -> None:
    """One logger that speaks on the main process only; warnings from every rank."""
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )


def init_loader_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn` of every loader: the worker leaves signals to the training
    process, ignoring SIGUSR1 and any SIGTERM but its parent's, and dies with its parent.

    torch's SIGTERM handler in a DataLoader worker exits quietly on its parent's SIGTERM (the
    loader's shutdown, multiprocessing's cleanup at exit) and dies of anyone else's, upon which the
    parent raises ("DataLoader worker ... is killed by signal") wherever it is: in the middle of
    the stop checkpoint, say. But SLURM signals every process of a job, and torchrun's agent each
    rank's whole process group. So SIGTERM is blocked here and a thread takes it with its sender:
    the parent's ends the worker as before, others are dropped (the training process handles its own).

    A worker that outlives a rank killed with -9 holds that rank's sockets (it was forked after
    the process group formed), so the other ranks would notice the death only when the worker's
    watchdog ends it, ~5 s later: PR_SET_PDEATHSIG kills it with its parent.
    """
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    parents = {os.getppid(), getattr(multiprocessing.parent_process(), "pid", None)}
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit it

    def take_sigterm() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid in parents:
                os._exit(0)

    threading.Thread(target=take_sigterm, name="sigterm", daemon=True).start()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass  # not Linux: the watchdog still ends the worker
    if os.getppid() not in parents:
        os._exit(0)  # the parent died before prctl took effect


class StopSignal:
    """SIGTERM and SIGUSR1 ask the training to stop at the next step boundary, with a checkpoint.

    SLURM sends SIGTERM to every process of a job it requeues, preempts, cancels or times out
    (SIGKILL follows after KillWait, 30 s by default); slurm/*.sbatch turn their time-limit warning
    into SIGUSR1 for the training processes. The handler only records the signal (`received`): ranks
    receive it at different moments (or not at all), so the train step sums the flag over ranks in every
    step's collective (segdist.train.step.train_step) and all ranks stop after the same step, none left
    alone inside a collective.

    DataLoader workers must not die of these signals either: see `init_loader_worker`.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signum

    def describe(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "another rank's signal"

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
