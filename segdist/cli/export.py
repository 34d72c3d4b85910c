"""Export to ONNX:  python launch/export.py RECIPE --checkpoint PATH --out model.onnx [--opset N]
                                     [--size H W] [--static] [--set SECTION.KEY=VALUE ...]

The graph takes float32 Nx3xHxW RGB in [0, 255] (H, W multiples of 32; ImageNet normalisation is
inside) and gives NxKxHxW logits; batch, height and width are dynamic unless --static. It is
checked with onnx.checker and run with onnxruntime against torch before it is written. Needs the
`export` extra: pip install 'segdist[export]'.
"""

from __future__ import annotations

import argparse

from segdist.errors import run_cli


def build_parser() -> argparse.ArgumentParser:
    from segdist.export import DEFAULT_OPSET

    p = argparse.ArgumentParser(
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Export a trained checkpoint (its EMA weights when it has them) to ONNX with dynamic\n"
        "batch, height and width; check it with onnx.checker and compare onnxruntime with torch on random\n"
        "inputs at two sizes (the largest logit difference is printed). The input is float32 Nx3xHxW RGB\n"
        "in [0, 255], H and W multiples of 32; the ImageNet normalisation is inside the graph.",
        epilog="example:\n  python launch/export.py recipes/cityscapes_unet.toml --checkpoint runs/cityscapes_unet "
        "--out cityscapes_unet.onnx",
    )
    p.add_argument("recipe", help="the recipe the checkpoint was trained with (or the run's recipe.toml)")
    p.add_argument("--checkpoint", required=True,
                   help="a run folder (its best checkpoint, else the latest) or one checkpoints/step-N folder")
    p.add_argument("--out", required=True, metavar="FILE.onnx", help="the ONNX file to write (atomically)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="input size the model is traced at (multiples of 32; default data.crop rounded up)")
    p.add_argument("--static", action="store_true",
                   help="fix height and width at --size (batch stays dynamic): for runtimes or architectures "
                   "that need fixed sizes")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe value, e.g. --set data.root=/data/shards (repeatable)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from segdist.distributed import setup_logging
    from segdist.export import export_onnx
    from segdist.recipe import load_recipe

    setup_logging(True)
    result = export_onnx(load_recipe(args.recipe, args.overrides), args.checkpoint, args.out, args.opset,
                         args.size, args.static)
    sizes = ", ".join(f"{shape}: {diff:.2e}" for shape, diff in result.max_abs_diff.items())
    print(f"wrote {result.path} (opset {result.opset}, {'dynamic' if result.dynamic else 'static'} height and width, "
          f"{result.outputs} output{'s' if result.outputs > 1 else ''}); onnxruntime vs torch, max |logit diff| "
          f"per input shape: {sizes}", flush=True)
    return 0


def run() -> None:
    """The `segdist-export` console script (and `launch/export.py`)."""
    run_cli(main)


if __name__ == "__main__":
    run()
