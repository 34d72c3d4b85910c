"""`launch/bench.py eval`: evaluation throughput of whole, slide and slide + flip, in canonical
groups of --batch-size frames and with every frame alone (batch 1), and the share of the grouped
run's wall time spent counting (ConfusionMatrix.update) and in the all-reduce.

The real path: segdist.evaluate.evaluate over converted shapes shards (the bench converts
--count frames of --size x --size unless --data names a converted root with a `val` split), the
demo recipe's UNet (random weights: the speed does not depend on them), in this process (1
process: the all-reduce is a no-op here; launched with several processes it is the real one).
The update and the all-reduce are timed by wrapping them for the bench's run; on a GPU each timed
call synchronises first, so the share is of work done, not of work queued.

Both groupings give batches that do not depend on the world size (segdist.data.stream.EvalStream):
"groups" is evaluation with eval.batch_size = --batch-size, "alone" with eval.batch_size = 1 (the
slide windows still go --batch-size per forward pass). Each mode runs them --rounds times,
alternating which goes first, and keeps each one's best time; `groups/alone` is the ratio of
their samples/s.

`--processes 1 2` converts the frames once and launches the bench once per world size
(`accelerate launch --multi_gpu` for several: gloo on CPUs, NCCL on GPUs); each rank evaluates
its share, and the table gives the split's samples/s and the shares of rank 0's wall time: the
update, the all-reduce itself, and the wait at a barrier just before it for the slower rank to
finish its share (load imbalance, not the collective's cost).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from segdist.bench.options import require_positive


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="eval samples/s of whole / slide / slide+flip, grouped and alone, and the counting share",
                       description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="converted data root with a `val` split (default: shapes converted here)")
    p.add_argument("--count", type=int, default=64, help="frames converted when --data is not given (default 64)")
    p.add_argument("--size", type=int, default=256, help="side of the converted frames (default 256)")
    p.add_argument("--crop", type=int, default=128, help="slide window side (default 128; stride two thirds of it)")
    p.add_argument("--batch-size", type=int, default=8, help="frames per canonical group, and slide windows per forward (default 8)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--rounds", type=int, default=1, help="runs of each grouping per mode, the best counts (default 1)")
    p.add_argument("--processes", type=int, nargs="+", default=None, metavar="N",
                   help="world sizes to launch the bench with, one after the other (e.g. 1 2); default: this process")
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)  # a launched child's rows, as JSON
    p.set_defaults(run=run)


class Timed:
    """Wall seconds spent in one callable, synchronising the device before each clock read."""

    def __init__(self, fn, device: torch.device, barrier: bool = False) -> None:
        self.fn, self.device, self.seconds = fn, device, 0.0
        self.barrier, self.waited = barrier, 0.0
        """With `barrier`: first wait (timed apart, in `waited`) for the other ranks to arrive, so
        that `seconds` is the collective itself, not a slower rank's lag."""

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, *args, **kwargs):
        self._sync()
        if self.barrier:
            start = time.perf_counter()
            torch.distributed.barrier()
            self.waited += time.perf_counter() - start
        start = time.perf_counter()
        out = self.fn(*args, **kwargs)
        self._sync()
        self.seconds += time.perf_counter() - start
        return out


def run(args: argparse.Namespace) -> int:
    require_positive(args, "count", "size", "crop", "batch_size", "threads", "rounds")
    if args.processes:
        return run_launched(args)
    from segdist.bench.scale import convert_shapes

    with tempfile.TemporaryDirectory(prefix="segdist-bench-eval-") as tmp:
        root = Path(args.data) if args.data else Path(tmp) / "data"
        if not args.data:
            convert_shapes(root, 8, [args.size, args.size], 5, val_count=args.count)
        return measure(args, root)


