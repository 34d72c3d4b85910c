"""`launch/bench.py gpu`: the checks for a machine with a CUDA GPU, in one run of a few minutes.

1. The train step, segdist's against the bare loop (as `bench step`), at precision "auto" (bf16
   where the GPU has it), for each --variants: eager, channels_last, and channels_last with
   torch.compile; ms/step, the ratio and MFU (FLOPs from torch.utils.flop_counter, the peak from
   segdist.telemetry's table or --peak-tflops).
2. Exact counting on the device: predictions of random logits over --frames Cityscapes-size label
   maps, counted by ConfusionMatrix on the GPU (scatter_add_, no host sync) and again on the CPU
   (bincount) from the same predictions: the two matrices must be identical.
3. One checkpoint, evaluated on the GPU and on the CPU: shapes scenes converted here, a short
   training on the device (segdist.cli.train), then segdist.cli.eval on the GPU and with
   CUDA_VISIBLE_DEVICES="" on the CPU, both at train.precision = "fp32" and with TF32 off
   (NVIDIA_TF32_OVERRIDE=0), so the float kernels are as close as they come. Counting is exact on both (check 2); a pixel whose
   top two logits differ by less than the kernels' rounding can still flip, so the bench prints
   how many of the pixels' predictions moved, and whether the matrices are identical.

The whole run is timed; its target is under 8 minutes. `--device cpu` runs the same checks on the
CPU (no compile by default), to try the bench on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from segdist.bench.launched import child_failure
from segdist.bench.options import require_positive
from segdist.bench.step import add_model_options, time_steps
from segdist.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ("eager", "channels_last", "compile")


def add_parser(sub) -> None:
    p = sub.add_parser("gpu", help="CUDA checks: step ratio with channels_last and torch.compile, MFU, exact eval",
                       description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="where the checks run (default cuda)")
    add_model_options(p)
    p.set_defaults(model="smp_unet_r18", size=512, batch=16)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=None,
                   help="step variants (default: all three on CUDA, eager and channels_last on the CPU)")
    p.add_argument("--block", type=int, default=10, help="steps per timed block (default 10)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved blocks per loop (default 3)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="the device's peak for MFU (default: the table's)")
    p.add_argument("--frames", type=int, default=4, help="1024x2048 label maps counted in check 2 (default 4)")
    p.add_argument("--train-steps", type=int, default=200, help="training steps of check 3's checkpoint (default 200)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch first asks (make_accelerator)
    elif not torch.cuda.is_available():
        raise UserError("bench gpu: no CUDA device is visible here; run it on a GPU machine, or add --device cpu to "
                        "try the same checks on the CPU")
    require_positive(args, "block", "rounds", "frames", "train_steps")
    from segdist.distributed import make_accelerator
    from segdist.precision import detect_hardware, resolve_precision

    hardware = detect_hardware()
    print(f"bench gpu on {hardware.describe()}", flush=True)
    precision = resolve_precision("auto")
    accelerator = make_accelerator(precision, 1)
    variants = args.variants or (list(VARIANTS) if args.device == "cuda" else ["eager", "channels_last"])
    print(step_table(args, accelerator, precision, variants, hardware), flush=True)
    print(count_check(accelerator.device, args.frames), flush=True)
    print(eval_check(args), flush=True)
    minutes = (time.perf_counter() - started) / 60
    print(f"whole run: {minutes:.1f} min ({'within' if minutes < 8 else 'OVER'} the 8-minute target)")
    return 0


def step_table(args, accelerator, precision, variants: list[str], hardware) -> str:
    from segdist.telemetry import peak_tflops

    peak = peak_tflops(hardware.name, precision.name, args.peak_tflops) if accelerator.device.type == "cuda" else None
    lines = [f"1. train step: {args.model}, batch {args.batch} at {args.size}x{args.size}, {precision.name}; best of "
             f"{args.rounds} interleaved blocks of {args.block}; peak {peak or 'unknown'} TFLOP/s",
             f"{'variant':<24} {'segdist ms':>11} {'bare ms':>9} {'bare/segdist':>13} {'MFU':>7}"]
    for variant in variants:
        t = time_steps(args, accelerator, precision, channels_last=variant != "eager", compile=variant == "compile",
                       flops=True)
        mfu = (t.flops_per_sample * t.batch / t.segdist_s / (peak * 1e12)) if peak and t.flops_per_sample else None
        label = {"eager": "eager", "channels_last": "channels_last", "compile": "channels_last + compile"}[variant]
        lines.append(f"{label:<24} {1000 * t.segdist_s:>11.1f} {1000 * t.bare_s:>9.1f} {t.ratio:>13.3f} "
                     f"{f'{100 * mfu:.1f}%' if mfu is not None else 'n/a':>7}")
    return "\n".join(lines)


def count_check(device: torch.device, frames: int) -> str:
    """The same predictions counted on `device` and on the CPU: identical int64 matrices."""
    from segdist.metrics import ConfusionMatrix

    n, ignore = 19, 255
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(1, n, 1024, 2048, generator=g, device=device)
    matrices = {"device": ConfusionMatrix(n, ignore, device), "cpu": ConfusionMatrix(n, ignore)}
    for _ in range(frames):
        pred = logits.normal_(generator=g).argmax(1)
        target = torch.randint(0, n, pred.shape, generator=g, device=device)
        target[:, :100] = ignore
        matrices["device"].update(pred, target)
        matrices["cpu"].update(pred.cpu(), target.cpu().to(torch.uint8))
    same = torch.equal(matrices["device"].matrix.cpu(), matrices["cpu"].matrix)
    if not same:
        raise RuntimeError(f"the confusion matrices counted on {device} and on the CPU differ")
    total = int(matrices["cpu"].matrix.sum())
    return (f"2. exact count: {frames} label maps of 1024x2048, 19 classes, {total} valid pixels counted on {device} "
            f"and on the CPU from the same predictions: identical matrices")


def eval_check(args) -> str:
    from segdist.bench.scale import convert_shapes
    from segdist.distributed import launch_command

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NVIDIA_TF32_OVERRIDE": "0"}
    recipe = str(ROOT / "recipes" / "shapes_unet.toml")
    with tempfile.TemporaryDirectory(prefix="segdist-bench-gpu-") as tmp:
        data, run_dir = Path(tmp) / "data", Path(tmp) / "run"
        convert_shapes(data, 256, [64, 64], 5)
        sets = [f"data.root={data}", "data.val_root=null", f"train.run_dir={run_dir}", f"train.steps={args.train_steps}",
                f"train.ckpt_every={args.train_steps}", "train.eval_every=0", "log.images=0"]
        train = [a for s in sets for a in ("--set", s)]
        _check_run(launch_command("segdist.cli.train", [recipe, *train], 1, module=True), env, "training")
        metrics = {}
        for where, visible in (("device", env.get("CUDA_VISIBLE_DEVICES")), ("cpu", "")):
            out = Path(tmp) / f"eval-{where}.json"
            argv = launch_command("segdist.cli.eval", [
                recipe, "--checkpoint", str(run_dir), "--out", str(out), "--set", f"data.root={data}", "--set", "data.val_root=null",
                "--set", "train.precision=fp32"], 1, module=True)
            run_env = {**env, **({"CUDA_VISIBLE_DEVICES": visible} if visible is not None else {})}
            _check_run(argv, run_env, f"eval on the {where}")
            metrics[where] = json.loads(out.read_text())
    a, b = (torch.tensor(metrics[k]["confusion_matrix"]) for k in ("device", "cpu"))
    moved = int((a - b).abs().sum()) // 2  # a flipped pixel leaves one cell and enters another
    total = int(b.sum())
    verdict = "identical matrices" if moved == 0 else f"{moved} of {total} pixels' predictions differ"
    return (f"3. one checkpoint ({args.train_steps} steps), evaluated in fp32 on the device: mIoU "
            f"{metrics['device']['miou']:.6f}, on the CPU: {metrics['cpu']['miou']:.6f}; {total} valid pixels each; "
            f"{verdict}")


def _check_run(argv: list[str], env: dict, what: str) -> None:
    done = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise child_failure(f"bench gpu: {what}", done)
