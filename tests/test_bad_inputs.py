"""A corpus of bad inputs, each run through the real entry points as a plain `python` process
(docs/design-notes.md: user errors are checked before any process group forms). Every one must end with exit code
2, exactly one stderr line that starts with "error:" and names the culprit, no traceback, and no
partial output (a run folder the failed run would have created, an --out file; a run folder that
existed is left as it was).

The cases are independent processes of a few seconds each (mostly the imports). The first test
to ask runs all selected cases, two at a time on this 2-core machine; each test then checks its own.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY_RECIPE, free_port
from conftest import shard as write_shapes
from segdist.data.manifest import sha256_file
from segdist.data.sample import shard_members
from segdist.data.shards import encode_png


@dataclass
class Case:
    args: list[str]
    """After `python`: a launch script and its arguments."""
    needles: tuple[str, ...]
    """Each must be in the error line (the culprit: a key, a file, a sample, and the way out)."""
    cwd: Path = ROOT
    absent: tuple[Path, ...] = ()
    """Must not exist afterwards: what a failed run would otherwise leave behind."""
    unchanged: Path | None = None
    """An existing folder whose files must be exactly as before."""
    mid_run: bool = False
    """Found while training (in the data as it is read): log lines may precede the error line."""
    env: dict = field(default_factory=dict)
    """Environment variables for this case's process."""


@dataclass
class Ctx:
    tmp: Path
    shapes: Path
    trained: Path
    """A finished 4-step run of TINY_RECIPE (a copy per case: its recipe.toml and run/)."""

    def recipe(self, *extra: str, root: Path | None = None, run: Path | None = None) -> Path:
        """TINY_RECIPE with its run folder in tmp/run (or `run`) and extra TOML lines appended."""
        path = self.tmp / "recipe.toml"
        text = TINY_RECIPE.format(root=root or self.shapes, run_dir=run or self.tmp / "run")
        path.write_text(text + "\n".join(extra))
        return path

    @property
    def run(self) -> Path:
        return self.tmp / "run"

    def data(self) -> Path:
        """A private copy of the shapes splits, to damage."""
        root = self.tmp / "data"
        shutil.copytree(self.shapes, root)
        return root

    def trained_copy(self) -> tuple[Path, Path]:
        """(recipe, run folder) of a private copy of the trained run."""
        recipe, run = self.trained
        copy = self.tmp / "trained"
        shutil.copytree(run, copy)
        path = self.tmp / "trained.toml"
        path.write_text(recipe.read_text().replace(str(run), str(copy)))
        return path, copy


def train(*args) -> list[str]:
    return [str(ROOT / "launch" / "train.py"), *map(str, args)]


def evaluate(*args) -> list[str]:
    return [str(ROOT / "launch" / "eval.py"), *map(str, args)]


def export(*args) -> list[str]:
    return [str(ROOT / "launch" / "export.py"), *map(str, args)]


def shard(*args) -> list[str]:
    return [str(ROOT / "launch" / "shard.py"), *map(str, args)]


CASES: dict[str, Callable[[Ctx], Case]] = {}


def case(fn: Callable[[Ctx], Case]) -> Callable[[Ctx], Case]:
    CASES[fn.__name__] = fn
    return fn


# -- recipe ----------------------------------------------------------------------------------------

@case
def recipe_file_missing(c: Ctx) -> Case:
    return Case(train(c.tmp / "nope.toml"), ("nope.toml", "not found"), absent=(c.run,))


@case
def recipe_not_toml(c: Ctx) -> Case:
    (c.tmp / "r.toml").write_text("[train\nsteps = 3\n")
    return Case(train(c.tmp / "r.toml"), ("r.toml", "not valid TOML"))


@case
def unknown_section(c: Ctx) -> Case:
    return Case(train(c.recipe("[trian]", "steps = 3")), ("[trian]", "valid sections"), absent=(c.run,))


@case
def unknown_key(c: Ctx) -> Case:
    return Case(train(c.recipe(), "--set", "train.stepz=3"), ("train.stepz", "valid keys"), absent=(c.run,))


