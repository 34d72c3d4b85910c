"""`launch/shard.py show`: a contact sheet drawn from real shards."""

import numpy as np
import pytest
from PIL import Image

from segdist.data.manifest import load_manifest
from segdist.data.convert.show import overlay, pick_samples
from segdist.errors import UserError
from shardtools import shard


def test_sheet_of_a_split(shapes_root, tmp_path, capsys):
    out = tmp_path / "sheet.png"
    assert shard("show", shapes_root, "--split", "train", "--count", "6", "--out", out) == 0
    sheet = np.asarray(Image.open(out))
    assert sheet.ndim == 3 and sheet.shape[0] > 400 and sheet.shape[1] > 600
    assert "6 sample(s) of split 'train'" in capsys.readouterr().out
    manifest = load_manifest(shapes_root, "train")
    first = [key for key, _, _ in pick_samples(manifest, 3, spread=False)]
    spread = [key for key, _, _ in pick_samples(manifest, 3, spread=True)]
    assert len(first) == len(spread) == 3 and first[0] == spread[0] and first[1:] != spread[1:]
    many = pick_samples(manifest, 1000, spread=False)
    assert len(many) == manifest.num_samples  # fewer samples than asked: all of them


def test_overlay_blends_and_keeps_ignored_pixels():
    image = np.full((2, 2, 3), 100, np.uint8)
    mask = np.array([[0, 1], [255, 1]], np.uint8)
    out = overlay(image, mask, [[0, 0, 0], [200, 0, 0]], 255)
    assert out[0, 0].tolist() == [50, 50, 50] and out[0, 1].tolist() == [150, 50, 50]
    assert out[1, 0].tolist() == [100, 100, 100]


def test_bad_arguments_are_one_line(shapes_root, tmp_path):
    with pytest.raises(UserError, match=r"\.png"):
        shard("show", shapes_root, "--split", "train", "--out", tmp_path / "sheet.jpg")
    with pytest.raises(UserError, match="--count"):
        shard("show", shapes_root, "--split", "train", "--count", "0", "--out", tmp_path / "s.png")
    with pytest.raises(UserError, match="nosuch"):
        shard("show", shapes_root, "--split", "nosuch", "--out", tmp_path / "s.png")
    assert not list(tmp_path.iterdir())
