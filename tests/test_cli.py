"""The command lines: console scripts, `launch/*.py` shims, and `-m segdist.cli.<name>`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TINY_RECIPE
from segdist.distributed import free_port

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

NAMES = ["train", "eval", "predict", "shard", "bench", "export"]


def test_every_command_is_a_console_script_of_its_cli_module():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {f"segdist-{name}": f"segdist.cli.{name}:run" for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_the_launch_script_is_a_short_shim_without_a_path_hack(name):
    text = (ROOT / "launch" / f"{name}.py").read_text()
    assert len(text.splitlines()) <= 20 and "sys.path" not in text
    assert f"from segdist.cli.{name} import run" in text


@pytest.mark.slow  # one process per command, each importing the package (~2 s apiece)
@pytest.mark.parametrize("name", NAMES)
def test_help_from_the_console_script(name):
    script = Path(sys.executable).parent / f"segdist-{name}"
    # installed by `pip install -e .` (make venv); else the module, as `python -m` runs it
    argv = [str(script), "--help"] if script.exists() else [sys.executable, "-m", f"segdist.cli.{name}", "--help"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.startswith("usage: "), result.stderr[-2000:]


@pytest.mark.slow
def test_accelerate_launch_of_the_module_trains_with_two_processes(shapes_root, tmp_path):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY_RECIPE.format(root=shapes_root, run_dir=tmp_path / "run"))
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), "-m", "segdist.cli.train", str(recipe), "--set", "train.steps=2"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world size 2" in result.stderr and (tmp_path / "run" / "checkpoints" / "step-2").is_dir()
