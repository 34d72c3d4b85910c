"""Predicting image files into a folder: `predict_files`, which is `segdist.predict` (segdist.api)
and what `launch/predict.py` runs. It takes the inputs (files, folders, globs), loads the model
once (segdist.predict.frame.load_predictor) and writes each image's outputs; which files and how
processes share them is said here. Uses CUDA when there is a GPU, else the CPU.

Outputs per image `<stem>` in the output folder, each written atomically (temp file + rename), as
`--format` asks (default labels, color, prob):
- `labels`: `<stem>.png` label map (class ids; uint8, 16-bit beyond 256 classes);
- `color`: `<stem>_color.png`, the label map in palette colours;
- `prob`: binary (one logit) `<stem>_prob.npy` float32 HxW sigmoid plus `<stem>_prob.png` (0-255
  gray); multi-class `<stem>_prob.npy` float16 CxHxW softmax;
- `overlay`: `<stem>_overlay.png`, the image blended half and half with the colour map;
- `cityscapes`: `<city>_<seq>_<frame>_pred_labelIds.png` (the stem without `_leftImg8bit`), train ids
  mapped back to Cityscapes label ids through cityscapesscripts' table: the files the benchmark
  server and `evalPixelLevelSemanticLabeling` read. That evaluator takes every PNG in the folder
  that names a frame, so this format gets a folder of its own.
The label maps (labels, color, overlay, cityscapes) come from the model's fp32 scores by evaluation's
rule (segdist.predict.predict_frame), so they are the labels `launch/eval.py` counts for the same
frame, near-ties included; the multi-class probability file is rounded to float16 for its size, so
where two classes nearly tie, its argmax may name the other one.

Every input is checked (found, decoded; no two inputs writing one file, no output overwriting an
input) before anything is written. With several processes (`accelerate launch --multi_gpu ...
launch/predict.py`), rank r takes every world-th input of the sorted list, so each output is
written exactly once; the inputs are all checked, across ranks, before any rank writes.
"""

from __future__ import annotations

import glob
import io
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from segdist.errors import UserError
from segdist.predict.frame import DEFAULT_THRESHOLD, Predictor, default_device, load_predictor, read_image

if TYPE_CHECKING:
    import numpy as np

    from segdist.recipe import Recipe

log = logging.getLogger("segdist")

FORMATS = ("labels", "color", "prob", "overlay", "cityscapes")
DEFAULT_FORMATS = ("labels", "color", "prob")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif")
"""What a folder given as input contributes (any case), searched recursively."""
CITYSCAPES_SUFFIX = "_leftImg8bit"


