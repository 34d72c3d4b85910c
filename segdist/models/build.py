"""The model builder: any segmentation-models-pytorch architecture with any encoder it accepts, or our own
`unet` / `segnet` (segdist/models/unet.py, segnet.py), and the options that matter at scale.

`model.arch` names smp architectures by their case-sensitive class name (Unet, UnetPlusPlus,
DeepLabV3Plus, Segformer, ...) and ours in lowercase. `model.arch_args` passes further keyword
arguments to the constructor; names the constructor does not take fail with the list it does.
A name that matches only when the case is ignored ("UNet") fails with the names it could mean.
`classes = 1` builds a one-logit binary model (sigmoid, threshold 0 in
segdist.inference.labels).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import warnings
from typing import Any

import torch
import torch.nn as nn

from segdist.errors import UserError
from segdist.models.pretrained import HubProbe, hub_access, hub_endpoint, is_local_file, load_encoder_file, start_hub_probe
from segdist.models.segnet import SegNet
from segdist.models.unet import NORMS, UPSAMPLES, UNet
from segdist.recipe import ModelConfig

log = logging.getLogger("segdist")

OURS: dict[str, type[nn.Module]] = {"unet": UNet, "segnet": SegNet}
"""Our own architectures by `model.arch` name."""
CHOICES: dict[str, tuple[str, ...]] = {"norm": NORMS, "upsample": UPSAMPLES}
"""Allowed values of our architectures' string arguments."""
WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def smp_architectures() -> dict[str, type]:
    """smp's architectures by class name (Unet, UnetPlusPlus, DeepLabV3Plus, Segformer, ...)."""
    import segmentation_models_pytorch as smp

    return {cls.__name__: cls for cls in smp.MODEL_ARCHITECTURES_MAPPING.values()}


def keyword_defaults(cls: type) -> dict[str, Any]:
    """Keyword arguments of a constructor and their defaults (what `model.arch_args` may set)."""
    return {p.name: p.default for p in inspect.signature(cls.__init__).parameters.values()
            if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is not p.empty}


def check_own_args(arch: str, args: dict) -> dict:
    """`model.arch_args` of our own architectures: known names, the type of the default, valid choices."""
    params = keyword_defaults(OURS[arch])
    listing = ", ".join(f"{k} = {v!r}" for k, v in params.items())
    for key, value in args.items():
        where = f"model.arch_args.{key}"
        if key not in params:
            raise UserError(f"{where}: {arch!r} has no argument {key!r}; its arguments (defaults): {listing}")
        default = params[key]
        ok = type(value) is type(default) or (isinstance(default, float) and type(value) is int)
        if not ok:
            raise UserError(f"{where} must be a {type(default).__name__} like the default {default!r}, got {value!r}")
        if key in CHOICES and value not in CHOICES[key]:
            raise UserError(f"{where}: unknown {value!r}; valid: {', '.join(CHOICES[key])}")
        if key in ("width", "depth") and value < 1:
            raise UserError(f"{where} must be >= 1, got {value}")
    return dict(args)


def build_model(cfg: ModelConfig, classes: int) -> nn.Module:
    """The recipe's model with `classes` outputs (1 = binary, one logit)."""
    if cfg.arch in OURS:
        return _build_own(cfg, classes)
    # Weights by name: ask the hub now, while smp imports (seconds), not after it.
    probe = start_hub_probe() if _weights_by_name(cfg.encoder_weights) else None
    archs = smp_architectures()
    if cfg.arch not in archs:
        near = [f"{name!r} ({'smp' if name in archs else 'ours'})" for name in [*sorted(archs), *sorted(OURS)]
                if name.lower() == cfg.arch.lower()]
        if near:
            raise UserError(f"model.arch: unknown architecture {cfg.arch!r} (names are case-sensitive); did you mean "
                            f"{' or '.join(near)}?")
        valid = sorted(archs) + sorted(OURS)
        raise UserError(f"model.arch: unknown architecture {cfg.arch!r}; valid names: {', '.join(valid)}")
    return _build_smp(archs[cfg.arch], cfg, classes, probe)


