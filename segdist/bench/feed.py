"""`launch/bench.py feed [RECIPE ...]`: can the CPUs feed a GPU on each shipped recipe?

Per recipe it measures, in one process on one thread, the CPU time per sample of the real training
input path — read each sample by its offsets in a pass's order, decode the image, decode the mask
and check its labels (`decode_sample`), the recipe's augmentation preset at its crop (seeded as the
training stream seeds it), collate a batch — on frames of the recipe's dataset at the dataset's real
size, stored as the recipe's `# convert:` line for its training split says (`--max-size`,
`--image-format`, `--jpeg-quality`, `--mask-format`), colour jitter drawn as factors for the device, JPEGs
decoded reduced where the preset shrinks them first, and with `data.geometry = "device"` only each
sample's placement drawn (the warp is the GPU's). With `data.in_memory` the split is read and
decoded once (timed, and printed below the table: once per run) and each micro-batch is a gather
from memory ("read") and its draws and canvas ("collate"), timed over `HELD_BATCHES` micro-batches a
pass. Beside it, in the same run and on the same frames, the input path before: full-size frames in
the source's own format (`--image-format keep`), decoded whole, colour jitter run on the CPU in the
pipeline (albumentations' ColorJitter).

The GPU side is arithmetic, not a measurement: the model's training FLOPs per sample at the crop
(`torch.utils.flop_counter`; on the meta device, or on a real CPU copy for models that cannot run
there, like smp's Segformer) against the dense bf16 peaks of `segdist.telemetry.PEAK_TFLOPS` at a
stated MFU (40 % by default) give the samples/s a GPU would take; that times the CPU seconds per
sample is the number of cores per GPU it takes to keep up.

Frames are synthetic (`segdist.bench.data.make_frame`: shapes scenes drawn at a quarter size and
upscaled, which compress roughly like photos), at each dataset's size: Cityscapes 1024x2048 PNG,
VOC 375x500 JPEG (quality 90), PH2 560x768 BMP, birds 375x500 JPEG, shapes 64x64 PNG. All files sit
in the page cache: reading costs a syscall per sample, not disk.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import shlex
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from segdist.bench.options import require_positive
from segdist.errors import UserError

# Each dataset's frames as its source ships them: (height, width, source format).
DATASETS = {
    "cityscapes": (1024, 2048, "PNG"),
    "voc": (375, 500, "JPEG"),
    "ph2": (560, 768, "BMP"),
    "birds": (375, 500, "JPEG"),
    "shapes": (64, 64, "PNG"),
}
STAGES = ("read", "image", "mask", "augment", "collate")
"""Where the ms go: tar read, image decode, mask decode + label check, the preset, batching."""
HELD_BATCHES = 64
"""Micro-batches per timed pass of a split held in memory: its cost per batch does not depend on the
split's size, so the bench's few frames are gathered again and again, over the passes, as training does."""
BEFORE = {"max_size": None, "image_format": "keep", "jpeg_quality": 95, "mask_format": "png"}
"""How every recipe's data was stored before recipes named their storage: launch/shard.py's
defaults (full frames, the source's format); tests/test_bench_feed.py checks they still are."""


def add_parser(sub) -> None:
    p = sub.add_parser("feed", help="CPU ms per training sample on each recipe's storage, and the cores a GPU needs",
                       description=__doc__.split("\n\n")[0].split(": ", 1)[1] + "\n\n" + __doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipes", nargs="*", metavar="RECIPE",
                   help="recipe files (default: every shipped recipe, recipes/*.toml)")
    p.add_argument("--frames", type=int, default=12, help="frames written per dataset and storage (default 12)")
    p.add_argument("--passes", type=int, default=5,
                   help="timed passes over the frames, before and now alternating; each stage's fastest counts (default 5)")
    p.add_argument("--mfu", type=float, default=0.40, help="model FLOPs utilisation assumed on the GPU (default 0.40)")
    p.add_argument("--workdir", default=None, help="write the shards here and keep them (default: a temporary folder)")
    p.set_defaults(run=run_feed)


# -- storage -------------------------------------------------------------------------------------------
def storage_of(recipe_path: Path, train_split: str) -> dict:
    """How the recipe's `# convert:` line for its training split stores frames (the keys of BEFORE),
    read with launch/shard.py's own parser, so its defaults are the converter's. The synthetic
    converter has no storage options: its frames are stored as generated, as BEFORE."""
    from segdist.data.convert import build_parser

    for line in Path(recipe_path).read_text(encoding="utf-8").splitlines():
        if not line.startswith("# convert: "):
            continue
        argv = shlex.split(line[len("# convert: "):])[2:]  # past "python launch/shard.py"
        if "--split" in argv and argv[argv.index("--split") + 1] == train_split:
            try:
                args = build_parser().parse_args(argv)
            except SystemExit:  # argparse has printed what is wrong with the line
                raise UserError(f"{recipe_path}: its '# convert:' line for split {train_split!r} is not a valid "
                                "launch/shard.py command") from None
            return {key: getattr(args, key, default) for key, default in BEFORE.items()}
    raise UserError(f"{recipe_path} has no '# convert:' line for its training split {train_split!r}: "
                    "add one (see recipes/README.md)")


def describe(storage: dict, fmt: str) -> str:
    """What a storage stores, in a few words: e.g. '128x256 raw', '1024x2048 jpeg q90', '375x500 keep (JPEG)'."""
    kind = storage["image_format"]
    kind = f"{kind} ({fmt})" if kind == "keep" else kind
    if storage["image_format"] == "jpeg" or (storage["image_format"] == "keep" and fmt == "JPEG" and storage["max_size"]):
        kind += f" q{storage['jpeg_quality']}"
    kind += f", longest {storage['max_size']}" if storage["max_size"] else ""
    return kind + (", raw masks" if storage["mask_format"] == "raw" else "")


def write_tier(root: Path, dataset: str, classes: int, storage: dict, frames: int) -> Path:
    """`frames` synthetic frames of `dataset` at its size, through the converter's own steps for
    `storage` (source bytes as the dataset ships them, `fit_longest`, `encode_image`), into a split."""
    from PIL import Image

    from segdist.bench.data import make_frame
    from segdist.data.convert.imageio import SourceImage, encode_image, fit_longest
    from segdist.data.sample import decode_image
    from segdist.data.shards import ShardWriter, encode_jpeg, encode_png
    from segdist.data.shapes import PALETTE, make_scene

    h, w, fmt = DATASETS[dataset]
    labels = max(classes, 2)
    out = root / "-".join(map(str, (dataset, labels, *storage.values())))
    if (out / "train.json").is_file():
        return out
    writer = ShardWriter(out, "train", dataset=dataset, classes=[f"c{i}" for i in range(labels)],
                         palette=[list(PALETTE[i % len(PALETTE)]) for i in range(labels)], samples_per_shard=frames,
                         mask_format=storage["mask_format"])
    with writer:
        for i in range(frames):
            rgb, mask = make_scene(3, i, h, w, min(labels, 5)) if dataset == "shapes" else make_frame(i, h, w)
            mask = (mask.astype(np.int64) % labels).astype(np.uint8)
            if fmt == "PNG":
                data = encode_png(rgb)
            elif fmt == "JPEG":
                data = encode_jpeg(rgb, 90)
            else:
                buf = io.BytesIO()
                Image.fromarray(rgb).save(buf, format="BMP")
                data = buf.getvalue()
            if fmt == "JPEG":  # the decoded JPEG is what a conversion reads
                rgb = decode_image(data)
            src = SourceImage(rgb, data, fmt, "RGB", keepable=fmt in ("PNG", "JPEG"))
            small, small_mask = fit_longest(rgb, mask, storage["max_size"])
            encoded, ext = encode_image(src, storage["image_format"], storage["jpeg_quality"],
                                        None if small is rgb else small)
            writer.write(f"f{i:05d}", encoded, ext, small_mask, source_size=(h, w))
        writer.close()
    return out


# -- timing --------------------------------------------------------------------------------------------
def pipeline(recipe, ignore_index: int, colour_on_cpu: bool):
    """(geometry, colour jitter whose factors the loader draws): today's (the recipe's
    `data.geometry`: the CPU pipeline, or placements drawn for the device), or the one before
    geometry could move and colour jitter moved to the device: the CPU pipeline, albumentations'
    ColorJitter at its end."""
    import albumentations as A

    from segdist.data.augment import build_augment, build_colour
    from segdist.data.geometry import build_geometry

    data = recipe.data
    colour = build_colour(data.augment, data.augment_args)
    if data.geometry == "device" and not colour_on_cpu:
        return build_geometry(data.augment, tuple(data.crop), ignore_index, data.augment_args), colour
    transform = build_augment(data.augment, tuple(data.crop), ignore_index, data.augment_args)
    if colour_on_cpu and colour is not None:
        jitter = A.ColorJitter(brightness=colour.brightness, contrast=colour.contrast, saturation=colour.saturation,
                               hue=colour.hue, p=colour.p)
        return A.Compose([*transform.transforms, jitter]), None
    return transform, colour


def time_stages(split: Path, recipe, passes: int, colour_on_cpu: bool) -> tuple[dict[str, float], float, float | None]:
    """(ms per sample of each stage, stored MB per sample, ms per sample of the one read into memory
    or None): the fastest of `passes` passes over the split, one thread. Each stage calls what the
    training stream calls; `colour_on_cpu`: the preset's colour jitter runs in the CPU pipeline, as
    before it moved to the device, and the split is streamed whatever `data.in_memory` says."""
    from segdist.data.augment import decode_reduction
    from segdist.data.manifest import load_manifest
    from segdist.data.sample import read_sample, sample_image, sample_mask
    from segdist.data.stream import PassOrder, SampleAugment, TrainStream

    manifest = load_manifest(split, "train")
    transform, colour = pipeline(recipe, manifest.ignore_index, colour_on_cpu)
    # The JPEG decode reduction came with the colour jitter's move: "before" decodes full frames.
    reduce_for = None if colour_on_cpu else decode_reduction(recipe.data.augment, tuple(recipe.data.crop),
                                                              recipe.data.augment_args)
    batch = recipe.data.batch_size
    best = {s: float("inf") for s in STAGES}
    stored = sum(p.stat().st_size for p in manifest.shard_paths()) / manifest.num_samples / 1e6
    if recipe.data.in_memory and not colour_on_cpu:
        # Held in memory (segdist.data.held): read and decoded once, then each micro-batch of
        # positions is a gather (read) and the batch's draws and canvas (collate).
        t = time.perf_counter()
        stream = TrainStream(manifest, seed=0, transform=transform, shuffle_buffer=recipe.data.shuffle_buffer,
                             colour=colour, reduce_for=reduce_for, in_memory=True)
        load = 1000 * (time.perf_counter() - t) / manifest.num_samples
        for _ in range(passes):
            spent = dict.fromkeys(STAGES, 0.0)
            for first in range(0, HELD_BATCHES * batch, batch):  # whole micro-batches, passes on passes
                positions = np.arange(first, first + batch)
                t0 = time.perf_counter()
                frames = stream.gathered(positions)  # the bench's frames share one size: a gather
                t1 = time.perf_counter()
                stream.augment.batch(*frames, positions)
                spent["read"] += t1 - t0
                spent["collate"] += time.perf_counter() - t1
            for stage in STAGES:
                best[stage] = min(best[stage], 1000 * spent[stage] / (HELD_BATCHES * batch))
        return best, stored, load
    # The training stream's own per-sample augmentation (seeds, CPU pipeline) and batching.
    augment = SampleAugment(transform, 0, colour)
    # As the training stream reads them: by offset, in a pass's order (blocks of the recipe's size);
    # the order and the locations are the stream's once-per-run setup, outside the timed reads.
    order = PassOrder([sh.samples for sh in manifest.shards], 0, recipe.data.shuffle_buffer)(0)
    where = manifest.located()
    for _ in range(passes):
        spent = dict.fromkeys(STAGES, 0.0)
        t = time.perf_counter()
        raws = [read_sample(*where[i]) for i in order]
        spent["read"] = time.perf_counter() - t
        items = []
        for n, raw in enumerate(raws):
            t0 = time.perf_counter()
            image, full = sample_image(raw, reduce_for)
            t1 = time.perf_counter()
            mask = sample_mask(raw, manifest.num_classes, manifest.ignore_index, full, image.shape[:2])
            t2 = time.perf_counter()
            items.append(augment(image, mask, n))
            t3 = time.perf_counter()
            spent["image"] += t1 - t0
            spent["mask"] += t2 - t1
            spent["augment"] += t3 - t2
        t = time.perf_counter()
        for i in range(0, len(items), batch):
            augment.collate(items[i: i + batch])  # as the training stream batches them
        spent["collate"] = time.perf_counter() - t
        for stage in STAGES:
            best[stage] = min(best[stage], 1000 * spent[stage] / len(raws))
    return best, stored, None


def count_flops(recipe, classes: int) -> float | None:
    """Training (forward + backward) FLOPs per sample at the recipe's crop: on the meta device, else
    on a real CPU copy (two samples, halved), for models the meta device cannot run."""
    from torch.utils.flop_counter import FlopCounterMode

    from segdist.models import build_model
    from segdist.telemetry import flops_per_sample

    spec = dataclasses.replace(recipe.model, encoder_weights=None)
    crop = tuple(recipe.data.crop)
    flops = flops_per_sample(lambda: build_model(spec, classes), crop)
    if flops is not None:
        return float(flops)
    model = build_model(spec, classes).train()
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(2, 3, *crop)).float().sum().backward()
    return counter.get_total_flops() / 2


