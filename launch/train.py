"""Train a recipe:  accelerate launch [--multi_gpu --num_processes N] launch/train.py RECIPE [--set k=v ...] [--resume]

One process per GPU under `accelerate launch` or `torchrun`; on a CPU-only machine the same
command forms a gloo group of N CPU processes. `python launch/train.py RECIPE` runs one process.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from segdist.errors import run_cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/train.py",
        description="Train a segmentation model from a TOML recipe with DDP, bf16, gradient "
        "accumulation, exact evaluation, atomic checkpoints and TensorBoard logs in train.run_dir.",
        epilog="example: accelerate launch --multi_gpu --num_processes 2 launch/train.py "
        "recipes/shapes_unet.toml --set train.steps=200",
    )
    p.add_argument("recipe", help="path of the TOML recipe (see recipes/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe value, e.g. --set train.steps=100 (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest complete checkpoint in train.run_dir")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from segdist.engine import train
    from segdist.recipe import load_recipe

    train(load_recipe(args.recipe, args.overrides), resume=args.resume)
    return 0


if __name__ == "__main__":
    run_cli(main)
