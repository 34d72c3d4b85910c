"""Every shipped recipe: loads, is complete (every key of every section written out), is described
(header comment, recipes/README.md row), says how its splits are stored (`# convert:` lines that
write its data.root and data.val_root), and builds a model (weights null), loss, optimizer and
schedule that take two optimizer steps on generated data of its class count. Its `# convert:` lines,
run on generated datasets in the official on-disk layouts, write splits it trains a step from and
evaluates. Plus a real binary run of a shipped PH2 recipe whose 2x2 confusion matrix is checked
against a numpy count."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, launch, shard
from segdist.evaluate import to_input
from segdist.losses import build_loss
from segdist.models import build_model, prepare_model
from segdist.models.ema import ModelEMA
from segdist.optim import build_optimizer, build_scheduler, lr_factor
from segdist.recipe import Recipe, dumps_toml, load_recipe

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

RECIPES = sorted((ROOT / "recipes").glob("*.toml"))
IGNORE = 255
CONVERT = re.compile(r"^# convert: (.*)$", re.M)


def convert_lines(path: Path) -> list[list[str]]:
    """The argv of each `# convert:` line of a recipe's header, as a shell would split it."""
    return [shlex.split(line) for line in CONVERT.findall(path.read_text(encoding="utf-8"))]


def option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_says_how_its_splits_are_stored(path):
    """A `# convert:` line per split: the exact launch/shard.py command, the dataset's root as $ROOT,
    the output under data/, writing the folders data.root and data.val_root name."""
    r = load_recipe(path)
    lines = convert_lines(path)
    assert lines, "the header has # convert: lines"
    for argv in lines:
        assert argv[:2] == ["python", "launch/shard.py"] and option(argv, "--out").startswith("data/"), argv
        assert (argv[2] == "shapes") != any("$ROOT" in a for a in argv), "every dataset but the synthetic one reads $ROOT"
    by_split = {option(argv, "--split"): option(argv, "--out") for argv in lines}
    assert by_split.get(r.data.train_split) == r.data.root
    assert by_split.get(r.data.val_split) == r.data.eval_root


def test_the_seed_experiments_all_have_recipes():
    names = {p.stem for p in RECIPES}
    assert names >= {"cityscapes_unet", "cityscapes_deeplabv3plus_r50", "voc_unet_r34", "voc_segformer_b0",
                     "voc_segformer_b2", "voc_unetpp_effb5", "voc_deeplabv3plus_mnv3", "ph2_unet", "ph2_segnet",
                     "birds_unet", "birds_encdec"}


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_is_complete_and_described(path, tmp_path):
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    recipe = load_recipe(path)
    (tmp_path / "resolved.toml").write_text(dumps_toml(recipe))  # as written into runs and checkpoints
    assert load_recipe(tmp_path / "resolved.toml") == recipe
    for section in dataclasses.fields(Recipe):
        written = set(raw.get(section.name, {}))
        keys = {f.name for f in dataclasses.fields(section.default_factory)}
        assert written == keys, f"[{section.name}] misses {sorted(keys - written)}"
    assert path.read_text().startswith("# "), "a header comment says what the recipe reproduces"
    assert f"`{path.name}`" in (ROOT / "recipes" / "README.md").read_text()


AUTO_WORKERS_EXCEPTIONS: dict[str, str] = {}
"""Recipes that keep a fixed data.num_workers, each with the reason its header comment gives."""


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_lets_the_node_choose_its_loader_workers(path):
    workers = load_recipe(path).data.num_workers
    if path.stem in AUTO_WORKERS_EXCEPTIONS:
        assert isinstance(workers, int) and AUTO_WORKERS_EXCEPTIONS[path.stem] in path.read_text()
    else:
        assert workers == "auto", f"{path.name}: data.num_workers = {workers!r}; ship \"auto\" (or say why not)"


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_builds_and_takes_two_steps(path):
    r = load_recipe(path, ["model.encoder_weights=null"])
    classes = r.model.classes
    torch.manual_seed(0)
    model = build_model(r.model, classes)
    ema = ModelEMA(model, r.model.ema_decay) if r.model.ema_decay > 0 else None
    model = prepare_model(model, dataclasses.replace(r.model, compile=False), "cpu", 1)  # compile: ~45 s on CPU
    labels = 2 if classes == 1 else classes
    loss_fn = build_loss(r.loss, classes, IGNORE, class_pixels=[1000 * (c + 1) for c in range(labels)])
    optimizer = build_optimizer(model, r.optim)
    if ema is not None:
        ema.attach(optimizer)
    scheduler = build_scheduler(optimizer, r.schedule, r.train.steps)
    before = [p.detach().clone() for p in model.parameters()]
    g = torch.Generator().manual_seed(0)
    accum = r.train.grad_accum
    for step in range(2):
        images = torch.randint(0, 256, (accum, 2, 32, 32, 3), dtype=torch.uint8, generator=g)
        masks = torch.randint(0, labels, (accum, 2, 32, 32), generator=g)
        masks[torch.rand(accum, 2, 32, 32, generator=g) < 0.1] = IGNORE
        denominators = loss_fn.denominators(sum(loss_fn.count(m) for m in masks), accum)
        for x, m in zip(images, masks):  # as segdist.train.step.train_step, with accelerate's division by accum
            loss = loss_fn(model(to_input(x, "cpu")).float(), m, denominators) / accum
            assert torch.isfinite(loss)
            loss.backward()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(
            optimizer.param_groups[0]["lr_mult"] * r.optim.lr
            * lr_factor(r.schedule, r.schedule.min_lr / r.optim.lr, r.train.steps, step))
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert ema is None or ema.updates == 2


