"""`launch/bench.py optim`: segdist's train step under each optim.implementation.

segdist's real `train_step` on one process (the demo UNet by default, precision "auto" resolved on
the device), one model and optimizer per implementation of optim.name, all from the same weights
and on the same batch, timed in interleaved blocks of --block steps, the order turning round every
round. It prints each implementation's best block, the paired ratio for-loop / it (the median over
the rounds of the two blocks' ratio: the machine's drift between rounds cancels), and the optimizer
step alone (best of --rounds blocks of --block steps on the same gradients). for-loop is torch's
default on CPU; foreach is its default on CUDA; segdist's default is fused.
"""

from __future__ import annotations

import argparse
import time

import torch

from segdist.bench.options import require_positive


def add_parser(sub) -> None:
    from segdist.bench.step import add_model_options
    from segdist.optim import OPTIMIZERS

    p = sub.add_parser("optim", help="the train step under each optim.implementation (fused, foreach, for-loop)",
                       description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(p)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw", help="optim.name (default adamw)")
    p.add_argument("--block", type=int, default=5, help="steps per timed block (default 5)")
    p.add_argument("--rounds", type=int, default=10, help="blocks per implementation, interleaved (default 10)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from segdist.bench.step import CLASSES, MODELS, model_config, paired_ratio, synthetic_window
    from segdist.distributed import make_accelerator
    from segdist.losses import build_loss
    from segdist.models import build_model, prepare_model
    from segdist.optim import IMPLEMENTATION_ARGS, build_optimizer
    from segdist.precision import detect_hardware, resolve_precision
    from segdist.recipe import LossConfig, OptimConfig
    from segdist.train.step import train_step

    require_positive(args, "block", "rounds", "threads")
    precision = resolve_precision("auto")
    accelerator = make_accelerator(precision, 1)
    torch.set_num_threads(args.threads)
    device = accelerator.device
    _, _, _, default_size, default_batch = MODELS[args.model]
    size, batch = args.size or default_size, args.batch or default_batch
    cfg = model_config(args.model)
    window = synthetic_window(size, batch, 0)
    loss_fn = build_loss(LossConfig(), CLASSES, 255)
    names = list(IMPLEMENTATION_ARGS)
    setups = {}
    for name in names:
        torch.manual_seed(0)
        model = prepare_model(build_model(cfg, CLASSES), cfg, device.type, 1)
        optimizer = build_optimizer(model, OptimConfig(name=args.optimizer, implementation=name))
        setups[name] = accelerator.prepare(model, optimizer)

    def step_block(name: str) -> float:
        model, optimizer = setups[name]
        start = time.perf_counter()
        for _ in range(args.block):
            train_step(model, optimizer, loss_fn, window, accelerator, 1.0, scaler=accelerator.scaler)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / args.block

    def optimizer_block(name: str) -> float:
        model, prepared = setups[name]
        optimizer = prepared.optimizer  # torch's own, without Accelerate's wrapper
        for p in model.parameters():
            p.grad = torch.full_like(p, 1e-3)
        start = time.perf_counter()
        for _ in range(args.block):
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = (time.perf_counter() - start) / args.block
        optimizer.zero_grad(set_to_none=True)
        return seconds

    for name in names:  # warm-up
        step_block(name)
    steps = [{name: step_block(name) for name in (names if r % 2 == 0 else names[::-1])} for r in range(args.rounds)]
    alone = [{name: optimizer_block(name) for name in (names if r % 2 == 0 else names[::-1])} for r in range(args.rounds)]
    print(f"train step by optim.implementation: {args.model}, batch {batch} at {size}x{size}, {precision.name}, "
          f"{args.optimizer}, 1 process, {args.threads} thread(s), {args.rounds} interleaved rounds of blocks of "
          f"{args.block} steps; {detect_hardware().describe()}")
    print(table({name: (min(r[name] for r in steps), paired_ratio(steps, "for-loop", name), min(r[name] for r in alone))
                 for name in names}))
    accelerator.end_training()
    return 0


def table(rows: dict[str, tuple[float, float, float]]) -> str:
    lines = [f"{'implementation':<15} {'ms/step':>8} {'for-loop / it':>15} {'optimizer.step ms':>18}",
             f"{'':<15} {'(best)':>8} {'(paired median)':>15} {'(best, alone)':>18}"]
    for name, (step_s, ratio, alone_s) in rows.items():
        lines.append(f"{name:<15} {1000 * step_s:>8.1f} {ratio:>15.3f} {1000 * alone_s:>18.2f}")
    return "\n".join(lines)
