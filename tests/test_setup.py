"""segdist.train.setup's checks that need no process group: the accumulation a fixed global batch
resolves to, and the global batch and seed a resume must keep (the CLI cases are in test_bad_inputs.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from segdist.errors import UserError
from segdist.recipe import Recipe, recipe_from_dict
from segdist.train.setup import check_global_batch, check_resumable, resolve_accumulation


def recipe(batch: int, accum, global_batch=None) -> Recipe:
    train = {"grad_accum": accum, **({} if global_batch is None else {"global_batch": global_batch})}
    return recipe_from_dict({"data": {"batch_size": batch}, "train": train})


@pytest.mark.parametrize("world, batch, accum", [(1, 4, 16), (2, 4, 8), (4, 2, 8), (8, 8, 1), (16, 2, 2)])
def test_auto_accumulation_keeps_the_global_batch_on_any_process_count(world, batch, accum):
    resolved = resolve_accumulation(recipe(batch, "auto", 64), world)
    assert resolved.train.grad_accum == accum and resolved.train.global_batch == 64
    assert world * batch * resolved.train.grad_accum == 64


def test_a_global_batch_that_the_layout_cannot_give_is_one_line():
    with pytest.raises(UserError, match=r"train.global_batch = 64 is not divisible by 3 processes x data.batch_size 4"):
        resolve_accumulation(recipe(4, "auto", 64), 3)
    with pytest.raises(UserError, match=r'2 processes x data.batch_size 4 x train.grad_accum 2 = 16: set '
                                        r'train.grad_accum = "auto" \(it gives 8\)'):
        resolve_accumulation(recipe(4, 2, 64), 2)
    assert resolve_accumulation(recipe(4, 8, 64), 2).train.grad_accum == 8  # a number that gives G is fine
    plain = recipe(4, 3)
    assert resolve_accumulation(plain, 5) is plain  # no global batch: nothing to resolve
    with pytest.raises(UserError, match="train.grad_accum = \"auto\" derives the accumulation from train.global_batch"):
        recipe(4, "auto")
    with pytest.raises(UserError, match="train.grad_accum must be an integer or \"auto\", got str"):
        recipe(4, "three")


def test_a_resume_keeps_the_global_batch():
    saved = {"global_batch": 16, "world_size": 2, "batch_size": 4, "grad_accum": 2}
    check_global_batch(Path("ck"), saved, recipe(8, 2), 1)  # 1 x 8 x 2: the same G
    check_global_batch(Path("ck"), {"step": 3}, recipe(1, 1), 3)  # from before G was recorded: not checked
    with pytest.raises(UserError, match=r"global batch of 16 samples .* = 2 x 4 x 2\), this run has 4 x 4 x 2 = 32: "
                                        r"set data.batch_size = 2 to resume"):
        check_global_batch(Path("ck"), saved, recipe(4, 2), 4)
    with pytest.raises(UserError, match=r"16 is not divisible by 3 processes x train.grad_accum 2"):
        check_global_batch(Path("ck"), saved, recipe(4, 2), 3)


def test_a_resume_keeps_the_seed_its_state_records_without_a_recipe_beside_it(tmp_path):
    (tmp_path / "state.json").write_text(json.dumps({"step": 2, "seed": 3, "global_batch": 4, "world_size": 1,
                                                      "batch_size": 4, "grad_accum": 1}))
    same = recipe_from_dict({"data": {"batch_size": 4}, "train": {"seed": 3, "steps": 5}})
    assert check_resumable(tmp_path, same, 1) == 2  # no recipe.toml in the checkpoint
    other = recipe_from_dict({"data": {"batch_size": 4}, "train": {"seed": 4, "steps": 5}})
    with pytest.raises(UserError, match=r"was trained with train.seed = 3, this recipe has 4"):
        check_resumable(tmp_path, other, 1)
