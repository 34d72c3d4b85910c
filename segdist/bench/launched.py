"""Benches that launch themselves once per world size (`--processes 1 2`): step and eval."""

from __future__ import annotations

import re

# a child's own last word: "error: ..." (a UserError) or "pkg.SomeError: ..." from its traceback;
# the launcher's ChildFailedError and its "=====" summary name no cause
_CAUSE = re.compile(r"^(error: .+|([\w.]+\.)?\w*(Error|Exception|Interrupt)\b(: .*)?)$")
_CONTEXT_LINES = 15


def child_failure(what: str, done) -> RuntimeError:
    """The error for a launched child that failed (`done`: its CompletedProcess, stderr captured):
    its own error line, which a launcher's banner would bury, then the last lines of its stderr."""
    lines = [line.rstrip() for line in (done.stderr or "").strip().splitlines()]
    causes = [line for line in lines if _CAUSE.match(line.strip()) and "ChildFailedError" not in line]
    cause = causes[-1].strip() if causes else next((l for l in reversed(lines) if l.strip("= ")), "(no output)")
    context = "\n".join(lines[-_CONTEXT_LINES:])
    return RuntimeError(f"{what} failed (exit {done.returncode}): {cause}" + (f"\n{context}" if context else ""))


def run_per_world_size(bench: str, child_args: list[str], processes: list[int], threads: int, tmp) -> list[dict]:
    """Launch `python -m segdist.cli.bench BENCH CHILD_ARGS --result FILE` once per world size in
    `processes` (segdist.distributed.launch_command: `accelerate launch --multi_gpu -m` for
    several), `threads` torch threads each; returns each launch's JSON result, in order."""
    import json
    import os
    import subprocess
    from pathlib import Path

    from segdist.distributed import launch_command
    from segdist.errors import UserError

    if min(processes) < 1:
        raise UserError(f"--processes: world sizes must be >= 1, got {processes}")
    results = []
    for n in processes:
        result = Path(tmp) / f"{bench}-world{n}.json"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
        argv = launch_command("segdist.cli.bench", [bench, *child_args, "--result", str(result)], n, module=True)
        done = subprocess.run(argv, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not result.exists():
            raise child_failure(f"bench {bench} with {n} process(es)", done)
        results.append(json.loads(result.read_text()))
    return results
