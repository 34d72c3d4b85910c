"""Real launches of launch/train.py: 2 processes forming one gloo group, TensorBoard tags,
atomic checkpoints, and resume at the right step."""

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import launch
from segdist.checkpoint import latest_checkpoint


def tags(run: Path) -> dict:
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc.Tags()


@pytest.mark.slow
def test_two_processes_train_evaluate_checkpoint_and_log(tiny_recipe, tmp_path):
    result = launch("train.py", [str(tiny_recipe), "--set", "train.steps=4"], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stderr + result.stdout
    assert "world size 2, effective batch 8" in log
    assert "final val mIoU" in result.stdout and "(2 processes)" in result.stdout
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "step-2", "step-4"]
    assert {p.name for p in (run / "checkpoints" / "step-4").iterdir()} >= {"rng-0.pt", "rng-1.pt", "COMPLETE"}
    found = tags(run)
    for tag in ("train/loss", "train/lr", "val/mIoU", "perf/samples_per_s", "val/IoU/background",
                "val/IoU/circle", "val/IoU/square", "val/IoU/triangle"):
        assert tag in found["scalars"], tag
    assert "val/sample_0" in found["images"] and "val/sample_1" in found["images"]
    assert (run / "recipe.toml").is_file() and (run / "metrics" / "step-4.json").is_file()


@pytest.mark.slow
def test_resume_continues_at_the_right_step(tiny_recipe, tmp_path):
    first = launch("train.py", [str(tiny_recipe), "--set", "train.steps=4", "--set", "train.eval_every=0"])
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "run"
    assert json.loads((latest_checkpoint(run) / "state.json").read_text())["step"] == 4
    # Without --resume a run folder with checkpoints is refused: nothing gets overwritten.
    again = launch("train.py", [str(tiny_recipe), "--set", "train.steps=6"])
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = launch("train.py", [str(tiny_recipe), "--set", "train.steps=6", "--set", "train.eval_every=0",
                                  "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "at step 4" in resumed.stderr
    state = json.loads((latest_checkpoint(run) / "state.json").read_text())
    assert state["step"] == 6
    steps = [e.step for e in _scalars(run, "train/lr")]
    assert steps == [1, 2, 3, 4, 5, 6]


def _scalars(run, tag):
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return acc.Scalars(tag)


def test_resume_without_checkpoint_exits_2(tiny_recipe):
    result = launch("train.py", [str(tiny_recipe), "--resume"])
    assert result.returncode == 2 and "no complete checkpoint" in result.stderr


def test_classes_mismatch_exits_2(tiny_recipe):
    result = launch("train.py", [str(tiny_recipe), "--set", "model.classes=7"])
    assert result.returncode == 2 and "model.classes" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
