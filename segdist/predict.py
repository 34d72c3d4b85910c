"""Prediction on image files: `launch/predict.py` and the function-style
`predict_probabilities(model, image)`.

An image is read like the converters read sources (segdist.data.convert.imageio): grayscale,
palette, RGBA, CMYK and 16-bit files become 8-bit RGB, as the birds assignment's grayscale images needed.
It goes through the model one at a time, in eval mode and fp32, the way evaluation runs frames
(segdist.inference): the recipe's `[eval]` mode (whole, slide or resize, with its scales and flip),
or resized to `size` — the training scale — with the scores resized back to the original size
(bilinear). Padding is black, to a multiple of 32, as the eval loader pads.

The model comes from `segdist.models.load_trained`, as evaluation loads it: built without
pretrained encoder weights (the checkpoint holds every weight), its EMA copy preferred when the
checkpoint has one. Class names and palette come from the manifest of the recipe's val split when
it exists; without the data folder generic names and the VOC palette stand in, and the number of
outputs then comes from `model.classes` alone.

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
The label map is computed from the stored probabilities (prob > threshold; argmax of the float16
values), so the files always agree with each other.

With several processes (`accelerate launch --multi_gpu ... launch/predict.py`), rank r takes every
world-th input of the sorted list, so each output is written exactly once; the inputs are all
checked, across ranks, before any rank writes.
"""

from __future__ import annotations

import glob
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from segdist import inference
from segdist.data.sample import to_uint8
from segdist.inference import InferenceMode
from segdist.errors import UserError
from segdist.models.trained import BINARY_CLASSES
from segdist.preprocess import normalise

log = logging.getLogger("segdist")

DEFAULT_THRESHOLD = 0.5
"""Binary label map: probability > threshold (0.5 is the eval's logit > 0)."""

ImageLike = str | os.PathLike | Image.Image | np.ndarray


@dataclass
class Predictor:
    """A loaded model and what is needed to write its predictions."""

    model: nn.Module
    """In eval mode, on `device`, with the checkpoint's (EMA) weights."""
    outputs: int
    """Logits of the model: 1 = binary (sigmoid), else one per class (softmax)."""
    classes: list[str]
    """Class names, from the val manifest or generic."""
    palette: list[list[int]]
    """RGB colour per class of `<stem>_color.png`."""
    ignore_index: int
    checkpoint: Path
    device: torch.device

    @property
    def binary(self) -> bool:
        return self.outputs == 1

    mode: InferenceMode = InferenceMode()
    """How images go through the model (the recipe's `[eval]` mode) when no size is given."""

    def predict_probabilities(self, image: ImageLike, size: Sequence[int] | None = None) -> np.ndarray:
        """`predict_probabilities(self.model, image, size, self.mode)`."""
        return predict_probabilities(self.model, image, size, self.mode)


# ---------------------------------------------------------------------------------------------
# Loading

def load_predictor(recipe, checkpoint: str | os.PathLike, device: str | torch.device | None = None) -> Predictor:
    """The recipe's model with a checkpoint's weights (EMA ones when it has them), ready to predict.

    `recipe` is a Recipe or the path of a recipe file; `checkpoint` a run folder (its best, else
    its latest checkpoint) or one `checkpoints/step-N` folder; `device` defaults to CUDA if there
    is one, else the CPU.
    """
    from segdist.models import load_trained
    from segdist.recipe import load_recipe

    if not hasattr(recipe, "model"):
        recipe = load_recipe(recipe)
    model, info = load_trained(recipe, checkpoint)
    if info.manifest is not None:
        m = info.manifest
        classes, palette, ignore_index = m.classes, m.palette, m.ignore_index
    else:
        classes = list(BINARY_CLASSES) if info.outputs == 1 else [f"class_{i}" for i in range(info.outputs)]
        palette, ignore_index = default_palette(len(classes)), 255
        log.info("no manifest of split %r in %s: generic class names and palette", recipe.data.val_split,
                 recipe.data.eval_root)
    device = torch.device(device) if device is not None else default_device()
    model.to(device).eval()
    return Predictor(model, info.outputs, list(classes), [list(c) for c in palette], ignore_index, info.checkpoint,
                     device, InferenceMode.from_recipe(recipe))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_palette(n: int) -> list[list[int]]:
    """The PASCAL VOC colour map for `n` classes (what folder datasets get at conversion)."""
    from segdist.data.convert.imageio import voc_palette

    return voc_palette(n)


# ---------------------------------------------------------------------------------------------
# Images and the forward pass

