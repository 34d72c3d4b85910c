"""The precision decision on every kind of device, given as data (no GPU needed)."""

import pytest

from segdist.errors import UserError
from segdist.precision import Hardware, choose_precision, detect_hardware

H100 = Hardware("cuda", "NVIDIA H100 80GB HBM3", (9, 0))
A100 = Hardware("cuda", "NVIDIA A100-SXM4-40GB", (8, 0))
V100 = Hardware("cuda", "Tesla V100-SXM2-32GB", (7, 0))
T4 = Hardware("cuda", "Tesla T4", (7, 5))
EPYC_AVX2 = Hardware("cpu", "AMD EPYC", None, "AVX2")
XEON_AMX = Hardware("cpu", "Intel(R) Xeon(R) Platinum 8480+", None, "AVX512", cpu_amx=True, cpu_avx512_bf16=True)
ZEN4 = Hardware("cpu", "AMD EPYC 9654", None, "AVX512", cpu_avx512_bf16=True)
SKYLAKE = Hardware("cpu", "Intel(R) Xeon(R) Gold 6148", None, "AVX512")


@pytest.mark.parametrize("hw, expected", [
    (H100, "bf16"), (A100, "bf16"), (V100, "fp16"), (T4, "fp16"),
    (XEON_AMX, "bf16"), (ZEN4, "bf16"), (EPYC_AVX2, "fp32"), (SKYLAKE, "fp32"),
])
def test_auto_picks_what_the_device_runs_natively(hw, expected):
    choice = choose_precision("auto", hw)
    assert choice.name == expected and choice.requested == "auto" and choice.warning is None
    assert hw.name in choice.reason
    assert choice.loss_scaling == (expected == "fp16")
    assert choice.accelerate == {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[expected]


def test_explicit_bf16_runs_everywhere_but_warns_where_it_is_emulated():
    for hw in (H100, XEON_AMX):
        assert choose_precision("bf16", hw).warning is None
    for hw in (V100, EPYC_AVX2, SKYLAKE):
        choice = choose_precision("bf16", hw)
        assert choice.name == "bf16"
        assert "emulated" in choice.warning and '"auto"' in choice.warning and "\n" not in choice.warning


def test_fp16_is_for_cuda_only():
    assert choose_precision("fp16", V100).name == "fp16"
    assert choose_precision("fp16", H100).loss_scaling
    for hw in (EPYC_AVX2, XEON_AMX):
        with pytest.raises(UserError, match='train.precision = "fp16" needs a CUDA GPU.*"auto"'):
            choose_precision("fp16", hw)


def test_fp32_is_always_fp32():
    for hw in (H100, T4, EPYC_AVX2, XEON_AMX):
        assert choose_precision("fp32", hw).name == "fp32"


def test_this_machine_is_described():
    hw = detect_hardware()
    assert hw.device in ("cpu", "cuda") and hw.name
    if hw.device == "cpu":
        import torch

        assert hw.cpu_capability == torch.backends.cpu.get_cpu_capability()
        assert hw.cpu_capability in hw.describe()