@case
def wrong_type_in_file(c: Ctx) -> Case:
    text = c.recipe().read_text().replace("steps = 4", 'steps = "four"')
    (c.tmp / "r.toml").write_text(text)
    return Case(train(c.tmp / "r.toml"), ("train.steps", "integer"), absent=(c.run,))


@case
def wrong_type_in_override(c: Ctx) -> Case:
    return Case(train(c.recipe(), "--set", "data.batch_size=1.5"), ("data.batch_size", "integer"), absent=(c.run,))


@case
def override_without_section(c: Ctx) -> Case:
    return Case(train(c.recipe(), "--set", "steps=3"), ("section.key=value",), absent=(c.run,))


@case
def value_out_of_range(c: Ctx) -> Case:
    return Case(train(c.recipe(), "--set", "train.ckpt_every=0"), ("train.ckpt_every", "> 0"), absent=(c.run,))


@case
def keep_last_negative(c: Ctx) -> Case:
    return Case(train(c.recipe(), "--set", "train.keep_last=-1"), ("train.keep_last",), absent=(c.run,))


@case
def empty_recipe_and_no_data(c: Ctx) -> Case:
    # Every section has defaults, so an empty recipe is valid: it trains data/shapes into
    # runs/default. Run where no data/shapes exists, the data root is the culprit.
    (c.tmp / "empty.toml").write_text("")
    return Case(train(c.tmp / "empty.toml"), ("data root data/shapes does not exist",), cwd=c.tmp,
                absent=(c.tmp / "runs",))


@case
def unknown_architecture(c: Ctx) -> Case:
    return Case(train(c.recipe(), "--set", "model.arch=Unett"), ("model.arch", "Unett", "Unet", "FPN"), absent=(c.run,))


@case
def unknown_encoder(c: Ctx) -> Case:
    return Case(train(c.recipe(), "--set", "model.encoder=resnet1800"), ("model.encoder", "resnet1800"),
                absent=(c.run,))


@case
def unknown_loss(c: Ctx) -> Case:
    return Case(train(c.recipe(), "--set", 'loss.terms=[{name = "cee"}]'), ("cee", "dice"), absent=(c.run,))


@case
def unknown_optimizer(c: Ctx) -> Case:
    return Case(train(c.recipe(), "--set", "optim.name=adamm"), ("optim.name", "adamm", "adamw", "sgd"),
                absent=(c.run,))


@case
def unknown_schedule(c: Ctx) -> Case:
    return Case(train(c.recipe(), "--set", "schedule.name=cosinus"), ("schedule.name", "cosinus", "cosine", "poly"),
                absent=(c.run,))


@case
def unknown_augmentation(c: Ctx) -> Case:
    return Case(train(c.recipe(), "--set", "data.augment=wild"), ("data.augment", "wild", "shapes"), absent=(c.run,))


@case
def unknown_geometry_place(c: Ctx) -> Case:
    return Case(train(c.recipe(), "--set", "data.geometry=gpu"), ("data.geometry", "gpu", "device"), absent=(c.run,))


@case
def in_memory_not_a_bool(c: Ctx) -> Case:
    return Case(train(c.recipe(), "--set", "data.in_memory=maybe"), ("data.in_memory", "true or false", "maybe"),
                absent=(c.run,))


@case
def blur_asked_of_device_geometry(c: Ctx) -> Case:
    return Case(train(c.recipe(), "--set", "data.augment=ph2", "--set", "data.geometry=device"),
                ("data.geometry", "p_blur", "data.augment_args.p_blur = 0"), absent=(c.run,))


@case
def pretrained_weights_offline(c: Ctx) -> Case:
    # HF_HUB_OFFLINE=1 (conftest): no hub here, and none on many clusters' compute nodes.
    return Case(train(c.recipe(), "--set", "model.encoder_weights=imagenet"), ("model.encoder_weights", "imagenet"),
                absent=(c.run,))


@case
def fp16_on_a_cpu(c: Ctx) -> Case:
    # Accelerate would silently train fp32 here (docs/design-notes.md); on a GPU machine fp16 is valid.
    if torch.cuda.is_available():
        return Case(train(c.recipe(), "--set", "train.precision=\"fp61\""), ("train.precision", "fp61"), absent=(c.run,))
    return Case(train(c.recipe(), "--set", "train.precision=\"fp16\""), ("train.precision = \"fp16\"", "CUDA", "auto"),
                absent=(c.run,))


