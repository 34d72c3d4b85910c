"""Shared fixtures: small shapes splits written by the real converter, a tiny recipe, and a
helper that launches real processes (`python` for one, `accelerate launch` for several)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, args: list[str], nproc: int = 1, timeout: int = 600, env: dict | None = None):
    """Run launch/<script> with `nproc` real processes; returns the CompletedProcess."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / "launch" / script), *args]
    else:
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), str(ROOT / "launch" / script), *args,
        ]
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def shard(args: list[str]) -> None:
    from segdist.data.convert import build_parser

    parsed = build_parser().parse_args(args)
    assert parsed.run(parsed) == 0


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    """train: 48 samples of 32x32 in 4 shards; val7: 7 samples in 3 shards; val7b: the same 7 in 2."""
    root = tmp_path_factory.mktemp("shapes")
    common = ["--out", str(root), "--size", "32", "32", "--classes", "4"]
    shard(["shapes", *common, "--split", "train", "--count", "48", "--seed", "1", "--samples-per-shard", "12"])
    shard(["shapes", *common, "--split", "val7", "--count", "7", "--seed", "2", "--samples-per-shard", "3"])
    shard(["shapes", *common, "--split", "val7b", "--count", "7", "--seed", "2", "--samples-per-shard", "4"])
    return root


TINY_RECIPE = """
[data]
root = "{root}"
train_split = "train"
val_split = "val7"
batch_size = 4
num_workers = 0
crop = [32, 32]
shuffle_buffer = 8

[model]
arch = "Unet"
encoder = "resnet18"
encoder_weights = "null"
classes = 4
decoder_channels = [32, 16, 16, 8, 8]

[optim]
lr = 0.002

[schedule]
name = "poly"
warmup_steps = 1

[train]
steps = 4
precision = "fp32"
eval_every = 2
ckpt_every = 2
run_dir = "{run_dir}"
seed = 3

[eval]
batch_size = 2
num_workers = 0

[log]
every = 1
images = 2
"""


@pytest.fixture
def tiny_recipe(shapes_root, tmp_path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_RECIPE.format(root=shapes_root, run_dir=tmp_path / "run"))
    return path


@pytest.fixture(scope="session")
def trained_run(shapes_root, tmp_path_factory) -> tuple[Path, Path]:
    """(recipe, run folder) of a finished 1-process run of 4 steps."""
    tmp = tmp_path_factory.mktemp("trained")
    recipe = tmp / "tiny.toml"
    recipe.write_text(TINY_RECIPE.format(root=shapes_root, run_dir=tmp / "run"))
    result = launch("train.py", [str(recipe)])
    assert result.returncode == 0, result.stderr[-3000:]
    return recipe, tmp / "run"
