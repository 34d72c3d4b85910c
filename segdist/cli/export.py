"""Export:  python launch/export.py RECIPE --checkpoint PATH --out model.onnx [--opset N] [--size H W]
                                [--static] [--set SECTION.KEY=VALUE ...]
           python launch/export.py RECIPE --checkpoint PATH --format hf --out DIR

ONNX (the default): the graph takes float32 Nx3xHxW RGB in [0, 255] (H, W multiples of 32; ImageNet
normalisation is inside) and gives NxKxHxW logits; batch, height and width are dynamic unless
--static. It is checked with onnx.checker and run with onnxruntime against torch before it is
written. Needs the `export` extra: pip install 'segdist[export]'.

hf: a folder that loads without segdist (segdist.hfexport): smp architectures with
segmentation_models_pytorch.from_pretrained(DIR), our UNet and SegNet with the modeling file in it;
with a model card (README.md). DIR must be new or empty.
"""

from __future__ import annotations

import argparse

from segdist.errors import UserError, run_cli

FORMATS = ("onnx", "hf")


def build_parser() -> argparse.ArgumentParser:
    from segdist.export import DEFAULT_OPSET

    p = argparse.ArgumentParser(
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Export a trained checkpoint (its EMA weights when it has them).\n"
        "--format onnx (default): ONNX with dynamic batch, height and width; checked with onnx.checker and\n"
        "onnxruntime against torch on random inputs at two sizes (the largest logit difference is printed).\n"
        "The input is float32 Nx3xHxW RGB in [0, 255], H and W multiples of 32; the ImageNet normalisation\n"
        "is inside the graph.\n"
        "--format hf: a folder that loads without segdist (smp models with\n"
        "segmentation_models_pytorch.from_pretrained, our unet and segnet with its modeling_segdist.py),\n"
        "with a model card README.md: classes, palette, input normalisation, training data, recipe, metrics.",
        epilog="examples:\n  python launch/export.py recipes/cityscapes_unet.toml --checkpoint runs/cityscapes_unet "
        "--out cityscapes_unet.onnx\n  python launch/export.py recipes/cityscapes_unet.toml --checkpoint "
        "runs/cityscapes_unet --format hf --out cityscapes_unet",
    )
    p.add_argument("recipe", help="the recipe the checkpoint was trained with (or the run's recipe.toml)")
    p.add_argument("--checkpoint", required=True,
                   help="a run folder (its best checkpoint, else the latest) or one checkpoints/step-N folder")
    p.add_argument("--format", choices=FORMATS, default="onnx",
                   help="onnx: one ONNX file (default); hf: a folder others load without segdist")
    p.add_argument("--out", required=True, metavar="FILE.onnx|DIR",
                   help="the ONNX file to write, or the folder for --format hf (new or empty); written atomically")
    p.add_argument("--opset", type=int, default=None, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="ONNX: input size the model is traced at (multiples of 32; default data.crop rounded up)")
    p.add_argument("--static", action="store_true",
                   help="ONNX: fix height and width at --size (batch stays dynamic): for runtimes or architectures "
                   "that need fixed sizes")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe value, e.g. --set data.root=/data/shards (repeatable)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from segdist.distributed import setup_logging
    from segdist.export import DEFAULT_OPSET, export_onnx
    from segdist.recipe import load_recipe

    setup_logging(True)
    if args.format == "hf":
        return export_folder(args)
    result = export_onnx(load_recipe(args.recipe, args.overrides), args.checkpoint, args.out,
                         DEFAULT_OPSET if args.opset is None else args.opset, args.size, args.static)
    sizes = ", ".join(f"{shape}: {diff:.2e}" for shape, diff in result.max_abs_diff.items())
    print(f"wrote {result.path} (opset {result.opset}, {'dynamic' if result.dynamic else 'static'} height and width, "
          f"{result.outputs} output{'s' if result.outputs > 1 else ''}); onnxruntime vs torch, max |logit diff| "
          f"per input shape: {sizes}", flush=True)
    return 0


def export_folder(args) -> int:
    """--format hf: the folder (segdist.hfexport), after refusing the ONNX-only options."""
    from segdist.hfexport import export_hf
    from segdist.recipe import load_recipe

    given = [name for name, value in (("--opset", args.opset), ("--size", args.size), ("--static", args.static))
             if value not in (None, False)]
    if given:
        raise UserError(f"{given[0]} is an ONNX option: --format hf writes the model as it is; drop {given[0]}")
    result = export_hf(load_recipe(args.recipe, args.overrides), args.checkpoint, args.out)
    loader = "segmentation_models_pytorch.from_pretrained" if result.smp else "its modeling_segdist.py"
    print(f"wrote {result.path} ({', '.join(result.files)}): loads with {loader}; "
          f"{'EMA' if result.ema else 'raw'} weights; max |logit diff| against the checkpoint's model: "
          f"{result.max_abs_diff:.2e}", flush=True)
    for gap in result.gaps:
        print(f"model card: no {gap}", flush=True)
    return 0


def run() -> None:
    """The `segdist-export` console script (and `launch/export.py`)."""
    run_cli(main)


if __name__ == "__main__":
    run()
