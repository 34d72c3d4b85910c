"""slurm/*.sbatch on a real SLURM cluster on this machine (slurm/local-cluster.sh: slurmctld and two
nodes n1, n2 sharing its cores). One node x 2 processes trains EXACT_RECIPE to completion; 2 nodes x
1 process, warned of the time limit mid-run (`scancel --signal=USR1 --batch`: what
`--signal=B:USR1@120` sends), checkpoint on both nodes, requeue and finish; one node, warned and then
requeued by SLURM itself (SIGTERM to every process, as preemption does), finishes too. Each ends
bit-identical to a plain 2-process run. A job of `--nodes=1-2` that started on both nodes and is
requeued while one is drained resumes on the other alone, with the same global batches: it ends at
the weights of an uninterrupted 2-process run, up to float summation order. The session brings the cluster up and takes it down; it is
skipped only where SLURM cannot be installed (not root, no apt-get). Every wait is bounded.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import GROUP_NORM, ROOT, assert_close_weights, assert_same_weights, final_weights, launch, write_exact_recipe

pytestmark = pytest.mark.slow
CLUSTER = ROOT / "slurm" / "local-cluster.sh"
LOGS = Path("/var/lib/segdist-slurm/log")  # the daemons' logs (slurm/README.md)


class Slurm:
    def __init__(self) -> None:
        self.jobs: list[str] = []

    def submit(self, script: str, args: list, options: list[str], folder: Path) -> str:
        # sbatch passes this environment on; OMP_NUM_THREADS is the scripts' to choose.
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        env.update(SEGDIST_PYTHON=sys.executable, HF_HUB_OFFLINE="1")
        result = subprocess.run(
            ["sbatch", "--parsable", "-o", str(folder / "slurm-%j.out"), *options, str(ROOT / "slurm" / script),
             *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 0, result.stderr
        job = result.stdout.strip().split(";")[0]
        self.jobs.append(job)
        return job

    @staticmethod
    def show(job: str) -> dict[str, str]:
        out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job: str, states: set[str], timeout: float, log: Path | None = None) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.show(job)
            if info.get("JobState") in states:
                return info
            ended = info.get("JobState") in {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
            if ended or time.monotonic() > deadline:
                tail = log.read_text()[-4000:] if log is not None and log.exists() else ""
                daemons = "".join(
                    f"--- {f.name}\n" + "".join(line for line in f.read_text(errors="replace").splitlines(True)[-400:]
                                                if re.search(f"(JobId=|[Jj]ob ){job}\\b|StepId={job}\\.", line))
                    for f in sorted(LOGS.glob("*.log")))
                pytest.fail(f"job {job} is {info.get('JobState')} ({info.get('Reason')}), waited for {states}:\n"
                            f"{tail}\n{daemons}")
            time.sleep(0.25)

    def start_now(self, job: str, restart: int, timeout: float = 120) -> None:
        """A requeued job waits about 2 minutes (BeginTime); a test need not. Started too early,
        slurmd refuses the launch ("Job N already killed") and the job FAILS: seen when the start
        came in the same second as the kill of the previous run (slurmd revokes a killed job's
        credentials with a whole-second timestamp). So wait for slurmctld's "Requeuing JobId=N" of
        this restart (the previous run is over), then for the clock to pass the next second."""
        deadline = time.monotonic() + timeout
        while (LOGS / "slurmctld.log").read_text(errors="replace").count(f"Requeuing JobId={job}\n") < restart:
            assert time.monotonic() < deadline, f"slurmctld did not requeue job {job} within {timeout}s"
            time.sleep(0.2)
        time.sleep(1.5)
        subprocess.run(["scontrol", "update", f"jobid={job}", "starttime=now"], check=True, timeout=30)


@pytest.fixture(scope="session")
def slurm():
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("the local SLURM cluster needs root and apt-get to install and start slurm-wlm (slurm/README.md)")
    # One cluster per machine: a second test session's `up` would restart it under the first one's
    # jobs (seen on a shared developer machine). Sessions take turns, each waiting at most 15 min.
    LOGS.parent.mkdir(parents=True, exist_ok=True)
    with open(LOGS.parent / "test-session.lock", "w") as lock:
        deadline = time.monotonic() + 900
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, "another test session has held the local SLURM cluster for 15 min"
                time.sleep(1)
        up = subprocess.run([str(CLUSTER), "up"], capture_output=True, text=True, timeout=1200)
        assert up.returncode == 0, up.stderr[-3000:]
        cluster = Slurm()
        yield cluster
        if cluster.jobs:
            subprocess.run(["scancel", *cluster.jobs], capture_output=True, timeout=60)
        down = subprocess.run([str(CLUSTER), "down"], capture_output=True, text=True, timeout=300)
        assert down.returncode == 0, down.stderr[-3000:]


def wait_for_checkpoint(run: Path, past: int, slurm: Slurm, job: str, log: Path, timeout: float = 300) -> int:
    """The step of the first complete checkpoint after step `past`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [int(p.parent.name[5:]) for p in (run / "checkpoints").glob("step-*/COMPLETE")]
        if any(s > past for s in steps):
            return min(s for s in steps if s > past)
        assert slurm.show(job).get("JobState") in {"PENDING", "RUNNING"}, log.read_text()[-4000:]
        time.sleep(0.1)
    pytest.fail(f"no checkpoint past step {past} after {timeout}s:\n{log.read_text()[-4000:]}")