@case
def batch_of_one_with_an_aspp_image_pooling_branch(c: Ctx) -> Case:
    # DeepLabV3+'s ASPP pools each image to 1x1: its BatchNorm cannot train on one sample.
    return Case(train(c.recipe(), "--set", "model.arch=DeepLabV3Plus", "--set", "model.encoder=resnet18",
                      "--set", "model.decoder_channels=\"null\"", "--set", "data.batch_size=1"),
                ("data.batch_size = 1", "decoder.aspp", "data.batch_size to >= 2", "model.sync_bn"), absent=(c.run,))


# -- data ------------------------------------------------------------------------------------------

@case
def classes_differ_from_manifest(c: Ctx) -> Case:
    return Case(train(c.recipe(), "--set", "model.classes=7"), ("model.classes = 7", "4 classes"), absent=(c.run,))


@case
def batch_larger_than_split(c: Ctx) -> Case:
    return Case(train(c.recipe(), "--set", "data.batch_size=64"), ("data.batch_size = 64", "48 samples"),
                absent=(c.run,))


@case
def data_root_missing(c: Ctx) -> Case:
    return Case(train(c.recipe(root=c.tmp / "nowhere")), (str(c.tmp / "nowhere"), "does not exist"), absent=(c.run,))


@case
def manifest_missing(c: Ctx) -> Case:
    return Case(train(c.recipe(), "--set", "data.val_split=test"), ("test.json", "not found"), absent=(c.run,))


@case
def manifest_corrupt(c: Ctx) -> Case:
    root = c.data()
    (root / "train.json").write_text('{"format": "segdist-shards/1", "split": ')
    return Case(train(c.recipe(root=root)), ("train.json", "corrupt"), absent=(c.run,))


@case
def shard_missing(c: Ctx) -> Case:
    root = c.data()
    (root / "train-000001.tar").unlink()
    return Case(train(c.recipe(root=root)), ("train-000001.tar", "missing"), absent=(c.run,))


@case
def shard_truncated(c: Ctx) -> Case:
    # A copy cut short: caught before anything starts by the shard's size (not whole tar blocks).
    root = c.data()
    cut = root / "train-000002.tar"
    cut.write_bytes(cut.read_bytes()[:-700])
    return Case(train(c.recipe(root=root)), ("train-000002.tar", "truncated", "verify"), absent=(c.run,))


