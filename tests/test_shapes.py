import numpy as np
import pytest

from segdist.data.shapes import SHAPES, make_scene


def test_same_seed_same_scene_and_different_seeds_differ():
    a = make_scene(5, 3, 40, 48, 5)
    b = make_scene(5, 3, 40, 48, 5)
    c = make_scene(6, 3, 40, 48, 5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


def test_scene_contents():
    labels = set()
    ignored = 0
    for i in range(40):
        image, mask = make_scene(0, i, 64, 64, 5)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert mask.shape == (64, 64) and mask.dtype == np.uint8
        values = set(np.unique(mask).tolist())
        assert values <= {0, 1, 2, 3, 4, 255}
        labels |= values
        ignored += int((mask == 255).sum())
    assert labels == {0, 1, 2, 3, 4, 255}  # every shape class appears, and ignore bands
    assert ignored > 0


def test_colour_does_not_give_the_class():
    # The mean colour of a class's pixels varies widely across scenes: geometry must be learned.
    means = []
    for i in range(30):
        image, mask = make_scene(1, i, 64, 64, 3)
        if (mask == 1).sum() > 20:
            means.append(image[mask == 1].mean(axis=0))
    assert np.std(np.array(means), axis=0).min() > 30


def test_class_count_limits():
    with pytest.raises(ValueError):
        make_scene(0, 0, 32, 32, len(SHAPES) + 2)
