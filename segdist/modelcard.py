"""The model card (README.md) and `segdist.json` of a folder `launch/export.py --format hf` writes:
what the model is (architecture, encoder, classes and palette), what it takes (the input
normalisation and padding, with a loader that needs no segdist), what it was trained on (dataset,
split, manifest sha256), the recipe, and the val metrics of the checkpoint's last evaluation.
`CardFacts` holds what segdist.hfexport found; `render` and `facts_json` write it down."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from segdist.data.sample import PAD_MULTIPLE
from segdist.preprocess import MEAN, STD

FORMAT = "segdist-hf/1"
MODELING_FILE = "modeling_segdist.py"
"""Our own architectures' source, beside their weights (segdist.hfexport.modeling_source)."""
SUMMARY_FILE = "segdist.json"
FOLDER_LINE = 'folder, image = "path/to/this/folder", "image.png"'
"""The loader snippet's first line: where the folder and the image are."""


@dataclass
class SplitFacts:
    """A split as its manifest names it."""

    dataset: str
    split: str
    samples: int
    manifest: str
    """The manifest's file name (`<split>.json`)."""
    sha256: str
    """Of the manifest file training read: the shards' own sha256 are in it, so this names the exact data."""
    now: str | None = None
    """The sha256 of the manifest at the recipe's root at export, where it differs from the one training
    read (the split was re-converted since: the other facts are the new manifest's)."""

    def describe(self) -> str:
        text = f"`{self.dataset}` split `{self.split}`, {self.samples} samples (manifest `{self.manifest}`, sha256 `{self.sha256}`)"
        if self.now is not None:
            text += (f"; the manifest there now has sha256 `{self.now}`: the split was converted again after training, "
                     "and the sample count is the new manifest's")
        return text


@dataclass
class CardFacts:
    """Everything the card and segdist.json say, gathered by segdist.hfexport.export_hf."""

    smp: bool
    """Loaded with `segmentation_models_pytorch.from_pretrained` (else with modeling_segdist.py)."""
    arch: str
    encoder: str | None
    config: dict
    """The constructor arguments, as config.json holds them."""
    outputs: int
    classes: list[str]
    palette: list[list[int]]
    ignore_index: int
    ema: bool
    checkpoint: str
    """`<run>/checkpoints/<name>`, or the folder's name where it lies outside a run."""
    step: int | None
    train: SplitFacts | str
    """The training split, or why it is not known (its manifest was not found at export)."""
    val: SplitFacts | str
    evaluation: tuple[int, dict] | None
    """(step, metrics.json) of the checkpoint's last evaluation."""
    no_evaluation: str
    """Why there is no evaluation, when there is none."""
    eval_mode: str
    whole_frames: bool
    """That evaluation ran each frame whole in one pass, as the card's snippet does."""
    """How segdist ran frames through the model for that evaluation (segdist.inference.InferenceMode.describe)."""
    recipe_toml: str


def loader_snippet(smp: bool, outputs: int) -> str:
    """Python that loads the folder and computes a frame's logits as segdist does, with torch,
    numpy, PIL and (for smp models) segmentation_models_pytorch alone. `FOLDER_LINE` in it names
    the folder and the image."""
    if smp:
        head = ["import numpy as np", "import segmentation_models_pytorch as smp", "import torch", "from PIL import Image",
                "", FOLDER_LINE, "model = smp.from_pretrained(folder).eval()"]
    else:
        head = ["import sys", "", "import numpy as np", "import torch", "from PIL import Image", "", FOLDER_LINE,
                f"sys.path.insert(0, folder)  # for {MODELING_FILE}: the architecture, needs torch and safetensors",
                "from modeling_segdist import from_pretrained", "", "model = from_pretrained(folder)"]
    labels = ("labels = (logits[0, 0] > 0).long()  # one logit: foreground where it is > 0 (sigmoid > 0.5)"
              if outputs == 1 else "labels = logits[0].argmax(0)  # H x W class ids")
    return "\n".join([
        *head, "",
        'rgb = np.array(Image.open(image).convert("RGB"))  # H x W x 3, uint8',
        "x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()  # 1 x 3 x H x W, RGB in [0, 255]",
        "h, w = x.shape[-2:]",
        f"x = torch.nn.functional.pad(x, (0, -w % {PAD_MULTIPLE}, 0, -h % {PAD_MULTIPLE}))"
        f"  # black at the bottom and right, to multiples of {PAD_MULTIPLE}",
        "mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255  # ImageNet's, on the [0, 255] scale",
        "std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255",
        "with torch.no_grad():",
        "    logits = model((x - mean) / std)[:, :, :h, :w]  # 1 x K x H x W, float32",
        labels,
    ])


