import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from segdist.bench import build_parser
from segdist.precision import resolve_precision


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU message is for machines without CUDA")
def test_without_a_gpu_it_is_one_line_and_exit_2():
    result = subprocess.run([sys.executable, str(ROOT / "launch" / "bench.py"), "gpu"], capture_output=True,
                            text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: bench gpu: no CUDA device is visible here")
    assert "--device cpu" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_the_same_checks_run_on_the_cpu(capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    args = build_parser().parse_args(["gpu", "--device", "cpu", "--model", "demo", "--size", "32", "--batch", "4",
                                      "--variants", "eager", "--block", "1", "--rounds", "1", "--frames", "1",
                                      "--train-steps", "3"])
    assert args.run(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("bench gpu on ") and "CPU" in out[0]
    # "auto" precision: bf16 on a CPU with AMX or AVX512-BF16, fp32 on the others.
    assert out[1].startswith(f"1. train step: demo, batch 4 at 32x32, {resolve_precision('auto').name};")
    assert re.fullmatch(r"eager\s+[\d.]+\s+[\d.]+\s+\d+\.\d{3}\s+n/a", out[3])  # no MFU without a GPU's peak
    assert re.fullmatch(r"2\. exact count: 1 label maps of 1024x2048, 19 classes, \d+ valid pixels counted on cpu "
                        r"and on the CPU from the same predictions: identical matrices", out[4])
    assert re.fullmatch(r"3\. one checkpoint \(3 steps\), evaluated in fp32 on the device: mIoU 0\.\d{6}, on the CPU: "
                        r"0\.\d{6}; \d+ valid pixels each; identical matrices", out[5])
    assert re.fullmatch(r"whole run: [\d.]+ min \(within the 8-minute target\)", out[6])
