"""The launch decisions of segdist.distributed, as functions of what the node shows."""

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


def test_start_sum_without_a_group_gives_the_tensor_back_unchanged():
    import torch

    from segdist.distributed import start_sum

    t = torch.tensor([3.0, 1.0], dtype=torch.float64)
    finish = start_sum(t)
    assert finish() is t and t.tolist() == [3.0, 1.0]
