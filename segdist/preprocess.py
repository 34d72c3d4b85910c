"""What every model of segdist sees: uint8 RGB normalised on the device with the ImageNet mean and
std (the statistics smp's and timm's pretrained encoders were trained with). Training, evaluation,
TensorBoard strips, prediction and the benches all go through these, so a model never sees two
kinds of input; what its output means is segdist.inference's."""

from __future__ import annotations

import torch

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255


def normalise(x: torch.Tensor) -> torch.Tensor:
    """Float NCHW pixel values in [0, 255] → the model's input, on x's device."""
    return (x - MEAN.to(x.device)) / STD.to(x.device)


def to_input(images: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """uint8 NHWC batch → normalised float NCHW on the device (normalising there is cheaper
    than shipping floats from the loader workers)."""
    return normalise(images.to(device, non_blocking=True).permute(0, 3, 1, 2).float())

