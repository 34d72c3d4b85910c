"""The launch decisions of segdist.distributed, as functions of what the node shows."""

import pytest

from segdist.distributed import unused_devices_warning


def test_more_devices_than_processes_names_the_command_that_uses_them():
    warning = unused_devices_warning(devices=8, local_processes=1)
    assert "8 CUDA devices" in warning and "1 process started" in warning
    assert "--multi_gpu --num_processes 8" in warning and "accelerate config" in warning
    assert "\n" not in warning
    assert "4 processes" in unused_devices_warning(devices=8, local_processes=4)


def test_no_warning_when_every_device_has_a_process():
    for devices, local in ((0, 1), (1, 1), (4, 4), (2, 3)):
        assert unused_devices_warning(devices, local) is None


def test_launch_context_reads_the_launchers_environment(monkeypatch):
    from segdist.distributed import launch_context

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    alone = launch_context()
    assert (alone.rank, alone.world, alone.local_rank, alone.local_world, alone.is_main) == (0, 1, 0, 1, True)
    # torchrun / accelerate launch on the second node of two, 4 processes each
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    ctx = launch_context()
    assert (ctx.rank, ctx.world, ctx.local_rank, ctx.local_world, ctx.is_main) == (5, 8, 1, 4, False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert launch_context().local_world == 8  # a launcher that does not say: one node


def test_launch_command_runs_one_process_plainly_and_several_through_accelerate():
    import sys

    from segdist.distributed import launch_command

    assert launch_command("x.py", ["--a"], 1) == [sys.executable, "x.py", "--a"]
    several = launch_command("x.py", ["--a"], 3)
    assert several[:6] == [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "3"]
    assert several[-2:] == ["x.py", "--a"] and "--main_process_port" in several
    # a module, as `python -m` runs it (accelerate's launcher takes -m/--module)
    assert launch_command("segdist.cli.train", ["r.toml"], 1, module=True) == [
        sys.executable, "-m", "segdist.cli.train", "r.toml"]
    assert launch_command("segdist.cli.train", ["r.toml"], 2, module=True)[-3:] == ["-m", "segdist.cli.train", "r.toml"]


def test_start_sum_without_a_group_gives_the_tensor_back_unchanged():
    import torch

    from segdist.distributed import start_sum

    t = torch.tensor([3.0, 1.0], dtype=torch.float64)
    finish = start_sum(t)
    assert finish() is t and t.tolist() == [3.0, 1.0]


@pytest.mark.parametrize("cores, local_world, workers", [(2, 2, 0), (2, 1, 1), (16, 4, 3), (64, 8, 7), (3, 2, 0),
                                                          (1, 4, 0), (7, 2, 2)])
def test_auto_loader_workers_share_the_cores_less_one_per_process(cores, local_world, workers):
    from segdist.distributed import loader_workers

    count, reason = loader_workers("auto", cores=cores, local_world=local_world)
    assert count == workers == max(0, cores // local_world - 1)
    assert f"{cores} core" in reason and f"{local_world} local process" in reason and "less 1" in reason


def test_auto_loader_workers_read_the_affinity_mask_and_the_launcher(monkeypatch):
    import os

    from segdist.distributed import loader_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert loader_workers("auto")[0] == 12 // 3 - 1
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS: no affinity mask, the machine's cores
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert loader_workers("auto")[0] == 8 // 3 - 1


def test_a_loader_worker_count_is_taken_as_it_is():
    from segdist.distributed import loader_workers

    assert loader_workers(0, cores=64, local_world=1)[0] == 0
    assert loader_workers(5, cores=2, local_world=2)[0] == 5


def report_place(folder: str) -> None:
    """A debug_launcher process: where it stands before and after its Accelerator is made."""
    import json
    from pathlib import Path

    import torch
    import torch.distributed as dist

    from segdist.distributed import launch_context, make_accelerator
    from segdist.precision import resolve_precision

    before = launch_context()
    accelerator = make_accelerator(resolve_precision("fp32"))
    after = launch_context()
    Path(folder, f"{dist.get_rank()}.json").write_text(json.dumps({
        "before": [before.rank, before.world, before.local_rank, before.local_world, before.is_main],
        "after": [after.rank, after.world, after.local_rank, after.local_world, after.is_main],
        "accelerator": [accelerator.process_index, accelerator.local_process_index, accelerator.num_processes,
                        accelerator.distributed_type.value],
        "threads": torch.get_num_threads()}))


@pytest.mark.slow
def test_processes_in_a_group_their_launcher_formed_know_their_rank(tmp_path, monkeypatch):
    """Accelerate's debug_launcher forks the processes and joins them into a gloo group itself,
    setting WORLD_SIZE only: launch_context reads the rest from the group, and the Accelerator is
    told too (alone it gives every process local rank 0 and a thread count for a node of one)."""
    import json

    from accelerate import debug_launcher

    from segdist.distributed import usable_cores

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    debug_launcher(report_place, (str(tmp_path),), num_processes=2)
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"{rank}.json").read_text())
        assert seen["before"] == seen["after"] == [rank, 2, rank, 2, rank == 0]
        assert seen["accelerator"] == [rank, rank, 2, "MULTI_CPU"]
        assert seen["threads"] == max(1, usable_cores() // 2)  # a share of the cores, as under accelerate launch
