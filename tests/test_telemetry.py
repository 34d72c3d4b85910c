"""Telemetry: FLOP counts on the meta device, the GPU peak table, the step meter's figures."""

import time

import torch

from segdist.telemetry import StepMeter, flops_per_sample, peak_memory_bytes, peak_tflops


def test_flops_of_a_convolution_are_forward_plus_twice_backward():
    conv = lambda: torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)  # noqa: E731
    forward = 2 * 3 * 8 * 9 * 16 * 16  # multiply-adds x 2, per output pixel
    # backward: the weight's gradient only (the input needs none): one more forward's worth.
    assert flops_per_sample(conv, (16, 16)) == 2 * forward
    deeper = lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False),  # noqa: E731
                                         torch.nn.Conv2d(8, 8, 3, padding=1, bias=False))
    second = 2 * 8 * 8 * 9 * 16 * 16
    assert flops_per_sample(deeper, (16, 16)) == 2 * forward + 3 * second


def test_a_model_that_cannot_run_on_meta_gives_no_count():
    class ReadsAValue(torch.nn.Module):
        def forward(self, x):
            return x * float(x.mean())

    assert flops_per_sample(ReadsAValue, (8, 8)) is None


def test_peak_table_prefers_the_specific_name_and_the_override():
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert peak_tflops("NVIDIA H200", "fp32") == 494.0
    assert peak_tflops("Tesla T4", "fp16") == 65.0
    assert peak_tflops("NVIDIA L40S", "bf16") == 362.0 and peak_tflops("NVIDIA L4", "bf16") == 121.0
    assert peak_tflops("Some Future GPU", "bf16") is None
    assert peak_tflops("Some Future GPU", "bf16", override=400.0) == 400.0


def test_meter_reports_step_time_wait_share_and_throughput():
    meter = StepMeter(world=2, device=torch.device("cpu"))
    meter.waited(0.02)
    time.sleep(0.05)
    meter.stepped(samples=8, pixels=8 * 64 * 64)
    meter.stepped(samples=8, pixels=8 * 64 * 64)
    perf = meter.summary()
    assert 25 <= perf["step_time_ms"] < 1000
    assert 0 < perf["data_wait_share"] < 0.5
    assert perf["pixels_per_s"] == perf["samples_per_s"] * 64 * 64
    assert perf["peak_memory_mb"] * 2**20 <= peak_memory_bytes(torch.device("cpu"))
    assert "mfu" not in perf  # CUDA only
    assert meter.summary()["samples_per_s"] == 0  # a summary starts the next interval
