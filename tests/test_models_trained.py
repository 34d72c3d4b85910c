"""`load_trained`: the one way eval and predict get a trained model back; every bad file is one line."""

import json
import shutil

import pytest
import torch

from segdist.checkpoint import MARKER, resolve_checkpoint
from segdist.errors import UserError
from segdist.models import load_trained
from segdist.recipe import load_recipe


@pytest.fixture
def checkpoint(trained_run, tmp_path):
    """(recipe, a copy of the run's checkpoint folder) to spoil."""
    recipe, run = trained_run
    copy = tmp_path / "step-4"
    shutil.copytree(resolve_checkpoint(run), copy)
    return load_recipe(recipe), copy


def remark(path):
    """Rewrite the completeness marker for the files as they are now (a file replaced, not truncated)."""
    files = {p.name: p.stat().st_size for p in path.iterdir() if p.name != MARKER}
    (path / MARKER).write_text(json.dumps({"files": files}))


def test_loads_the_weights_in_eval_mode_with_the_manifest(checkpoint):
    recipe, path = checkpoint
    model, info = load_trained(recipe, path)
    assert not model.training and info.checkpoint == path and not info.ema
    assert info.outputs == info.manifest.num_classes == 4
    from safetensors.torch import load_file

    saved = load_file(str(path / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_prefers_the_ema_copy(checkpoint):
    recipe, path = checkpoint
    model, _ = load_trained(recipe, path)
    averaged = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save({"module": averaged, "updates": 3}, path / "ema.pt")
    remark(path)
    model, info = load_trained(recipe, path)
    assert info.ema and all(torch.equal(averaged[k], v) for k, v in model.state_dict().items())


def test_without_the_data_folder_the_recipe_gives_the_outputs(checkpoint, tmp_path):
    recipe, path = checkpoint
    nowhere = load_recipe(recipe_path(recipe, tmp_path), [f"data.root={tmp_path / 'nowhere'}", "model.classes=4"])
    model, info = load_trained(nowhere, path)
    assert info.manifest is None and info.outputs == 4
    with pytest.raises(UserError, match='model.classes is "null"'):
        load_trained(load_recipe(recipe_path(recipe, tmp_path), [f"data.root={tmp_path / 'nowhere'}", "model.classes=null"]), path)


def recipe_path(recipe, tmp_path):
    from segdist.recipe import dumps_toml

    out = tmp_path / "recipe.toml"
    out.write_text(dumps_toml(recipe))
    return out


@pytest.mark.parametrize("spoil, needle", [
    (lambda p: (p / "ema.pt").write_bytes(b"not a torch file" * 64), "ema.pt is not a segdist EMA file"),
    (lambda p: torch.save({"weights": {}}, p / "ema.pt"), "ema.pt is not a segdist EMA file (KeyError"),
    (lambda p: torch.save({"module": {"conv.weight": torch.zeros(1)}}, p / "ema.pt"), "ema.pt does not fit"),
    (lambda p: (p / "model.safetensors").write_bytes(b"\0" * 4096), "model.safetensors is not readable"),
])
def test_a_bad_file_is_one_line_naming_it(checkpoint, spoil, needle):
    recipe, path = checkpoint
    spoil(path)
    remark(path)
    with pytest.raises(UserError) as err:
        load_trained(recipe, path)
    assert needle in str(err.value) and "\n" not in str(err.value)