def test_one_node_two_processes_trains_to_completion(slurm, shapes_root, tmp_path, reference_weights):
    recipe = write_exact_recipe(shapes_root, tmp_path)
    run = tmp_path / "run"
    job = slurm.submit("train.sbatch", [recipe], ["--cpus-per-task=2"], tmp_path)
    log = run / "logs" / f"slurm-{job}.log"
    info = slurm.wait(job, {"COMPLETED"}, timeout=400, log=log)
    assert info["ExitCode"] == "0:0"
    text = log.read_text()
    assert "2 processes (0 GPUs), 1 threads each" in text and "world size 2" in text, text[-3000:]
    assert "final val mIoU" in text
    assert f"logs to {log}" in (tmp_path / f"slurm-{job}.out").read_text()
    assert_same_weights(final_weights(run), reference_weights(2))


def test_two_nodes_one_process_each_warned_requeued_and_trained_to_completion(slurm, shapes_root, tmp_path,
                                                                             reference_weights):
    recipe = write_exact_recipe(shapes_root, tmp_path)
    run = tmp_path / "run"
    job = slurm.submit("train_multinode.sbatch", [recipe], ["-N2", "--cpus-per-task=1"], tmp_path)
    log = run / "logs" / f"slurm-{job}.log"
    wait_for_checkpoint(run, 0, slurm, job, log)
    # The time-limit warning reaches the batch script on the first node only; it must reach the
    # training processes of both nodes (srun --label prefixes each line with the node's task).
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
    slurm.wait(job, {"PENDING"}, timeout=120, log=log)
    text = log.read_text()
    stop = int(re.search(r"stopped after step (\d+) of 40 on SIGUSR1", text).group(1))
    for node in (0, 1):
        assert f"{node}: " in text and re.search(f"{node}: .* stopping after step {stop} on SIGUSR1", text), text[-3000:]
    slurm.start_now(job, 1)
    info = slurm.wait(job, {"COMPLETED"}, timeout=400, log=log)
    assert info["ExitCode"] == "0:0" and info["NodeList"] == "n[1-2]" and info["Restarts"] == "1"
    text = log.read_text()
    assert f"2 nodes x 1 processes (0 GPUs each), rendezvous n1:{20000 + int(job) % 20000}" in text, text[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'step-{stop}'} at step {stop}" in text and "world size 2" in text
    # Two machines of one process each compute what one machine with two processes does.
    assert_same_weights(final_weights(run), reference_weights(2))


