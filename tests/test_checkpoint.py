"""Checkpoint folders: completeness, latest, best, pruning, RNG round trips; and kill -9 of a
random rank at random moments (in a step or in a save), five times over, then an exact finish."""

import json
import os
import random
import signal
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import Running, assert_same_weights, final_weights, launch, write_exact_recipe
from segdist.checkpoint import (MARKER, STEP_DIR, is_complete, latest_checkpoint, prune_checkpoints, publish_copy,
                                resolve_checkpoint, rng_state, run_folder, saved_step, set_rng_state, step_checkpoints)
from segdist.errors import UserError


def fake_checkpoint(root, name, complete=True):
    path = root / "checkpoints" / name
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"x" * 100)
    if complete:
        (path / MARKER).write_text(json.dumps({"name": name, "files": {"model.safetensors": 100}}))
    return path


def test_latest_skips_incomplete_and_truncated(tmp_path):
    fake_checkpoint(tmp_path, "step-2")
    fake_checkpoint(tmp_path, "step-10", complete=False)
    truncated = fake_checkpoint(tmp_path, "step-6")
    (truncated / "model.safetensors").write_bytes(b"x" * 50)
    fake_checkpoint(tmp_path, ".tmp-step-12")
    assert latest_checkpoint(tmp_path).name == "step-2"


def test_resolve_prefers_best_then_latest(tmp_path):
    with pytest.raises(UserError):
        resolve_checkpoint(tmp_path)
    s4 = fake_checkpoint(tmp_path, "step-4")
    assert resolve_checkpoint(tmp_path) == s4
    publish_copy(s4, "best")
    assert resolve_checkpoint(tmp_path).name == "best" and is_complete(tmp_path / "checkpoints" / "best")
    publish_copy(s4, "best")  # replacing an existing best works
    assert resolve_checkpoint(s4) == s4
    s6 = fake_checkpoint(tmp_path, "step-6")
    assert resolve_checkpoint(tmp_path).name == "best" and resolve_checkpoint(tmp_path, best=False) == s6
    with pytest.raises(UserError, match="model.safetensors is a file: give a checkpoint folder"):
        resolve_checkpoint(s6 / "model.safetensors")


def test_a_checkpoint_knows_its_run_folder_and_step(tmp_path):
    path = fake_checkpoint(tmp_path, "best")
    assert run_folder(path) == tmp_path and saved_step(path) is None
    (path / "state.json").write_text(json.dumps({"step": 6, "best_miou": 0.5}))
    assert saved_step(path) == 6
    (tmp_path / "lone").mkdir()
    assert run_folder(tmp_path / "lone") is None


def test_weights_misfit_reads_the_shapes_a_strict_load_needs(tmp_path):
    from safetensors.torch import save_file

    from segdist.checkpoint import load_weights, weights_misfit

    def model(width):
        return torch.nn.Sequential(torch.nn.Conv2d(3, width, 3), torch.nn.BatchNorm2d(width))

    def shapes(m):
        return {k: tuple(v.shape) for k, v in m.state_dict().items()}

    save_file(model(4).state_dict(), str(tmp_path / "model.safetensors"))
    assert weights_misfit(tmp_path, shapes(model(4))) is None
    load_weights(tmp_path, model(4))  # what fits by the header loads
    wider = "its 0.weight has shape [4, 3, 3, 3], this model's [5, 3, 3, 3], and 5 more like it"
    assert weights_misfit(tmp_path, shapes(model(5))) == wider
    with pytest.raises(UserError, match="does not fit"):
        load_weights(tmp_path, model(5))
    nested = shapes(torch.nn.Sequential(model(4)))  # the same tensors under other names
    assert weights_misfit(tmp_path, nested) == "it has no 0.0.weight, and 6 more like it"
    assert weights_misfit(tmp_path, shapes(model(4)[:1])) == "this model has no 1.bias, and 4 more like it"
    (tmp_path / "model.safetensors").write_bytes(b"half a file")
    with pytest.raises(UserError, match="model.safetensors is not readable"):
        weights_misfit(tmp_path, shapes(model(4)))


def test_rng_state_round_trip_survives_weights_only(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def test_prune_keeps_the_newest_complete_and_best(tmp_path):
    for n in (2, 4, 6, 8):
        fake_checkpoint(tmp_path, f"step-{n}")
    fake_checkpoint(tmp_path, "step-3", complete=False)   # an interrupted save before step-8: garbage
    fake_checkpoint(tmp_path, "step-10", complete=False)  # a save in progress or to be redone: kept
    publish_copy(tmp_path / "checkpoints" / "step-4", "best")
    for leftover in (".tmp-step-9", ".old-best", ".del-step-1"):
        (tmp_path / "checkpoints" / leftover).mkdir()
    prune_checkpoints(tmp_path, keep_last=0)  # 0 keeps every complete one, removes only garbage
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "best", "step-10", "step-2", "step-4", "step-6", "step-8"]
    prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best", "step-10", "step-6", "step-8"]
    assert is_complete(tmp_path / "checkpoints" / "best")  # hard links outlive the pruned step-4


