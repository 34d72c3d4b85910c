"""Our own UNet, as our users' experiments built it (recipes/README.md lists them), in one parametrised class.

`depth` down-sampling steps; level i has `width * 2**i` channels, each level two 3x3 conv-norm-ReLU
blocks, the bottleneck `width * 2**depth`. Up-sampling is a 2x2 transposed convolution (the VOC
model comparison's UNet-Lite), bilinear or nearest interpolation followed by a 1x1 convolution (the VOC accumulation
study's TinyUNet, the PH2 lesion study's UNet v2), or max-unpooling with the encoder's pooling indices (the PH2 study's UNet). `skips = False`
removes the skip connections: the plain encoder-decoder that the birds assignment compares UNet with.

Inputs of any size work: the forward pads to a multiple of 2**depth and crops the logits back.
Submodules are named `encoder`, `decoder` and `head` (optim.encoder_lr_mult finds the encoder).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

NORMS = ("batch", "instance", "group", "none")
UPSAMPLES = ("transpose", "bilinear", "nearest", "maxunpool")


def norm_layer(norm: str, channels: int) -> nn.Module:
    """BatchNorm, InstanceNorm (affine), GroupNorm with up to 32 groups, or nothing."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if norm == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm {norm!r} is not one of {NORMS}")  # checked by check_args before


def conv_norm_act(cin: int, cout: int, norm: str, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=norm == "none"),
        norm_layer(norm, cout),
        nn.ReLU(inplace=True),
    )


def double_conv(cin: int, cout: int, norm: str) -> nn.Sequential:
    return nn.Sequential(conv_norm_act(cin, cout, norm), conv_norm_act(cout, cout, norm))


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    return (F.pad(x, (0, pw, 0, ph)) if ph or pw else x), (h, w)


class UNetEncoder(nn.Module):
    def __init__(self, in_channels: int, widths: list[int], norm: str, indices: bool) -> None:
        super().__init__()
        self.stem = double_conv(in_channels, widths[0], norm)
        self.pool = nn.MaxPool2d(2, 2, return_indices=indices)
        self.indices = indices
        self.levels = nn.ModuleList(double_conv(widths[i], widths[i + 1], norm) for i in range(len(widths) - 1))

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        features, indices = [self.stem(x)], []
        for level in self.levels:
            pooled = self.pool(features[-1])
            pooled, idx = pooled if self.indices else (pooled, None)
            indices.append(idx)
            features.append(level(pooled))
        return features, indices


class Up(nn.Module):
    """Level i+1 → level i: double the resolution and go from widths[i+1] to widths[i] channels."""

    def __init__(self, cin: int, cout: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        if mode == "transpose":
            self.proj = nn.ConvTranspose2d(cin, cout, kernel_size=2, stride=2)
        else:  # interpolation or unpooling keep the channels: a 1x1 convolution changes them
            self.proj = nn.Conv2d(cin, cout, kernel_size=1)
        self.unpool = nn.MaxUnpool2d(2, 2) if mode == "maxunpool" else None

    def forward(self, x: torch.Tensor, size: torch.Size, indices: torch.Tensor | None) -> torch.Tensor:
        if self.mode == "transpose":
            return self.proj(x)
        if self.mode == "maxunpool":
            return self.unpool(self.proj(x), indices, output_size=size)
        corners = {"align_corners": False} if self.mode == "bilinear" else {}
        return self.proj(F.interpolate(x, size=size, mode=self.mode, **corners))


class UNetDecoder(nn.Module):
    def __init__(self, widths: list[int], norm: str, upsample: str, skips: bool) -> None:
        super().__init__()
        self.skips = skips
        n = len(widths) - 1
        self.ups = nn.ModuleList(Up(widths[i + 1], widths[i], upsample) for i in reversed(range(n)))
        self.blocks = nn.ModuleList(
            double_conv(widths[i] * (2 if skips else 1), widths[i], norm) for i in reversed(range(n))
        )

    def forward(self, features: list[torch.Tensor], indices: list[torch.Tensor | None]) -> torch.Tensor:
        x = features[-1]
        for k, (up, block) in enumerate(zip(self.ups, self.blocks)):
            level = len(features) - 2 - k
            skip = features[level]
            x = up(x, skip.shape[-2:], indices[level])
            x = block(torch.cat([x, skip], dim=1) if self.skips else x)
        return x


class UNet(nn.Module):
    def __init__(self, in_channels: int, classes: int, *, width: int = 32, depth: int = 4, norm: str = "batch",
                 upsample: str = "transpose", skips: bool = True) -> None:
        """width: channels of the first level (doubled per level); depth: down-sampling steps;
        norm: batch, instance, group or none; upsample: transpose, bilinear, nearest or maxunpool;
        skips: concatenate encoder features into the decoder (false = plain encoder-decoder)."""
        super().__init__()
        widths = [width * 2**i for i in range(depth + 1)]
        self.multiple = 2**depth
        self.encoder = UNetEncoder(in_channels, widths, norm, indices=upsample == "maxunpool")
        self.decoder = UNetDecoder(widths, norm, upsample, skips)
        self.head = nn.Conv2d(widths[0], classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, (h, w) = pad_to_multiple(x, self.multiple)
        features, indices = self.encoder(x)
        return self.head(self.decoder(features, indices))[..., :h, :w]
