import json
import random

import numpy as np
import pytest
import torch

from segdist.checkpoint import (MARKER, is_complete, latest_checkpoint, publish_copy, resolve_checkpoint,
                                rng_state, set_rng_state)
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


def test_rng_state_round_trip_survives_weights_only(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]
