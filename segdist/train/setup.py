"""A training run's setup: the checks a user can fail, before any process group forms and before
anything is written (`check_run` -> `Setup`), and the run's parts, built from the recipe and restored
from the checkpoint when resuming (`build_parts` -> `Parts`). segdist.train.run.train hands both to
the loop.

A new run with `train.init_from` takes only the model weights of that checkpoint (`check_init_from`
checks that they fit): optimizer, schedule, counters and data position are a new run's, so the batch
size may differ from the checkpoint's run.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from segdist.checkpoint import Pieces, latest_checkpoint, load_weights, resolve_checkpoint, weights_misfit
from segdist.data.augment import build_augment, build_colour, decode_reduction
from segdist.data.geometry import build_geometry
from segdist.data.held import check_fits
from segdist.data.manifest import Manifest, check_crop_fits, check_random_access, check_reachable, check_same_labels, load_split
from segdist.data.sampling import training_draws
from segdist.distributed import DistContext, launch_context
from segdist.errors import UserError
from segdist.fileio import check_writable
from segdist.inference import InferenceMode
from segdist.losses import build_loss
from segdist.models import OURS, build_model, check_batch_norms_train, prepare_model, resolve_classes, state_shapes
from segdist.models.ema import ModelEMA
from segdist.optim import build_optimizer, build_scheduler
from segdist.precision import Precision, resolve_precision
from segdist.recipe import Recipe, parse_null
from segdist.tracking import check_trackers
from segdist.train.state import TrainState

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib



@dataclass
class Setup:
    """Everything checked before anything is built, created or joined into a process group."""

    recipe: Recipe
    train_manifest: Manifest
    val_manifest: Manifest
    classes: int
    resume_from: Path | None
    start_step: int
    creates_run_dir: bool
    """The run folder did not exist: a run that fails before its first checkpoint removes it."""
    precision: Precision
    """train.precision resolved against this process's device (segdist.precision)."""
    dist: DistContext
    """This process's rank and world, as the launcher set them (read once, here)."""
    draws: object = None
    """data.sampling = "rare_class": each training sample's draw probability, in manifest order
    (segdist.data.sampling.training_draws); None = uniform passes."""
    init_from: Path | None = None
    """The checkpoint whose model weights start this new run (train.init_from, resolved and checked);
    None without one, and when resuming (the run's own checkpoint wins)."""

    @property
    def finished(self) -> bool:
        return self.resume_from is not None and self.start_step == self.recipe.train.steps


RESUME_MODES = ("no", "must", "auto")


def check_run(recipe: Recipe, resume: str = "no") -> Setup:
    """Fail on user errors with one line, before any process group exists (docs/design-notes.md) and before
    anything is written (no partial output). `resume`: "no" (refuse a folder holding
    checkpoints), "must" (error without one) or "auto" (resume if there is one, else start)."""
    assert resume in RESUME_MODES, resume
    train_m = load_split(recipe.data, recipe.data.train_split)
    val_m = load_split(recipe.data, recipe.data.val_split, evaluation=True)
    classes = resolve_classes(recipe.model, train_m)
    check_same_labels(train_m, val_m)
    check_crop_fits(train_m, recipe.data.crop)
    check_random_access(train_m)  # the training stream reads samples by their offsets
    precision = resolve_precision(recipe.train.precision)
    InferenceMode.from_recipe(recipe)  # eval.stride against the window, before any process group
    dist = launch_context()
    if recipe.data.in_memory:
        check_fits(train_m, dist.local_world)  # every local process holds its own copy
    world = dist.world
    recipe = resolve_accumulation(recipe, world)
    if recipe.data.batch_size == 1 and not (recipe.model.sync_bn and torch.cuda.is_available() and world > 1):
        check_batch_norms_train(recipe.model, classes, tuple(recipe.data.crop))
    if recipe.data.batch_size * world > train_m.num_samples:
        raise UserError(
            f"data.batch_size = {recipe.data.batch_size} on {world} process{'es' if world > 1 else ''} exceeds the "
            f"{train_m.num_samples} samples of split {train_m.split!r}; lower data.batch_size"
        )
    draws = training_draws(train_m, recipe.data)
    for manifest in (train_m, val_m):
        check_reachable(manifest)
    check_trackers(recipe.log, dist.is_main)  # packages and servers of log.trackers, on the process that logs
    run_dir = Path(recipe.train.run_dir)
    check_writable(run_dir, "train.run_dir", create=True)
    latest = latest_checkpoint(run_dir)
    if resume == "must" and latest is None:
        raise UserError(f"--resume: no complete checkpoint in {run_dir}/checkpoints; start without --resume")
    if resume == "no" and latest is not None:
        raise UserError(
            f"{run_dir} already holds checkpoints (latest {latest.name}): pass --resume to continue, "
            "or set train.run_dir to a new folder"
        )
    resume_from = latest if resume != "no" else None
    start = check_resumable(resume_from, recipe, world) if resume_from is not None else 0
    # init_from only seeds a new run: a resumed one continues from its own checkpoint (and a
    # requeued job does not need the checkpoint it once started from).
    seeded = recipe.train.init_from is not None and resume_from is None
    init_from = check_init_from(recipe, classes) if seeded else None
    return Setup(recipe, train_m, val_m, classes, resume_from, start, creates_run_dir=not run_dir.exists(),
                 precision=precision, dist=dist, draws=draws, init_from=init_from)


