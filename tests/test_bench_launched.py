import pytest

from segdist.bench.launched import run_per_world_size
from segdist.errors import UserError


def test_world_sizes_must_be_positive(tmp_path):
    with pytest.raises(UserError, match="world sizes must be >= 1"):
        run_per_world_size("step", [], [1, 0], 1, tmp_path)


def test_a_failing_launch_names_the_bench_and_its_last_line(tmp_path):
    with pytest.raises(RuntimeError, match=r"bench eval with 1 process\(es\) failed \(exit 2\): error: .*--crop"):
        run_per_world_size("eval", ["--crop", "0"], [1], 1, tmp_path)
