"""`launch/bench.py data --rss`: the training loader's resident memory as the split grows.

For each size in `--rss-counts` (default 1k and 10k samples) it converts a split of small
`segdist.data.shapes` scenes, then, in a fresh process per size (so no allocator history carries
over), loads the manifest and takes the same number of batches through the real training path
(`load_manifest` -> `TrainStream` -> `train_loader`, shuffle buffer 256): `--rss-passes` (default 1)
times the largest split's samples, so every split is read whole. A thread samples every 20 ms the
process's RSS and the PSS of it and of its DataLoader workers (shared pages counted once); the table
prints the peaks side by side, the smallest split's as the baseline. Frames are small on purpose:
what could grow with the split is per-sample bookkeeping (the manifest, shard lists, sampling
weights), not pixels.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import tempfile
import threading
import time
from pathlib import Path

import psutil

from segdist.errors import UserError

MIB = 1 << 20


def write_split(root: Path, count: int, size: tuple[int, int], per_shard: int) -> None:
    from segdist.data.shapes import PALETTE, class_names, make_scene
    from segdist.data.shards import ShardWriter, encode_png

    with ShardWriter(root, "train", dataset="bench", classes=class_names(8), palette=PALETTE,
                     samples_per_shard=per_shard) as writer:
        for i in range(count):
            image, mask = make_scene(11, i, size[0], size[1], 8)
            writer.write(f"s{i:06d}", encode_png(image), "png", mask)
        writer.close()


def _pss(process: psutil.Process) -> int:
    """Proportional set size: shared pages (torch's libraries, forked memory) split among their users,
    so the tree's PSS adds up to what it really holds; RSS would count them once per worker."""
    info = process.memory_full_info()
    return getattr(info, "pss", info.uss)


def _peaks(stop: threading.Event, out: dict) -> None:
    me = psutil.Process()
    while not stop.is_set():
        try:
            workers = me.children(recursive=True)
            main, main_pss = me.memory_info().rss, _pss(me)
            workers_pss = sum(_pss(c) for c in workers)
        except psutil.Error:  # a worker ending between the listing and the read: sample again
            stop.wait(0.02)
            continue
        out["main"] = max(out.get("main", 0), main)
        out["main_pss"] = max(out.get("main_pss", 0), main_pss)
        out["workers_pss"] = max(out.get("workers_pss", 0), workers_pss)
        out["total"] = max(out.get("total", 0), main_pss + workers_pss)
        stop.wait(0.02)


def measure(root: str, args_dict: dict, queue) -> None:
    """In a fresh process: peak RSS while taking `batches` batches of the split at `root`."""
    import torch

    from segdist.data.augment import build_augment
    from segdist.data.manifest import load_manifest
    from segdist.data.sampling import sample_probabilities
    from segdist.data.stream import GlobalBatches, TrainStream, train_loader

    torch.set_num_threads(1)
    peaks: dict = {}
    stop = threading.Event()
    sampler = threading.Thread(target=_peaks, args=(stop, peaks), daemon=True)
    sampler.start()
    start = time.perf_counter()
    manifest = load_manifest(root, "train")
    draws = sample_probabilities(manifest, 0.01) if args_dict["sampling"] == "rare_class" else None
    stream = TrainStream(manifest, seed=0, transform=build_augment("crop", args_dict["crop"], 255),
                         shuffle_buffer=args_dict["shuffle_buffer"], probabilities=draws)
    batches = iter(train_loader(stream, GlobalBatches(0, 1, args_dict["batch_size"]), args_dict["workers"], pin_memory=False))
    for _ in range(args_dict["batches"]):
        next(batches)
    del batches
    stop.set()
    sampler.join()
    queue.put({**peaks, "seconds": time.perf_counter() - start,
               "manifest_kb": os.path.getsize(Path(root) / "train.json") / 1024})


def run_rss(args) -> int:
    from segdist.precision import detect_hardware

    counts = sorted(set(args.rss_counts))
    if counts[0] < args.batch_size:
        raise UserError(f"--rss-counts {counts[0]} is below --batch-size {args.batch_size}: the stream needs a full batch")
    if min(args.rss_size) < 8:
        raise UserError(f"--rss-size {args.rss_size[0]} {args.rss_size[1]} is too small: give at least 8 8")
    if not args.rss_passes > 0 or args.rounds < 1 or args.workers < 0:
        raise UserError("--rss-passes must be > 0, --rounds >= 1 and --workers >= 0")
    batches = math.ceil(args.rss_passes * counts[-1] / args.batch_size)
    settings = {"crop": (min(32, args.rss_size[0]), min(32, args.rss_size[1])), "shuffle_buffer": 256,
                "batch_size": args.batch_size, "workers": args.workers, "batches": batches,
                "sampling": args.rss_sampling}
    ctx = multiprocessing.get_context("spawn")
    runs: dict[int, list[dict]] = {count: [] for count in counts}
    with tempfile.TemporaryDirectory(prefix="segdist-rss-") as tmp:
        base = Path(args.workdir) if args.workdir else Path(tmp)
        for count in counts:
            root = base / f"rss-{count}"
            if not (root / "train.json").is_file():
                write_split(root, count, tuple(args.rss_size), args.samples_per_shard)
        for _ in range(args.rounds):  # interleaved: a busy moment hits every size alike
            for count in counts:
                queue = ctx.Queue()
                child = ctx.Process(target=measure, args=(str(base / f"rss-{count}"), settings, queue))
                child.start()
                runs[count].append(queue.get())
                child.join()
                if child.exitcode != 0:
                    raise RuntimeError(f"the measuring process for {count} samples exited with {child.exitcode}")
    # The workers' PSS moves by several percent from run to run (how many of the parent's pages
    # each worker happens to copy on write); the least of the rounds is the steadiest figure.
    results = {count: {**min(r, key=lambda x: x["total"]), "spread": max(x["total"] for x in r) - min(x["total"] for x in r)}
               for count, r in runs.items()}
    print(rss_table(args, counts, batches, results, detect_hardware().describe()))
    return 0


def rss_table(args, counts: list[int], batches: int, results: dict, machine: str) -> str:
    h, w = args.rss_size
    lines = [
        f"loader memory: splits of {', '.join(map(str, counts))} samples of {w}x{h}, {args.samples_per_shard} per "
        f"shard; {batches} batches of {args.batch_size} for every split ({args.rss_passes:g} x the largest), {args.workers} workers, shuffle buffer 256, "
        f"sampling {args.rss_sampling}; peaks sampled every 20 ms, the least of {args.rounds} rounds; {machine}",
        f"{'samples':>8}{'manifest KB':>13}{'main RSS MiB':>14}{'main PSS':>10}{'workers PSS':>13}{'total PSS':>11}{'spread':>8}"
        f"{'vs ' + str(counts[0]):>10}",
    ]
    base = results[counts[0]]["total"]
    for count in counts:
        r = results[count]
        lines.append(f"{count:>8}{r['manifest_kb']:>13.0f}{r['main'] / MIB:>14.1f}{r['main_pss'] / MIB:>10.1f}"
                     f"{r['workers_pss'] / MIB:>13.1f}{r['total'] / MIB:>11.1f}"
                     f"{r['spread'] / MIB:>8.0f}{100 * (r['total'] / base - 1):>+9.1f}%")
    return "\n".join(lines)