def _looks_like_path(weights: str) -> bool:
    return os.sep in weights or weights.endswith(WEIGHT_FILE_SUFFIXES)


def _weights_by_name(weights: str | None) -> bool:
    return weights is not None and not is_local_file(weights) and not _looks_like_path(weights)


def _build_own(cfg: ModelConfig, classes: int) -> nn.Module:
    if cfg.encoder_weights is not None:
        raise UserError(f"model.encoder_weights: our {cfg.arch!r} is trained from scratch; set model.encoder_weights "
                        "= \"null\" (or pick an smp architecture, e.g. arch = \"Unet\", for a pretrained encoder)")
    if cfg.decoder_channels is not None:
        raise UserError(f"model.decoder_channels is for smp architectures; {cfg.arch!r} takes width and depth "
                        "in model.arch_args: set model.decoder_channels = \"null\"")
    kwargs = check_own_args(cfg.arch, cfg.arch_args)
    return OURS[cfg.arch](cfg.in_channels, classes, **kwargs)


def _build_smp(cls: type, cfg: ModelConfig, classes: int, probe: HubProbe | None) -> nn.Module:
    if cfg.encoder is None:
        raise UserError(f"model.encoder: smp's {cfg.arch} needs an encoder, e.g. \"resnet34\" or \"tu-convnext_tiny\"")
    kwargs = dict(cfg.arch_args)
    accepted = keyword_defaults(cls)
    reserved = {"encoder_name": "model.encoder", "encoder_weights": "model.encoder_weights",
                "in_channels": "model.in_channels", "classes": "model.classes"}
    for key in kwargs:
        if key in reserved or key not in accepted:
            valid = ", ".join(k for k in accepted if k not in reserved)
            hint = f" (it is {reserved[key]})" if key in reserved else ""
            raise UserError(f"model.arch_args.{key}: smp's {cfg.arch} takes no argument {key!r}{hint}; valid: {valid}")
    if cfg.decoder_channels is not None:
        if "decoder_channels" in kwargs:
            raise UserError("model.decoder_channels and model.arch_args.decoder_channels are both set: give one")
        kwargs["decoder_channels"] = cfg.decoder_channels
    weights = cfg.encoder_weights
    local_file = weights is not None and is_local_file(weights)
    if weights is not None and not local_file and _looks_like_path(weights):
        raise UserError(f"model.encoder_weights: file {weights} not found; give an existing file, a weights name "
                        "smp knows (\"imagenet\"), or \"null\"")
    named = None if local_file else weights
    if named is not None and cfg.encoder.startswith("tu-"):
        named = True  # timm encoders take the pretrained tag in the name ("tu-<model>.<tag>"), not here
    _check_encoder_name(cfg.encoder, named)
    try:
        with hub_access(probe) as online, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*deprecated.*", category=DeprecationWarning)
            model = cls(encoder_name=cfg.encoder, encoder_weights=named, in_channels=cfg.in_channels,
                        classes=classes, **kwargs)
    except OSError as exc:  # huggingface_hub's errors (not cached, offline, no such repo) are OSErrors
        if online:
            reason = f"could not be fetched from {hub_endpoint()} ({type(exc).__name__})"
        elif _env_offline():
            reason = "are not in the local cache and HF_HUB_OFFLINE is set"
        else:
            reason = f"are not in the local cache and {hub_endpoint()} is unreachable"
        raise UserError(
            f"model.encoder_weights = {weights!r}: the {cfg.encoder} weights {reason}; put the weights file on this machine "
            "and set model.encoder_weights to its path, or set model.encoder_weights = \"null\""
        ) from None
    except (KeyError, ValueError, TypeError, AssertionError, RuntimeError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"model: smp's {cfg.arch} cannot be built with encoder {cfg.encoder!r} and arch_args "
                        f"{cfg.arch_args}: {message[:300]}") from None
    if local_file:
        load_encoder_file(model.encoder, os.path.expanduser(weights), cfg.encoder)
    return model


