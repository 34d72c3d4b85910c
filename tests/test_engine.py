"""Real launches of launch/train.py: 2 processes forming one gloo group, TensorBoard tags,
atomic checkpoints, resume at the right step; a stop signal mid-run, then a resume (past a broken
checkpoint) that ends bit-identical to an uninterrupted run, with 1 and 2 processes; NaN steps."""

import json
import os
import re
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import Running, assert_same_weights, final_weights, launch, write_exact_recipe
from segdist.checkpoint import is_complete, latest_checkpoint


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


@pytest.mark.slow
def test_sigterm_then_resume_past_a_broken_checkpoint_is_bit_identical(shapes_root, tmp_path, reference_weights):
    recipe = write_exact_recipe(shapes_root, tmp_path)
    run = tmp_path / "run"
    job = Running("train.py", [str(recipe)], 1, tmp_path / "first")
    job.wait_for(run / "checkpoints" / "step-10" / "COMPLETE")
    job.proc.send_signal(signal.SIGTERM)
    assert job.finish(120) == 0, job.err[-3000:]
    stopped = int(re.search(r"stopped after step (\d+) of 40 on SIGTERM", job.out).group(1))
    assert 10 <= stopped < 40 and latest_checkpoint(run).name == f"step-{stopped}"
    # Break the stop checkpoint (a file loses its tail) and leave a newer save without its marker:
    # resume must skip both, with a warning each, and take the checkpoint before.
    optimizer = run / "checkpoints" / f"step-{stopped}" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:-100])
    unfinished = run / "checkpoints" / f"step-{stopped + 3}"
    unfinished.mkdir()
    (unfinished / "model.safetensors").write_bytes(b"half a file")
    previous = (stopped - 1) // 5 * 5
    resumed = launch("train.py", [str(recipe), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for broken in (f"step-{stopped}", f"step-{stopped + 3}"):
        assert re.search(f"skipping incomplete checkpoint .*{broken} ", resumed.stderr), broken
    assert f"resumed from {run / 'checkpoints' / f'step-{previous}'} at step {previous}" in resumed.stderr
    assert_same_weights(final_weights(run), reference_weights(1))
    # The TensorBoard step resumes too: every logged step once, in order.
    assert [e.step for e in _scalars(run, "train/lr")] == list(range(5, 41, 5))


@pytest.mark.slow
def test_sigusr1_to_one_rank_stops_both_and_resume_is_bit_identical(shapes_root, tmp_path, reference_weights):
    recipe = write_exact_recipe(shapes_root, tmp_path)
    run = tmp_path / "run"
    keep = ["--set", "train.keep_last=2"]
    job = Running("train.py", [str(recipe), "--resume", "auto", *keep], 2, tmp_path / "first")
    job.wait_for(run / "checkpoints" / "step-10" / "COMPLETE")
    # Only rank 1 hears it; rank 0 (which prints) stops at the same step through the all-reduce.
    os.kill(job.rank_pids()[1], signal.SIGUSR1)
    assert job.finish(120) == 0, job.err[-3000:]
    match = re.search(r"stopped after step (\d+) of 40 on another rank's signal", job.out)
    assert match, job.out[-2000:] + job.err[-2000:]
    stopped = int(match.group(1))
    state = json.loads((latest_checkpoint(run) / "state.json").read_text())
    assert state["step"] == stopped and state["world_size"] == 2
    resumed = launch("train.py", [str(recipe), "--resume", "auto", *keep], nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {stopped}" in resumed.stderr
    assert_same_weights(final_weights(run), reference_weights(2))
    # train.keep_last = 2: the two newest step checkpoints, plus best.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "step-35", "step-40"]


@pytest.mark.slow
def test_non_finite_steps_are_skipped_then_the_run_stops_with_exit_3(shapes_root, tmp_path):
    recipe = write_exact_recipe(shapes_root, tmp_path)
    run = tmp_path / "run"
    result = launch("train.py", [str(recipe), "--set", "optim.lr=1e30", "--set", "train.max_bad_steps=3",
                                 "--set", "log.every=1", "--set", "train.eval_every=0"])
    assert result.returncode == 3, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "training diverged" in errors[0] and "optim.lr" in errors[0], result.stderr[-2000:]
    # lr 1e30: step 1 is finite (and ruins the weights), steps 2-4 are not, and were not applied.
    assert "steps 2-4" in errors[0] and "weights of step 1" in errors[0]
    ckpt = run / "checkpoints" / "step-4"
    assert is_complete(ckpt) and json.loads((ckpt / "state.json").read_text())["bad_steps"] == 3
    weights = load_file(str(ckpt / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert [(e.step, e.value) for e in _scalars(run, "train/bad_steps")] == [(1, 0), (2, 1), (3, 2), (4, 3)]
