import subprocess

import pytest

from segdist.bench.launched import child_failure, run_per_world_size
from segdist.distributed import launch_command
from segdist.errors import UserError


def test_world_sizes_must_be_positive(tmp_path):
    with pytest.raises(UserError, match="world sizes must be >= 1"):
        run_per_world_size("step", [], [1, 0], 1, tmp_path)


def test_a_failing_launch_names_the_bench_and_its_last_line(tmp_path):
    with pytest.raises(RuntimeError, match=r"bench eval with 1 process\(es\) failed \(exit 2\): error: .*--crop"):
        run_per_world_size("eval", ["--crop", "0"], [1], 1, tmp_path)


def test_a_failed_rank_is_named_above_the_launchers_banner(tmp_path):
    # a real 2-process launch where rank 1 raises: accelerate's ChildFailedError summary ends stderr
    script = tmp_path / "fails.py"
    script.write_text("import os\nif os.environ['RANK'] == '1':\n    raise ValueError('rank 1 found no shard')\n")
    done = subprocess.run(launch_command(str(script), [], 2), capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and done.stderr.strip().splitlines()[-1].strip("= ") == ""
    error = child_failure("bench step with 2 process(es)", done)
    first, *context = str(error).splitlines()
    assert first == f"bench step with 2 process(es) failed (exit {done.returncode}): ValueError: rank 1 found no shard"
    assert context == [line.rstrip() for line in done.stderr.strip().splitlines()[-15:]]
