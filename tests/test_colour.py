"""segdist.data.colour: per-sample factors drawn from a sample's seed, applied to a batch on the
device exactly as torchvision's colour functions define brightness, contrast, saturation and hue."""

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from segdist.data.colour import IDENTITY, ColourJitter, apply_colour
from segdist.data.draws import uniforms


def batch(n=4, h=9, w=11, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g).float()


def torchvision_reference(x: torch.Tensor, f) -> torch.Tensor:
    """One CHW sample in [0, 255] through torchvision's functions, in segdist's fixed order."""
    y = x / 255.0
    y = TF.adjust_brightness(y, float(f[0]))
    y = TF.adjust_contrast(y, float(f[1]))
    y = TF.adjust_saturation(y, float(f[2]))
    if float(f[3]) != 0:
        y = TF.adjust_hue(y, float(f[3]))
    return y * 255.0


def test_each_sample_gets_its_own_factors_as_torchvision_defines_them():
    x = batch()
    factors = torch.tensor([[1.2, 0.8, 1.3, 0.1], [0.7, 1.25, 0.6, -0.2], list(IDENTITY), [1.0, 1.0, 0.0, 0.45]])
    out = apply_colour(x.clone(), factors)
    for i in range(len(x)):
        assert torch.allclose(out[i], torchvision_reference(x[i], factors[i]), atol=1e-3), i
    assert torch.equal(out[2], x[2])  # the identity leaves a sample exactly as it was


def test_draws_are_the_seeds_and_respect_p_and_the_ranges():
    jitter = ColourJitter(0.2, 0.2, 0.2, 0.1, 0.5)
    draws = jitter.factors(uniforms(7, np.arange(400), 3, 5))
    again = np.concatenate([jitter.factors(uniforms(7, [n], 3, 5)) for n in range(400)])
    assert np.array_equal(draws, again) and draws.dtype == np.float32
    identity = (draws == np.asarray(IDENTITY, np.float32)).all(1)
    assert 0.4 < identity.mean() < 0.6
    moved = draws[~identity]
    assert (np.abs(moved[:, :3] - 1) <= 0.2 + 1e-6).all() and (np.abs(moved[:, 3]) <= 0.1 + 1e-6).all()
    assert not ColourJitter(0.0, 0.0, 0.0, 0.0, 0.5).active and not ColourJitter(0.2, 0.2, 0.2, 0.1, 0.0).active


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_same_on_the_gpu():
    x = batch(8, 64, 64)
    factors = torch.from_numpy(ColourJitter(0.4, 0.4, 0.4, 0.2, 1.0).factors(uniforms(0, np.arange(8), 3, 5)))
    assert torch.allclose(apply_colour(x.cuda(), factors).cpu(), apply_colour(x, factors), atol=1e-3)


def test_to_input_applies_the_factors_before_normalising():
    from segdist.preprocess import normalise, to_input

    images = batch(3, 8, 8).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    factors = torch.tensor([[1.3, 0.9, 1.1, 0.05], list(IDENTITY), [0.8, 1.2, 0.5, -0.1]])
    x = images.permute(0, 3, 1, 2).float()
    assert torch.equal(to_input(images, "cpu", factors), normalise(apply_colour(x, factors)))
    assert torch.equal(to_input(images, "cpu", factors)[1], to_input(images, "cpu")[1])


def test_a_batch_without_hue_skips_the_hsv_round_trip_and_gives_the_same_pixels():
    x = batch()
    factors = torch.tensor([[1.2, 0.8, 1.3, 0.0], [0.7, 1.25, 0.6, 0.0], list(IDENTITY), [1.0, 1.1, 0.9, 0.0]])
    out = apply_colour(x.clone(), factors)
    for i in range(len(x)):
        assert torch.allclose(out[i], torchvision_reference(x[i], factors[i]), atol=1e-3), i
