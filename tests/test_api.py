"""segdist.api: `segdist.train`, `segdist.evaluate` and `segdist.predict` are the package's modules
made callable, whatever was imported first. In process they return their results and raise a
UserError with the line the command prints. Two processes forked by Accelerate's debug_launcher
(the fork-based path of notebook_launcher) train the weights `launch/train.py` trains under
`accelerate launch`, bit for bit, each knowing its own rank; a user error in forked processes
reaches the caller of either launcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import segdist
from conftest import ROOT, assert_same_weights, final_weights, launch, write_exact_recipe
from segdist.errors import UserError
from segdist.recipe import load_recipe

FRESH_INTERPRETER = """
import inspect, sys
import segdist
assert "torch" not in sys.modules, "import segdist imported torch"
assert sorted(segdist.__all__) == ["__version__", "evaluate", "predict", "train"]
{first}
import segdist.train.trainer
from segdist.train.setup import check_run
from segdist.predict import load_predictor
from segdist import evaluate as evaluate_module, train as train_module
assert train_module is segdist.train is sys.modules["segdist.train"] and callable(segdist.train)
assert segdist.train.trainer is sys.modules["segdist.train.trainer"] and segdist.train.setup.check_run is check_run
assert segdist.evaluate is evaluate_module and callable(segdist.evaluate) and callable(segdist.evaluate.evaluate)
assert callable(segdist.predict) and segdist.predict.load_predictor is load_predictor
print(list(inspect.signature(segdist.train).parameters), list(inspect.signature(segdist.predict).parameters)[:2])
"""


@pytest.mark.parametrize("first", [
    "import segdist.train.setup; import segdist.evaluate; import segdist.predict.frame",  # the submodules first
    "segdist.train; segdist.evaluate; segdist.predict",  # the package's __getattr__ first
])
def test_the_names_are_the_modules_made_callable_whatever_was_imported_first(first):
    result = subprocess.run([sys.executable, "-c", FRESH_INTERPRETER.format(first=first)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[-2] == "['recipe', 'overrides', 'resume'] ['recipe', 'images']"


def test_bad_arguments_raise_a_user_error(tiny_recipe, tmp_path):
    with pytest.raises(UserError, match='resume must be False, True or "auto", got \'yes\''):
        segdist.train(tiny_recipe, resume="yes")
    with pytest.raises(UserError, match="overrides must be 'section.key=value' strings .*got int 3"):
        segdist.train(tiny_recipe, ["train.steps=2", 3])
    with pytest.raises(UserError, match="recipe must be the path of a .toml recipe or a segdist.recipe.Recipe, got dict"):
        segdist.evaluate({"train": {"steps": 2}}, checkpoint=tmp_path)
    with pytest.raises(UserError, match="unknown key train.stepz"):  # one string is one override
        segdist.predict(load_recipe(tiny_recipe), tmp_path, checkpoint=tmp_path, out=tmp_path / "out",
                        overrides="train.stepz=2")
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_user_error_raises_the_line_the_command_prints(tiny_recipe, tmp_path):
    """The same bad input through each command (exit 2, one `error:` line) and through Python
    (a UserError, not SystemExit), with nothing left behind by either."""
    image = tmp_path / "missing.png"
    cases = [
        ("train.py", [str(tiny_recipe), "--set", "data.batch_size=100"],
         lambda: segdist.train(tiny_recipe, ["data.batch_size=100"])),
        ("eval.py", [str(tiny_recipe), "--checkpoint", str(tmp_path / "nowhere")],
         lambda: segdist.evaluate(tiny_recipe, checkpoint=tmp_path / "nowhere")),
        ("predict.py", [str(tiny_recipe), str(image), "--checkpoint", str(tmp_path), "--out", str(tmp_path / "out")],
         lambda: segdist.predict(tiny_recipe, [image], checkpoint=tmp_path, out=tmp_path / "out")),
    ]
    for script, argv, call in cases:
        result = launch(script, argv)
        assert result.returncode == 2, result.stderr[-3000:]
        with pytest.raises(UserError) as raised:
            call()
        assert result.stderr.splitlines() == [f"error: {raised.value}"], script
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.toml"]


@pytest.mark.slow
def test_train_evaluate_and_predict_in_process_return_their_results(tiny_recipe, tmp_path, one_thread):
    quick = ["train.steps=2", "train.eval_every=0", "log.images=0"]
    run = tmp_path / "run"
    metrics = segdist.train(tiny_recipe, quick)
    assert metrics == json.loads((run / "metrics" / "step-2" / "metrics.json").read_text())
    resumed = segdist.train(load_recipe(tiny_recipe), [*quick, "train.steps=3"], resume=True)
    assert resumed["num_samples"] == 7 and (run / "metrics" / "step-3").is_dir()
    assert json.loads((run / "checkpoints" / "step-3" / "state.json").read_text())["step"] == 3
    # The checkpoint the run ranked best, evaluated again: the run's own metrics, and what --out holds.
    best = json.loads((run / "checkpoints" / "best" / "state.json").read_text())["step"]
    scores = segdist.evaluate(tiny_recipe, checkpoint=run, out=tmp_path / "scores.json")
    assert scores["checkpoint"] == str(run / "checkpoints" / "best")
    assert scores["confusion_matrix"] == json.loads((run / "metrics" / f"step-{best}" / "metrics.json").read_text())[
        "confusion_matrix"]
    assert scores == json.loads((tmp_path / "scores.json").read_text())
    # Another precision in the same interpreter: each call makes its own Accelerator.
    assert segdist.evaluate(tiny_recipe, checkpoint=run, overrides=["train.precision=bf16"])["num_samples"] == 7
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    written = segdist.predict(tiny_recipe, tmp_path / "x.png", checkpoint=run, out=tmp_path / "pred", formats="labels")
    assert written == [tmp_path / "pred" / "x.png"] and np.asarray(Image.open(written[0])).shape == (40, 36)


def train_and_record(recipe: str, folder: str, overrides: list[str]) -> None:
    """A debug_launcher process: train, then record what this process knew of its place."""
    import torch.distributed as dist

    from segdist.distributed import launch_context

    metrics = segdist.train(recipe, overrides)
    ctx = launch_context()
    Path(folder, f"rank-{dist.get_rank()}.json").write_text(json.dumps({
        "context": [ctx.rank, ctx.world, ctx.local_rank, ctx.local_world], "RANK": os.environ["RANK"],
        "miou": metrics["miou"]}))


@pytest.mark.slow
def test_two_forked_processes_train_the_weights_of_launch_train_py(shapes_root, tmp_path, reference_weights,
                                                                   one_thread):
    """debug_launcher forks two processes and joins them into a gloo group itself, telling them only
    WORLD_SIZE: each must still know its rank (Accelerate alone would make both rank 0), and together
    they must train what `accelerate launch --multi_gpu --num_processes 2 launch/train.py` trains."""
    recipe = write_exact_recipe(shapes_root, tmp_path)
    launch_forked("debug", str(recipe), str(tmp_path), [])
    assert_same_weights(final_weights(tmp_path / "run"), reference_weights(2))
    seen = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [s["context"] for s in seen] == [[0, 2, 0, 2], [1, 2, 1, 2]] and [s["RANK"] for s in seen] == ["0", "1"]
    assert seen[0]["miou"] == seen[1]["miou"]  # every process returns the run's metrics


def launch_forked(launcher: str, *args) -> None:
    """`train_and_record(*args)` in two processes forked by Accelerate's `debug_launcher` or by its
    `notebook_launcher` (the example of docs/python-api.md; torch's elastic agent, which sets its
    own handlers of SIGTERM, SIGINT, SIGHUP and SIGQUIT in this process and leaves them there)."""
    import signal

    from accelerate import debug_launcher, notebook_launcher

    from segdist.distributed import free_port

    if launcher == "debug":
        return debug_launcher(train_and_record, args, num_processes=2)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)}
    try:
        notebook_launcher(train_and_record, args, num_processes=2, use_port=str(free_port()))
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["debug", "notebook"])
def test_a_user_error_in_forked_processes_reaches_the_launchers_caller(launcher, tiny_recipe, tmp_path, one_thread):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.multiprocessing import ProcessRaisedException

    with pytest.raises(ProcessRaisedException if launcher == "debug" else ChildFailedError) as raised:
        launch_forked(launcher, str(tiny_recipe), str(tmp_path), ["data.batch_size=30"])
    # 30 fit the 48 samples on one process; the check counts both.
    assert "segdist.errors.UserError: data.batch_size = 30 on 2 processes exceeds the 48 samples" in str(raised.value)
    assert not (tmp_path / "run").exists()
