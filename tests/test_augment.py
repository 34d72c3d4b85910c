import numpy as np
import pytest

from segdist.data.augment import PRESETS, build_augment, build_colour, check_augment, preset_params, seed_pipeline
from segdist.data.colour import ColourJitter
from segdist.errors import UserError
from segdist.recipe import recipe_from_dict

CROP = (32, 40)


def sample(shape, labels, ignore, dtype=np.uint8, seed=0):
    """An image and a mask of vertical stripes of the given labels, plus an ignore band: stripes
    side by side make any non-nearest resize invent in-between values."""
    rng = np.random.default_rng(seed)
    h, w = shape
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = np.asarray(labels, dtype=dtype)[(np.arange(w) // 3) % len(labels)][None, :].repeat(h, axis=0)
    mask[h // 2 : h // 2 + 2] = ignore
    return image, mask


def run(pipeline, seed, image, mask):
    seed_pipeline(pipeline, seed)
    out = pipeline(image=image, mask=mask)
    return out["image"], out["mask"]


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("shape", [(20, 24), (50, 90)])  # smaller than the crop (padding) and larger
@pytest.mark.parametrize("dtype, labels, ignore", [(np.uint8, [0, 4], 255), (np.uint16, [0, 300], 1000)])
def test_presets_give_the_crop_size_and_no_new_labels(name, shape, dtype, labels, ignore):
    pipeline = build_augment(name, CROP, ignore)
    image, mask = sample(shape, labels, ignore, dtype)
    for seed in range(6):
        out_image, out_mask = run(pipeline, seed, image, mask)
        assert out_image.shape == (*CROP, 3) and out_image.dtype == np.uint8
        assert out_mask.shape == CROP and out_mask.dtype == dtype
        assert set(np.unique(out_mask).tolist()) <= {*labels, ignore}  # nearest: nothing in between


def no_colour_change(name: str) -> dict:
    return {k: 0.0 for k in ("p_jitter",) if k in preset_params(name)}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_pixels_that_are_not_from_the_photo_are_ignore(name):
    args = no_colour_change(name) | ({"p_affine": 1.0, "rotate": 40.0} if name == "ph2" else {})
    pipeline = build_augment(name, CROP, 255, args)
    image = np.full((20, 24, 3), 200, np.uint8)  # smaller than the crop: every preset pads
    mask = np.full((20, 24), 3, np.uint8)  # no ignore in the source
    padded_somewhere = False
    for seed in range(6):
        out_image, out_mask = run(pipeline, seed, image, mask)
        filled = (out_image == 0).all(axis=2)  # image fill is 0; interpolation mixes only at borders
        assert (out_mask[filled] == 255).all()
        assert (out_mask[out_image.min(axis=2) == 200] == 3).all()  # pure photo pixels keep their label
        padded_somewhere |= bool(filled.any())
    assert padded_somewhere


def test_same_seed_same_output_and_seeds_differ():
    pipeline = build_augment("voc", CROP, 255)
    image, mask = sample((60, 70), [0, 1, 2], 255)
    a, am = run(pipeline, 7, image, mask)
    b, bm = run(pipeline, 7, image, mask)
    assert np.array_equal(a, b) and np.array_equal(am, bm)
    outs = [run(pipeline, s, image, mask)[0] for s in range(4)]
    assert any(not np.array_equal(outs[0], o) for o in outs[1:])


def test_each_transform_draws_its_own_randomness():
    # albumentations' own set_random_seed gives HorizontalFlip and VerticalFlip the same seed:
    # both flips or neither, never one alone. seed_pipeline must give all four outcomes.
    import albumentations as A

    pipeline = A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)])
    image = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    seen = set()
    for seed in range(64):
        seed_pipeline(pipeline, seed)
        out = pipeline(image=image)["image"]
        seen.add((np.array_equal(out[:, ::-1], image) or np.array_equal(out[::-1, ::-1], image),
                  np.array_equal(out[::-1], image) or np.array_equal(out[::-1, ::-1], image)))
    assert seen == {(False, False), (True, False), (False, True), (True, True)}


