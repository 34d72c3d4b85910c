"""launch/bench.py feed: each recipe's storage read from its # convert: line, frames written through
the converter's own steps, every stage timed, and the cores a GPU needs computed from the FLOPs."""

import json

import pytest

from conftest import ROOT
from segdist.bench import build_parser
from segdist.bench.feed import BEFORE, STAGES, gpu_rates, shipped_recipes, storage_of, write_tier
from segdist.data.convert import build_parser as shard_parser
from segdist.data.manifest import load_manifest
from segdist.errors import UserError


def test_storage_comes_from_the_training_splits_convert_line():
    assert storage_of(ROOT / "recipes" / "cityscapes_unet.toml", "train") == {
        "max_size": 256, "image_format": "raw", "jpeg_quality": 95, "mask_format": "raw"}
    assert storage_of(ROOT / "recipes" / "cityscapes_deeplabv3plus_r50.toml", "train") == {
        "max_size": None, "image_format": "jpeg", "jpeg_quality": 90, "mask_format": "png"}
    assert storage_of(ROOT / "recipes" / "birds_unet.toml", "train")["mask_format"] == "raw"
    assert storage_of(ROOT / "recipes" / "shapes_unet.toml", "train")["image_format"] == "keep"
    with pytest.raises(UserError, match="no '# convert:' line for its training split 'trainaug'"):
        storage_of(ROOT / "recipes" / "voc_unet_r34.toml", "trainaug")


def test_before_is_the_converters_default_storage():
    args = shard_parser().parse_args(["cityscapes", "--root", "r", "--split", "train", "--out", "o"])
    assert {key: getattr(args, key) for key in BEFORE} == BEFORE


def test_a_convert_line_the_converter_refuses_is_a_user_error_naming_the_recipe(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("# convert: python launch/shard.py cityscapes --root $ROOT --split train --image-format webp\n")
    with pytest.raises(UserError, match="not a valid launch/shard.py command"):
        storage_of(recipe, "train")


def test_tiers_are_written_as_the_converter_writes_them(tmp_path):
    tier = write_tier(tmp_path, "cityscapes", 19,
                      {"max_size": 256, "image_format": "raw", "jpeg_quality": 95, "mask_format": "raw"}, 2)
    m = load_manifest(tier, "train")
    assert m.frame_sizes == {"stored": {"min": [128, 256], "max": [128, 256]},
                             "source": {"min": [1024, 2048], "max": [1024, 2048]}}
    assert m.num_samples == 2 and m.num_classes == 19


def test_gpu_rates_are_mfu_times_peak_over_flops():
    rates = gpu_rates(1e12, 0.4)
    assert rates["H100"] == pytest.approx(0.4 * 989) and rates["A100"] == pytest.approx(0.4 * 312)
    assert gpu_rates(None, 0.4) == {"H100": None, "A100": None}


@pytest.mark.slow
def test_feed_prints_a_row_per_recipe_with_its_stages(capsys, tmp_path):
    recipes = [str(ROOT / "recipes" / name) for name in ("cityscapes_unet.toml", "ph2_unet.toml")]
    args = build_parser().parse_args(["feed", *recipes, "--frames", "2", "--passes", "1", "--workdir", str(tmp_path)])
    assert args.run(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("bench feed: ") and "capability" in out[0]
    rows = [line for line in out if line.startswith(("cityscapes_unet ", "ph2_unet "))]
    assert len(rows) == 2
    for row in rows:
        cells = [c.split() for c in row.split("|")]
        flops, h100, a100 = float(cells[0][1]), float(cells[0][2].replace(",", "")), float(cells[0][3].replace(",", ""))
        assert flops > 0 and h100 == pytest.approx(0.4 * 989e12 / (flops * 1e9), rel=0.01) and a100 < h100
        stages = [float(v) for v in cells[3] if v != "/"]
        now_ms, cores_h100 = float(cells[2][-4]), float(cells[2][-2])
        assert len(stages) == len(STAGES) and all(v >= 0 for v in stages)
        assert now_ms == pytest.approx(sum(stages), abs=0.02 * len(STAGES))
        assert cores_h100 == pytest.approx(now_ms * h100 / 1000, rel=0.05, abs=0.1)
    # cityscapes_unet: before = full PNG frames; now = the raw 128x256 tier, far cheaper to read
    city = [c.split() for c in rows[0].split("|")]
    assert float(city[1][-2]) > 5 * float(city[2][-4])
    stored = {json.loads(p.read_text())["frame_sizes"]["stored"]["max"][1] for p in tmp_path.glob("cityscapes-*/train.json")}
    assert stored == {2048, 256}
    # ph2_unet holds its split in memory: its one-off read is printed under the table
    held = [line for line in out if line.startswith("held = data.in_memory")]
    assert len(held) == 1 and "ph2_unet: " in held[0] and "cityscapes_unet" not in held[0]


def test_unknown_recipe_file_is_a_user_error(tmp_path):
    args = build_parser().parse_args(["feed", str(tmp_path / "nope.toml")])
    with pytest.raises(UserError, match="nope.toml not found"):
        args.run(args)


def test_the_default_list_is_the_repositorys_recipes_and_without_them_one_line(tmp_path):
    assert ROOT / "recipes" / "shapes_unet.toml" in shipped_recipes()
    with pytest.raises(UserError, match=r"^bench feed: no recipes/\*\.toml in .*: pass the recipe files") as caught:
        shipped_recipes(tmp_path)
    assert "\n" not in str(caught.value)
