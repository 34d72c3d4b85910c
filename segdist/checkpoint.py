"""Atomic checkpoints: `<run>/checkpoints/step-<N>/`, complete only with its COMPLETE marker.

All ranks write into a temporary folder (rank 0 the shared files, each rank its RNG state), a
barrier waits for every rank, then rank 0 writes the marker (which lists every file's size) and
renames the folder into place with `os.replace`. A crash at any point leaves either the previous
checkpoint or a temporary folder that resume never reads (docs/design-notes.md: `save_state` alone is not
atomic). Everything loads with `weights_only=True` or from safetensors: no pickle execution.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from segdist.errors import UserError
from segdist.fileio import atomic_write_json, atomic_write_text, fsync_path

log = logging.getLogger("segdist")

MARKER = "COMPLETE"
STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": _numpy_state(), "python": _python_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]


def _python_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, torch.tensor(internal, dtype=torch.int64), gauss]


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(v) for v in internal.tolist()), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_rng(seed: int, position: int, rank: int) -> None:
    """Seed torch (every device), numpy and Python from (seed, position, rank): the RNG a rank
    resumes with when the checkpoint's ranks do not correspond to this run's (another world size)."""
    value = int(np.random.SeedSequence([seed, position, rank]).generate_state(1, np.uint64)[0] >> 1)
    torch.manual_seed(value)
    np.random.seed(value % (1 << 32))
    random.seed(value)


def piece_file(name: str) -> str:
    """The file of a registered piece: the weights as safetensors, the trainer's counters as JSON,
    anything else (optimizer, scheduler, ema, scaler, ...) as `<name>.pt` of its state_dict."""
    return {"model": "model.safetensors", "trainer": "state.json"}.get(name, f"{name}.pt")


def save_checkpoint(accelerator, run_dir: str | Path, name: str, pieces: dict, recipe_toml: str) -> Path:
    """Write checkpoint `name` atomically from the trainer's registry `pieces` (name -> object with
    `state_dict`; "model" is the prepared model, "trainer" the TrainState); every rank must call
    this (it holds two barriers)."""
    root = checkpoints_dir(run_dir)
    tmp = root / f".tmp-{name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for piece, obj in pieces.items():
            target = tmp / piece_file(piece)
            if piece == "model":
                weights = accelerator.unwrap_model(obj).state_dict()
                save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(target))
            elif piece == "trainer":
                atomic_write_json(target, obj.state_dict())
            else:  # tensors and numbers only: they load back with weights_only=True
                torch.save(obj.state_dict(), target)
        atomic_write_text(tmp / "recipe.toml", recipe_toml)
    torch.save(rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    # Every rank's files are on disk before the marker says so.
    accelerator.wait_for_everyone()
    final = root / name
    if accelerator.is_main_process:
        sizes = {}
        for p in sorted(tmp.iterdir()):
            fsync_path(p)  # the marker must not outlive its files in a power cut, only in a kill
            sizes[p.name] = p.stat().st_size
        atomic_write_json(tmp / MARKER, {"name": name, "files": sizes})
        _swap_into_place(tmp, final)
        fsync_path(root)
    accelerator.wait_for_everyone()
    return final


def _swap_into_place(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`, replacing an existing folder without a moment where neither is complete."""
    if final.exists():
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def publish_copy(src: Path, name: str) -> Path:
    """Make `<checkpoints>/<name>` a complete copy of checkpoint `src` (hard links where possible)."""
    tmp = src.parent / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for f in src.iterdir():
        try:
            os.link(f, tmp / f.name)
        except OSError:
            shutil.copy2(f, tmp / f.name)
    final = src.parent / name
    _swap_into_place(tmp, final)
    return final


def is_complete(path: Path) -> bool:
    """A marker is there and every file it lists has the size it recorded."""
    marker = path / MARKER
    try:
        files = json.loads(marker.read_text())["files"]
        return all((path / n).stat().st_size == s for n, s in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def step_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Every `step-N` folder as (N, path), highest N first, complete or not."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name))), reverse=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete `step-N` with the highest N; incomplete ones are skipped with a warning."""
    for _, path in step_checkpoints(run_dir):
        if is_complete(path):
            return path
        log.warning("skipping incomplete checkpoint %s (no marker or a truncated file)", path)
    return None


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete `step-N` (0 = all) and `best`; remove older ones,
    incomplete ones older than the newest complete, and leftovers of interrupted saves.

    Main process only, and only right after a save completed (no save is in progress then).
    A folder is renamed to a dot-name before it is deleted, so a kill mid-delete never leaves a
    half-deleted `step-N` behind.
    """
    root = checkpoints_dir(run_dir)
    doomed = [p for p in root.glob(".*") if p.name.startswith((".tmp-", ".old-", ".del-"))]
    complete = 0
    for _, path in step_checkpoints(run_dir):
        if is_complete(path):
            complete += 1
            if keep_last and complete > keep_last:
                doomed.append(path)
        elif complete:
            doomed.append(path)  # an interrupted save older than a complete checkpoint: garbage
    for path in doomed:
        if path.name.startswith("."):
            shutil.rmtree(path, ignore_errors=True)
            continue
        trash = path.with_name(f".del-{path.name}")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)


def resolve_checkpoint(path: str | Path, best: bool = True) -> Path:
    """A checkpoint folder, or a run folder: its `best` (unless `best` is False: a new run starting
    from it wants where the run got to), else its latest complete step."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist: give a run folder or a checkpoints/step-N folder")
    if path.is_file():
        raise UserError(f"checkpoint {path} is a file: give a checkpoint folder (a run's checkpoints/step-N) "
                        "or a run folder")
    if (path / MARKER).exists() or (path / "model.safetensors").exists():
        if not is_complete(path):
            raise UserError(f"checkpoint {path} is incomplete (no marker or a truncated file): use an earlier one")
        return path
    if best and is_complete(checkpoints_dir(path) / "best"):
        return checkpoints_dir(path) / "best"
    latest = latest_checkpoint(path)
    if latest is None:
        raise UserError(f"no complete checkpoint in {path}: train first, or give a checkpoint folder")
    return latest


