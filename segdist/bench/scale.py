"""`launch/bench.py scale`: training samples/s at 1 process against 2 (or any world sizes).

The real training path: the train command (segdist.cli.train) on a recipe (default the demo's,
recipes/shapes_unet.toml), reading converted shards through the augmenting stream and its loader,
each process with --threads torch threads. Every run trains --steps steps with logging every
--steps / 5; the trainer's own telemetry (TensorBoard perf/*) gives samples/s and data-wait share,
the first logged window (warm-up) left out. Rounds interleave the world sizes. The data is
converted once, with the shapes converter, unless --data names a converted root.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from segdist.bench.launched import child_failure
from segdist.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def add_parser(sub) -> None:
    p = sub.add_parser("scale", help="training samples/s at 1 vs 2 processes on the real training path",
                       description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "shapes_unet.toml"),
                   help="recipe trained (default recipes/shapes_unet.toml)")
    p.add_argument("--data", default=None,
                   help="converted data root with the recipe's splits (default: shapes scenes converted here, "
                        "--count training samples at the recipe's crop)")
    p.add_argument("--count", type=int, default=512, help="training samples converted when --data is not given "
                                                          "(default 512)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps per run (default 100)")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2], metavar="N",
                   help="world sizes compared; the first is the baseline (default 1 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds, the best counts (default 1)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="recipe override passed to every run (repeatable)")
    p.set_defaults(run=run)


def convert_shapes(root: Path, count: int, crop: list[int], classes: int, val_count: int = 32) -> None:
    """Shapes scenes of the crop's size, train (`count`) and val (`val_count`), by the real
    converter; its report goes to stderr, leaving stdout to the bench's table."""
    from segdist.data.convert import build_parser

    size = [str(crop[0]), str(crop[1])]
    for split, n, seed in (("train", count, 1), ("val", val_count, 2)):
        args = build_parser().parse_args(["shapes", "--out", str(root), "--split", split, "--count", str(n),
                                          "--seed", str(seed), "--size", *size, "--classes", str(classes),
                                          "--samples-per-shard", str(max(1, n // 8))])
        with contextlib.redirect_stdout(sys.stderr):
            args.run(args)


def perf_of(run_dir: Path) -> dict[str, float]:
    """samples/s and data-wait share of a finished run, from its TensorBoard perf/* scalars; the
    first logged window is warm-up and left out, the others weigh by their (equal) steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    rates = [e.value for e in events.Scalars("perf/samples_per_s")][1:]
    waits = [e.value for e in events.Scalars("perf/data_wait_share")][1:]
    steps = [e.value for e in events.Scalars("perf/step_time_ms")][1:]
    return {"samples_per_s": len(rates) / sum(1 / r for r in rates), "data_wait_share": sum(waits) / len(waits),
            "step_time_ms": sum(steps) / len(steps)}


def train_once(recipe: str, data: Path, run_dir: Path, steps: int, nproc: int, threads: int,
               overrides: list[str]) -> dict[str, float]:
    from segdist.distributed import launch_command

    every = max(1, steps // 5)
    sets = [f"data.root={data}", "data.val_root=null", f"train.run_dir={run_dir}", f"train.steps={steps}", "train.eval_every=0",
            f"train.ckpt_every={steps}", f"log.every={every}", "log.images=0", *overrides]
    argv = launch_command("segdist.cli.train", [recipe, *[a for s in sets for a in ("--set", s)]], nproc, module=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise child_failure(f"training with {nproc} process(es)", done)
    return perf_of(run_dir)


def run(args: argparse.Namespace) -> int:
    from segdist.distributed import loader_workers
    from segdist.precision import detect_hardware
    from segdist.recipe import load_recipe

    if args.steps < 10:
        raise UserError(f"--steps must be >= 10 (five logged windows of >= 2 steps), got {args.steps}")
    if min(args.processes) < 1 or args.threads < 1 or args.rounds < 1 or args.count < 1:
        raise UserError("--processes, --threads, --rounds and --count must be >= 1")
    recipe = load_recipe(args.recipe, args.set)
    best: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="segdist-bench-scale-") as tmp:
        data = Path(args.data) if args.data else Path(tmp) / "data"
        if not args.data:
            convert_shapes(data, args.count, recipe.data.crop, recipe.model.classes or 5)
        for round_ in range(args.rounds):
            for n in args.processes:
                perf = train_once(args.recipe, data, Path(tmp) / f"run-{round_}-{n}", args.steps, n, args.threads,
                                  args.set)
                if n not in best or perf["samples_per_s"] > best[n]["samples_per_s"]:
                    best[n] = perf
    base = best[args.processes[0]]["samples_per_s"]
    r = recipe.data
    # What each run's trainer resolved data.num_workers to, through the same resolver ("auto" varies with n).
    workers = {n: loader_workers(r.num_workers, local_world=n)[0] for n in args.processes}
    worker_text = (f"{workers[args.processes[0]]} loader worker(s) per process" if len(set(workers.values())) == 1
                   else "data.num_workers auto: " + ", ".join(f"{w} loader worker(s) per process with {n} process(es)"
                                                               for n, w in workers.items()))
    print(f"training throughput: {Path(args.recipe).name}, batch {r.batch_size} per process at "
          f"{r.crop[1]}x{r.crop[0]}, {worker_text}, {args.threads} thread(s) per "
          f"process, {args.steps} steps per run, best of {args.rounds}; {os.cpu_count()} cores; "
          f"{detect_hardware().describe()}")
    print(f"{'processes':>9} {'samples/s':>10} {'ms/step':>8} {'data wait':>10} {'speed-up':>9}")
    for n in args.processes:
        p = best[n]
        print(f"{n:>9} {p['samples_per_s']:>10.1f} {p['step_time_ms']:>8.0f} {100 * p['data_wait_share']:>9.1f}% "
              f"{p['samples_per_s'] / base:>8.2f}x")
    return 0
