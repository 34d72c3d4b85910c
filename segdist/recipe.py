"""Recipes: one dataclass per TOML section, one strict loader, `--set` overrides.

Precedence is CLI (`--set section.key=value`) > file > the defaults written here, once. An
unknown section or key, a wrong type or a value out of range is a `UserError` naming the key.
TOML has no null: optional values take the string "null" (or "none") and are written back so.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from segdist.errors import UserError

NULLS = ("null", "none")

AUTO = "auto"
"""The one word `data.num_workers` takes besides a count (segdist.distributed.loader_workers resolves
it), and `train.grad_accum` (segdist.train.setup.resolve_accumulation)."""


@dataclass
class DataConfig:
    root: str = "data/shapes"
    """Where the `<split>-NNNNNN.tar` shards and `<split>.json` manifests are: a folder, an http(s):// prefix,
    a "pipe:" command with {name} (e.g. "pipe:aws s3 cp s3://bucket/shards/{name} -") or an fsspec URL (s3://, gs://)."""
    val_root: Optional[str] = None
    """Where evaluation reads its splits, when not from `root`: the full-size split while training from a
    reduced tier (`launch/shard.py ... --max-size N`); "null" = `root`. Same kinds of location as `root`."""
    cache_dir: Optional[str] = None
    """For a remote root: a local folder that keeps each shard once read whole and checked (sha256); "null" = none."""
    fetch_retries: int = 5
    """For a remote root: how often a read that broke off is retried (with backoff) before it is an error."""
    fetch_timeout: float = 60.0
    """For a remote root: seconds a read may bring no bytes before it counts as broken off (a server
    that goes silent mid-file), then retried as above."""
    sampling: str = "uniform"
    """How often each training sample is drawn per pass: "uniform" (once) or "rare_class" (DAFormer's rare-class sampling)."""
    rare_class_temperature: float = 0.01
    """rare_class: T of P(c) ~ exp((1 - f_c) / T); smaller favours rare classes more (DAFormer: 0.01)."""
    rare_class_min_pixels: int = 0
    """rare_class: a sample counts as holding a class from this many pixels of it (DAFormer: 3000 at 1024x512)."""
    train_split: str = "train"
    """Split trained on."""
    val_split: str = "val"
    """Split evaluated every `train.eval_every` steps and at the end."""
    batch_size: int = 8
    """Samples per process per micro-step (the effective batch is batch x grad_accum x world)."""
    num_workers: Union[int, Literal["auto"]] = AUTO
    """DataLoader worker processes per training process (0 = read in the main process), or "auto": the
    node's usable cores shared among its training processes, less one each for the trainer itself
    (segdist.distributed.loader_workers), so a recipe fits the node it lands on."""
    augment: str = "shapes"
    """Training augmentation preset: shapes, crop, voc, cityscapes, ph2 or birds (segdist/data/augment.py)."""
    augment_args: dict = field(default_factory=dict)
    """Overrides of the preset's parameters, e.g. {scale = [0.75, 1.5], p_flip = 0.0}; {} = its defaults."""
    crop: list[int] = field(default_factory=lambda: [64, 64])
    """Training crop as [height, width]."""
    geometry: str = "cpu"
    """Where the preset's geometry runs: "cpu" (albumentations in the loader) or "device" (the loader
    draws each sample's placement, one batched warp on the GPU applies it; for light models whose
    loader cannot keep up, segdist/data/geometry.py). Not with the ph2 preset's blur."""
    shuffle_buffer: int = 256
    """Each pass shuffles samples within blocks of whole shards holding at least this many (0: whole
    shards in a shuffled order, their samples in order); segdist.data.stream.PassOrder."""
    on_corrupt: str = "fail"
    """A truncated shard or undecodable sample in training: "fail", or "skip" it with a warning (eval never skips)."""
    in_memory: bool = False
    """Read and decode the whole training split into each training process's memory when training
    starts, and gather every batch from there (segdist/data/held.py): for small splits on light models,
    where per-sample reading and decoding cannot keep a GPU busy. The same batches as without."""

    def __post_init__(self) -> None:
        _positive("data.batch_size", self.batch_size)
        if self.num_workers != AUTO and (isinstance(self.num_workers, (str, bool)) or not self.num_workers >= 0):
            raise UserError(f"data.num_workers must be an integer >= 0 or \"auto\", got {self.num_workers!r}")
        _non_negative("data.shuffle_buffer", self.shuffle_buffer)
        _non_negative("data.fetch_retries", self.fetch_retries)
        if isinstance(self.fetch_timeout, bool) or not isinstance(self.fetch_timeout, (int, float)) \
                or not self.fetch_timeout > 0:
            raise UserError(f"data.fetch_timeout must be a number of seconds > 0, got {self.fetch_timeout!r}")
        _non_negative("data.rare_class_min_pixels", self.rare_class_min_pixels)
        if self.sampling not in ("uniform", "rare_class"):
            raise UserError(f"data.sampling must be \"uniform\" or \"rare_class\", got {self.sampling!r}")
        if not self.rare_class_temperature > 0:
            raise UserError(f"data.rare_class_temperature must be > 0, got {self.rare_class_temperature}")
        if len(self.crop) != 2 or any(c <= 0 for c in self.crop):
            raise UserError(f"data.crop must be [height, width] of positive ints, got {self.crop}")
        if self.on_corrupt not in ("fail", "skip"):
            raise UserError(f"data.on_corrupt must be \"fail\" or \"skip\", got {self.on_corrupt!r}")
        from segdist.data.augment import resolved_params  # checks names and values; no albumentations import
        from segdist.data.geometry import check_geometry

        check_geometry(self.geometry, self.augment, resolved_params(self.augment, self.augment_args))

    @property
    def eval_root(self) -> str:
        """The root evaluation reads every split from: `val_root`, else `root`."""
        return self.val_root if self.val_root is not None else self.root


@dataclass
class ModelConfig:
    arch: str = "Unet"
    """smp architecture by class name (Unet, UnetPlusPlus, DeepLabV3Plus, Segformer, ...) or ours: unet, segnet."""
    encoder: Optional[str] = "resnet18"
    """smp encoder name (resnet34, mit_b2, ...) or a timm one as "tu-<name>"; ignored ("null") by unet/segnet."""
    encoder_weights: Optional[str] = None
    """Pretrained encoder weights: a name smp knows ("imagenet"), a local file path, or "null" (random init)."""
    classes: Optional[int] = None
    """Outputs: "null" = the train manifest's class count; 1 = binary (one logit, sigmoid, threshold 0)."""
    in_channels: int = 3
    """Input image channels."""
    decoder_channels: Optional[list[int]] = None
    """Decoder widths for smp architectures that take a list (Unet, UnetPlusPlus); "null" = smp default."""
    arch_args: dict = field(default_factory=dict)
    """More constructor arguments of the architecture, e.g. {decoder_attention_type = "scse"}; {} = its defaults."""
    channels_last: bool = False
    """Keep weights and activations in channels-last memory format (faster convolutions on recent GPUs)."""
    compile: bool = False
    """torch.compile the model's forward in place (state_dict keys unchanged)."""
    sync_bn: bool = False
    """Synchronise BatchNorm statistics across processes (applied only on CUDA with more than one process)."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the weights, evaluated and checkpointed beside them (0 = off)."""

    def __post_init__(self) -> None:
        if self.classes is not None:
            _positive("model.classes", self.classes)
        _positive("model.in_channels", self.in_channels)
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"model.ema_decay must be in [0, 1) (0 = no EMA), got {self.ema_decay}")