def measure(args: argparse.Namespace, root: Path) -> int:
    """The three modes, grouped and alone, in this process (one rank of a launched bench)."""
    from segdist.data.manifest import load_manifest
    from segdist.distributed import make_accelerator
    from segdist.evaluate import evaluate
    from segdist.inference import InferenceMode
    from segdist.metrics import ConfusionMatrix
    from segdist.models import build_model
    from segdist.precision import detect_hardware, resolve_precision
    from segdist.recipe import ModelConfig

    precision = resolve_precision("auto")
    accelerator = make_accelerator(precision, 1)
    torch.set_num_threads(args.threads)
    crop = (args.crop, args.crop)
    stride = tuple(max(1, 2 * c // 3) for c in crop)
    variants = {"whole": InferenceMode(batch_size=args.batch_size),
                "slide": InferenceMode("slide", crop, stride, batch_size=args.batch_size),
                "slide + flip": InferenceMode("slide", crop, stride, flip=True, batch_size=args.batch_size)}
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="unet", encoder=None, encoder_weights=None,
                                    arch_args={"width": 16, "depth": 4}), 5).to(accelerator.device).eval()
    rows = []
    manifest = load_manifest(root, "val")
    original_update, original_reduce = ConfusionMatrix.update, accelerator.reduce
    for name, mode in variants.items():
        best: dict[int, tuple] = {}  # group size -> (wall, update, reduce) of its fastest run
        for r in range(args.rounds):
            for group in (args.batch_size, 1) if r % 2 == 0 else (1, args.batch_size):
                update = Timed(original_update, accelerator.device)
                reduce = Timed(original_reduce, accelerator.device, barrier=accelerator.num_processes > 1)
                ConfusionMatrix.update = lambda self, pred, target, _timed=update: _timed(self, pred, target)
                accelerator.reduce = reduce
                try:
                    accelerator.wait_for_everyone()
                    start = time.perf_counter()
                    metrics = evaluate(model, manifest, accelerator, group, 0, mode)
                    wall = time.perf_counter() - start
                finally:
                    ConfusionMatrix.update, accelerator.reduce = original_update, original_reduce
                if group not in best or wall < best[group][0]:
                    best[group] = (wall, update, reduce)
        wall, update, reduce = best[args.batch_size]
        alone = best[1][0]
        rows.append((name, accelerator.num_processes, metrics["num_samples"] / wall, metrics["num_samples"] / alone,
                     update.seconds / wall, reduce.seconds / wall, reduce.waited / wall))
    if accelerator.is_main_process:
        if args.result:
            Path(args.result).write_text(json.dumps({"rows": rows, "precision": precision.name,
                                                     "samples": manifest.num_samples, "frames": frames(manifest, args)}))
        else:
            print(header(args, manifest.num_samples, frames(manifest, args), precision.name,
                         [accelerator.num_processes], detect_hardware().describe()))
            print(table(rows))
    accelerator.end_training()
    return 0


def run_launched(args: argparse.Namespace) -> int:
    """Convert once, launch once per world size, one table."""
    from segdist.bench.launched import run_per_world_size
    from segdist.bench.scale import convert_shapes
    from segdist.precision import detect_hardware

    with tempfile.TemporaryDirectory(prefix="segdist-bench-eval-") as tmp:
        root = Path(args.data) if args.data else Path(tmp) / "data"
        if not args.data:
            convert_shapes(root, 8, [args.size, args.size], 5, val_count=args.count)
        child = ["--data", str(root), "--size", str(args.size), "--crop", str(args.crop),
                 "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--rounds", str(args.rounds)]
        results = run_per_world_size("eval", child, args.processes, args.threads, tmp)
    rows = [tuple(row) for r in results for row in r["rows"]]
    print(header(args, results[0]["samples"], results[0]["frames"], results[0]["precision"], args.processes,
                 detect_hardware().describe()))
    print(table(rows))
    return 0


def frames(manifest, args: argparse.Namespace) -> str:
    """The frames' size as the manifest stores it ("HxW", or "HxW to HxW"); --size where not recorded."""
    sizes = (manifest.frame_sizes or {}).get("stored")
    if sizes is None:
        return f"{args.size}x{args.size}"
    low, high = ("x".join(map(str, sizes[end])) for end in ("min", "max"))
    return low if low == high else f"{low} to {high}"


def header(args, samples: int, frame: str, precision: str, worlds, machine: str) -> str:
    stride = max(1, 2 * args.crop // 3)
    return (f"eval throughput: {samples} frames of {frame}, demo UNet, {precision}, "
            f"groups of {args.batch_size} against alone, slide window {args.crop} stride {stride} "
            f"({args.batch_size} windows per forward), {', '.join(map(str, worlds))} process(es), "
            f"{args.threads} thread(s) each, best of {args.rounds}; {machine}")


def table(rows) -> str:
    lines = [f"{'mode':<14} {'processes':>9} {'samples/s':>10} {'alone/s':>8} {'groups/alone':>12} "
             f"{'update share':>13} {'all-reduce share':>17} {'rank wait share':>16}"]
    for name, world, rate, alone, update_share, reduce_share, wait_share in rows:
        lines.append(f"{name:<14} {world:>9} {rate:>10.1f} {alone:>8.1f} {rate / alone:>12.2f} "
                     f"{100 * update_share:>12.2f}% {100 * reduce_share:>16.2f}% {100 * wait_share:>15.2f}%")
    return "\n".join(lines)