def read_image(image: ImageLike) -> np.ndarray:
    """HxWx3 uint8 RGB from a file path, a PIL image or an array (HxW, HxWx1/3/4, uint8 or uint16).

    Files and PIL images follow the converters' rules (segdist.data.convert.imageio): gray,
    palette, RGBA (alpha dropped), CMYK and 16-bit (scaled to 8 bits) become RGB; a file that does
    not decode is a `UserError` naming it.
    """
    from segdist.data.convert import imageio

    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise UserError(f"image {path} not found: give the path of an image file")
        return imageio.load_image(path).rgb
    if isinstance(image, Image.Image):
        return imageio.to_rgb(image, Path(getattr(image, "filename", "") or "<PIL image>"))
    arr = np.asarray(image)
    if arr.dtype == np.uint16:
        arr = to_uint8(arr)
    if arr.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8 or uint16, got {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"image arrays must be HxW, HxWx1, HxWx3 or HxWx4, got shape {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr[:, :, :3])


@torch.no_grad()
def forward_scores(model: nn.Module, rgb: np.ndarray, mode: InferenceMode) -> torch.Tensor:
    """1xKxHxW scores of an HxWx3 uint8 image at its own size H, W (on the model's device), through
    segdist.inference as evaluation runs it: logits for a single pass, mean probabilities with
    test-time augmentation."""
    device = next(model.parameters()).device
    x = torch.from_numpy(np.array(rgb, dtype=np.uint8)).to(device).permute(2, 0, 1)[None].float()
    return inference.scores(model, normalise(x), mode)


def to_probabilities(scores: torch.Tensor, mode: InferenceMode) -> np.ndarray:
    """1xKxHxW scores → float32 HxW sigmoid (one logit) or KxHxW softmax, on the CPU."""
    prob = scores if mode.tta else inference.probabilities(scores)
    return (prob[0, 0] if prob.shape[1] == 1 else prob[0]).cpu().numpy()


def predict_probabilities(model: nn.Module, image: ImageLike, size: Sequence[int] | None = None,
                          mode: InferenceMode | None = None) -> np.ndarray:
    """Probability map of one image at its original size, as the birds assignment's `predict(model, img_path)`:
    float32 HxW (probability of the foreground) for a one-logit model, CxHxW (softmax) otherwise.

    `image` is a file path, a PIL image or an array; `size` (H, W) resizes it for the forward pass
    (the scale the model was trained at: "resize" mode); otherwise `mode` (segdist.inference; a
    Predictor passes its recipe's `[eval]` mode) or the whole image. The model runs in eval mode
    under no_grad on its device (its train/eval mode is restored after). E.g.
    `predict_probabilities(load_predictor(recipe, run).model, "bird.jpg")`.
    """
    if size is not None:
        mode = InferenceMode("resize", crop=tuple(int(v) for v in size))
    mode = mode or InferenceMode()
    rgb = read_image(image)
    was_training = model.training
    model.eval()
    try:
        return to_probabilities(forward_scores(model, rgb, mode), mode)
    finally:
        model.train(was_training)


def label_map(prob: np.ndarray, threshold: float, num_classes: int) -> np.ndarray:
    """Class ids from `predict_probabilities`' output: prob > threshold (binary), else argmax over classes."""
    if prob.ndim == 2:
        return (prob > threshold).astype(np.uint8)
    return prob.argmax(axis=0).astype(np.uint8 if num_classes <= 256 else np.uint16)


# ---------------------------------------------------------------------------------------------
# `launch/predict.py`

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
    from cityscapesscripts.helpers.labels import trainId2label

    from segdist.data.convert.cityscapes import train_classes

    names, _ = train_classes()
    if list(classes) != names:
        raise UserError(f"--format cityscapes needs a model of Cityscapes' {len(names)} train classes "
                        f"({', '.join(names[:3])}, ...); this one predicts {len(classes)}: "
                        f"{', '.join(list(classes)[:3])}, ... (train it on shards from launch/shard.py cityscapes)")
    return np.array([trainId2label[i].id for i in range(len(names))], dtype=np.uint8)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def write_prediction(predictor: Predictor, prob: np.ndarray, out: Path, stem: str, threshold: float,
                     formats: Sequence[str] = DEFAULT_FORMATS, rgb: np.ndarray | None = None) -> list[Path]:
    """Write one image's outputs in `formats` into `out`, each atomically; `rgb` (the image) is
    needed for overlay."""
    from segdist.data.shards import encode_png
    from segdist.fileio import atomic_write_bytes
    from segdist.report import colorize

    names = output_names(stem, predictor.binary, formats)
    stored = prob.astype(np.float32 if predictor.binary else np.float16)
    label = label_map(stored, threshold, len(predictor.classes))
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
    raises the first one's error (so the main process prints it) before anything is written."""
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


def predict_files(recipe, checkpoint: str, inputs: Sequence[str], out: str, size: Sequence[int] | None = None,
                  threshold: float | None = None, formats: Sequence[str] | None = None) -> list[Path]:
    """`launch/predict.py`: every input checked (exists, decodes) before anything is written, then
    this rank's share of the inputs one image at a time through the model; returns the files this
    process wrote."""
    from tqdm import tqdm

    from segdist.distributed import launch_context, make_accelerator, setup_logging
    from segdist.precision import resolve_precision

    setup_logging(launch_context().is_main)
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
    # group and picks this process's device; one process needs none (and makes none, so the
    # Python API leaves the interpreter's AcceleratorState alone).
    accelerator = make_accelerator(resolve_precision("fp32")) if launch_context().world > 1 else None
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
        prob = predictor.predict_probabilities(rgb, size)
        written += write_prediction(predictor, prob, out_dir, path.stem, threshold, formats, rgb)
    split = "1 process"
    if accelerator is not None:  # every rank is done (and says how many it wrote) before rank 0 reports
        shares = accelerator.gather(torch.tensor([len(mine)], device=device)).tolist()
        split = f"{world} processes: {' + '.join(map(str, shares))}"
        accelerator.end_training()
    if rank == 0:
        print(f"wrote predictions of {len(paths)} image(s) to {out_dir} ({split})", flush=True)
    return written
