"""`launch/bench.py data`: training-input throughput on Cityscapes-size frames (2048x1024). It writes the same
synthetic frames three ways — a folder of PNG image + PNG mask files, shards storing PNG images,
shards storing JPEG images (quality 90, as `launch/shard.py ... --image-format jpeg
--jpeg-quality 90` writes them) — then measures four loaders, in one run with the same workers,
batch size and augmentation preset: the folder (a plain map-style torch Dataset, shuffled, that
reads the two files); the PNG shards scanned front to back, each worker its share (`png-scan`,
`ShardScan`: how the training stream read before it read by position); and the PNG and JPEG shards
through the training stream (`TrainStream` + `GlobalBatches` + `train_loader`, each sample read by
its offsets in a pass's block-shuffled order). All run the same `decode_sample` and preset.
- 1-process CPU ms: read + `decode_sample` + the preset per sample in this process, no loader;
- the loaders, timed after `--warmup` batches, best of `--rounds` interleaved rounds. Loader CPU
  ms/sample (main process + workers) barely moves when other jobs share the machine; loader
  samples/s (wall clock) is what training sees, and does move;
- read KB/sample: the folder's two files; a whole shard per its samples when scanned; the span a
  read by offset takes (from the first member's tar header to the last member's end).

Frames are `segdist.data.shapes` scenes drawn at a quarter of the size and upscaled: smooth
regions, sharp edges and grain compress roughly like street photos (the stored MB/sample column
shows it: ~2.8 MB as PNG, where Cityscapes' PNGs average ~2.2 MB). All files sit in the page
cache: reading costs syscalls (and, for the scan, tar parsing), not disk — cold storage would
favour sequential scans more.
"""

from __future__ import annotations

import argparse
import os
import tarfile
import tempfile
import time
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import psutil
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler, get_worker_info

from segdist.bench.options import require_positive
from segdist.data.augment import PRESETS, build_augment, seed_pipeline
from segdist.data.convert import parallel_map
from segdist.data.shapes import PALETTE, class_names, make_scene
from segdist.data.shards import ShardWriter, encode_jpeg, encode_mask, encode_png
from segdist.data.sample import decode_sample, make_sample, read_sample, read_shard
from segdist.data.manifest import load_manifest
from segdist.data.stream import GlobalBatches, PassOrder, TrainStream, train_loader
from segdist.errors import UserError

CLASSES = 8  # the most segdist.data.shapes draws


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="training-input throughput: shards vs a folder of files, JPEG vs PNG",
                       description=__doc__.split("\n\n")[0].split(": ", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=48, help="frames written (default 48)")
    p.add_argument("--size", type=int, nargs=2, default=[1024, 2048], metavar=("H", "W"), help="frame size (default 1024 2048)")
    p.add_argument("--crop", type=int, nargs=2, default=[512, 1024], metavar=("H", "W"), help="training crop (default 512 1024)")
    p.add_argument("--augment", default="cityscapes", choices=sorted(PRESETS), help="augmentation preset (default cityscapes)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per batch (default 8)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers, the same for every row (default 2)")
    p.add_argument("--batches", type=int, default=16, help="batches timed per loader run (default 16)")
    p.add_argument("--warmup", type=int, default=2, help="batches taken before the clock starts (default 2)")
    p.add_argument("--rounds", type=int, default=2, help="loader runs per row, the best counts (default 2)")
    p.add_argument("--samples-per-shard", type=int, default=8, help="shard size (default 8)")
    p.add_argument("--workdir", default=None, help="write the data here and keep it (default: a temporary folder)")
    rss = p.add_argument_group("--rss: the loader's resident memory as the split grows (segdist/bench/rss.py)")
    rss.add_argument("--rss", action="store_true",
                     help="measure the peak memory of the training loader (main process + workers) over splits of "
                          "--rss-counts samples instead of throughput; --batch-size, --workers, --rounds and --samples-per-shard apply")
    rss.add_argument("--rss-counts", type=int, nargs="+", default=[1000, 10000], metavar="N",
                     help="split sizes, the smallest is the baseline (default 1000 10000)")
    rss.add_argument("--rss-size", type=int, nargs=2, default=[64, 64], metavar=("H", "W"),
                     help="frame size of the --rss splits (default 64 64)")
    rss.add_argument("--rss-passes", type=float, default=1.0, metavar="P",
                     help="samples taken from every split: P x the largest split's (default 1)")
    rss.add_argument("--rss-sampling", choices=("uniform", "rare_class"), default="uniform",
                     help="data.sampling of the measured stream (default uniform)")
    p.set_defaults(run=run_data)


