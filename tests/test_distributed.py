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