def _env_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _check_encoder_name(encoder: str, weights: str | bool | None) -> None:
    """Unknown encoders and weight names fail here with what exists (smp's KeyError lists it badly)."""
    if encoder.startswith("tu-"):
        import timm

        name = encoder[3:].split(".")[0]
        if not timm.is_model(name):
            raise UserError(f"model.encoder: timm has no model {name!r}; timm.list_models('*{name[:6]}*') lists "
                            "similar names")
        return
    from segmentation_models_pytorch.encoders import encoders

    if encoder.startswith("timm-"):
        return  # smp maps its deprecated timm- names to tu- encoders itself
    if encoder not in encoders:
        raise UserError(f"model.encoder: smp has no encoder {encoder!r}; valid names: {', '.join(encoders)} "
                        "(or any timm model as \"tu-<name>\")")
    if isinstance(weights, str) and weights not in encoders[encoder]["pretrained_settings"]:
        known = ", ".join(encoders[encoder]["pretrained_settings"]) or "none"
        raise UserError(f"model.encoder_weights: smp has no {weights!r} weights for {encoder}; known: {known} "
                        "(or a local file path, or \"null\")")


def state_shapes(cfg: ModelConfig, classes: int) -> dict[str, tuple[int, ...]] | None:
    """The shape of every entry of the recipe's model's state_dict, from a build on the meta device
    (no memory, no compute, no pretrained weights): what a checkpoint must hold to load into it.
    None when the model cannot be built there: some cannot (timm's mit/ViT encoders call .item()
    while they are built), and a recipe error shows when the model is built for real."""
    try:
        with torch.device("meta"):
            model = build_model(dataclasses.replace(cfg, encoder_weights=None), classes)
    except Exception:  # noqa: BLE001 - best effort: whoever asks falls back to loading the weights
        return None
    return {name: tuple(value.shape) for name, value in model.state_dict().items()}


def check_batch_norms_train(cfg: ModelConfig, classes: int, crop: tuple[int, int]) -> None:
    """With `data.batch_size = 1` a BatchNorm layer whose input is a 1x1 map (an ASPP image-pooling
    branch pools every image to one pixel) sees one value per channel and cannot train ("Expected
    more than 1 value per channel when training"): a UserError naming the layer, before anything
    starts. Shapes only: a copy of the model runs one sample on the meta device (no memory, no
    compute); a model that cannot run there is not checked."""
    seen: list[str] = []

    def hook(name: str):
        def check(module, args):
            x = args[0]
            if x.dim() >= 2 and x.numel() // x.shape[1] == 1 and not seen:
                seen.append(name)
        return check

    try:
        with torch.device("meta"):
            model = build_model(dataclasses.replace(cfg, encoder_weights=None), classes)
            for name, module in model.named_modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.register_forward_pre_hook(hook(name))
            model.eval()  # shapes are the same; eval mode lets the forward reach every layer
            with torch.no_grad():
                model(torch.empty(1, cfg.in_channels, *crop))
    except Exception:  # noqa: BLE001 - best effort: the check needs a meta-device forward
        return
    if seen:
        raise UserError(
            f"data.batch_size = 1: BatchNorm layer {seen[0]!r} of model.arch = {cfg.arch!r} sees one value per channel "
            "(a 1x1 map of one sample) and cannot train; raise data.batch_size to >= 2, or set model.sync_bn = true "
            "and train on >= 2 CUDA processes"
        )


def prepare_model(model: nn.Module, cfg: ModelConfig, device_type: str, world_size: int) -> nn.Module:
    """Apply the scale options before the model is wrapped for DDP: SyncBatchNorm (only on CUDA with
    more than one process — docs/design-notes.md: gloo cannot construct DDP over it), channels-last memory format,
    and in-place torch.compile (the module and its state_dict keys stay as they are)."""
    if cfg.sync_bn and device_type == "cuda" and world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif cfg.sync_bn:
        log.info("model.sync_bn: not applied (%s, %d process(es)): needs CUDA and more than one process",
                 device_type, world_size)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile:
        model.compile()
    return model