@case
def shards_truncated_at_a_block_boundary(c: Ctx) -> Case:
    # Whole tar blocks, cut inside a member: only reading finds it, mid-run; the run folder the
    # failed run had created is removed again.
    root = c.data()
    for tar_path in root.glob("train-*.tar"):
        data = tar_path.read_bytes()
        tar_path.write_bytes(data[: len(data) // 2 // 512 * 512])
    return Case(train(c.recipe(root=root)), ("train-0000", ".tar"), absent=(c.run,), mid_run=True)


@case
def shard_changed_since_conversion(c: Ctx) -> Case:
    # Training does not hash shards (minutes for a large dataset); `verify` does, and names it.
    root = c.data()
    changed = root / "train-000003.tar"
    data = bytearray(changed.read_bytes())
    data[len(data) // 2] ^= 0xFF
    changed.write_bytes(bytes(data))
    return Case(shard("verify", root), ("train-000003.tar", "sha256"))


@case
def index_shard_changed_since_conversion(c: Ctx) -> Case:
    # `index` reads every shard to find its member offsets and checks its sha256 as it goes: a shard
    # that is not the manifest's is named, and no manifest changes.
    root = c.data()
    for path in root.glob("*.json"):
        raw = json.loads(path.read_text())
        for info in raw["shards"]:
            del info["members"]
        path.write_text(json.dumps(raw))
    changed = root / "val7-000001.tar"
    data = bytearray(changed.read_bytes())
    data[len(data) // 2] ^= 0xFF
    changed.write_bytes(bytes(data))
    return Case(shard("index", root), ("val7-000001.tar", "sha256 differs", "re-run the conversion"), unchanged=root)


@case
def index_a_remote_root(c: Ctx) -> Case:
    return Case(shard("index", "https://data.example.org/shards"), ("https://data.example.org/shards",
                                                                     "not a local folder", "index the folder"))


@case
def image_bytes_corrupt(c: Ctx) -> Case:
    # Same size, valid tar, damaged PNG data in every image: the first sample read is named.
    root = c.data()
    for tar_path in root.glob("train-*.tar"):
        data = bytearray(tar_path.read_bytes())
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".image.png"):
                    for k in range(40, 60):
                        data[member.offset_data + member.size // 2 + k] ^= 0x5A
        tar_path.write_bytes(bytes(data))
    return Case(train(c.recipe(root=root)), ("sample", "train-0000"), absent=(c.run,), mid_run=True)


@case
def image_bytes_corrupt_in_a_loader_worker(c: Ctx) -> Case:
    # The error class takes more than a message, so torch raises it again as a RuntimeError with
    # the worker's traceback text: still a user error, one line, exit 2, nothing left behind.
    corrupt = image_bytes_corrupt(c)
    return Case(corrupt.args + ["--set", "data.num_workers=1"], corrupt.needles, absent=corrupt.absent, mid_run=True)


@case
def split_empty(c: Ctx) -> Case:
    root = c.data()
    manifest = json.loads((root / "train.json").read_text())
    manifest.update(num_samples=0, shards=[])
    (root / "train.json").write_text(json.dumps(manifest))
    return Case(train(c.recipe(root=root)), ("'train'", "empty"), absent=(c.run,))


@case
def mask_and_image_sizes_differ(c: Ctx) -> Case:
    root = split_with(c, mask=np.zeros((16, 16), np.uint8))
    return Case(train(c.recipe(root=root)), ("sample bad-", "size"), absent=(c.run,), mid_run=True)


@case
def mask_label_not_a_class(c: Ctx) -> Case:
    mask = np.zeros((32, 32), np.uint8)
    mask[4:8, 4:8] = 9
    root = split_with(c, mask=mask)
    return Case(train(c.recipe(root=root)), ("sample bad-", "label 9", "4 classes"), absent=(c.run,), mid_run=True)


@case
def mask_label_not_a_class_in_a_loader_worker(c: Ctx) -> Case:
    # The same, found in a DataLoader worker process: the error arrives wrapped in its traceback.
    mask = np.zeros((32, 32), np.uint8)
    mask[4:8, 4:8] = 9
    root = split_with(c, mask=mask)
    return Case(train(c.recipe(root=root), "--set", "data.num_workers=1"), ("sample bad-", "label 9"),
                absent=(c.run,), mid_run=True)


@case
def val_split_has_other_classes(c: Ctx) -> Case:
    root = c.data()
    manifest = json.loads((root / "val7.json").read_text())
    manifest["classes"][1] = "disc"
    (root / "val7.json").write_text(json.dumps(manifest))
    return Case(train(c.recipe(root=root)), ("'classes'", "split 'val7'", "split 'train'", "'disc' against 'circle'"), absent=(c.run,))


def val_root_with(c: Ctx, **changes) -> Path:
    """A data.val_root holding the shapes val split with `changes` made to its manifest."""
    root = c.tmp / "full"
    root.mkdir()
    for f in c.shapes.glob("val7*"):
        shutil.copy(f, root / f.name)
    manifest = json.loads((root / "val7.json").read_text())
    manifest.update(changes)
    (root / "val7.json").write_text(json.dumps(manifest))
    return root


@case
def val_root_has_another_palette(c: Ctx) -> Case:
    palette = json.loads((c.shapes / "val7.json").read_text())["palette"]
    full = val_root_with(c, palette=[[9, 9, 9]] + palette[1:])
    return Case(train(c.recipe(), "--set", f"data.val_root={full}"), ("'palette'", "data.val_root", str(full)),
                absent=(c.run,))


@case
def val_root_has_another_ignore_index(c: Ctx) -> Case:
    full = val_root_with(c, ignore_index=0)
    return Case(train(c.recipe(), "--set", f"data.val_root={full}"), ("'ignore_index'", "data.val_root", "0 against 255"),
                absent=(c.run,))


def tier(c: Ctx, max_size: int, image_format: str = "png") -> Path:
    """A train split converted by launch/shard.py folder from 32x32 shapes frames, stored with
    --max-size and --image-format, beside the shapes val split."""
    from PIL import Image

    from segdist.data.shapes import make_scene

    (c.tmp / "img").mkdir()
    (c.tmp / "lbl").mkdir()
    for i in range(8):
        image, mask = make_scene(5, i, 32, 32, 4)
        Image.fromarray(image).save(c.tmp / "img" / f"f{i}.png")
        Image.fromarray(mask).save(c.tmp / "lbl" / f"f{i}.png")
    root = c.tmp / "data"
    names = ",".join(json.loads((c.shapes / "val7.json").read_text())["classes"])
    subprocess.run([sys.executable, *shard("folder", "--images", c.tmp / "img" / "*.png", "--masks", c.tmp / "lbl" / "*.png",
                                          "--classes", names, "--split", "train", "--out", root, "--max-size", max_size,
                                          "--image-format", image_format)], check=True, capture_output=True)
    palette = json.loads((c.shapes / "val7.json").read_text())["palette"]
    manifest = json.loads((root / "train.json").read_text())
    manifest["palette"] = palette  # the folder converter's own palette; the shapes val split has its own
    (root / "train.json").write_text(json.dumps(manifest))
    for f in c.shapes.glob("val7*"):
        shutil.copy(f, root / f.name)
    return root


@case
def crop_larger_than_the_tier(c: Ctx) -> Case:
    root = tier(c, 16)
    return Case(train(c.recipe(root=root)), ("data.crop [32, 32]", "at most 16x16", "--max-size 16"), absent=(c.run,))


def cut_raw_images(tar_path: Path) -> Path:
    """Rewrite a shard with every raw (.npy) image 7 bytes short, still a valid tar."""
    with tarfile.open(tar_path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            data = data[:-7] if name.endswith(".image.npy") else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return tar_path


@case
def raw_image_bytes_do_not_match_the_shape(c: Ctx) -> Case:
    # A raw (.npy) member cut short inside a valid tar fails as any corrupt sample does.
    root = tier(c, 32, "raw")
    tar_path = cut_raw_images(root / "train-000000.tar")
    manifest = json.loads((root / "train.json").read_text())
    manifest["shards"][0].update(sha256=sha256_file(tar_path), members=members_of(tar_path))
    (root / "train.json").write_text(json.dumps(manifest))
    return Case(train(c.recipe(root=root)), ("sample f", "train-000000.tar", "does not decode"), absent=(c.run,),
                mid_run=True)


@case
def shard_rewritten_after_its_offsets_were_recorded(c: Ctx) -> Case:
    # The same shard rewritten, the manifest left as it was: its offsets point between other bytes.
    # Each member's tar header is checked against the manifest, so it is named, not trained on.
    root = tier(c, 32, "raw")
    cut_raw_images(root / "train-000000.tar")
    return Case(train(c.recipe(root=root)), ("sample f", "train-000000.tar", "does not match the manifest's offsets",
                                             "verify"), absent=(c.run,), mid_run=True)


# -- runs and checkpoints ----------------------------------------------------------------------------

@case
def run_folder_not_writable(c: Ctx) -> Case:
    (c.tmp / "a-file").write_text("not a folder")
    run = c.tmp / "a-file" / "run"
    return Case(train(c.recipe(run=run)), ("train.run_dir", "a-file", "not writable"))


@case
def resume_without_checkpoint(c: Ctx) -> Case:
    return Case(train(c.recipe(), "--resume"), ("--resume", "no complete checkpoint"), absent=(c.run,))


@case
def fresh_start_into_a_run_with_checkpoints(c: Ctx) -> Case:
    recipe, run = c.trained_copy()
    return Case(train(recipe), ("already holds checkpoints", "--resume"), unchanged=run)


@case
def resume_with_another_encoder(c: Ctx) -> Case:
    recipe, run = c.trained_copy()
    return Case(train(recipe, "--resume", "--set", "model.encoder=resnet34"), ("model.encoder", "resnet34", "recipe.toml"),
                unchanged=run)


@case
def resume_with_other_decoder_widths(c: Ctx) -> Case:
    recipe, run = c.trained_copy()
    return Case(train(recipe, "--resume", "--set", "train.steps=6", "--set", "model.decoder_channels=[64, 32, 16, 8, 8]"),
                ("does not fit", "recipe.toml"), unchanged=run)


@case
def resume_with_another_optimizer(c: Ctx) -> Case:
    recipe, run = c.trained_copy()
    return Case(train(recipe, "--resume", "--set", "optim.name=sgd"), ("optim.name", "sgd"), unchanged=run)


@case
def resume_past_the_last_step(c: Ctx) -> Case:
    recipe, run = c.trained_copy()
    return Case(train(recipe, "--resume", "--set", "train.steps=2"), ("step 4", "train.steps = 2"), unchanged=run)


@case
def init_from_missing(c: Ctx) -> Case:
    return Case(train(c.recipe(), "--set", f"train.init_from={c.tmp / 'no-run'}"),
                ("train.init_from", "no-run", "does not exist"), absent=(c.run,))


@case
def init_from_a_folder_without_checkpoints(c: Ctx) -> Case:
    return Case(train(c.recipe(), "--set", f"train.init_from={c.shapes}"),
                ("train.init_from", str(c.shapes), "no complete checkpoint"), absent=(c.run,))


@case
def init_from_another_encoder(c: Ctx) -> Case:
    _, source = c.trained_copy()
    return Case(train(c.recipe(), "--set", f"train.init_from={source}", "--set", "model.encoder=resnet34"),
                ("train.init_from", "model.encoder = 'resnet18'", "resnet34"), absent=(c.run,), unchanged=source)


@case
def init_from_another_class_count(c: Ctx) -> Case:
    _, source = c.trained_copy()  # 4 classes; the new run's data has 5
    root = c.tmp / "five"
    for split, seed in (("train", "1"), ("val7", "2")):
        write_shapes(["shapes", "--out", str(root), "--size", "32", "32", "--classes", "5", "--split", split,
                      "--count", "8", "--seed", seed])
    return Case(train(c.recipe(root=root), "--set", f"train.init_from={source}", "--set", "model.classes=5"),
                ("train.init_from", "model.classes = 4", "5 outputs"), absent=(c.run,), unchanged=source)


@case
def init_from_other_decoder_widths(c: Ctx) -> Case:
    _, source = c.trained_copy()
    return Case(train(c.recipe(), "--set", f"train.init_from={source}",
                      "--set", "model.decoder_channels=[64, 32, 16, 8, 8]"),
                ("train.init_from", "step-4", "does not fit", "[32, 768, 3, 3]", "recipe.toml"), absent=(c.run,),
                unchanged=source)


@case
def eval_checkpoint_missing(c: Ctx) -> Case:
    out = c.tmp / "m.json"
    return Case(evaluate(c.recipe(), "--checkpoint", c.tmp / "no-run", "--out", out), ("no-run", "does not exist"),
                absent=(out,))


@case
def eval_checkpoint_incomplete(c: Ctx) -> Case:
    recipe, run = c.trained_copy()
    (run / "checkpoints" / "step-4" / "COMPLETE").unlink()
    out = c.tmp / "m.json"
    return Case(evaluate(recipe, "--checkpoint", run / "checkpoints" / "step-4", "--out", out),
                ("step-4", "incomplete"), absent=(out,))


@case
def eval_checkpoint_of_another_model(c: Ctx) -> Case:
    recipe, run = c.trained_copy()
    out = c.tmp / "m.json"
    return Case(evaluate(recipe, "--checkpoint", run, "--set", "model.decoder_channels=[64, 32, 16, 8, 8]", "--out", out),
                ("does not fit",), absent=(out,))


@case
def eval_out_folder_missing(c: Ctx) -> Case:
    recipe, run = c.trained_copy()
    return Case(evaluate(recipe, "--checkpoint", run, "--out", c.tmp / "no" / "m.json"), ("--out",),
                absent=(c.tmp / "no",))


@case
def eval_split_missing(c: Ctx) -> Case:
    recipe, run = c.trained_copy()
    return Case(evaluate(recipe, "--checkpoint", run, "--split", "test"), ("test.json", "not found"))


@case
def eval_shard_holds_another_count(c: Ctx) -> Case:
    # A shard rewritten since conversion with a sample more: evaluation reads by the manifest's counts.
    recipe, run = c.trained_copy()
    root = c.data()
    recipe.write_text(recipe.read_text().replace(str(c.shapes), str(root)))
    with tarfile.open(root / "val7-000002.tar") as src, tarfile.open(root / "val7-000000.tar", "a") as dst:
        for member in src.getmembers():
            dst.addfile(member, src.extractfile(member))
    out = c.tmp / "m.json"
    return Case(evaluate(recipe, "--checkpoint", run, "--out", out),
                ("val7-000000.tar", "holds more samples than the 3", "launch/shard.py verify"), absent=(out,),
                mid_run=True)


@case
def export_hf_into_a_folder_that_holds_something(c: Ctx) -> Case:
    recipe, run = c.trained_copy()
    out = c.tmp / "model"
    out.mkdir()
    (out / "notes.txt").write_text("not a model")
    return Case(export(recipe, "--checkpoint", run, "--format", "hf", "--out", out),
                ("--out", "model is not empty", "'notes.txt'", "new or empty folder"), unchanged=out)


@case
def export_hf_with_an_onnx_option(c: Ctx) -> Case:
    recipe, run = c.trained_copy()
    out = c.tmp / "model"
    return Case(export(recipe, "--checkpoint", run, "--format", "hf", "--out", out, "--opset", "17"),
                ("--opset", "ONNX option", "--format hf"), absent=(out,))


@case
def verify_folder_without_manifests(c: Ctx) -> Case:
    (c.tmp / "empty").mkdir()
    return Case(shard("verify", c.tmp / "empty"), ("no manifest",))


@case
def convert_folder_without_images(c: Ctx) -> Case:
    out = c.tmp / "shards"
    return Case(shard("folder", "--images", c.tmp / "none" / "*.png", "--masks", c.tmp / "none" / "*.png",
                      "--classes", "background,thing", "--out", out, "--split", "train"), ("none",),
                absent=(out / "train.json",))


def split_with(c: Ctx, mask: np.ndarray) -> Path:
    """A data root whose train split has 12 32x32 samples with `mask` (written by hand: the real
    writer refuses bad masks), and the shapes val split."""
    root = c.tmp / "data"
    root.mkdir()
    for f in c.shapes.glob("val7*"):
        shutil.copy(f, root / f.name)
    image = encode_png(np.full((32, 32, 3), 128, np.uint8))
    tar_path = root / "train-000000.tar"
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(12):
            for name, data in ((f"bad-{i:03d}.image.png", image), (f"bad-{i:03d}.mask.png", encode_png(mask))):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    manifest = json.loads((root / "val7.json").read_text())
    manifest.update(split="train", num_samples=12, class_pixels=[32 * 32 * 12, 0, 0, 0],
                    shards=[{"file": tar_path.name, "samples": 12, "sha256": sha256_file(tar_path),
                             "members": members_of(tar_path)}])
    (root / "train.json").write_text(json.dumps(manifest))
    return root


def members_of(tar_path: Path) -> list:
    """The member offsets of a tar written by hand, as the manifest records them."""
    with open(tar_path, "rb") as f:
        return shard_members(f)


@case
def resume_with_another_global_batch(c: Ctx) -> Case:
    recipe, run = c.trained_copy()  # trained as 1 process x batch 4 x accumulation 1
    return Case(train(recipe, "--resume", "--set", "train.steps=6", "--set", "data.batch_size=2"),
                ("global batch of 4 samples", "1 x 2 x 1 = 2", "data.batch_size = 4", "train.init_from"), unchanged=run)


@case
def resume_with_another_seed(c: Ctx) -> Case:
    recipe, run = c.trained_copy()
    return Case(train(recipe, "--resume", "--set", "train.steps=6", "--set", "train.seed=4"), ("train.seed", "4"),
                unchanged=run)


@case
def global_batch_the_processes_cannot_divide(c: Ctx) -> Case:
    return Case(train(c.recipe(), "--set", "train.global_batch=6", "--set", "train.grad_accum=auto"),
                ("train.global_batch = 6", "1 process x data.batch_size 4"), absent=(c.run,))


@case
def global_batch_against_a_fixed_accumulation(c: Ctx) -> Case:
    return Case(train(c.recipe(), "--set", "train.global_batch=8"),
                ("train.global_batch = 8", "= 4", 'train.grad_accum = "auto"', "gives 2"), absent=(c.run,))


@case
def accumulation_auto_without_global_batch(c: Ctx) -> Case:
    return Case(train(c.recipe(), "--set", "train.grad_accum=auto"), ("train.grad_accum", "train.global_batch"),
                absent=(c.run,))


@case
def manifest_without_member_offsets(c: Ctx) -> Case:
    root = c.data()
    raw = json.loads((root / "train.json").read_text())
    for entry in raw["shards"]:
        entry.pop("members")
    (root / "train.json").write_text(json.dumps(raw))
    return Case(train(c.recipe(root=root)), ("train.json", "launch/shard.py index"), absent=(c.run,))


# -- trackers --------------------------------------------------------------------------------------

TRACKERS = 'log.trackers=["tensorboard", "{}"]'


@case
def unknown_tracker(c: Ctx) -> Case:
    return Case(train(c.recipe(), "--set", TRACKERS.format("mlfow")),
                ("log.trackers", "'mlfow'", "known: tensorboard, wandb, mlflow"), absent=(c.run,))


@case
def tracker_not_installed(c: Ctx) -> Case:
    return Case(train(c.recipe(), "--set", TRACKERS.format("aim")), ("log.trackers", "aim", "pip install 'segdist[aim]'"),
                absent=(c.run,))


@case
def mlflow_server_unreachable(c: Ctx) -> Case:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    return Case(train(c.recipe(), "--set", TRACKERS.format("mlflow")),
                ("log.trackers: mlflow", url, "MLFLOW_TRACKING_URI", "refused"), absent=(c.run,),
                env={"MLFLOW_TRACKING_URI": url})


@case
def wandb_server_unreachable(c: Ctx) -> Case:
    url = f"http://127.0.0.1:{free_port()}"
    return Case(train(c.recipe(), "--set", TRACKERS.format("wandb")), ("log.trackers: wandb", url, "WANDB_BASE_URL"),
                absent=(c.run,), env={"WANDB_BASE_URL": url, "WANDB_MODE": "online"})


# -- running them ----------------------------------------------------------------------------------

@dataclass
class Outcome:
    case: Case | None
    returncode: int | None = None
    stderr: str = ""
    before: list[str] = field(default_factory=list)
    after: list[str] = field(default_factory=list)


def _files(folder: Path | None) -> list[str]:
    if folder is None:
        return []
    return sorted(f"{p.relative_to(folder)} {p.stat().st_size}" for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def outcomes(request, shapes_root, trained_run, tmp_path_factory) -> dict[str, Outcome]:
    selected = sorted({item.callspec.params["name"] for item in request.session.items
                       if getattr(item, "originalname", "") == "test_bad_input"})

    def run(name: str) -> Outcome:
        try:
            c = CASES[name](Ctx(tmp_path_factory.mktemp(name), shapes_root, trained_run))
        except Exception as exc:  # reported by this case's test alone
            return Outcome(None, stderr=f"setting the case up failed: {exc!r}")
        before = _files(c.unchanged)
        proc = subprocess.Popen([sys.executable, *c.args], cwd=c.cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, start_new_session=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **c.env})
        try:
            _, stderr = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, stderr = proc.communicate()
            stderr += "\n[no exit within 180 s: killed]"
        return Outcome(c, proc.returncode, stderr, before, _files(c.unchanged))

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(selected, pool.map(run, selected)))


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 30


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name, outcomes):
    o = outcomes[name]
    assert o.case is not None, o.stderr
    assert o.returncode == 2, f"exit {o.returncode}:\n{o.stderr[-3000:]}"
    lines = o.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in o.stderr, o.stderr[-3000:]
    if not o.case.mid_run:
        assert len(lines) == 1, o.stderr[-3000:]  # found before anything started: the one line only
    for needle in o.case.needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    for path in o.case.absent:
        assert not path.exists(), f"{path} left behind"
    assert o.before == o.after, "the existing run folder changed"
