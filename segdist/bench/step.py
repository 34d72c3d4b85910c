"""`launch/bench.py step`: segdist's train step against the loop a user writes by hand.

segdist's real `train_step` (exact loss normalisation, the packed collective, the non-finite guard,
BatchNorm restore) runs against forward, F.cross_entropy(ignore_index), backward, clip_grad_norm_,
optimizer.step: the same model, batches, precision ("auto" resolved on the device), AdamW
(segdist's default optim.implementation, fused, in both) and clipping, plain
DistributedDataParallel when several processes run. Timed in interleaved blocks of --block steps,
the two loops taking turns to go first, --rounds of them. It prints each loop's best block, their
ratio, and the paired ratio: the median over the rounds of bare / segdist for the two blocks that
ran back to back, which cancels the machine's drift between rounds (on 2 shared cores, two
identical bare loops gave best-block ratios from 0.92 to 1.05 at 2 processes, paired medians from
0.967 to 1.017, over 10 runs; `--aa` runs that check).

`--processes 1 2` launches the bench once per world size (`accelerate launch --multi_gpu` for
several, one thread each by default) and prints one table; launched by hand under `accelerate
launch` it times that world size.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from segdist.bench.options import require_positive

MODELS = {
    # name: (arch, encoder, arch_args, size, batch); 5 classes as the shapes demo
    "demo": ("unet", None, {"width": 16, "depth": 4}, 64, 8),
    "smp_unet_r18": ("Unet", "resnet18", {}, 256, 4),
}
CLASSES = 5


def add_parser(sub) -> None:
    p = sub.add_parser("step", help="segdist's train step vs a bare PyTorch (DDP) loop, interleaved",
                       description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(p)
    p.add_argument("--block", type=int, default=5, help="steps per timed block (default 5)")
    p.add_argument("--rounds", type=int, default=10,
                   help="blocks per loop, interleaved; the best and the paired median count (default 10)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--aa", action="store_true",
                   help="A/A check: a second bare loop (its own model, optimizer and DDP) takes segdist's place; how "
                        "far its ratios stray from 1 is this machine's noise floor for the bench")
    p.add_argument("--processes", type=int, nargs="+", default=None, metavar="N",
                   help="launch the bench once per world size N and print them together (e.g. 1 2); default: "
                        "time the world size this was launched with")
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)  # a launched child's figures, as JSON
    p.set_defaults(run=run)


def add_model_options(p) -> None:
    p.add_argument("--model", choices=sorted(MODELS), default="demo",
                   help="demo = recipes/shapes_unet.toml's UNet at 64x64, batch 8; smp_unet_r18 = smp Unet-ResNet18 at "
                        "256x256, batch 4 (default demo)")
    p.add_argument("--size", type=int, default=None, help="square input size (default: the model's)")
    p.add_argument("--batch", type=int, default=None, help="samples per process (default: the model's)")


@dataclass
class StepTiming:
    model: str
    size: int
    batch: int
    precision: str
    world: int
    segdist_s: float
    bare_s: float
    paired_ratio: float
    """The median over the rounds of bare / segdist, each round's two blocks run back to back."""
    flops_per_sample: int | None = None
    aa: bool = False
    """An A/A run: a second bare loop timed in segdist's place."""

    @property
    def ratio(self) -> float:
        return self.bare_s / self.segdist_s


def model_config(name: str, channels_last: bool = False, compile: bool = False):
    from segdist.recipe import ModelConfig

    arch, encoder, arch_args, _, _ = MODELS[name]
    return ModelConfig(arch=arch, encoder=encoder, encoder_weights=None, arch_args=dict(arch_args),
                       channels_last=channels_last, compile=compile)


def synthetic_window(size: int, batch: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One micro-batch as the loader gives it: uint8 HxWx3 images and uint8 labels of CLASSES
    classes, their top two rows ignored (255)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=g)
    masks = torch.randint(0, CLASSES, (batch, size, size), dtype=torch.uint8, generator=g)
    masks[:, :2] = 255
    return [(images, masks)]


