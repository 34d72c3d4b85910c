"""Predict images:  python launch/predict.py RECIPE --checkpoint PATH IMAGE_OR_GLOB... --out DIR
                     [--size H W] [--threshold T] [--set SECTION.KEY=VALUE ...]

Writes per image <stem>.png (class ids), <stem>_color.png (palette colours) and <stem>_prob.npy
(binary: float32 HxW sigmoid, plus <stem>_prob.png; multi-class: float16 CxHxW softmax). Every
input is checked before anything is written. Uses CUDA when there is a GPU, else the CPU.
"""

from __future__ import annotations

import argparse

from segdist.errors import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Segment image files with a trained checkpoint (its EMA weights when it has them): "
        "label map, colour map and probability map per image, written atomically into --out.",
        epilog="example: python launch/predict.py recipes/birds_unet.toml --checkpoint runs/birds_unet "
        "'photos/*.jpg' --out predictions --size 256 256",
    )
    p.add_argument("recipe", help="the recipe the checkpoint was trained with (or the run's recipe.toml)")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_GLOB",
                   help="image files (any format PIL reads; gray, RGBA, palette and 16-bit become RGB) "
                   "or quoted globs like 'photos/**/*.jpg'")
    p.add_argument("--checkpoint", required=True,
                   help="a run folder (its best checkpoint, else the latest) or one checkpoints/step-N folder")
    p.add_argument("--out", required=True, metavar="DIR", help="folder the predictions are written into (created)")
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="resize each image to H W for the model (the training scale; the probabilities are "
                   "resized back); default: the image's own size, padded to a multiple of 32")
    p.add_argument("--threshold", type=float, default=None, metavar="T",
                   help="binary models: label = probability > T (default 0.5)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe value, e.g. --set model.classes=1 (repeatable)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from segdist.infer import predict_files
    from segdist.recipe import load_recipe

    predict_files(load_recipe(args.recipe, args.overrides), args.checkpoint, args.images, args.out,
                  args.size, args.threshold)
    return 0


def run() -> None:
    """The `segdist-predict` console script (and `launch/predict.py`)."""
    run_cli(main)


if __name__ == "__main__":  # accelerate launch -m segdist.cli.predict ...
    run()