def make_frame(index: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A photo-like synthetic frame: a shapes scene (textured, noisy) drawn at 1/4 size and upscaled,
    so the noise becomes fine grain; 10x faster than drawing at full size."""
    small, small_mask = make_scene(7, index, max(8, height // 4), max(8, width // 4), CLASSES)
    image = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    mask = cv2.resize(small_mask, (width, height), interpolation=cv2.INTER_NEAREST_EXACT)
    return image, mask


def _encode(index: int, height: int, width: int) -> tuple[str, bytes, bytes, np.ndarray]:
    image, mask = make_frame(index, height, width)
    return frame_key(index), encode_png(image), encode_jpeg(image, 90), mask


def write_data(root: Path, count: int, size: tuple[int, int], per_shard: int, workers: int) -> dict[str, float]:
    """folder/, png/ and jpg/ under `root` (frame_NNNNNN keys); returns the stored MB per sample of each."""
    folder = root / "folder"
    folder.mkdir(parents=True, exist_ok=True)
    writers = {fmt: ShardWriter(root / fmt, "train", dataset="bench", classes=class_names(CLASSES), palette=PALETTE,
                                samples_per_shard=per_shard) for fmt in ("png", "jpg")}
    for key, png, jpg, mask in parallel_map(partial(_encode, height=size[0], width=size[1]), range(count), workers):
        (folder / f"{key}.png").write_bytes(png)
        (folder / f"{key}_mask.png").write_bytes(encode_mask(mask, CLASSES))
        writers["png"].write(key, png, "png", mask)
        writers["jpg"].write(key, jpg, "jpg", mask)
    for writer in writers.values():
        writer.close()
    folder_bytes = sum((folder / f"{key}{end}").stat().st_size for key in frame_keys(count) for end in (".png", "_mask.png"))
    shard_bytes = {fmt: sum(p.stat().st_size for p in (root / fmt).glob("train-*.tar")) for fmt in ("png", "jpg")}
    return {"folder": folder_bytes / count / 1e6, **{k: v / count / 1e6 for k, v in shard_bytes.items()}}


def frame_key(index: int) -> str:
    return f"frame_{index:06d}"


def frame_keys(count: int) -> list[str]:
    return [frame_key(i) for i in range(count)]


class FolderDataset(Dataset):
    """The baseline: image and mask files side by side, the same decode and augmentation as the stream."""

    def __init__(self, folder: Path, keys: list[str], transform, seed: int = 0) -> None:
        self.images = [folder / f"{key}.png" for key in keys]
        self.transform, self.seed = transform, seed

    def __len__(self) -> int:
        return len(self.images)

    def raw(self, i: int) -> dict:
        image = self.images[i]
        return make_sample(image.stem, str(image), image.read_bytes(), "image.png",
                           image.with_name(f"{image.stem}_mask.png").read_bytes())

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        _, image, mask = decode_sample(self.raw(i), CLASSES, 255)
        seed_pipeline(self.transform, self.seed * 1_000_003 + i)
        out = self.transform(image=image, mask=mask)
        return torch.from_numpy(np.ascontiguousarray(out["image"])), torch.from_numpy(np.ascontiguousarray(out["mask"]))


class ShardScan(IterableDataset):
    """The baseline of reading by offset: how the training stream read before it, each loader worker
    scanning its share of the shards front to back (`read_shard`), endless; the same decode and
    augmentation. Fast and sequential, but what a batch holds depends on the worker count."""

    def __init__(self, shards: list[Path], transform) -> None:
        self.shards, self.transform = shards, transform

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        assert len(self.shards) >= workers, "run_data checks that every worker has a shard to scan"
        n = 0
        while True:
            for path in self.shards[worker::workers]:
                for raw in read_shard(path):
                    _, image, mask = decode_sample(raw, CLASSES, 255)
                    seed_pipeline(self.transform, n)
                    out = self.transform(image=image, mask=mask)
                    n += 1
                    yield torch.from_numpy(np.ascontiguousarray(out["image"])), torch.from_numpy(np.ascontiguousarray(out["mask"]))


def _loader(source: str, root: Path, args, transform) -> DataLoader:
    if source == "folder":
        total = (args.warmup + args.batches) * args.batch_size
        ds = FolderDataset(root / "folder", frame_keys(args.count), transform)
        sampler = RandomSampler(ds, num_samples=total, generator=torch.Generator().manual_seed(0))
        return DataLoader(ds, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                          prefetch_factor=4 if args.workers else None)  # as train_loader
    if source == "png-scan":
        return DataLoader(ShardScan(sorted((root / "png").glob("train-*.tar")), transform), batch_size=args.batch_size,
                          num_workers=args.workers, prefetch_factor=4 if args.workers else None)
    stream = TrainStream(load_manifest(root / source, "train"), seed=0, transform=transform,
                         shuffle_buffer=args.batch_size * 2)
    return train_loader(stream, GlobalBatches(0, 1, args.batch_size), args.workers, pin_memory=False)


def _cpu_seconds(proc: psutil.Process) -> float:
    """CPU time so far of this process (ns resolution) and its children, the DataLoader workers
    (clock ticks)."""
    total = time.process_time()
    for child in proc.children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def loader_rate(source: str, root: Path, args, transform) -> tuple[float, float]:
    """(samples/s, CPU ms/sample) of a loader, timed after the warm-up batches. The CPU figure
    (main process + workers) hardly moves when other jobs share the cores; the wall one does."""
    me = psutil.Process()
    batches = iter(_loader(source, root, args, transform))
    for _ in range(args.warmup):
        next(batches)
    start, cpu = time.perf_counter(), _cpu_seconds(me)
    for _ in range(args.batches):
        images, masks = next(batches)
        assert images.shape[0] == args.batch_size and masks.dtype == torch.uint8
    wall, cpu = time.perf_counter() - start, _cpu_seconds(me) - cpu
    n = args.batches * args.batch_size
    return n / wall, cpu / n * 1000


def one_process_ms(source: str, root: Path, count: int, transform, block: int) -> float:
    """Read + decode + augment every sample once in this process; CPU ms per sample."""
    if source == "folder":
        ds = FolderDataset(root / "folder", frame_keys(count), transform)
        raws = (ds.raw(i) for i in range(len(ds)))
    elif source == "png-scan":
        raws = (s for p in sorted((root / "png").glob("train-*.tar")) for s in read_shard(p))
    else:  # by offset, in a pass's order, as the training stream reads
        manifest = load_manifest(root / source, "train")
        where = manifest.located()
        raws = (read_sample(*where[i]) for i in PassOrder([sh.samples for sh in manifest.shards], 0, block)(0))
    start, n = time.process_time(), 0
    for raw in raws:
        _, image, mask = decode_sample(raw, CLASSES, 255)
        seed_pipeline(transform, n)
        transform(image=image, mask=mask)
        n += 1
    return (time.process_time() - start) / n * 1000


ROWS = {"folder": "folder of PNG files", "png-scan": "shards, PNG, scanned", "png": "shards, PNG images",
        "jpg": "shards, JPEG q90 images"}
"""The loaders compared: `png-scan` reads the `png` shards front to back per worker (`ShardScan`, the
training stream before it read by offset); `png` and `jpg` go through the training stream."""


def read_kb(root: Path, count: int) -> dict[str, float]:
    """KB read per sample: the two files of the folder, a whole shard per its samples when scanned,
    a sample's members (one span) when read by offset."""
    folder = sum((root / "folder" / f"{key}{end}").stat().st_size for key in frame_keys(count)
                 for end in (".png", "_mask.png"))
    out = {"folder": folder / count / 1e3,
           "png-scan": sum(p.stat().st_size for p in (root / "png").glob("train-*.tar")) / count / 1e3}
    for fmt in ("png", "jpg"):
        manifest = load_manifest(root / fmt, "train")
        # read_sample's one span: from the first member's tar header (checked) to the last member's end
        spans = [max(o + n for _, o, n in m) - min(o for _, o, _ in m) + tarfile.BLOCKSIZE
                 for sh in manifest.shards for _, m in sh.members]
        out[fmt] = sum(spans) / count / 1e3
    return out


def run_data(args: argparse.Namespace) -> int:
    if args.rss:
        from segdist.bench.rss import run_rss

        return run_rss(args)
    require_positive(args, "count", "batch_size", "batches", "rounds", "samples_per_shard")
    if args.workers < 0 or args.warmup < 0 or min(args.size) < 8 or min(args.crop) < 1:
        raise UserError("--workers and --warmup must be >= 0, --size at least 8 8 and --crop positive")
    if args.count < args.batch_size:
        raise UserError(f"--count {args.count} is below --batch-size {args.batch_size}: the stream needs a full batch")
    shards = -(-args.count // args.samples_per_shard)
    if shards < args.workers:  # the scanning baseline gives each worker its own shards
        raise UserError(f"--count {args.count} at --samples-per-shard {args.samples_per_shard} makes {shards} shards "
                        f"for {args.workers} workers: lower --samples-per-shard or --workers")
    with tempfile.TemporaryDirectory(prefix="segdist-bench-") as tmp:
        root = Path(args.workdir) if args.workdir else Path(tmp)
        t0 = time.perf_counter()
        big = args.count * args.size[0] * args.size[1] > 2e7  # else spawning encoder processes costs more
        mb = write_data(root, args.count, tuple(args.size), args.samples_per_shard, (os.cpu_count() or 1) if big else 1)
        written = time.perf_counter() - t0
        transform = build_augment(args.augment, tuple(args.crop), 255)
        ms = {source: one_process_ms(source, root, args.count, transform, args.batch_size * 2) for source in ROWS}
        runs: dict[str, list[tuple[float, float]]] = {source: [] for source in ROWS}
        for _ in range(args.rounds):  # interleaved, so a busy moment hits every row alike
            for source in ROWS:
                runs[source].append(loader_rate(source, root, args, transform))
        kb = read_kb(root, args.count)
    mb["png-scan"] = mb["png"]
    rate = {s: max(r for r, _ in v) for s, v in runs.items()}
    cpu = {s: min(c for _, c in v) for s, v in runs.items()}
    print(table(args, mb, ms, rate, cpu, written, kb))
    return 0


def table(args, mb: dict, ms: dict, rate: dict, cpu: dict, written: float, kb: dict) -> str:
    h, w = args.size
    lines = [
        f"data throughput: {args.count} frames of {w}x{h} (W x H), preset {args.augment!r}, crop "
        f"{args.crop[1]}x{args.crop[0]}, batch {args.batch_size}, {args.workers} workers, best of {args.rounds} "
        f"rounds of {args.batches} batches; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
        f"data written in {written:.0f} s",
        f"{'source':<25}{'MB/sample':>10}{'read KB/sample':>15}{'1-process CPU ms':>18}{'loader CPU ms':>15}"
        f"{'loader samples/s':>18}{'vs folder':>11}",
    ]
    for source, label in ROWS.items():
        lines.append(f"{label:<25}{mb[source]:>10.2f}{kb[source]:>15.1f}{ms[source]:>18.1f}{cpu[source]:>15.1f}"
                     f"{rate[source]:>18.1f}{_ratio(rate[source], rate['folder']):>11}")
    lines.append(f"JPEG over PNG shards: {_ratio(ms['png'], ms['jpg'])} less CPU per sample in one process, "
                 f"{_ratio(cpu['png'], cpu['jpg'])} in the loader, {_ratio(rate['jpg'], rate['png'])} the samples/s")
    lines.append(f"PNG shards by offset over scanned: {_ratio(rate['png'], rate['png-scan'])} the samples/s, "
                 f"{_ratio(kb['png'], kb['png-scan'])} the bytes read per sample")
    return "\n".join(lines)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "n/a"


