"""Train a recipe:  accelerate launch [--multi_gpu --num_processes N] launch/train.py RECIPE [--set k=v ...] [--resume [auto]]

The command is `segdist.train` (segdist.train.run.train). One process per GPU under
`accelerate launch` or `torchrun`; on a CPU-only machine the same command forms a gloo group of N
CPU processes. `python launch/train.py RECIPE` runs one process.
SIGTERM or SIGUSR1 stop it after the current step with a checkpoint (exit 0); slurm/*.sbatch use
`--resume auto` so that a requeued job continues where it stopped.
"""

from __future__ import annotations

import argparse
import os

from segdist.errors import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a segmentation model from a TOML recipe with DDP, the precision the device "
        "runs fastest (train.precision = auto: bf16, fp16 with loss scaling, or fp32), gradient accumulation, "
        "exact evaluation, atomic checkpoints and TensorBoard logs in train.run_dir.",
        epilog="example: accelerate launch --multi_gpu --num_processes 2 launch/train.py "
        "recipes/shapes_unet.toml --set train.steps=200",
    )
    p.add_argument("recipe", help="path of the TOML recipe (see recipes/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe value, e.g. --set train.steps=100 (repeatable)")
    p.add_argument("--resume", nargs="?", const=True, default=False, choices=["auto"], metavar="auto",
                   help="continue from the latest complete checkpoint in train.run_dir (an error if there is "
                   "none); --resume auto: continue if there is one, else start (what a requeued job needs)")
    p.add_argument("--print-run-dir", action="store_true",
                   help="print the recipe's resolved train.run_dir and exit (used by slurm/*.sbatch)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.print_run_dir:
        from segdist.recipe import load_recipe

        print(os.path.abspath(load_recipe(args.recipe, args.overrides).train.run_dir))
        return 0
    import segdist

    segdist.train(args.recipe, args.overrides, resume=args.resume)  # False, True (--resume) or "auto"
    return 0


def run() -> None:
    """The `segdist-train` console script (and `launch/train.py`)."""
    run_cli(main)


if __name__ == "__main__":  # accelerate launch -m segdist.cli.train ...
    run()