def run_folder(path: Path) -> Path | None:
    """The run folder a checkpoint folder lies in (`<run>/checkpoints/<name>`), None for one kept elsewhere."""
    path = Path(path)
    return path.parent.parent if path.parent.name == "checkpoints" else None


def saved_state(path: Path) -> dict:
    """The trainer's counters checkpoint `path` saved (its state.json); {} where it has none or it does not read."""
    try:
        state = json.loads((Path(path) / piece_file("trainer")).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def saved_step(path: Path) -> int | None:
    """The training step checkpoint `path` was saved at (its state.json), None where it is not recorded."""
    step = saved_state(path).get("step")
    return step if isinstance(step, int) else None


FIT_FIX = "use the recipe it was trained with (it is saved beside it as recipe.toml)"
"""What to do about weights that do not fit the recipe's model, when the recipe should be the checkpoint's own."""


def load_weights(path: Path, model: torch.nn.Module, fix: str = FIT_FIX) -> None:
    """Load checkpoint `path`'s model.safetensors into `model` (strict); a file that does not fit is
    one UserError ending in `fix`."""
    try:
        state = load_file(str(path / "model.safetensors"))
    except (OSError, SafetensorError) as exc:
        raise _unreadable(path, exc) from None
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise UserError(
            f"checkpoint {path} does not fit this recipe's model ({first[1].strip() if len(first) > 1 else first[0]}); "
            f"{fix}"
        ) from None


def _unreadable(path: Path, exc: Exception) -> UserError:
    return UserError(f"checkpoint {path}: model.safetensors is not readable ({str(exc).strip().splitlines()[0]}); "
                     "re-copy the checkpoint or use an earlier one")


def weights_misfit(path: Path, expected: dict[str, tuple[int, ...]]) -> str | None:
    """What keeps checkpoint `path`'s weights from loading into a model whose state_dict has the
    shapes `expected` (as strictly as `load_weights` loads them), or None when they fit. Read from
    model.safetensors' header alone: no tensor is loaded."""
    try:
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (OSError, SafetensorError) as exc:
        raise _unreadable(path, exc) from None
    wrong = [k for k in expected if k in saved and saved[k] != tuple(expected[k])]
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    if wrong:
        first = f"its {wrong[0]} has shape {list(saved[wrong[0]])}, this model's {list(expected[wrong[0]])}"
    elif missing:
        first = f"it has no {missing[0]}"
    elif unexpected:
        first = f"this model has no {unexpected[0]}"
    else:
        return None
    found = wrong or missing or unexpected
    return first + (f", and {len(found) - 1} more like it" if len(found) > 1 else "")


MISSING = {
    "ema": "holds no EMA of the weights: the average restarts from them",
    "scaler": "holds no loss-scaler state (it was not trained in fp16): the scale starts afresh",
}
"""Pieces a checkpoint may lack (an earlier run without them): what starts afresh instead."""


def restore(path: Path, pieces: dict) -> None:
    """Load the registered `pieces` (name -> object) that the caller has built from checkpoint
    `path`, each from its file (`piece_file`). The RNG state is separate (`load_rng_state`): the
    caller restores it at the point where it was saved."""
    for piece, obj in pieces.items():
        target = path / piece_file(piece)
        if piece == "model":
            load_weights(path, obj)
        elif piece == "trainer":
            obj.load_state_dict(json.loads(target.read_text()))
        elif not target.exists() and piece in MISSING:
            log.warning("checkpoint %s %s", path, MISSING[piece])
            if hasattr(obj, "reset"):
                obj.reset()
        elif piece == "optimizer":
            try:
                obj.load_state_dict(torch.load(target, map_location="cpu", weights_only=True))
            except (ValueError, KeyError, RuntimeError) as exc:
                raise UserError(
                    f"checkpoint {path} holds an optimizer state that does not fit optim.name = "
                    f"{type(obj).__name__.lower()} ({str(exc).splitlines()[0]}); use the run's recipe.toml"
                ) from None
        else:
            obj.load_state_dict(torch.load(target, map_location="cpu", weights_only=True))


class Pieces(dict):
    """A run's checkpointed pieces, name -> object with `state_dict` / `load_state_dict`: the one
    registry that restores a resumed run and that `save_checkpoint` writes. `add` registers pieces as
    they come into being (None is no piece) and restores each from the checkpoint being resumed, if
    any; `prepared` puts in the accelerator's wrappers of pieces already there (they save through the
    wrapper; nothing is restored twice)."""

    def __init__(self, resume_from: Path | None) -> None:
        super().__init__()
        self.resume_from = resume_from

    def add(self, **pieces) -> None:
        new = {name: obj for name, obj in pieces.items() if obj is not None}
        if self.resume_from is not None:
            restore(self.resume_from, new)
        self.update(new)

    def prepared(self, **wrappers) -> None:
        unknown = set(wrappers) - set(self)
        if unknown:
            raise KeyError(f"no registered piece {sorted(unknown)} to wrap")
        self.update(wrappers)


def load_rng_state(path: Path, rank: int) -> dict | None:
    """This rank's saved RNG state (None when the checkpoint was written by fewer ranks)."""
    rng_file = path / f"rng-{rank}.pt"
    return torch.load(rng_file, map_location="cpu", weights_only=True) if rng_file.exists() else None