def test_augment_args_override_the_preset():
    image, mask = sample(CROP, [0, 1, 2], 255)
    default = build_augment("voc", CROP, 255)
    fixed = build_augment("voc", CROP, 255, {"scale": [1, 1], "p_flip": 1.0, "p_jitter": 0.0})
    for seed in range(4):
        out_image, out_mask = run(fixed, seed, image, mask)
        assert np.array_equal(out_image, image[:, ::-1]) and np.array_equal(out_mask, mask[:, ::-1])
    assert any(not np.array_equal(run(default, s, image, mask)[0], image[:, ::-1]) for s in range(4))


@pytest.mark.parametrize(
    "name, args, needle",
    [
        ("voc", {"scal": [1, 2]}, "data.augment_args.scal: preset 'voc' has no parameter 'scal'; its parameters"),
        ("crop", {"p_flip": 0.5}, "its parameters (defaults): none"),
        ("voc", {"p_flip": 1.5}, "data.augment_args.p_flip is a probability"),
        ("voc", {"scale": [2.0, 1.0]}, "low must not exceed high"),
        ("voc", {"scale": "big"}, "data.augment_args.scale must be like the default [0.5, 2.0]"),
        ("ph2", {"blur": [3.5, 7]}, "data.augment_args.blur"),
        ("birds", {"keep_aspect": 1}, "data.augment_args.keep_aspect"),
        ("vocc", {}, "unknown preset 'vocc'; valid presets: birds, cityscapes, crop, ph2, shapes, voc"),
    ],
)
def test_bad_augment_args_name_the_key(name, args, needle):
    with pytest.raises(UserError) as err:
        build_augment(name, CROP, 255, args)
    assert needle in str(err.value)
    if name == "voc" and "scal" in args:
        assert "scale = [0.5, 2.0]" in str(err.value) and "p_flip = 0.5" in str(err.value)


def test_recipe_checks_augment_args_when_loaded():
    ok = recipe_from_dict({"data": {"augment": "cityscapes", "augment_args": {"scale": [0.75, 1.25], "longest": 1024}}})
    assert check_augment(ok.data.augment, ok.data.augment_args) == {"scale": (0.75, 1.25), "longest": 1024}
    with pytest.raises(UserError, match=r"data\.augment_args\.longes: preset 'cityscapes'"):
        recipe_from_dict({"data": {"augment": "cityscapes", "augment_args": {"longes": 1024}}})
    with pytest.raises(UserError, match="data.on_corrupt"):
        recipe_from_dict({"data": {"on_corrupt": "ignore"}})


def test_colour_jitter_runs_on_the_device_not_in_the_cpu_pipeline():
    import albumentations as A

    for name in PRESETS:
        assert not any(isinstance(t, A.ColorJitter) for t in build_augment(name, CROP, 255).transforms), name
    assert build_colour("voc") == ColourJitter(0.2, 0.2, 0.2, 0.1, 0.5)
    assert build_colour("voc", {"jitter": 0.4, "hue": 0.2, "p_jitter": 0.8}) == ColourJitter(0.4, 0.4, 0.4, 0.2, 0.8)
    assert build_colour("cityscapes", {"jitter": 0.0, "hue": 0.0}) is None
    assert build_colour("voc", {"p_jitter": 0.0}) is None and build_colour("crop") is None and build_colour("ph2") is None


def test_decode_reduction_is_the_presets_first_shrink_as_a_power_of_two():
    from segdist.data.augment import decode_reduction

    city = decode_reduction("cityscapes", (128, 256), {"longest": 256})
    assert city(1024, 2048) == 8 and city(512, 1024) == 4 and city(300, 500) == 1
    assert decode_reduction("cityscapes", (512, 1024)) is None  # scale jitter first: no fixed shrink
    assert decode_reduction("voc", (512, 512)) is None and decode_reduction("shapes", (64, 64)) is None
    fit = decode_reduction("birds", (256, 256), {"keep_aspect": True})
    assert fit(375, 500) == 1 and fit(1024, 1536) == 4  # fitted: the longer side's shrink
    stretch = decode_reduction("ph2", (256, 256), {"keep_aspect": False})
    assert stretch(560, 768) == 2 and stretch(600, 2400) == 2  # stretched: the gentler side's shrink
