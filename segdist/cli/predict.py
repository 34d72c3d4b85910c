"""Predict images:  [accelerate launch --multi_gpu ...] launch/predict.py RECIPE --checkpoint PATH
                     IMAGE_FOLDER_OR_GLOB... --out DIR [--format F[,F...]] [--size H W] [--threshold T]
                     [--set SECTION.KEY=VALUE ...]

The command is `segdist.predict` (segdist.predict.files.predict_files, which says what each format
writes and how processes share the inputs); this module parses its arguments.
"""

from __future__ import annotations

import argparse

from segdist.errors import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Segment image files with a trained checkpoint (its EMA weights when it has them): label map,\n"
        "colour map, probability map, overlay or Cityscapes submission file per image, written atomically\n"
        "into --out. With several processes each rank takes its share of the files.",
        epilog="examples:\n"
        "  python launch/predict.py recipes/birds_unet.toml --checkpoint runs/birds_unet 'photos/*.jpg' \\\n"
        "      --out predictions --size 256 256\n"
        "  accelerate launch --multi_gpu --num_processes 4 launch/predict.py recipes/cityscapes_unet.toml \\\n"
        "      --checkpoint runs/cityscapes_unet data/cityscapes/leftImg8bit/test --out submission --format cityscapes",
    )
    p.add_argument("recipe", help="the recipe the checkpoint was trained with (or the run's recipe.toml)")
    p.add_argument("images", nargs="+", metavar="IMAGE_FOLDER_OR_GLOB",
                   help="image files (any format PIL reads; gray, RGBA, palette and 16-bit become RGB), "
                   "folders (their image files, recursively) or quoted globs like 'photos/**/*.jpg'")
    p.add_argument("--checkpoint", required=True,
                   help="a run folder (its best checkpoint, else the latest) or one checkpoints/step-N folder")
    p.add_argument("--out", required=True, metavar="DIR", help="folder the predictions are written into (created)")
    p.add_argument("--format", dest="formats", action="append", default=None, metavar="F[,F...]",
                   help="what to write per image (repeatable, or comma-separated): labels (<stem>.png class ids), color (<stem>_color.png), "
                   "prob (<stem>_prob.npy), overlay (<stem>_overlay.png: image and colours blended), "
                   "cityscapes (<frame>_pred_labelIds.png in Cityscapes label ids, for the benchmark server "
                   "and evalPixelLevelSemanticLabeling; needs its own --out); default: labels color prob")
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
    import segdist

    segdist.predict(args.recipe, args.images, checkpoint=args.checkpoint, out=args.out, overrides=args.overrides,
                    formats=args.formats, size=args.size, threshold=args.threshold)
    return 0


def run() -> None:
    """The `segdist-predict` console script (and `launch/predict.py`)."""
    run_cli(main)


if __name__ == "__main__":  # accelerate launch -m segdist.cli.predict ...
    run()