@pytest.fixture(scope="module")
def binary_root(tmp_path_factory) -> Path:
    """Shapes with 2 classes (background, circle; thin ignore bands): a binary dataset."""
    root = tmp_path_factory.mktemp("binary")
    common = ["--out", str(root), "--size", "32", "32", "--classes", "2"]
    shard(["shapes", *common, "--split", "train", "--count", "32", "--seed", "4", "--samples-per-shard", "16"])
    shard(["shapes", *common, "--split", "val", "--count", "7", "--seed", "5", "--samples-per-shard", "4"])
    return root


@pytest.mark.slow
def test_binary_recipe_trains_with_ema_and_counts_exactly(binary_root, tmp_path):
    """ph2_unet.toml (one logit, bce) on a generated binary set, with an EMA of the weights: the run
    finishes, checkpoints the EMA, and its val confusion matrix is the 2x2 count of the EMA
    weights' thresholded predictions, counted here with numpy."""
    run = tmp_path / "run"
    overrides = [
        f"data.root={binary_root}", "data.val_root=null", "data.crop=[32, 32]", "data.batch_size=4", "data.num_workers=0",
        "data.shuffle_buffer=8", 'model.arch_args={width = 8, depth = 2, norm = "batch", upsample = "maxunpool", skips = true}',
        "model.ema_decay=0.8", "optim.lr=0.01", "train.precision=fp32", "train.steps=12", "train.eval_every=0", "train.ckpt_every=12",
        f"train.run_dir={run}", "eval.batch_size=4", "eval.num_workers=0", "log.every=1", "log.images=1",
    ]
    # fp32: the reference below counts fp32 logits, and "auto" is bf16 on a CPU with AMX.
    args = [str(ROOT / "recipes" / "ph2_unet.toml")] + [a for o in overrides for a in ("--set", o)]
    result = launch("train.py", args)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = run / "checkpoints" / "step-12"
    assert (ckpt / "ema.pt").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert len(losses) == 12 and np.mean(losses[-4:]) < 0.85 * np.mean(losses[:4]), losses  # it learns
    metrics = json.loads((run / "metrics" / "step-12" / "metrics.json").read_text())

    from segdist.data.manifest import load_manifest
    from segdist.data.sample import decode_sample, read_shard

    r = load_recipe(ROOT / "recipes" / "ph2_unet.toml", overrides)
    model = build_model(r.model, 1)
    model.load_state_dict(torch.load(ckpt / "ema.pt", weights_only=True)["module"])
    model.eval()
    manifest = load_manifest(binary_root, "val")
    counts = np.zeros(4, dtype=np.int64)
    with torch.no_grad():
        for shard_path in manifest.shard_paths():
            for sample in read_shard(shard_path):
                _, image, mask = decode_sample(sample, manifest.num_classes, manifest.ignore_index)
                logit = model(to_input(torch.from_numpy(image)[None], "cpu"))[0, 0].numpy()
                valid = mask != IGNORE
                pred = (logit > 0).astype(np.int64)
                counts += np.bincount(mask[valid].astype(np.int64) * 2 + pred[valid], minlength=4)
    assert metrics["confusion_matrix"] == counts.reshape(2, 2).tolist()
    assert metrics["valid_pixels"] == manifest.valid_pixels and len(metrics["per_class_iou"]) == 2
    # resuming restores the average and keeps folding steps into it
    resumed = launch("train.py", args + ["--set", "train.steps=14", "--set", "train.ckpt_every=14", "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(ckpt / "ema.pt", weights_only=True)["updates"] == 12
    assert torch.load(run / "checkpoints" / "step-14" / "ema.pt", weights_only=True)["updates"] == 14


# -- the # convert: lines, run on generated datasets in the official layouts ----------------------
@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """$ROOT of each dataset the recipes name, in its real layout, frames at realistic sizes."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_convert_cityscapes import make_cityscapes
    from test_convert_folder import make_birds, make_ph2
    from test_convert_voc import make_voc

    base = tmp_path_factory.mktemp("sources")
    make_cityscapes(base / "cityscapes", "train", 0, size=(256, 512))
    make_cityscapes(base / "cityscapes", "val", 1, size=(256, 512))
    make_voc(base / "VOC2012", size=(375, 500))
    for split, seed in (("train", 0), ("val", 1)):
        make_ph2(base / f"ph2-{split}", seed, size=(420, 576))  # above the 384 tier
        (base / "PH2").mkdir(exist_ok=True)
        shutil.move(base / f"ph2-{split}" / "PH2 Dataset images", base / "PH2" / split)
    for split, seed in (("train", 0), ("test", 1)):
        make_birds(base / f"birds-{split}", seed, size=(300, 400))  # landscape, above the 256 tier
        (base / "birds" / split).mkdir(parents=True)
        shutil.move(base / f"birds-{split}" / "images", base / "birds" / split / "images")
        shutil.move(base / f"birds-{split}" / "masks", base / "birds" / split / "gt")
    return {"cityscapes": base / "cityscapes", "voc": base / "VOC2012", "ph2": base / "PH2", "birds": base / "birds"}


class Converted:
    """Where the # convert: lines run (their data/ folders land there), shared by the recipes so a
    command that several of them name runs once."""

    def __init__(self, workdir: Path) -> None:
        self.workdir, self.done = workdir, set()

    def run(self, argv: list[str], root: Path | None, monkeypatch) -> None:
        from shardtools import shard as shard_in_process

        line = [a.replace("$ROOT", str(root)) for a in argv]
        if " ".join(line) in self.done:
            return
        with monkeypatch.context() as m:
            m.chdir(self.workdir)
            assert shard_in_process(*line[2:]) == 0
        self.done.add(" ".join(line))


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Converted:
    return Converted(tmp_path_factory.mktemp("converted"))


@pytest.mark.slow
@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_convert_lines_write_what_the_recipe_trains_and_evaluates(path, sources, converted, tmp_path, monkeypatch):
    """Run the recipe's `# convert:` lines as written ($ROOT = a generated dataset), then train one
    step of the recipe from what they wrote (small crop and batch for the big models) and evaluate
    its val split, read from data.val_root, at the frames' native size."""
    from segdist.data.manifest import load_manifest

    r = load_recipe(path)
    dataset = path.stem.split("_")[0]
    for argv in convert_lines(path):
        converted.run(argv, sources.get(dataset), monkeypatch)
    workdir = converted.workdir
    train_m = load_manifest(workdir / r.data.root, r.data.train_split)
    val_m = load_manifest(workdir / r.data.eval_root, r.data.val_split)
    crop = r.data.crop if r.data.crop[0] * r.data.crop[1] <= 256 * 256 else [64, 64]  # the big models' smaller
    run = tmp_path / "run"
    overrides = [
        f"data.root={workdir / r.data.root}", f"data.val_root={workdir / r.data.eval_root}", f"data.crop={crop}",
        "data.batch_size=2", "data.num_workers=0", "data.shuffle_buffer=4", "model.encoder_weights=null",
        "train.steps=1", "train.grad_accum=1", "train.eval_every=0", "train.ckpt_every=1", f"train.run_dir={run}",
        "eval.batch_size=1", "eval.num_workers=0", "log.images=0",
    ]
    result = launch("train.py", [str(path)] + [a for o in overrides for a in ("--set", o)])
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run / "metrics" / "step-1" / "metrics.json").read_text())
    assert metrics["num_samples"] == val_m.num_samples and metrics["valid_pixels"] == val_m.valid_pixels
    if dataset in ("birds", "ph2"):  # the crop is the recipe's own, on its real tier
        assert crop == r.data.crop and max(train_m.frame_sizes["stored"]["max"]) == {"birds": 256, "ph2": 384}[dataset]
    if path.stem == "cityscapes_unet":  # a tier at the training size, evaluated on the full frames
        assert train_m.frame_sizes["stored"]["max"] == [128, 256] and train_m.frame_sizes["source"]["max"] == [256, 512]
        assert val_m.frame_sizes["stored"]["max"] == [256, 512]