def _steps_seen(run) -> int:
    """The highest step whose checkpoint was being or had been written."""
    names = [p.name.removeprefix(".tmp-") for p in (run / "checkpoints").iterdir()]
    return max((int(m.group(1)) for n in names if (m := STEP_DIR.match(n))), default=0)


def _load_everything(path) -> int:
    """Read every file of a checkpoint the way resume does (no pickle code); return its step."""
    load_file(str(path / "model.safetensors"))
    for name in ("optimizer.pt", "scheduler.pt", "rng-0.pt", "rng-1.pt"):
        torch.load(path / name, map_location="cpu", weights_only=True)
    return json.loads((path / "state.json").read_text())["step"]


@pytest.mark.slow
def test_kill_9_of_a_random_rank_never_leaves_an_unreadable_latest(shapes_root, tmp_path, reference_weights):
    seed = int(os.environ.get("SEGDIST_KILL_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    recipe = write_exact_recipe(shapes_root, tmp_path)
    run = tmp_path / "run"
    # A checkpoint every step: a kill at a random moment often lands inside a save.
    args = [str(recipe), "--set", "train.ckpt_every=1", "--set", "train.keep_last=2"]
    start, exits = 0, []
    for attempt in range(5):
        resume = ["--resume"] if start else ["--resume", "auto"]
        job = Running("train.py", [*args, *resume], 2, tmp_path / f"attempt-{attempt}")
        # Near the save of a random coming step: at its start, or up to ~2 steps later (a step and
        # its save take ~0.1 s here), so that five kills stay well within the 40 steps.
        target = start + rng.randint(1, 3)
        ckpts = run / "checkpoints"
        job.wait_for(ckpts / f".tmp-step-{target}", ckpts / f"step-{target}")
        time.sleep(rng.uniform(0.0, 0.2))
        rank = rng.randint(0, 1)
        pid = job.rank_pids()[rank]
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        code = job.finish(timeout=90)  # the launcher must notice and end, not hang
        in_save = any(p.name.startswith(".tmp-step-") for p in (run / "checkpoints").iterdir())
        exits.append((rank, round(time.monotonic() - killed_at, 1), "in a save" if in_save else "in a step"))
        why = f"seed {seed}, attempt {attempt}, rank {rank} killed near step {target}: {exits}"
        assert code != 0, why
        seen, latest = _steps_seen(run), latest_checkpoint(run)
        step = _load_everything(latest) if latest is not None else 0
        assert step >= seen - 1, f"{why}: latest complete step-{step}, a save of step {seen} was under way"
        # keep_last = 2, plus one when the kill fell between a save and its prune (pruning waits
        # for the new checkpoint to be complete); the next run's first save prunes it.
        complete = [p for _, p in step_checkpoints(run) if is_complete(p)]
        assert len(complete) <= 3, f"{why}: train.keep_last = 2 but {[p.name for p in complete]}"
        assert step >= start, why
        start = step
    print(f"kill -9 seed {seed}: (rank, seconds until the launcher exited, where) {exits}")
    final = launch("train.py", [*args, "--resume"], nproc=2)
    assert final.returncode == 0, final.stderr[-3000:]
    # Five kills later the weights are those of the uninterrupted run, bit for bit.
    assert_same_weights(final_weights(run), reference_weights(2))


def test_one_registry_restores_each_piece_as_it_comes_and_saves_them_all(tmp_path):
    """`Pieces`: what a run saves is what a resume restores, each piece when it comes into being (the
    GradScaler only once the accelerator made it); wrapped pieces are not restored a second time."""
    from accelerate import Accelerator

    from segdist.checkpoint import Pieces, save_checkpoint
    from segdist.train.state import TrainState

    def pieces_of_a_run():
        model = torch.nn.Linear(3, 2)
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), TrainState()

    torch.manual_seed(0)
    model, optimizer, state = pieces_of_a_run()
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state.step = 7
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    pieces = Pieces(None)
    pieces.add(model=model, optimizer=optimizer, trainer=state, ema=None)  # None is no piece
    pieces.add(scaler=scaler)
    assert list(pieces) == ["model", "optimizer", "trainer", "scaler"]
    path = save_checkpoint(Accelerator(cpu=True), tmp_path, "step-7", pieces, "")

    torch.manual_seed(1)
    model2, optimizer2, state2 = pieces_of_a_run()
    resumed = Pieces(path)
    resumed.add(model=model2, optimizer=optimizer2, trainer=state2)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    assert state2.step == 7
    assert torch.equal(optimizer2.state_dict()["state"][0]["momentum_buffer"],
                       optimizer.state_dict()["state"][0]["momentum_buffer"])

    class Wrapper(torch.nn.Module):  # as a prepared model: saved through, never loaded into again
        def load_state_dict(self, *args, **kwargs):
            raise AssertionError("a wrapped piece was restored twice")

    resumed.prepared(model=Wrapper())
    scaler2 = torch.amp.GradScaler("cpu", init_scale=1.0)
    resumed.add(scaler=scaler2)
    assert scaler2.get_scale() == 1024.0
    with pytest.raises(KeyError, match="ema"):
        resumed.prepared(ema=model2)
