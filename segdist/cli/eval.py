"""Evaluate a checkpoint exactly:  accelerate launch [...] launch/eval.py RECIPE --checkpoint PATH [--split NAME]
                                   [--out FILE.json] [--report DIR [--show N]]

Every sample of the split is counted exactly once across all processes; the mIoU equals a single
process's bit for bit, whatever the number of processes (segdist.evaluate). The command loads the
checkpoint (segdist.models.load_trained: its EMA weights when it has them), checks that --out and
--report can be written before evaluating, and from the main process prints the per-class table and
writes the metrics JSON, the report folder and the strips of the worst samples.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from segdist.errors import UserError, run_cli

if TYPE_CHECKING:
    from segdist.data.manifest import Manifest
    from segdist.inference import InferenceMode

log = logging.getLogger("segdist")


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
    from segdist.recipe import load_recipe

    evaluate_checkpoint(load_recipe(args.recipe, args.overrides), args.checkpoint, args.split, args.out,
                        args.report, args.show)
    return 0


def evaluate_checkpoint(recipe, checkpoint: str, split: str | None = None, out: str | None = None,
                        report_dir: str | None = None, show: int = 0) -> dict:
    """The command's body: load a checkpoint, evaluate a split on every rank (segdist.evaluate),
    print, write the JSON (`out`), the report folder (`report_dir`: segdist.report.write_report)
    and strips of the `show` worst samples into it."""
    from segdist import report
    from segdist.data.manifest import load_split
    from segdist.distributed import make_accelerator, setup_logging
    from segdist.evaluate import evaluate
    from segdist.fileio import atomic_write_json, unwritable
    from segdist.inference import InferenceMode
    from segdist.metrics import format_table
    from segdist.models import load_trained
    from segdist.precision import resolve_precision

    if show < 0:
        raise UserError(f"--show must be a number of samples >= 0, got {show}")
    if show and report_dir is None:
        raise UserError("--show N writes its strips into the report folder: give --report DIR too")
    manifest = load_split(recipe.data, split or recipe.data.val_split, evaluation=True)
    # Training chose `best` by the EMA copy's mIoU: load_trained prefers the same weights.
    model, info = load_trained(recipe, checkpoint, manifest)
    path = info.checkpoint
    if out is not None and unwritable(Path(out).resolve().parent) is not None:
        raise UserError(f"--out {out}: its folder does not exist or is not writable")
    if report_dir is not None and unwritable(Path(report_dir).resolve(), create=True) is not None:
        raise UserError(f"--report {report_dir}: it is not a folder that can be created and written")
    accelerator = make_accelerator(resolve_precision(recipe.train.precision))
    setup_logging(accelerator.is_main_process)
    model.to(accelerator.device)
    mode = InferenceMode.from_recipe(recipe)
    log.info("evaluating %s on split %r (%d samples) with %d processes; %s",
             path, manifest.split, manifest.num_samples, accelerator.num_processes, mode.describe())
    metrics = evaluate(model, manifest, accelerator, recipe.eval.batch_size, recipe.eval.num_workers, mode,
                       per_image=bool(show))
    metrics["checkpoint"] = str(path)
    if accelerator.is_main_process:
        print(format_table(metrics, manifest.classes), flush=True)
        print(f"mIoU {metrics['miou']:.4f} on {metrics['num_samples']} samples, "
              f"{metrics['valid_pixels']} valid pixels ({accelerator.num_processes} processes)", flush=True)
        if out is not None:
            atomic_write_json(out, metrics)
        if report_dir is not None:
            report.write_report(report_dir, metrics, manifest.classes)
            if show:
                write_worst(Path(report_dir), model.eval(), manifest, metrics["per_image_iou"], show, accelerator, mode)
            print(f"report in {report_dir}", flush=True)
    accelerator.end_training()
    return metrics


def write_worst(folder: Path, model, manifest: Manifest, image_ious: dict, count: int, accelerator,
                mode: InferenceMode) -> list[Path]:
    """`worst-<i>-<key>.png` in `folder` for the `count` samples of lowest per-image IoU (ties by
    key): input | truth | prediction | errors, predicted again as evaluation predicted them."""
    from segdist import report
    from segdist.data.sample import decode_sample, read_shard
    from segdist.evaluate import predict_sample

    worst = sorted(image_ious, key=lambda k: (image_ious[k], k))[:count]
    rank = {key: i for i, key in enumerate(worst)}
    written = []
    for shard in manifest.sources():
        for sample in read_shard(shard):
            if sample["__key__"] not in rank:
                continue
            key, image, mask = decode_sample(sample, manifest.num_classes, manifest.ignore_index)
            pred = predict_sample(model, image, accelerator, mode)
            name = f"worst-{rank[key] + 1:0{len(str(count))}d}-{key.replace('/', '_')}.png"
            report.write_png(folder / name, report.strip(image, mask, pred, manifest.palette, manifest.ignore_index,
                                                        errors=True))
            written.append(folder / name)
    log.info("the %d worst samples by per-image IoU (%s) drawn in %s", len(worst),
             ", ".join(f"{k} {image_ious[k]:.3f}" for k in worst[:5]) + (", ..." if len(worst) > 5 else ""), folder)
    return written


def run() -> None:
    """The `segdist-eval` console script (and `launch/eval.py`)."""
    run_cli(main)


if __name__ == "__main__":  # accelerate launch -m segdist.cli.eval ...
    run()