def time_steps(args, accelerator, precision, channels_last: bool = False, compile: bool = False,
               flops: bool = False, aa: bool = False) -> StepTiming:
    """Both loops on this process's accelerator; every rank returns the same (rank 0's) figures.
    `aa`: a second bare loop in segdist's place (`--aa`)."""
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from segdist.train.step import train_step
    from segdist.preprocess import to_input
    from segdist.losses import build_loss
    from segdist.models import build_model, prepare_model
    from segdist.optim import IMPLEMENTATION_ARGS
    from segdist.recipe import LossConfig, OptimConfig
    from segdist.telemetry import flops_per_sample

    _, _, _, default_size, default_batch = MODELS[args.model]
    size, batch = args.size or default_size, args.batch or default_batch
    cfg = model_config(args.model, channels_last, compile)
    device, world = accelerator.device, accelerator.num_processes
    window = synthetic_window(size, batch, accelerator.process_index)  # each rank its own batch, as in training
    (images, masks), = window
    loss_fn = build_loss(LossConfig(), CLASSES, 255)

    how = IMPLEMENTATION_ARGS[OptimConfig().implementation]  # segdist's default, in both loops

    def fresh():
        torch.manual_seed(0)
        model = prepare_model(build_model(cfg, CLASSES), cfg, device.type, world)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3, **how)

    carried = {"counts": None}

    def segdist_loop():
        model, optimizer = accelerator.prepare(*fresh())

        def block():
            # As the trainer's loop runs it: each step's collective carries the next window's counts.
            for _ in range(args.block):
                out = train_step(model, optimizer, loss_fn, window, accelerator, 1.0, scaler=accelerator.scaler,
                                 counts=carried["counts"], fetch_next=lambda: window)
                carried["counts"] = out.next_counts
        return block

    def bare_loop():
        model, optimizer = fresh()
        model.to(device)
        if world > 1:
            model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        scaler = torch.amp.GradScaler(device.type) if precision.loss_scaling else None

        def block():
            for _ in range(args.block):
                with accelerator.autocast():
                    logits = model(to_input(images, device))
                labels = masks.to(device, non_blocking=True).long()  # as each new batch needs
                loss = F.cross_entropy(logits.float(), labels, ignore_index=255)
                if scaler is None:
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    optimizer.step()
                else:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    scaler.step(optimizer)
                    scaler.update()
                optimizer.zero_grad(set_to_none=True)
        return block

    # --aa: a second bare loop, built where segdist's is, takes segdist's place: the bench's noise floor
    segdist_block = bare_loop() if aa else segdist_loop()
    bare_block = bare_loop()

    def timed(fn) -> float:
        accelerator.wait_for_everyone()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / args.block

    timed(segdist_block), timed(bare_block)  # warm-up (and compilation)
    best = {"segdist": math.inf, "bare": math.inf}
    loops = [("segdist", segdist_block), ("bare", bare_block)]
    pairs = []
    for round_ in range(args.rounds):
        this = {}
        for name, fn in loops if round_ % 2 == 0 else loops[::-1]:  # neither always goes first
            this[name] = timed(fn)
            best[name] = min(best[name], this[name])
        pairs.append(this)
    # rank 0's clock speaks for all: the ranks run in lockstep through their collectives
    figures = torch.tensor([best["segdist"], best["bare"], paired_ratio(pairs)], dtype=torch.float64, device=device)
    if world > 1:
        torch.distributed.broadcast(figures, src=0)
    plain_cfg = model_config(args.model)
    count = flops_per_sample(lambda: build_model(plain_cfg, CLASSES), (size, size)) if flops else None
    return StepTiming(args.model, size, batch, precision.name, world, *figures.tolist(), count, aa)


def paired_ratio(rounds: list[dict[str, float]], numerator: str = "bare", denominator: str = "segdist") -> float:
    """The median over rounds of numerator / denominator, each round's blocks (seconds per step)
    timed back to back: a round the machine slowed down for both loops weighs no more than any other."""
    return statistics.median(r[numerator] / r[denominator] for r in rounds)


def run(args: argparse.Namespace) -> int:
    require_positive(args, "block", "rounds", "threads")
    if args.processes:
        return run_launched(args)
    from segdist.distributed import make_accelerator
    from segdist.precision import detect_hardware, resolve_precision

    precision = resolve_precision("auto")
    accelerator = make_accelerator(precision, 1)
    torch.set_num_threads(args.threads)
    timing = time_steps(args, accelerator, precision, aa=args.aa)
    if accelerator.is_main_process:
        if args.result:
            Path(args.result).write_text(json.dumps(timing.__dict__))
        else:
            print(header(args, [timing], detect_hardware().describe()))
            print(table([timing]))
    accelerator.end_training()
    return 0


def run_launched(args: argparse.Namespace) -> int:
    """One launch per world size, in the order given; one table."""
    from segdist.bench.launched import run_per_world_size
    from segdist.precision import detect_hardware

    child = ["--model", args.model, "--block", str(args.block), "--rounds", str(args.rounds), "--threads", str(args.threads)]
    child += [*(["--size", str(args.size)] if args.size else []), *(["--batch", str(args.batch)] if args.batch else [])]
    child += ["--aa"] if args.aa else []
    with tempfile.TemporaryDirectory(prefix="segdist-bench-step-") as tmp:
        timings = [StepTiming(**r) for r in run_per_world_size("step", child, args.processes, args.threads, tmp)]
    print(header(args, timings, detect_hardware().describe()))
    print(table(timings))
    return 0


def header(args, timings: list[StepTiming], machine: str) -> str:
    t = timings[0]
    worlds = ", ".join(str(x.world) for x in timings)
    what = "train step A/A (a second bare loop in segdist's column)" if t.aa else "train step"
    return (f"{what}: {t.model}, batch {t.batch} per process at {t.size}x{t.size}, {t.precision}, "
            f"{worlds} process(es), {args.threads} thread(s) each, {args.rounds} interleaved rounds of blocks of "
            f"{args.block} steps; {machine}")


def table(timings: list[StepTiming]) -> str:
    lines = [f"{'processes':>9} {'segdist ms/step':>16} {'bare ms/step':>13} {'bare / segdist':>15} {'paired':>7}",
             f"{'':>9} {'(best block)':>16} {'(best block)':>13} {'(best blocks)':>15} {'median':>7}"]
    for t in timings:
        lines.append(f"{t.world:>9} {1000 * t.segdist_s:>16.1f} {1000 * t.bare_s:>13.1f} {t.ratio:>15.3f} "
                     f"{t.paired_ratio:>7.3f}")
    return "\n".join(lines)