def saved_recipe(path: Path) -> dict:
    """The recipe checkpoint `path` was trained with, as written in its recipe.toml ({} if unreadable)."""
    try:
        return tomllib.loads((path / "recipe.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def resolve_accumulation(recipe: Recipe, world: int) -> Recipe:
    """The recipe with train.grad_accum a number: with train.global_batch G set, "auto" becomes
    G / (processes x data.batch_size), and a number must give G; the one-line error names the keys."""
    train, batch = recipe.train, recipe.data.batch_size
    G, per_step = train.global_batch, world * batch
    if G is None:
        return recipe
    plural = "es" if world > 1 else ""
    if train.grad_accum == "auto":
        if G % per_step:
            raise UserError(
                f"train.global_batch = {G} is not divisible by {world} process{plural} x data.batch_size {batch}: "
                "choose a data.batch_size (or a process count) whose product with the other divides it")
        return dataclasses.replace(recipe, train=dataclasses.replace(train, grad_accum=G // per_step))
    if per_step * train.grad_accum != G:
        raise UserError(
            f"train.global_batch = {G}, but {world} process{plural} x data.batch_size {batch} x train.grad_accum "
            f'{train.grad_accum} = {per_step * train.grad_accum}: set train.grad_accum = "auto"'
            + (f" (it gives {G // per_step})" if G % per_step == 0 else ", and a data.batch_size that divides it"))
    return recipe


def check_resumable(path: Path, recipe: Recipe, world: int) -> int:
    """The step a checkpoint holds, if this recipe on `world` processes can continue from it: the same
    model and optimizer, and the same data to come (seed and global batch, segdist.data.stream)."""
    state = json.loads((path / "state.json").read_text())
    step = int(state["step"])
    saved = saved_recipe(path)
    if "seed" in state:  # state.json's own record (older checkpoints: only their recipe.toml has it)
        saved.setdefault("train", {})["seed"] = state["seed"]
    for section, key in (("model", "arch"), ("model", "encoder"), ("model", "classes"), ("optim", "name"),
                         ("train", "seed")):
        before = saved.get(section, {}).get(key)
        now = getattr(getattr(recipe, section), key)
        before = parse_null(before)
        if key in saved.get(section, {}) and before != now:
            raise UserError(
                f"checkpoint {path} was trained with {section}.{key} = {before!r}, this recipe has {now!r}: "
                f"resume with {path.parent.parent / 'recipe.toml'}, or set train.run_dir to a new folder"
            )
    check_global_batch(path, state, recipe, world)
    if step > recipe.train.steps:
        raise UserError(f"checkpoint {path} is at step {step}, past train.steps = {recipe.train.steps}: raise train.steps")
    return step


def check_global_batch(path: Path, state: dict, recipe: Recipe, world: int) -> None:
    """A resume keeps the global batch G = processes x data.batch_size x train.grad_accum, the unit in
    which the data advances: any layout with the same G continues with exactly the samples that came
    next; another G is a new run (train.init_from)."""
    saved = int(state.get("global_batch") or 0)
    batch, accum = recipe.data.batch_size, recipe.train.grad_accum
    if not saved or saved == world * batch * accum:
        return
    was = f"{state.get('world_size')} x {state.get('batch_size')} x {state.get('grad_accum')}"
    if saved % (world * accum) == 0:
        fix = f"set data.batch_size = {saved // (world * accum)}"
    else:
        fix = (f"{saved} is not divisible by {world} process{'es' if world > 1 else ''} x train.grad_accum {accum}: "
               "change train.grad_accum or the process count")
    raise UserError(
        f"checkpoint {path} was trained with a global batch of {saved} samples (processes x data.batch_size x "
        f"train.grad_accum = {was}), this run has {world} x {batch} x {accum} = {world * batch * accum}: {fix} to "
        "resume, or start a new run from its weights with train.init_from"
    )


INIT_FROM_FIX = "or give train.init_from a checkpoint of this recipe's model"


def check_init_from(recipe: Recipe, classes: int) -> Path:
    """The checkpoint train.init_from names (a run folder: its latest complete one), if this recipe's
    model (with `classes` outputs) can start from its weights: the same model.arch and model.encoder
    as its recipe.toml, the same class count, and every tensor of the shape this model has (read
    from the weights file's header against a meta-device build; a model that cannot be built there
    is checked when build_parts loads the weights, still before anything is written)."""
    try:
        path = resolve_checkpoint(recipe.train.init_from, best=False)
    except UserError as exc:
        raise UserError(f"train.init_from: {exc}") from None
    saved = saved_recipe(path).get("model", {})
    for key in ("arch",) if recipe.model.arch in OURS else ("arch", "encoder"):
        before, now = parse_null(saved.get(key)), getattr(recipe.model, key)
        if key in saved and before != now:
            raise UserError(f"train.init_from: checkpoint {path} was trained with model.{key} = {before!r}, this "
                            f"recipe has {now!r}: set model.{key} = {before!r} (as in its recipe.toml), "
                            f"{INIT_FROM_FIX}")
    before = parse_null(saved.get("classes"))
    if isinstance(before, int) and before != classes:
        raise UserError(f"train.init_from: checkpoint {path} was trained with model.classes = {before}, this "
                        f"recipe's model has {classes} output{'s' if classes > 1 else ''}: start from a checkpoint "
                        "of this class count, or without train.init_from")
    expected = state_shapes(recipe.model, classes)
    misfit = weights_misfit(path, expected) if expected is not None else None
    if misfit:
        raise UserError(f"train.init_from: checkpoint {path} does not fit this recipe's model ({misfit}): set the "
                        f"model keys as in its recipe.toml, {INIT_FROM_FIX}")
    return path


@dataclass
class Parts:
    """What training is made of, built before the process group forms (builders raise UserError)."""

    model: torch.nn.Module
    loss_fn: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    transform: object
    """The preset's geometry: the CPU pipeline the loader runs, or (data.geometry = "device") the
    segdist.data.geometry.DeviceGeometry whose placements the trainer applies on the device."""
    colour: object
    """The preset's colour jitter (segdist.data.colour.ColourJitter), applied on the device; None if off."""
    reduce_for: object
    """The preset's first shrink as a JPEG decode reduction (segdist.data.augment.DecodeReduction), or None."""
    state: TrainState
    """The trainer's counters (from the checkpoint when resuming)."""
    pieces: Pieces
    """The checkpointed pieces by name, restored from the checkpoint when resuming; the Trainer adds
    the GradScaler and saves them all."""
    ema: ModelEMA | None = None
    """EMA of the weights (model.ema_decay > 0): updated by an optimizer hook, evaluated, checkpointed."""


def build_parts(r: Recipe, setup: Setup) -> Parts:
    torch.manual_seed(r.train.seed)  # the same initial weights on every rank and every run
    # Resuming or starting from train.init_from, the weights come from a checkpoint: no pretrained
    # download (the node may be offline).
    from_checkpoint = setup.resume_from is not None or setup.init_from is not None
    model_cfg = dataclasses.replace(r.model, encoder_weights=None) if from_checkpoint else r.model
    model = build_model(model_cfg, setup.classes)
    if setup.init_from is not None:  # before the EMA copies the model: both start from these weights
        try:
            load_weights(setup.init_from, model, fix=f"set the model keys as in its recipe.toml, {INIT_FROM_FIX}")
        except UserError as exc:  # what the header check could not see (a model the meta device cannot build)
            raise UserError(f"train.init_from: {exc}") from None
    # The EMA copies the plain model, before compile (a copied compiled forward would call the original).
    ema = ModelEMA(model, r.model.ema_decay) if r.model.ema_decay > 0 else None
    model = prepare_model(model, r.model, "cuda" if torch.cuda.is_available() else "cpu", setup.dist.world)
    ignore = setup.train_manifest.ignore_index
    loss_fn = build_loss(r.loss, setup.classes, ignore, setup.train_manifest.class_pixels)
    optimizer = build_optimizer(model, r.optim)
    if ema is not None:
        ema.attach(optimizer)  # a post-step hook: only applied optimizer steps update the average
    scheduler = build_scheduler(optimizer, r.schedule, r.train.steps)
    if r.data.geometry == "device":
        transform = build_geometry(r.data.augment, tuple(r.data.crop), ignore, r.data.augment_args)
    else:
        transform = build_augment(r.data.augment, tuple(r.data.crop), ignore, r.data.augment_args)
    colour = build_colour(r.data.augment, r.data.augment_args)
    reduce_for = decode_reduction(r.data.augment, tuple(r.data.crop), r.data.augment_args)
    state = TrainState()
    # Restored before the process group forms, so a checkpoint that does not fit is one line (the
    # scaler, which exists only with the Accelerator, joins in the Trainer).
    pieces = Pieces(setup.resume_from)
    pieces.add(model=model, optimizer=optimizer, scheduler=scheduler, trainer=state, ema=ema)
    return Parts(model, loss_fn, optimizer, scheduler, transform, colour, reduce_for, state, pieces, ema)