# -- the table -------------------------------------------------------------------------------------------
def gpu_rates(flops: float | None, mfu: float) -> dict[str, float | None]:
    """Samples/s an H100 and an A100 would train at `mfu` of their dense bf16 peak."""
    from segdist.telemetry import peak_tflops

    return {gpu: (None if not flops else mfu * peak_tflops(gpu, "bf16") * 1e12 / flops) for gpu in ("H100", "A100")}


def shipped_recipes(root: Path = Path(__file__).resolve().parents[2]) -> list[Path]:
    """The default list: every recipes/*.toml of the repository holding this package; a
    `UserError` where there is none (an installed package without the repository)."""
    paths = sorted((root / "recipes").glob("*.toml"))
    if not paths:
        raise UserError(f"bench feed: no recipes/*.toml in {root} (the repository's recipes folder) to take by "
                        "default: pass the recipe files to time (segdist-bench feed RECIPE.toml ...)")
    return paths


def run_feed(args: argparse.Namespace) -> int:
    from segdist.precision import cpu_model
    from segdist.recipe import load_recipe

    require_positive(args, "frames", "passes")
    if not 0 < args.mfu <= 1:
        raise UserError(f"--mfu must be in (0, 1], got {args.mfu}")
    paths = [Path(p) for p in args.recipes] or shipped_recipes()
    for path in paths:
        if not path.is_file():
            raise UserError(f"recipe {path} not found")
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    print(f"bench feed: {cpu_model()}, torch CPU capability {torch.backends.cpu.get_cpu_capability()}, one thread; "
          f"GPU demand at {100 * args.mfu:.0f} % MFU of dense bf16 peaks (H100 989, A100 312 TFLOP/s)")
    print("before = full frames in the source's format, colour jitter on the CPU; now = the recipe's # convert: "
          "line, colour jitter on the device. ms = CPU ms per training sample; cores = ms x samples/s a GPU "
          "takes / 1000\n")
    header = (f"{'recipe':<30} {'GFLOP/s.':>9} {'H100 s/s':>9} {'A100 s/s':>9} | {'stored before':<24} {'ms':>6} "
              f"{'cores/H100':>10} | {'stored now':<34} {'ms':>6} {'MB':>5} {'cores/H100':>10} {'cores/A100':>10} | "
              f"now: {' / '.join(STAGES)} ms")
    print(header)
    print("-" * len(header))
    held = []
    with tempfile.TemporaryDirectory(prefix="segdist-feed-") as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for path in paths:
            recipe = load_recipe(path)
            dataset = path.stem.split("_")[0]
            if dataset not in DATASETS:
                raise UserError(f"recipe {path.name}: no frame size known for dataset {dataset!r} "
                                f"(known: {', '.join(DATASETS)})")
            classes = recipe.model.classes or 2
            fmt = DATASETS[dataset][2]
            now_storage = storage_of(path, recipe.data.train_split)
            splits = {name: write_tier(work, dataset, classes, storage, args.frames)
                      for name, storage in (("before", BEFORE), ("now", now_storage))}
            rows = {}
            for _ in range(args.passes):  # before and now alternate, so a busy moment hits both alike
                for name, split in splits.items():
                    stages, stored, load = time_stages(split, recipe, 1, colour_on_cpu=name == "before")
                    best, best_load = rows.get(name, (stages, stored, load))[0::2]
                    rows[name] = ({k: min(v, best[k]) for k, v in stages.items()}, stored,
                                  None if load is None else min(load, best_load))
            if rows["now"][2] is not None:
                held.append(f"{path.stem}: {rows['now'][2]:.2f} ms per sample")
            flops = count_flops(recipe, classes)
            rates = gpu_rates(flops, args.mfu)
            before_ms = sum(rows["before"][0].values())
            now_ms = sum(rows["now"][0].values())
            cores = lambda ms, gpu: "-" if rates[gpu] is None else f"{ms * rates[gpu] / 1000:.1f}"  # noqa: E731
            rate = lambda gpu: "-" if rates[gpu] is None else f"{rates[gpu]:,.0f}"  # noqa: E731
            stages = " / ".join(f"{rows['now'][0][s]:.3f}" for s in STAGES)
            print(f"{path.stem:<30} {(flops or 0) / 1e9:>9.1f} {rate('H100'):>9} {rate('A100'):>9} | "
                  f"{describe(BEFORE, fmt):<24} {before_ms:>6.2f} {cores(before_ms, 'H100'):>10} | "
                  f"{describe(now_storage, fmt) + (', held' if recipe.data.in_memory else ''):<34} {now_ms:>6.3f} {rows['now'][1]:>5.2f} {cores(now_ms, 'H100'):>10} "
                  f"{cores(now_ms, 'A100'):>10} | {stages}", flush=True)
    if held:
        print("\nheld = data.in_memory: the split read and decoded once when training starts (not in ms above; "
              "once per run, ms per sample of the split): " + ", ".join(held))
    return 0