@dataclass
class LossConfig:
    terms: list[dict] = field(default_factory=lambda: [{"name": "ce", "weight": 1.0}])
    """Weighted sum of terms, e.g. [{name = "ce", weight = 0.7}, {name = "dice", weight = 0.3, smooth = 1e-5}]."""
    label_smoothing: float = 0.0
    """Label smoothing of the ce and bce terms."""
    class_weights: Optional[list[float]] = None
    """Per-class weights of the ce and bce terms, one per manifest class; "null" = see class_weighting."""
    class_weighting: str = "none"
    """Derive ce/bce class weights from the train manifest's pixel counts: none, inverse, sqrt_inverse, median_frequency."""

    def __post_init__(self) -> None:
        if not self.terms:
            raise UserError("loss.terms is empty: give at least one term, e.g. [{name = \"ce\", weight = 1.0}]")
        for i, term in enumerate(self.terms):
            if "name" not in term:
                raise UserError(f"loss.terms[{i}] has no name: write {{name = \"ce\", weight = 1.0}}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UserError(f"loss.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        weightings = ("none", "inverse", "sqrt_inverse", "median_frequency")
        if self.class_weighting not in weightings:
            raise UserError(f"loss.class_weighting: unknown {self.class_weighting!r}; valid: {', '.join(weightings)}")
        if self.class_weights is not None:
            if self.class_weighting != "none":
                raise UserError("loss.class_weights and loss.class_weighting are both set: give one of them")
            if any(w < 0 for w in self.class_weights) or not any(w > 0 for w in self.class_weights):
                raise UserError(f"loss.class_weights must be >= 0 with at least one > 0, got {self.class_weights}")


OPTIM_IMPLEMENTATIONS = ("fused", "foreach", "for-loop")


@dataclass
class OptimConfig:
    name: str = "adamw"
    """Optimizer: adamw, adam or sgd."""
    lr: float = 1e-3
    """Peak learning rate (reached after warmup) of the non-encoder parameters."""
    weight_decay: float = 1e-4
    """Weight decay (not applied to norms and biases)."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = False
    """SGD with Nesterov momentum."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam/AdamW betas."""
    encoder_lr_mult: float = 1.0
    """LR multiplier of the model's `encoder` parameters (e.g. 0.1 for a pretrained backbone)."""
    implementation: str = "fused"
    """How torch runs the update: fused (one kernel for all parameters, on CPU and CUDA), foreach
    (one op per step of the update, over all parameters) or for-loop (per parameter; torch's CPU
    default). The same update, computed differently: fused rounds differently from the other two,
    so a run resumed under another implementation is no longer bit-identical to one never stopped."""

    def __post_init__(self) -> None:
        _positive("optim.lr", self.lr)
        _non_negative("optim.weight_decay", self.weight_decay)
        _non_negative("optim.momentum", self.momentum)
        _positive("optim.encoder_lr_mult", self.encoder_lr_mult)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise UserError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if self.nesterov and (self.name != "sgd" or self.momentum == 0):
            raise UserError("optim.nesterov needs optim.name = \"sgd\" and optim.momentum > 0")
        if self.implementation not in OPTIM_IMPLEMENTATIONS:
            raise UserError(f"optim.implementation: unknown {self.implementation!r}; valid: "
                            f"{', '.join(OPTIM_IMPLEMENTATIONS)}")


@dataclass
class ScheduleConfig:
    name: str = "poly"
    """LR schedule in optimizer steps: constant, poly, cosine or onecycle (formulas in segdist/optim.py)."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup to optim.lr (from lr/warmup_steps; onecycle from lr/25, needs >= 2)."""
    power: float = 0.9
    """Exponent of the poly schedule."""
    min_lr: float = 0.0
    """LR the poly, cosine and onecycle decays end at (the encoder's is scaled by optim.encoder_lr_mult)."""

    def __post_init__(self) -> None:
        _non_negative("schedule.warmup_steps", self.warmup_steps)
        _non_negative("schedule.min_lr", self.min_lr)


PRECISIONS = ("auto", "bf16", "fp16", "fp32")
"""train.precision values; segdist.precision resolves "auto" against the hardware."""


@dataclass
class TrainConfig:
    steps: int = 1000
    """Optimizer steps to train for."""
    grad_accum: Union[int, Literal["auto"]] = 1
    """Micro-batches accumulated per optimizer step; "auto": train.global_batch / (processes x
    data.batch_size), so a run keeps its global batch on any number of processes."""
    global_batch: Optional[int] = None
    """Samples per optimizer step over all processes (G), the unit the data advances by; null:
    processes x data.batch_size x train.grad_accum. A resume must keep it (docs/training.md)."""
    precision: str = "auto"
    """auto (bf16 where the device runs it natively, fp16 with loss scaling on CUDA without bf16, else fp32), bf16, fp16 (CUDA only) or fp32."""
    clip_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0 = off)."""
    eval_every: int = 0
    """Evaluate every N optimizer steps (0 = only at the end)."""
    ckpt_every: int = 500
    """Checkpoint every N optimizer steps (and always at the end)."""
    run_dir: str = "runs/default"
    """Run folder: recipe.toml, checkpoints/, tensorboard/, metrics/."""
    seed: int = 0
    """Seed of weights, data order and augmentation."""
    keep_last: int = 0
    """Keep only the newest N `step-N` checkpoints (plus `best`); 0 keeps them all."""
    max_bad_steps: int = 10
    """Stop (exit 3, last good weights checkpointed) after N consecutive steps with a non-finite loss or gradient."""
    init_from: Optional[str] = None
    """Start a new run from a checkpoint's model weights (mmseg's load_from): a checkpoint folder
    (`RUN/checkpoints/step-N` or `best`) or a run folder (its latest complete checkpoint). The EMA, if
    any, starts from the same weights; optimizer, schedule, step count and data position start afresh,
    so the batch may change. Unused when `--resume` finds a checkpoint in run_dir. "null" = none."""

    def __post_init__(self) -> None:
        _positive("train.steps", self.steps)
        _non_negative("train.keep_last", self.keep_last)
        _positive("train.max_bad_steps", self.max_bad_steps)
        if self.grad_accum == AUTO:
            if self.global_batch is None:
                raise UserError('train.grad_accum = "auto" derives the accumulation from train.global_batch, which is '
                                "null: set train.global_batch, or give train.grad_accum a number")
        elif isinstance(self.grad_accum, (str, bool)) or not self.grad_accum > 0:
            raise UserError(f'train.grad_accum must be an integer > 0 or "auto", got {self.grad_accum!r}')
        if self.global_batch is not None:
            _positive("train.global_batch", self.global_batch)
        _non_negative("train.eval_every", self.eval_every)
        _positive("train.ckpt_every", self.ckpt_every)
        _non_negative("train.clip_grad_norm", self.clip_grad_norm)
        if self.init_from is not None and not self.init_from.strip():
            raise UserError("train.init_from is empty: give a checkpoint folder or a run folder, or \"null\"")
        if self.precision not in PRECISIONS:
            raise UserError(f"train.precision must be one of {', '.join(map(repr, PRECISIONS))}, got {self.precision!r}")


EVAL_MODES = ("whole", "slide", "resize")


@dataclass
class EvalConfig:
    batch_size: int = 8
    """Frames per evaluation batch: a canonical group of consecutive samples in manifest order, the
    same whatever the world size (1 = every frame alone); in slide mode also the windows per forward pass."""
    num_workers: int = 1
    """DataLoader workers per process for evaluation."""
    mode: str = "whole"
    """How a frame goes through the model (segdist.inference): "whole" at its native size, "slide" in
    overlapping crop-sized windows, "resize" at eval.crop and the scores resized back."""
    crop: Optional[list[int]] = None
    """[H, W] of a slide window, or the size "resize" runs at; "null" = data.crop (the training scale)."""
    stride: Optional[list[int]] = None
    """[H, W] step between slide windows; "null" = two thirds of the crop (mmseg's 513 for 769)."""
    scales: list[float] = field(default_factory=lambda: [1.0])
    """Test-time scales of the frame (e.g. [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]); more than one averages probabilities."""
    flip: bool = False
    """Also run the horizontally flipped frame and average the probabilities (test-time augmentation)."""

    def __post_init__(self) -> None:
        _positive("eval.batch_size", self.batch_size)
        _non_negative("eval.num_workers", self.num_workers)
        if self.mode not in EVAL_MODES:
            raise UserError(f"eval.mode must be one of {', '.join(map(repr, EVAL_MODES))}, got {self.mode!r}")
        for key in ("crop", "stride"):
            value = getattr(self, key)
            if value is not None and (len(value) != 2 or min(value) < 1):
                raise UserError(f"eval.{key} must be two positive integers [H, W] (or \"null\"), got {value}")
        if self.crop is not None and self.stride is not None and any(s > c for s, c in zip(self.stride, self.crop)):
            raise UserError(f"eval.stride {self.stride} is larger than eval.crop {self.crop}: the windows would leave "
                            "pixels unseen; use a stride <= the crop (e.g. two thirds of it)")
        if not self.scales or min(self.scales) <= 0:
            raise UserError(f"eval.scales must be positive numbers, e.g. [0.75, 1.0, 1.25]; got {self.scales}")


TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")
"""log.trackers names: segdist's TensorBoard writer and Accelerate's other trackers (segdist.tracking)."""


@dataclass
class LogConfig:
    every: int = 10
    """Log train loss, LR and throughput every N optimizer steps."""
    images: int = 4
    """Fixed validation samples drawn at each eval (input | truth | prediction), to the trackers that take images."""
    peak_tflops: float = 0.0
    """The GPU's peak dense TFLOP/s at the run's precision for model FLOPs utilisation (0 = from segdist.telemetry's table)."""
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Where the run logs, on the main process (docs/trackers.md): any of "tensorboard", "wandb", "mlflow",
    "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio"; each but tensorboard needs its extra
    (pip install 'segdist[mlflow]') and is set up by its own environment variables."""
    project: str = "segdist"
    """The project (W&B, Comet, ...) or experiment (MLflow) the trackers log the run under; the run is
    named after train.run_dir's last folder."""

    def __post_init__(self) -> None:
        _positive("log.every", self.every)
        _non_negative("log.images", self.images)
        _non_negative("log.peak_tflops", self.peak_tflops)
        for name in self.trackers:
            if name not in TRACKERS:
                raise UserError(f"log.trackers: unknown tracker {name!r}; known: {', '.join(TRACKERS)}")
            if self.trackers.count(name) > 1:
                raise UserError(f"log.trackers lists {name!r} twice: name each tracker once")
        if not self.project.strip():
            raise UserError('log.project is empty: name the project the trackers log under, e.g. "segdist"')


@dataclass
class Recipe:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise UserError(f"{key} must be > 0, got {value}")


def _non_negative(key: str, value: float) -> None:
    if not value >= 0:
        raise UserError(f"{key} must be >= 0, got {value}")


# ---------------------------------------------------------------------------------------------
# Loading

def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Read a TOML recipe, apply `section.key=value` overrides, validate, return a Recipe."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe {path} not found: give the path of a .toml recipe (see recipes/)")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"recipe {path} is not valid TOML: {exc}") from None
    return recipe_from_dict(apply_overrides(raw, overrides or [], str(path)), source=str(path))