def test_time_limit_warning_and_preemption_requeue_and_resume_exactly(slurm, shapes_root, tmp_path,
                                                                      reference_weights):
    recipe = write_exact_recipe(shapes_root, tmp_path)
    run = tmp_path / "run"
    job = slurm.submit("train.sbatch", [recipe], ["--cpus-per-task=2"], tmp_path)
    log = run / "logs" / f"slurm-{job}.log"

    # 1. The time-limit warning: SIGUSR1 to the batch script, which passes it on and requeues.
    first = wait_for_checkpoint(run, 0, slurm, job, log)
    signalled = time.monotonic()
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
    slurm.wait(job, {"PENDING"}, timeout=120, log=log)
    requeued_in = time.monotonic() - signalled
    text = log.read_text()
    stop1 = int(re.search(r"stopped after step (\d+) of 40 on SIGUSR1", text).group(1))
    assert stop1 >= first and f"requeueing job {job}" in text, text[-3000:]
    slurm.start_now(job, 1)

    # 2. SLURM's own requeue, as preemption does: SIGTERM to every process of the job.
    slurm.wait(job, {"RUNNING"}, timeout=120, log=log)
    wait_for_checkpoint(run, stop1, slurm, job, log)
    signalled = time.monotonic()
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=30)
    slurm.wait(job, {"PENDING"}, timeout=120, log=log)
    requeued_in = max(requeued_in, time.monotonic() - signalled)
    slurm.start_now(job, 2)

    info = slurm.wait(job, {"COMPLETED"}, timeout=400, log=log)
    text = log.read_text()
    stops = [int(s) for s in re.findall(r"stopped after step (\d+) of 40", text)]
    assert info["Restarts"] == "2" and len(stops) == 2 and stops[1] > stop1, text[-4000:]
    for step in stops:
        assert f"resumed from {run / 'checkpoints' / f'step-{step}'} at step {step}" in text
    assert "final val mIoU" in text
    print(f"signal to PENDING (requeued) in at most {requeued_in:.1f}s")
    assert_same_weights(final_weights(run), reference_weights(2))


def test_a_job_requeued_onto_fewer_nodes_continues_with_the_same_global_batches(slurm, shapes_root, tmp_path):
    """2 nodes x 1 process, then 1 node x 1 process with twice the accumulation: G = 8 throughout."""
    recipe = write_exact_recipe(shapes_root, tmp_path)
    run = tmp_path / "run"
    sets = [a for o in (*GROUP_NORM, "train.global_batch=8", "train.grad_accum=auto", "train.steps=20")
            for a in ("--set", o)]
    job = slurm.submit("train_multinode.sbatch", [recipe, *sets], ["--nodes=1-2", "--cpus-per-task=1"], tmp_path)
    log = run / "logs" / f"slurm-{job}.log"
    try:
        wait_for_checkpoint(run, 0, slurm, job, log)
        assert slurm.show(job)["NodeList"] == "n[1-2]"
        # n2 leaves (drained, as for maintenance); the time-limit warning requeues the job.
        subprocess.run(["scontrol", "update", "nodename=n2", "state=drain", "reason=segdist-test"], check=True,
                       timeout=30)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
        slurm.wait(job, {"PENDING"}, timeout=120, log=log)
        stop = int(re.search(r"stopped after step (\d+) of 20 on SIGUSR1", log.read_text()).group(1))
        slurm.start_now(job, 1)
        info = slurm.wait(job, {"COMPLETED"}, timeout=400, log=log)
    finally:
        # (an error where n2 was never drained: the test failed before)
        subprocess.run(["scontrol", "update", "nodename=n2", "state=resume"], capture_output=True, timeout=30)
    assert info["ExitCode"] == "0:0" and info["NodeList"] == "n1" and info["Restarts"] == "1"
    text = log.read_text()
    assert "2 nodes x 1 processes" in text and "1 nodes x 1 processes" in text, text[-3000:]
    assert f"at step {stop} (sample {8 * stop} of the run)" in text and "the same global batches continue" in text
    reference = tmp_path / "reference"
    result = launch("train.py", [str(recipe), *sets, "--set", f"train.run_dir={reference}"], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_close_weights(final_weights(reference, 20), final_weights(run, 20))
