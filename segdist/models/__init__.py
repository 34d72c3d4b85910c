"""Model builder: any segmentation-models-pytorch architecture with any encoder it accepts."""

from __future__ import annotations

import os

import torch.nn as nn

from segdist.errors import UserError
from segdist.recipe import ModelConfig


def smp_architectures() -> dict[str, type]:
    """smp's architectures by class name (Unet, UnetPlusPlus, DeepLabV3Plus, Segformer, ...)."""
    import segmentation_models_pytorch as smp

    return {cls.__name__: cls for cls in smp.MODEL_ARCHITECTURES_MAPPING.values()}


def build_model(cfg: ModelConfig, classes: int) -> nn.Module:
    """The recipe's model with `classes` outputs (1 = binary, one logit)."""
    archs = smp_architectures()
    if cfg.arch not in archs:
        raise UserError(f"model.arch: unknown architecture {cfg.arch!r}; valid names: {', '.join(sorted(archs))}")
    weights = cfg.encoder_weights
    local_file = weights is not None and os.path.isfile(weights)
    kwargs = {}
    if cfg.decoder_channels is not None:
        kwargs["decoder_channels"] = cfg.decoder_channels
    try:
        model = archs[cfg.arch](
            encoder_name=cfg.encoder,
            encoder_weights=None if local_file else weights,
            in_channels=cfg.in_channels,
            classes=classes,
            **kwargs,
        )
    except KeyError as exc:
        raise UserError(f"model.encoder: {cfg.encoder!r} is not an encoder {cfg.arch} accepts ({exc})") from None
    except OSError as exc:  # offline hub: huggingface_hub errors subclass OSError
        raise UserError(
            f"model.encoder_weights: cannot fetch {weights!r} weights for {cfg.encoder} ({type(exc).__name__}); "
            "give a local file path or set model.encoder_weights = \"null\""
        ) from None
    if local_file:
        import torch

        state = torch.load(weights, map_location="cpu", weights_only=True)
        missing, unexpected = model.encoder.load_state_dict(state, strict=False)
        if unexpected or len(missing) == len(list(model.encoder.state_dict())):
            raise UserError(f"model.encoder_weights: {weights} does not hold {cfg.encoder} encoder weights")
    return model