def resolve_recipe(recipe: Recipe | str | os.PathLike, overrides: Sequence[str] | str = ()) -> Recipe:
    """The recipe a run of the Python API uses: `recipe` is the path of a TOML recipe (`load_recipe`)
    or a loaded `Recipe`, `overrides` the `--set` strings applied on top (one string is one override)."""
    overrides = [overrides] if isinstance(overrides, str) else list(overrides or [])
    bad = next((o for o in overrides if not isinstance(o, str)), None)
    if bad is not None:
        raise UserError(f"overrides must be 'section.key=value' strings (e.g. 'train.steps=100'), got {_describe(bad)}")
    if isinstance(recipe, Recipe):
        if not overrides:
            return recipe
        return recipe_from_dict(apply_overrides(tomllib.loads(dumps_toml(recipe)), overrides, "recipe"))
    if isinstance(recipe, (str, os.PathLike)):
        return load_recipe(recipe, overrides)
    raise UserError(f"recipe must be the path of a .toml recipe or a segdist.recipe.Recipe, got {_describe(recipe)}")


def apply_overrides(raw: dict, overrides: Sequence[str], source: str) -> dict:
    """`raw` (a recipe's TOML tables) with each `section.key=value` of `overrides` set, in order."""
    for item in overrides:
        section, key, value = parse_override(item)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise UserError(f"recipe {source}: [{section}] must be a table")
        table, *inner = key.split(".")
        target, where = raw[section], f"{section}.{table}"
        for name in inner:  # a key inside a table-valued key: data.augment_args.scale=[0.5, 2.0]
            node = target.setdefault(table, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {item}: {where} is {node!r}, not a table, so it has no key {name!r}; "
                                f"set it whole: --set {where}=...")
            target, table, where = node, name, f"{where}.{name}"
        target[table] = value
    return raw