def expand_inputs(patterns: Sequence[str]) -> list[Path]:
    """Image files named by paths, folders (their image files, recursively) and globs, in order,
    without duplicates; a missing file, an empty folder or a glob matching no file is a
    `UserError` naming it."""
    paths: list[Path] = []
    for pattern in patterns:
        literal = Path(os.path.expanduser(pattern))
        if literal.is_file():
            found = [literal]
        elif literal.is_dir():
            found = sorted(p for p in literal.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise UserError(f"folder {pattern} holds no image file ({', '.join(IMAGE_SUFFIXES)}): "
                                "give image files, a folder of them or a quoted glob")
        elif any(c in pattern for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
            if not found:
                raise UserError(f"no file matches {pattern!r}: check the pattern (quote it so the shell leaves it)")
        else:
            raise UserError(f"image {pattern} not found: give existing image files, folders or a quoted glob like 'img/*.jpg'")
        paths.extend(found)
    return list(dict.fromkeys(p.resolve() for p in paths))


def check_formats(formats: Sequence[str] | None) -> tuple[str, ...]:
    """The `--format` values, each known and named once; cityscapes alone in its folder."""
    if not formats:
        return DEFAULT_FORMATS
    formats = tuple(dict.fromkeys(f for value in formats for f in value.split(",") if f))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise UserError(f"--format {unknown[0]!r} is not a format: use one or more of {', '.join(FORMATS)}")
    if "cityscapes" in formats and set(formats) & {"labels", "color", "overlay"}:
        raise UserError("--format cityscapes cannot share its folder with labels, color or overlay: the official "
                        "evaluator reads every PNG naming a frame; predict them into another --out")
    return formats


def output_names(stem: str, binary: bool, formats: Sequence[str] = DEFAULT_FORMATS) -> dict[str, str]:
    """File name of each output of one input, by what it holds."""
    names = {}
    if "labels" in formats:
        names["label"] = f"{stem}.png"
    if "color" in formats:
        names["color"] = f"{stem}_color.png"
    if "prob" in formats:
        names["prob"] = f"{stem}_prob.npy"
        if binary:
            names["prob_png"] = f"{stem}_prob.png"
    if "overlay" in formats:
        names["overlay"] = f"{stem}_overlay.png"
    if "cityscapes" in formats:
        frame = stem[: -len(CITYSCAPES_SUFFIX)] if stem.endswith(CITYSCAPES_SUFFIX) else stem
        names["cityscapes"] = f"{frame}_pred_labelIds.png"
    return names


def _check_outputs(paths: list[Path], out: Path, binary: bool, formats: Sequence[str]) -> None:
    """No two inputs may write the same file, and no output may overwrite an input."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a folder (it is created if missing)")
    owner: dict[str, Path] = {}
    inputs = set(paths)
    for path in paths:
        for name in output_names(path.stem, binary, formats).values():
            if name in owner:
                raise UserError(f"{owner[name]} and {path} would both write {out / name}: "
                                "rename one, or predict them into different --out folders")
            owner[name] = path
            if (out / name).resolve() in inputs:
                raise UserError(f"predicting {path} would overwrite the input {out / name}: choose another --out")


def _check_size(size: Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if len(size) != 2 or any(int(s) <= 0 for s in size):
        raise UserError(f"--size must be two positive integers H W, got {' '.join(map(str, size))}")
    return int(size[0]), int(size[1])


def cityscapes_label_ids(classes: Sequence[str]) -> np.ndarray:
    """Lookup table train id → Cityscapes label id (cityscapesscripts' table) for a model whose
    classes are Cityscapes' 19 train classes in order; a `UserError` for any other model."""
    import numpy as np
    from cityscapesscripts.helpers.labels import trainId2label

    from segdist.data.convert.cityscapes import train_classes

    names, _ = train_classes()
    if list(classes) != names:
        raise UserError(f"--format cityscapes needs a model of Cityscapes' {len(names)} train classes "
                        f"({', '.join(names[:3])}, ...); this one predicts {len(classes)}: "
                        f"{', '.join(list(classes)[:3])}, ... (train it on shards from launch/shard.py cityscapes)")
    return np.array([trainId2label[i].id for i in range(len(names))], dtype=np.uint8)


def _npy_bytes(array: np.ndarray) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def write_prediction(predictor: Predictor, label: np.ndarray, prob: np.ndarray, out: Path, stem: str,
                     formats: Sequence[str] = DEFAULT_FORMATS, rgb: np.ndarray | None = None) -> list[Path]:
    """Write one image's outputs in `formats` into `out`, each atomically, from its label map and
    probabilities (`Predictor.predict`); `rgb` (the image) is needed for overlay."""
    import numpy as np

    from segdist.data.shards import encode_png
    from segdist.fileio import atomic_write_bytes
    from segdist.report import colorize

    names = output_names(stem, predictor.binary, formats)
    stored = prob.astype(np.float32 if predictor.binary else np.float16)
    files = {}
    if "label" in names:
        files[names["label"]] = encode_png(label)
    if "color" in names or "overlay" in names:
        color = colorize(label, predictor.palette, predictor.ignore_index)
        if "color" in names:
            files[names["color"]] = encode_png(color)
        if "overlay" in names:
            blend = (rgb.astype(np.uint16) + color.astype(np.uint16) + 1) // 2
            files[names["overlay"]] = encode_png(blend.astype(np.uint8))
    if "prob" in names:
        files[names["prob"]] = _npy_bytes(stored)
    if "prob_png" in names:
        files[names["prob_png"]] = encode_png(np.round(stored * 255).astype(np.uint8))
    if "cityscapes" in names:
        files[names["cityscapes"]] = encode_png(cityscapes_label_ids(predictor.classes)[label])
    for name, data in files.items():
        atomic_write_bytes(out / name, data)
    return [out / name for name in files]


def _agree_on_inputs(paths: list[Path], world: int) -> None:
    """Decode this rank's share of the inputs; if any rank's share holds a bad file, every rank
    raises the first one's error (so the main process prints it) before anything is written. Each
    file is so decoded twice (here, and when predicted): the price of that promise, since a header
    check (PIL's `verify`) passes a truncated JPEG, and keeping the decoded frames would hold the
    whole share in memory."""
    error = None
    try:
        for path in paths:
            read_image(path)
    except UserError as exc:
        error = str(exc)
    if world > 1:
        import torch.distributed as dist

        errors: list[str | None] = [None] * world
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise UserError(error)


def predict_files(recipe: Recipe | str | os.PathLike, images: Sequence[str | os.PathLike] | str | os.PathLike, *,
                  checkpoint: str | os.PathLike, out: str | os.PathLike, overrides: Sequence[str] | str = (),
                  formats: Sequence[str] | None = None, size: Sequence[int] | None = None,
                  threshold: float | None = None) -> list[Path]:
    """`segdist.predict` (segdist.api) and `launch/predict.py`: the outputs of `images` (files,
    folders of them, globs; one path alone is a list of one) by `checkpoint` (a run folder: its best
    checkpoint, else the latest; or one checkpoints/step-N folder) in `formats` (default labels,
    color, prob; a string may list several, comma-separated), written into the folder `out`.
    `recipe` is a TOML path or a loaded Recipe, `overrides` the `--set` strings; `size` (H, W) the
    scale images are resized to for the model, `threshold` a binary model's. Every input is checked
    (exists, decodes) before anything is written, then this process's share goes through the model
    one image at a time. Returns the files this process wrote."""
    import torch
    from tqdm import tqdm

    from segdist.distributed import forget_accelerator, launch_context, make_accelerator, setup_logging
    from segdist.precision import resolve_precision
    from segdist.recipe import resolve_recipe

    recipe = resolve_recipe(recipe, overrides)
    setup_logging(launch_context().is_main)
    inputs = [os.fspath(p) for p in ([images] if isinstance(images, (str, os.PathLike)) else images)]
    formats = [formats] if isinstance(formats, str) else formats
    size = _check_size(size)
    formats = check_formats(formats)
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise UserError(f"--threshold must be in [0, 1], got {threshold}")
    paths = expand_inputs(inputs)
    predictor = load_predictor(recipe, checkpoint, device="cpu")
    if threshold is not None and not predictor.binary:
        raise UserError(f"--threshold is for binary (model.classes = 1) models; this one has {predictor.outputs} "
                        "classes and takes the argmax")
    if "cityscapes" in formats:
        cityscapes_label_ids(predictor.classes)
    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    out_dir = Path(out)
    _check_outputs(paths, out_dir.resolve(), predictor.binary, formats)
    # Prediction runs in fp32. A multi-process launch gets an Accelerator, which forms the process
    # group and picks this process's device; one process needs none and makes none.
    accelerator = make_accelerator(resolve_precision("fp32")) if launch_context().world > 1 else None
    try:
        rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
        device = accelerator.device if accelerator else default_device()
        predictor.model.to(device)
        predictor.device = device
        mine = paths[rank::world]
        _agree_on_inputs(mine, world)
        out_dir.mkdir(parents=True, exist_ok=True)
        log.info("predicting %d image(s) with %s on %d %s process(es) (%s: %s), formats %s", len(paths),
                 predictor.checkpoint, world, predictor.device.type,
                 "binary" if predictor.binary else f"{predictor.outputs} classes",
                 ", ".join(predictor.classes[:8]) + (", ..." if len(predictor.classes) > 8 else ""), ", ".join(formats))
        written: list[Path] = []
        for path in tqdm(mine, desc="predict", unit="img", disable=None if rank == 0 else True):
            rgb = read_image(path)
            label, prob = predictor.predict(rgb, size, threshold)
            written += write_prediction(predictor, label, prob, out_dir, path.stem, formats, rgb)
        split = "1 process"
        if accelerator is not None:  # every rank is done (and says how many it wrote) before rank 0 reports
            shares = accelerator.gather(torch.tensor([len(mine)], device=device)).tolist()
            split = f"{world} processes: {' + '.join(map(str, shares))}"
            accelerator.end_training()
        if rank == 0:
            print(f"wrote predictions of {len(paths)} image(s) to {out_dir} ({split})", flush=True)
        return written
    finally:
        if accelerator is not None:
            forget_accelerator()  # the next run in this interpreter makes its own