def _pct(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def _model_lines(f: CardFacts) -> list[str]:
    if f.smp:
        arch = f"segmentation_models_pytorch `{f.arch}`, encoder `{f.encoder}`"
    else:
        arch = f"segdist's own `{f.arch}` (its source is `{MODELING_FILE}`)"
    outputs = ("one logit (sigmoid; foreground where the logit is > 0)" if f.outputs == 1
               else f"{f.outputs} logits, one per class (the label is the argmax)")
    weights = ("the checkpoint's EMA (exponential moving average) weights, the ones training evaluated"
               if f.ema else "the checkpoint's weights (it holds no EMA copy)")
    step = f", step {f.step}" if f.step is not None else ""
    return ["| | |", "|---|---|", f"| architecture | {arch} |",
            f"| constructor arguments | `{json.dumps(f.config, sort_keys=True)}` (config.json) |",
            f"| outputs | {outputs} |", f"| weights | {weights} |",
            f"| checkpoint | `{f.checkpoint}`{step} |"]


def _class_lines(f: CardFacts) -> list[str]:
    ious = f.evaluation[1].get("per_class_iou") if f.evaluation else None
    lines = ["| id | class | colour (RGB) | val IoU % |", "|---:|---|---|---:|"]
    for i, name in enumerate(f.classes):
        colour = ", ".join(map(str, f.palette[i])) if i < len(f.palette) else "n/a"
        iou = _pct(ious[i]) if ious is not None and i < len(ious) else "n/a"
        lines.append(f"| {i} | {name} | {colour} | {iou} |")
    lines.append("")
    lines.append(f"Label {f.ignore_index} in the training masks marks pixels that were neither trained on nor counted.")
    return lines


def _metrics_lines(f: CardFacts) -> list[str]:
    if f.evaluation is None:
        return [f"No evaluation was found: {f.no_evaluation}."]
    at, m = f.evaluation
    val = f.val.describe() if isinstance(f.val, SplitFacts) else "the val split"
    lines = [f"The checkpoint's last evaluation, at step {at}, on {val}: **mIoU {_pct(m.get('miou'))} %**, pixel "
             f"accuracy {_pct(m.get('pixel_accuracy'))} %, over {m.get('num_samples', 'n/a')} samples; per-class IoU in "
             f"the classes' table above. segdist's evaluation ran on {f.eval_mode}"
             + (", as the snippet above does." if f.whole_frames else "; the snippet above runs whole frames.")]
    if f.step is not None and at != f.step:
        lines.append(f"That evaluation measured the weights of step {at}; these are of step {f.step}.")
    return lines


def render(f: CardFacts) -> str:
    """README.md: YAML front matter for model hubs, then the sections."""
    library = "segmentation-models-pytorch" if f.smp else "pytorch"
    tags = ["semantic-segmentation", "segdist"] + (["segmentation-models-pytorch"] if f.smp else [])
    train = f.train.describe() if isinstance(f.train, SplitFacts) else f"not known: {f.train}"
    name = f"{f.arch} ({f.encoder})" if f.smp else f.arch
    on = f" on {f.train.dataset}" if isinstance(f.train, SplitFacts) else ""
    values = lambda t: ", ".join(f"{v:g}" for v in t.flatten().tolist())  # noqa: E731
    parts = [
        "---", f"library_name: {library}", "pipeline_tag: image-segmentation", "tags:", *[f"- {t}" for t in tags], "---",
        f"# {name}{on}", "",
        "A semantic segmentation model trained with segdist. This folder loads without segdist: "
        + ("`segmentation_models_pytorch.from_pretrained(folder)`." if f.smp else
           f"`{MODELING_FILE}` holds the architecture, which needs torch and safetensors alone."), "",
        "## Model", "", *_model_lines(f), "",
        "## Classes and palette", "", *_class_lines(f), "",
        "## Input", "",
        "- N x 3 x H x W float32, RGB, values in [0, 255];",
        f"- normalised as `(x - mean) / std` with mean = ({values(MEAN)}) and std = ({values(STD)}): ImageNet's "
        "statistics times 255;",
        f"- H and W padded at the bottom and right to multiples of {PAD_MULTIPLE} with black (0 before normalising), "
        "the logits cropped back to H x W.",
        "",
        "## Load and run", "",
        f"The logits below are segdist's for the same image, whole frame, in float32 (`{SUMMARY_FILE}` has the classes, "
        "the palette and these numbers for programs):", "",
        "```python", loader_snippet(f.smp, f.outputs), "```", "",
        "## Training data", "", f"Trained on {train}.", "",
        "## Validation metrics", "", *_metrics_lines(f), "",
        "## Recipe", "", "The recipe the checkpoint was trained with:", "", "```toml", f.recipe_toml.strip(), "```", "",
    ]
    return "\n".join(parts)


def facts_json(f: CardFacts) -> dict:
    """segdist.json: the card's facts for programs."""
    split = lambda s: vars(s).copy() if isinstance(s, SplitFacts) else None  # noqa: E731
    evaluation = None
    if f.evaluation is not None:
        at, m = f.evaluation
        evaluation = {"step": at, **{k: m.get(k) for k in ("miou", "per_class_iou", "pixel_accuracy", "num_samples")}}
    return {
        "format": FORMAT,
        "loader": "segmentation_models_pytorch.from_pretrained" if f.smp else f"{MODELING_FILE}:from_pretrained",
        "architecture": f.arch, "encoder": f.encoder, "outputs": f.outputs,
        "classes": f.classes, "palette": f.palette, "ignore_index": f.ignore_index,
        "input": {"layout": "NCHW", "channels": "RGB", "range": [0, 255], "mean": MEAN.flatten().tolist(),
                  "std": STD.flatten().tolist(), "pad_multiple": PAD_MULTIPLE, "pad_value": 0, "pad_sides": ["bottom", "right"]},
        "weights": "ema" if f.ema else "raw", "checkpoint": f.checkpoint, "step": f.step,
        "train_data": split(f.train), "val_data": split(f.val), "evaluation": evaluation,
    }
