"""Shared fixtures: small shapes splits written by the real converter, a tiny recipe, and a
helper that launches real processes (`python` for one, `accelerate launch` for several)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from segdist.distributed import free_port, launch_command as launch_command_argv  # noqa: F401 (free_port: tests import it here)

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def leave_worker(accelerator) -> None:
    """The end of a spawned test rank that formed a gloo group, as segdist's command lines leave
    one (segdist.errors.run_cli): through the interpreter's teardown instead, such a worker aborted
    now and then (SIGABRT, "terminate called without an active exception"; 6 of 30 runs of a
    2-rank worker, and once in a `make test` of 498 tests)."""
    from segdist.errors import leave

    accelerator.end_training()
    leave(0)


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Each test starts without an AcceleratorState: one a test made in this process (a bench run
    in-process, say) would fix the mixed precision for every later test, and "auto" differs by
    machine (bf16 on a CPU with AMX, fp32 on others)."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def one_thread(monkeypatch):
    """torch on one thread, as in the launched runs (OMP_NUM_THREADS=1, which the trainer keeps): in
    process, with two threads on this 2-core machine and a load of about 3 from other processes, an
    in-process training test took 8.3, 12.5 and 19.0 s against 6.2, 7.0 and 5.3 s (runs alternated).
    Processes forked from this one (accelerate's debug_launcher) inherit it."""
    import torch

    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def launch_command(script: str, args: list[str], nproc: int = 1, env: dict | None = None) -> tuple[list[str], dict]:
    """(argv, environment) that run launch/<script> with `nproc` real processes."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return launch_command_argv(str(ROOT / "launch" / script), args, nproc), full_env


def launch(script: str, args: list[str], nproc: int = 1, timeout: int = 600, env: dict | None = None):
    """Run launch/<script> with `nproc` real processes; returns the CompletedProcess."""
    cmd, full_env = launch_command(script, args, nproc, env)
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


# The recipe of the exact-resume, kill -9 and SLURM tests: a 0.4M-parameter encoder (fast steps,
# 4 MB checkpoints), dropout in the FPN decoder (so a wrongly restored RNG shows), a DataLoader
# worker, and evaluations in between (each draws from the RNG). Steps and evaluations are fixed:
# every test that interrupts it compares its final weights with one uninterrupted run.
EXACT_RECIPE = """
[data]
root = "{root}"
train_split = "train"
val_split = "val7"
batch_size = 4
num_workers = 1
crop = [32, 32]
shuffle_buffer = 8

[model]
arch = "FPN"
encoder = "tu-mobilenetv3_small_050"
encoder_weights = "null"
classes = 4

[optim]
lr = 0.002

[schedule]
name = "poly"
warmup_steps = 1

[train]
steps = 40
precision = "fp32"
eval_every = 20
ckpt_every = 5
run_dir = "{run_dir}"
seed = 3

[eval]
batch_size = 2
num_workers = 0

[log]
every = 5
images = 1
"""


def write_exact_recipe(shapes_root: Path, folder: Path) -> Path:
    """EXACT_RECIPE in `folder`, its run folder `folder/run`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "exact.toml"
    path.write_text(EXACT_RECIPE.format(root=shapes_root, run_dir=folder / "run"))
    return path


def final_weights(run: Path, steps: int = 40) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoints" / f"step-{steps}" / "model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"


# A model without BatchNorm and no dropout: the same global batches on another layout train the same
# weights, up to float summation order (assert_close_weights).
GROUP_NORM = ["model.arch=unet", "model.encoder=null", "model.decoder_channels=null",
              'model.arch_args={width = 8, depth = 2, norm = "group"}', "schedule.name=constant",
              "optim.name=sgd", "optim.lr=0.05",
              "train.eval_every=0", "train.ckpt_every=5", "log.images=0", "data.num_workers=0"]


def assert_close_weights(a: dict, b: dict, rtol: float = 1e-5) -> None:
    """Every tensor agrees to `rtol` relative, as ||a - b|| / ||b|| (a weight near 0 may differ by more than
    1e-5 of itself: float summation order moves every weight by about 1e-7 absolute). Another data order
    moves them by about 1e-2."""
    assert a.keys() == b.keys()
    worst, name = max(((a[k].double() - b[k].double()).norm() / b[k].double().norm().clamp_min(1e-12), k) for k in a
                      if a[k].is_floating_point())
    print(f"largest relative difference of a tensor: {float(worst):.2e} ({name})")
    assert worst < rtol, name


@pytest.fixture(scope="session")
def reference_weights(shapes_root, tmp_path_factory):
    """`reference_weights(nproc)`: final weights of EXACT_RECIPE trained without interruption by
    `nproc` processes (trained once per session, on first use)."""
    cache: dict[int, dict] = {}

    def get(nproc: int) -> dict:
        if nproc not in cache:
            recipe = write_exact_recipe(shapes_root, tmp_path_factory.mktemp(f"reference{nproc}"))
            result = launch("train.py", [str(recipe)], nproc=nproc)
            assert result.returncode == 0, result.stderr[-3000:]
            cache[nproc] = final_weights(recipe.parent / "run")
        return cache[nproc]

    return get


class Running:
    """A launch started in the background; its output goes to files (a full pipe would block it)."""

    def __init__(self, script: str, args: list[str], nproc: int, folder: Path, env: dict | None = None) -> None:
        cmd, full_env = launch_command(script, args, nproc, env)
        folder.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = folder / "stdout.txt", folder / "stderr.txt"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=out, stderr=err, start_new_session=True)

    def wait_for(self, *paths: Path, timeout: float = 300) -> Path:
        """Until one of `paths` exists (returned); fails if the launch ends first or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while True:
            for path in paths:
                if path.exists():
                    return path
            assert self.proc.poll() is None, f"ended ({self.proc.returncode}) before {paths[0]} appeared:\n{self.err[-3000:]}"
            assert time.monotonic() < deadline, f"no {paths[0]} after {timeout}s"
            time.sleep(0.01)

    def rank_pids(self, world: int = 2, timeout: float = 30) -> dict[int, int]:
        """RANK -> pid of the training processes (the launcher's children), once all are there."""
        deadline = time.monotonic() + timeout
        while True:
            children = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
            ranks = {}
            for pid in map(int, children.split()):
                try:
                    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue  # gone meanwhile
                rank = [e for e in env if e.startswith(b"RANK=")]
                if rank:
                    ranks[int(rank[0][5:])] = pid
            if len(ranks) == world:
                return ranks
            assert time.monotonic() < deadline and self.proc.poll() is None, f"ranks found: {ranks}\n{self.err[-2000:]}"
            time.sleep(0.05)

    def finish(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    @property
    def out(self) -> str:
        return self.out_path.read_text()

    @property
    def err(self) -> str:
        return self.err_path.read_text()


def write_split(root, samples, per_shard=4, split="s"):
    """Shards of 8x8 samples; `samples` lists keys, "bad*" keys get image bytes that do not decode."""
    import numpy as np

    from segdist.data.shards import ShardWriter, encode_png

    w = ShardWriter(root, split, dataset="t", classes=["a", "b", "c", "d"], palette=[[0, 0, 0]] * 4,
                    samples_per_shard=per_shard)
    for i, key in enumerate(samples):
        image = encode_png(np.full((8, 8, 3), i * 5 % 256, np.uint8))
        mask = np.full((8, 8), i % 4, np.uint8)
        w.write(key, b"not an image" if key.startswith("bad") else image, "png", mask)
    return w.close()
