"""The one way a trained model comes back from a checkpoint: eval, predict (and export) call
`load_trained`. It builds the recipe's model without pretrained encoder weights (the checkpoint
holds every weight, and the machine may be offline), loads `model.safetensors`, and prefers the
checkpoint's EMA copy (`ema.pt`) when there is one: training ranked `best` by the EMA weights'
mIoU, so those are the ones evaluated and used. Every bad file is one UserError naming it."""

from __future__ import annotations

import dataclasses
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from segdist.errors import UserError
from segdist.recipe import ModelConfig

BINARY_CLASSES = ["background", "foreground"]
"""Class names of a binary model when no manifest is there."""


def resolve_classes(cfg: ModelConfig, manifest) -> int:
    """Model outputs: the manifest's class count, or 1 (one logit) for a 2-class binary split."""
    n = manifest.num_classes
    if cfg.classes is None:
        return n
    if cfg.classes == n or (cfg.classes == 1 and n == 2):
        return cfg.classes
    raise UserError(
        f"model.classes = {cfg.classes} but split {manifest.split!r} has {n} classes "
        f"({', '.join(manifest.classes[:6])}{', ...' if n > 6 else ''}); set model.classes = {n}"
        + (" (or 1 for one binary logit)" if n == 2 else "")
    )


@dataclass
class TrainedInfo:
    """What `load_trained` found beside the weights."""

    checkpoint: Path
    """The checkpoint folder the weights came from (a run folder resolves to its best, else latest)."""
    outputs: int
    """Logits of the model: 1 = binary (sigmoid), else one per class."""
    ema: bool
    """The weights are the checkpoint's EMA copy."""
    manifest: object | None
    """The recipe's val-split manifest when it is there (class names, palette, ignore index)."""


def load_trained(recipe, checkpoint, manifest=None) -> tuple[nn.Module, TrainedInfo]:
    """The recipe's model with a checkpoint's weights, on the CPU in eval mode.

    `checkpoint`: a run folder (its best checkpoint, else its latest) or one `checkpoints/step-N`
    folder. The number of outputs comes from `manifest` when given, else from the recipe's
    val-split manifest when it exists, else from `model.classes` alone."""
    from segdist.checkpoint import load_weights, resolve_checkpoint
    from segdist.data.location import is_remote
    from segdist.data.manifest import load_split, manifest_path
    from segdist.models.build import build_model

    root = recipe.data.eval_root
    if manifest is None and (is_remote(root) or manifest_path(root, recipe.data.val_split).is_file()):
        manifest = load_split(recipe.data, recipe.data.val_split, check_files=False, evaluation=True)
    if manifest is not None:
        outputs = resolve_classes(recipe.model, manifest)
    elif recipe.model.classes is not None:
        outputs = recipe.model.classes
    else:
        where = manifest_path(root, recipe.data.val_split)
        raise UserError(
            f"model.classes is \"null\" and manifest {where} (which would give the class count) is not there: "
            "set the class count the checkpoint was trained with, e.g. --set model.classes=5 (1 for one binary "
            "logit), or --set data.root=<the data folder>"
        )
    path = resolve_checkpoint(checkpoint)
    model = build_model(dataclasses.replace(recipe.model, encoder_weights=None), outputs)
    load_weights(path, model)
    ema = (path / "ema.pt").exists()
    if ema:
        _load_ema(path, model)
    model.eval()
    return model, TrainedInfo(path, outputs, ema, manifest)


def _load_ema(path: Path, model: nn.Module) -> None:
    """Load the EMA copy's weights into the model: one line for any bad file."""
    from segdist.checkpoint import FIT_FIX

    try:
        saved = torch.load(path / "ema.pt", map_location="cpu", weights_only=True)
        state = saved["module"]
    except (OSError, RuntimeError, EOFError, KeyError, TypeError, ValueError, pickle.UnpicklingError) as exc:
        first = str(exc).strip().splitlines()[0][:100] if str(exc).strip() else "unreadable"
        raise UserError(f"checkpoint {path}/ema.pt is not a segdist EMA file ({type(exc).__name__}: {first}); "
                        "re-copy the checkpoint, or delete ema.pt to use the raw weights") from None
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise UserError(f"checkpoint {path}/ema.pt does not fit this recipe's model "
                        f"({str(exc).strip().splitlines()[0]}); {FIT_FIX}") from None