def parse_override(item: str) -> tuple[str, str, Any]:
    """`section.key=value` → (section, key, value); the value is read as TOML, else a string. The
    key may go on into a table-valued key (`data.augment_args.scale`: key "augment_args.scale"),
    at any depth; the other entries of that table stay as the recipe has them."""
    name, sep, text = item.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not section or not key:
        raise UserError(f"--set {item!r} is not section.key=value (e.g. --set train.steps=100)")
    text = text.strip()
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # bare words are strings: --set model.arch=FPN
    return section, key, value


def recipe_from_dict(raw: dict, source: str = "recipe") -> Recipe:
    sections = {f.name: f for f in dataclasses.fields(Recipe)}
    for name in raw:
        if name not in sections:
            raise UserError(
                f"{source}: unknown section [{name}]; valid sections: {', '.join(sections)}"
            )
    built = {}
    for name, f in sections.items():
        table = raw.get(name, {})
        if not isinstance(table, dict):
            raise UserError(f"{source}: [{name}] must be a table of key = value lines")
        built[name] = _section_from_dict(f.default_factory, name, table, source)  # type: ignore[arg-type]
    return Recipe(**built)


def _section_from_dict(cls: type, section: str, table: dict, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in table.items():
        if key not in hints:
            raise UserError(
                f"{source}: unknown key {section}.{key}; valid keys of [{section}]: {', '.join(names)}"
            )
        kwargs[key] = _coerce(f"{section}.{key}", value, hints[key])
    return cls(**kwargs)


def parse_null(value: Any) -> Any:
    """None for the strings that stand for it ("null", "none", any case), else the value."""
    return None if isinstance(value, str) and value.lower() in NULLS else value


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) < len(args) and isinstance(value, str) and parse_null(value) is None:
            return None  # only an Optional takes "null"
        if len(inner) == 1:
            return _coerce(key, value, inner[0])
        for option in inner:  # the first that takes the value, as written
            try:
                return _coerce(key, value, option)
            except UserError:
                pass
        raise UserError(f"{key} must be {' or '.join(_expected(a) for a in inner)}, got {_describe(value)}")
    if origin is Literal:
        if not any(type(value) is type(a) and value == a for a in args):  # no True for 1
            raise UserError(f"{key} must be {_expected(hint)}, got {_describe(value)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{key} must be a list, got {_describe(value)}")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)] if args else value
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise UserError(f"{key} must be a table, got {_describe(value)}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise UserError(f"{key} must be true or false, got {_describe(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{key} must be an integer, got {_describe(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{key} must be a number, got {_describe(value)}")
        if not math.isfinite(value):
            raise UserError(f"{key} must be finite, got {value}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise UserError(f"{key} must be a string (in quotes), got {_describe(value)}")
        return value
    raise TypeError(f"unsupported recipe type {hint} for {key}")  # a bug, not a user error


def _expected(hint: Any) -> str:
    """What a value of a union's member looks like, for the one line that names them all."""
    if typing.get_origin(hint) is Literal:
        return " or ".join(f'"{a}"' if isinstance(a, str) else repr(a) for a in typing.get_args(hint))
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string (in quotes)"}
    return names.get(hint, "a list" if typing.get_origin(hint) is list else "a table")


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


# ---------------------------------------------------------------------------------------------
# Writing

def dumps_toml(recipe: Recipe) -> str:
    """The resolved recipe as TOML that `load_recipe` reads back to an equal Recipe."""
    lines = []
    for section, table in dataclasses.asdict(recipe).items():
        lines.append(f"[{section}]")
        for key, value in table.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if value is None:
        return '"null"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")
