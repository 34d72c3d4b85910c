"""SegNet (Badrinarayanan et al. 2015) as the PH2 lesion study built it: an encoder of conv-norm-ReLU
pairs with max-pooling that remembers where each maximum was, a bottleneck convolution, and a
decoder that puts values back at those places with max-unpooling (no skip connections, no
learned up-sampling). Level i has `width * 2**i` channels; that study used width 16, depth 4.

Inputs of any size work (padded to a multiple of 2**depth, logits cropped back). Submodules are
named `encoder`, `decoder` and `head` like our UNet's.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from segdist.models.unet import conv_norm_act, double_conv, pad_to_multiple


class SegNetEncoder(nn.Module):
    def __init__(self, in_channels: int, widths: list[int], norm: str) -> None:
        super().__init__()
        ins = [in_channels, *widths[:-1]]
        self.levels = nn.ModuleList(double_conv(cin, cout, norm) for cin, cout in zip(ins, widths))
        self.pool = nn.MaxPool2d(2, 2, return_indices=True)
        self.bottleneck = conv_norm_act(widths[-1], widths[-1], norm)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Size]]]:
        pools = []
        for level in self.levels:
            x = level(x)
            size = x.shape[-2:]
            x, idx = self.pool(x)
            pools.append((idx, size))
        return self.bottleneck(x), pools


class SegNetDecoder(nn.Module):
    def __init__(self, widths: list[int], norm: str) -> None:
        super().__init__()
        outs = [widths[0], *widths[:-1]]  # level i ends with the channels level i-1 unpools
        self.unpool = nn.MaxUnpool2d(2, 2)
        self.levels = nn.ModuleList(
            nn.Sequential(conv_norm_act(w, w, norm), conv_norm_act(w, out, norm))
            for w, out in reversed(list(zip(widths, outs)))
        )

    def forward(self, x: torch.Tensor, pools: list[tuple[torch.Tensor, torch.Size]]) -> torch.Tensor:
        for level, (idx, size) in zip(self.levels, reversed(pools)):
            x = level(self.unpool(x, idx, output_size=size))
        return x


class SegNet(nn.Module):
    def __init__(self, in_channels: int, classes: int, *, width: int = 16, depth: int = 4, norm: str = "batch") -> None:
        """width: channels of the first level (doubled per level); depth: pooling steps;
        norm: batch, instance, group or none."""
        super().__init__()
        widths = [width * 2**i for i in range(depth)]
        self.multiple = 2**depth
        self.encoder = SegNetEncoder(in_channels, widths, norm)
        self.decoder = SegNetDecoder(widths, norm)
        self.head = nn.Conv2d(widths[0], classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, (h, w) = pad_to_multiple(x, self.multiple)
        bottom, pools = self.encoder(x)
        return self.head(self.decoder(bottom, pools))[..., :h, :w]
