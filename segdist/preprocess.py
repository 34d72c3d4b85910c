"""What every model of segdist sees: uint8 RGB normalised on the device with the ImageNet mean and
std (the statistics smp's and timm's pretrained encoders were trained with). Training, evaluation,
TensorBoard strips, prediction and the benches all go through these, so a model never sees two
kinds of input; what its output means is segdist.inference's."""

from __future__ import annotations

import torch

from segdist.data.colour import apply_colour

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255


_ON_DEVICE: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _statistics(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """MEAN and STD on `device`, copied there once per process: a blocking copy from pageable host
    memory to a GPU waits for the device's stream to drain, and normalise runs every micro-batch,
    right after the batch's own non-blocking copy, so it would stall the host behind the previous
    step's kernels each time. On the CPU `.to` is the tensor itself."""
    stats = _ON_DEVICE.get(device)
    if stats is None:
        stats = _ON_DEVICE[device] = (MEAN.to(device), STD.to(device))
    return stats


def normalise(x: torch.Tensor) -> torch.Tensor:
    """Float NCHW pixel values in [0, 255] → the model's input, on x's device."""
    mean, std = _statistics(x.device)
    return (x - mean) / std


def to_input(images: torch.Tensor, device: torch.device | str, colour: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 NHWC batch → normalised float NCHW on the device (normalising there is cheaper
    than shipping floats from the loader workers); `colour`: the training batch's per-sample
    colour-jitter factors (segdist.data.colour), applied there first."""
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    if colour is not None:
        x = apply_colour(x, colour)
    return normalise(x)

