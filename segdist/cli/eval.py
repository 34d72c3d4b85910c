"""Evaluate a checkpoint exactly:  accelerate launch [...] launch/eval.py RECIPE --checkpoint PATH [--split NAME]
                                   [--out FILE.json] [--report DIR [--show N]]

Every sample of the split is counted exactly once across all processes; the mIoU equals a single
process's bit for bit, whatever the number of processes. The command is `segdist.evaluate`
(segdist.evaluate.evaluate_checkpoint): it loads the checkpoint (segdist.models.load_trained: its
EMA weights when it has them), checks that --out and --report can be written before evaluating, and
from the main process prints the per-class table and writes the metrics JSON, the report folder and
the strips of the worst samples.
"""

from __future__ import annotations

import argparse

from segdist.errors import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Exact distributed evaluation: per-rank int64 confusion matrices, one all-reduce; "
        "prints the per-class table and mIoU, writes the metrics JSON with --out and a report folder "
        "(per-class CSV and Markdown, confusion figure, worst samples) with --report.",
    )
    p.add_argument("recipe", help="the recipe the checkpoint was trained with (or the run's recipe.toml)")
    p.add_argument("--checkpoint", required=True,
                   help="a run folder (its best checkpoint, else the latest) or one checkpoints/step-N folder")
    p.add_argument("--split", default=None, help="split to evaluate (default: the recipe's data.val_split)")
    p.add_argument("--out", default=None, metavar="FILE.json", help="write the metrics JSON here (atomically)")
    p.add_argument("--report", default=None, metavar="DIR",
                   help="write the report into DIR (created): metrics.json, per_class.csv, per_class.md and "
                   "confusion.png (row-normalised, class names on the axes)")
    p.add_argument("--show", type=int, default=0, metavar="N",
                   help="with --report: also draw the N worst samples by per-image IoU as "
                   "worst-<i>-<key>.png strips (input | truth | prediction | errors in red)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe value, e.g. --set data.root=/data/shards (repeatable)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import segdist

    segdist.evaluate(args.recipe, checkpoint=args.checkpoint, overrides=args.overrides, split=args.split,
                     out=args.out, report=args.report, show=args.show)
    return 0


def run() -> None:
    """The `segdist-eval` console script (and `launch/eval.py`)."""
    run_cli(main)


if __name__ == "__main__":  # accelerate launch -m segdist.cli.eval ...
    run()
