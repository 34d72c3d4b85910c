"""Benches that launch themselves once per world size (`--processes 1 2`): step and eval."""

from __future__ import annotations


def run_per_world_size(bench: str, child_args: list[str], processes: list[int], threads: int, tmp) -> list[dict]:
    """Launch `launch/bench.py BENCH CHILD_ARGS --result FILE` once per world size in `processes`
    (segdist.distributed.launch_command: `accelerate launch --multi_gpu` for several), `threads`
    torch threads each; returns each launch's JSON result, in order."""
    import json
    import os
    import subprocess
    from pathlib import Path

    from segdist.distributed import launch_command
    from segdist.errors import UserError

    if min(processes) < 1:
        raise UserError(f"--processes: world sizes must be >= 1, got {processes}")
    script = str(Path(__file__).resolve().parents[2] / "launch" / "bench.py")
    results = []
    for n in processes:
        result = Path(tmp) / f"{bench}-world{n}.json"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
        done = subprocess.run(launch_command(script, [bench, *child_args, "--result", str(result)], n), env=env,
                              capture_output=True, text=True)
        if done.returncode != 0 or not result.exists():
            tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"bench {bench} with {n} process(es) failed (exit {done.returncode}): {tail}")
        results.append(json.loads(result.read_text()))
    return results
