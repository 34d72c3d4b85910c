"""segdist.inference: whole, slide and resize, and test-time augmentation, on models whose answer is known."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from segdist.inference import InferenceMode, labels, pad_black, scores, window_starts
from segdist.preprocess import MEAN, STD


def pointwise(classes: int = 3, seed: int = 0) -> nn.Module:
    """A 1x1 convolution: each pixel's logits depend on that pixel alone, so any window sees the same."""
    torch.manual_seed(seed)
    return nn.Conv2d(3, classes, 1).eval()


def frames(n: int, h: int, w: int) -> torch.Tensor:
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(1))


def test_window_starts_cover_the_side_the_last_flush_with_the_border():
    assert window_starts(1024, 769, 513) == [0, 255]  # mmseg's grid for its 769 crops
    assert window_starts(100, 40, 30) == [0, 30, 60]
    assert window_starts(32, 40, 30) == [0]


@pytest.mark.parametrize("h, w, crop, stride, batch", [(50, 70, (32, 32), (20, 24), 3), (40, 64, (40, 32), (40, 32), 8),
                                                      (20, 30, (32, 32), (16, 16), 2)])
def test_slide_equals_whole_for_a_pointwise_model(h, w, crop, stride, batch):
    model, x = pointwise(), frames(2, h, w)
    whole = scores(model, x, InferenceMode())
    slide = scores(model, x, InferenceMode("slide", crop, stride, batch_size=batch))
    assert slide.shape == whole.shape == (2, 3, h, w)
    torch.testing.assert_close(slide, whole, rtol=1e-5, atol=1e-5)


def test_slide_divides_by_the_number_of_windows_over_each_pixel():
    class Ones(nn.Module):
        def forward(self, x):
            return torch.ones(x.shape[0], 2, *x.shape[-2:])

    out = scores(Ones(), frames(1, 45, 45), InferenceMode("slide", (32, 32), (8, 8)))
    assert torch.equal(out, torch.ones(1, 2, 45, 45))


def test_resize_runs_at_the_crop_and_comes_back_to_the_frame():
    seen = []

    class Spy(nn.Module):
        def forward(self, x):
            seen.append(tuple(x.shape[-2:]))
            return x[:, :2]

    x = frames(1, 100, 150)
    out = scores(Spy(), x, InferenceMode("resize", (32, 64)))
    assert seen == [(32, 64)] and out.shape == (1, 2, 100, 150)
    expected = F.interpolate(F.interpolate(x, size=(32, 64), mode="bilinear", align_corners=False)[:, :2],
                             size=(100, 150), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, expected)


def test_flip_averages_probabilities_and_undoes_the_flip():
    model, x = pointwise(), frames(2, 32, 48)
    tta = scores(model, x, InferenceMode(flip=True))
    # a pointwise model gives the same scores to a flipped frame, flipped back: the mean is one softmax
    torch.testing.assert_close(tta, torch.softmax(model(x), dim=1), rtol=1e-6, atol=1e-6)
    assert torch.equal(labels(model, x, InferenceMode(flip=True)), model(x).argmax(1))


def test_scales_average_probabilities_over_the_passes():
    class Constant(nn.Module):  # the same logits everywhere at any scale: every pass agrees
        def forward(self, x):
            return torch.tensor([0.0, 2.0, 1.0]).view(1, 3, 1, 1).expand(x.shape[0], 3, *x.shape[-2:])

    mode = InferenceMode(scales=(0.5, 1.0, 1.5), flip=True)
    out = scores(Constant(), frames(1, 40, 40), mode)
    torch.testing.assert_close(out, torch.softmax(torch.tensor([0.0, 2.0, 1.0]), 0).view(1, 3, 1, 1).expand(1, 3, 40, 40))


def test_binary_labels_threshold_logits_or_probabilities_alike():
    model, x = pointwise(classes=1), frames(1, 32, 32)
    single = labels(model, x, InferenceMode())
    assert torch.equal(single, (model(x)[:, 0] > 0).long())
    assert torch.equal(labels(model, x, InferenceMode(flip=True)), single)


def test_padding_is_what_black_pixels_normalise_to():
    x = frames(1, 5, 7)
    out = pad_black(x, 8, 9)
    assert torch.equal(out[:, :, :5, :7], x)
    torch.testing.assert_close(out[0, :, 7, 8], ((0 - MEAN) / STD).flatten())


def test_mode_from_the_recipe_defaults_to_the_training_crop():
    from segdist.errors import UserError
    from segdist.recipe import Recipe, load_recipe  # noqa: F401

    from conftest import ROOT

    r = load_recipe(ROOT / "recipes" / "shapes_unet.toml", ["eval.mode=slide"])
    mode = InferenceMode.from_recipe(r)
    assert (mode.mode, mode.crop, mode.stride, mode.tta) == ("slide", (64, 64), (42, 42), False)
    assert "slide (64, 64) windows, stride (42, 42)" in mode.describe()
    with pytest.raises(UserError, match=r"eval.stride \[80, 80\] is larger than the window \[64, 64\]"):
        InferenceMode.from_recipe(load_recipe(ROOT / "recipes" / "shapes_unet.toml", ["eval.stride=[80, 80]"]))


def test_labels_come_from_the_scores_not_from_rounded_probabilities():
    """A near-tie that softmax or sigmoid rounds to a tie still goes to the class scored higher."""
    from segdist.inference import labels_of, probabilities

    logits = torch.tensor([0.0, 1e-6], dtype=torch.float32).view(1, 2, 1, 1)
    assert probabilities(logits).to(torch.float16).argmax(1).item() == 0  # rounded: a tie, class 0
    assert labels_of(logits, tta=False).item() == 1
    one = torch.full((1, 1, 1, 1), 1e-8)
    assert torch.sigmoid(one).item() == 0.5  # a probability above 0.5 would say background
    assert labels_of(one, tta=False).item() == 1
    assert labels_of(one, tta=False, threshold=0.6).item() == 0
    assert labels_of(torch.full((1, 1, 1, 1), 0.6), tta=True, threshold=0.5).item() == 1  # TTA: mean probabilities
    assert labels_of(one, tta=False, threshold=0.0).item() == 1 and labels_of(one, tta=False, threshold=1.0).item() == 0
