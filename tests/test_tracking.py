"""segdist.tracking, for real: a training run logging to an MLflow server this module starts on
127.0.0.1 (metrics, images, text and the recipe read back through its REST API; a resume continues
the same MLflow run), W&B in offline mode (the run's .wandb file read back), a tracker that does not
start (one line from two ranks, no run folder) and a server that dies mid-run (one warning, the run
completes, TensorBoard has every step)."""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import Running, free_port, launch
from segdist.recipe import TRACKERS, recipe_from_dict
from segdist.tracking import IDS_FILE, Tracking, mlflow_key

MLFLOW = ["--set", 'log.trackers=["tensorboard", "mlflow"]']


class MlflowServer:
    """`mlflow server` on a free port of 127.0.0.1 with a SQLite store in `folder`; `url` (re)starts
    it, so a test that stopped it leaves a working one to the next."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.proc, self.port = folder, None, free_port()

    @property
    def url(self) -> str:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.folder / "server.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
             "--artifacts-destination", str(self.folder / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not come up: {(self.folder / 'server.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def get(self, endpoint: str, **params) -> dict:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/2.0/mlflow/{endpoint}?{query}", timeout=30) as r:
            return json.loads(r.read())

    def post(self, endpoint: str, body: dict) -> dict:
        request = urllib.request.Request(f"{self.url}/api/2.0/mlflow/{endpoint}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as r:
            return json.loads(r.read())

    def runs(self, experiment: str) -> list[dict]:
        exp = self.get("experiments/get-by-name", experiment_name=experiment)["experiment"]
        return self.post("runs/search", {"experiment_ids": [exp["experiment_id"]]}).get("runs", [])

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        metrics = self.get("metrics/get-history", run_id=run_id, metric_key=key).get("metrics", [])
        return sorted((m["step"], m["value"]) for m in metrics)

    def artifacts(self, run_id: str, path: str) -> list[str]:
        return [f["path"] for f in self.get("artifacts/list", run_id=run_id, path=path).get("files", [])]

    def artifact(self, run_id: str, path: str) -> str:
        """A run's artifact file, as the server serves it."""
        query = urllib.parse.urlencode({"run_id": run_id, "path": path})
        with urllib.request.urlopen(f"{self.url}/get-artifact?{query}", timeout=30) as r:
            return r.read().decode()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()


def tb_steps(run: Path, tag: str) -> list[int]:
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return [e.step for e in events.Scalars(tag)]


def test_log_trackers_are_accelerates():
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    assert set(TRACKERS) == set(LOGGER_TYPE_TO_CLASS)


def test_a_class_name_becomes_a_metric_name_mlflow_takes():
    from mlflow.utils.validation import _validate_metric_name

    key = mlflow_key("val/IoU/person (rider); other")
    assert key == "val/IoU/person _rider__ other"
    _validate_metric_name(key)


@pytest.mark.slow
def test_mlflow_gets_what_tensorboard_gets_and_a_resume_continues_its_run(tiny_recipe, tmp_path, mlflow_server):
    env = {"MLFLOW_TRACKING_URI": mlflow_server.url}
    project = ["--set", "log.project=resume"]
    first = launch("train.py", [str(tiny_recipe), *MLFLOW, *project], env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "run"
    [run] = mlflow_server.runs("resume")
    run_id = run["info"]["run_id"]
    assert run["info"]["run_name"] == "run" and run["info"]["status"] == "FINISHED"
    assert json.loads((run_dir / IDS_FILE).read_text()) == {"mlflow": run_id}
    assert [s for s, _ in mlflow_server.history(run_id, "train/loss")] == [1, 2, 3, 4]
    for step in (2, 4):  # every evaluation, the values of its metrics.json
        metrics = json.loads((run_dir / "metrics" / f"step-{step}" / "metrics.json").read_text())
        assert (step, metrics["miou"]) in mlflow_server.history(run_id, "val/mIoU")
        for name, iou in zip(["background", "circle", "square", "triangle"], metrics["per_class_iou"]):
            if iou is not None:
                assert (step, iou) in mlflow_server.history(run_id, f"val/IoU/{name}")
    # The recipe as parameters.
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["train.seed"] == "3" and params["log.trackers"] == '["tensorboard", "mlflow"]'
    assert params["train.steps"] == "4" and params["model.encoder_weights"] == "null"
    # Strips and figures as step-indexed images; the per-class table as a Markdown file per evaluation.
    images = " ".join(mlflow_server.artifacts(run_id, "images"))
    for tag in ("val~sample_0", "val~sample_1", "val~confusion", "val~per_class_iou"):
        assert f"{tag}+step+2+" in images and f"{tag}+step+4+" in images, tag
    assert mlflow_server.artifacts(run_id, "text/val/per_class") == ["text/val/per_class/step-2.md",
                                                                      "text/val/per_class/step-4.md"]
    table = (run_dir / "metrics" / "step-4" / "per_class.md").read_text()
    assert mlflow_server.artifact(run_id, "text/val/per_class/step-4.md") == table
    assert mlflow_server.artifacts(run_id, "text/run/precision") == ["text/run/precision/step-0.md"]
    # TensorBoard keeps every tag.
    assert tb_steps(run_dir, "train/loss") == [1, 2, 3, 4] and tb_steps(run_dir, "val/IoU/circle") == [2, 4]

    resumed = launch("train.py", [str(tiny_recipe), *MLFLOW, *project, "--set", "train.steps=6", "--resume"], env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    [run] = mlflow_server.runs("resume")  # the same run, continued
    assert run["info"]["run_id"] == run_id
    assert [s for s, _ in mlflow_server.history(run_id, "train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in mlflow_server.history(run_id, "val/mIoU")] == [2, 4, 6]
    assert {p["key"]: p["value"] for p in run["data"]["params"]}["train.steps"] == "4"  # logged when it started
    assert tb_steps(run_dir, "train/loss") == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_a_tracker_that_does_not_start_is_one_line_from_two_ranks_and_no_run_folder(tiny_recipe, tmp_path):
    """A server that answers HTTP but is no MLflow server: reachable at the check, refused at start."""
    (tmp_path / "www").mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0),
                                 lambda *a: SimpleHTTPRequestHandler(*a, directory=str(tmp_path / "www")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{server.server_port}", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
        result = launch("train.py", [str(tiny_recipe), *MLFLOW, "--set", "data.batch_size=2"], nproc=2, env=env)
    finally:
        server.shutdown()
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode != 0 and len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith("error: log.trackers: mlflow did not start (") and "docs/trackers.md" in errors[0]
    assert "Traceback" not in result.stderr.split("error: ")[0]  # neither rank failed before the error
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_wandb_offline_gets_what_tensorboard_gets_and_a_resume_continues_its_run(tmp_path, monkeypatch):
    from accelerate import Accelerator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    recipe = recipe_from_dict({"train": {"run_dir": str(tmp_path / "run"), "steps": 9},
                               "log": {"trackers": ["tensorboard", "wandb"], "project": "offline"}})
    accelerator = Accelerator(cpu=True)
    tracking = Tracking.open(recipe, accelerator, step=0, resumed=False)
    tracking.text("run/precision", "fp32: no native bf16", 0)
    tracking.scalar("train/loss", 0.5, 1)
    tracking.scalar("train/lr", 0.01, 1)
    tracking.scalar("val/IoU/circle", None, 1)  # a class with no union: nothing
    tracking.scalar("train/loss", 0.25, 2)
    mask = np.ones((4, 5), np.uint8)
    tracking.strip("val/sample_0", np.zeros((4, 5, 3), np.uint8), mask, mask, [[0, 0, 0], [9, 9, 9]], 255, 2)
    tracking.image("val/confusion", np.zeros((6, 7, 3), np.uint8), 2)
    tracking.text("val/per_class", "| class | IoU |", 2)
    tracking.flush()
    tracking.close()

    [first] = sorted((tmp_path / "wandb").glob("offline-run-*"))
    run_id = first.name.rsplit("-", 1)[1]
    assert json.loads((tmp_path / "run" / IDS_FILE).read_text()) == {"wandb": run_id}
    history, config = wandb_history(first)
    assert history[1]["train/loss"] == 0.5 and history[1]["train/lr"] == 0.01 and "val/IoU/circle" not in history[1]
    assert history[0]["run/precision"] == "fp32: no native bf16" and history[2]["val/per_class"] == "| class | IoU |"
    assert history[2]["train/loss"] == 0.25
    assert history[2]["val/sample_0"]["_type"] == "images/separated"
    [sample] = [first / "files" / f for f in history[2]["val/sample_0"]["filenames"]]
    from PIL import Image

    assert Image.open(sample).size == (3 * 320 + 2 * 4, 256)  # the strip TensorBoard gets
    assert history[2]["val/confusion"]["width"] == 7
    assert config["train.steps"] == 9 and config["log.project"] == "offline" and config["model.encoder_weights"] == "null"
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert {"val/sample_0", "val/confusion"} <= set(events.Tags()["images"])
    assert "_hparams_/experiment" in events.PluginTagToContent("hparams")

    # --resume: the same W&B run goes on (a second offline folder of the same id); no second config.
    resumed = Tracking.open(recipe, accelerator, step=2, resumed=True)
    resumed.scalar("train/loss", 0.125, 3)
    resumed.close()
    second = [p for p in (tmp_path / "wandb").glob("offline-run-*") if p != first]
    assert [p.name.rsplit("-", 1)[1] for p in second] == [run_id]
    history, config = wandb_history(second[0])
    assert history[3]["train/loss"] == 0.125 and config == {}


def wandb_history(run: Path, timeout: float = 60) -> tuple[dict[int, dict], dict]:
    """({step: logged values}, config) of an offline W&B run, from its run-<id>.wandb file, once it
    holds the run's exit record (wandb's service process may still be writing it when finish returns)."""
    deadline = time.monotonic() + timeout
    while True:
        records = wandb_records(next(run.glob("run-*.wandb")))
        if records and records[-1].HasField("exit") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    history: dict[int, dict] = {}
    config: dict = {}
    for record in records:
        if record.HasField("history"):
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            history[items["_step"]] = _nest(items)
        elif record.HasField("config"):
            config.update({i.key: json.loads(i.value_json) for i in record.config.update if i.key != "_wandb"})
    return history, config


def wandb_records(path: Path) -> list:
    """W&B's own Record messages in a .wandb file: LevelDB's log framing (32 KiB blocks of [crc32c,
    length, type] chunks) after a 7-byte ":W&B" header; a record cut short at the end is left out."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records = []
    pos, block, chunk = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):
            break
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST ends a record
            records.append(pb.Record.FromString(chunk))
            chunk = b""
    return records


def _nest(items: dict) -> dict:
    """W&B's flattened media keys (val/sample_0/_type, ...) under their tag (val/sample_0)."""
    out: dict = {}
    for key, value in items.items():
        head, _, field = key.rpartition("/")
        if field in ("_type", "filenames", "width", "height", "format", "count"):
            out.setdefault(head, {})[field] = value
        else:
            out[key] = value
    return out


@pytest.mark.slow
def test_a_server_that_dies_mid_run_is_one_warning_and_training_completes(tiny_recipe, tmp_path, mlflow_server):
    run_dir = tmp_path / "run"
    env = {"MLFLOW_TRACKING_URI": mlflow_server.url, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    job = Running("train.py", [str(tiny_recipe), *MLFLOW, "--set", "log.project=dies", "--set", "train.steps=12",
                               "--set", "train.eval_every=6", "--set", "train.ckpt_every=2"], 1, tmp_path / "job", env=env)
    job.wait_for(run_dir / "checkpoints" / "step-2" / "COMPLETE")
    # Freeze the trainer while its server goes: it cannot finish before, whatever the machine's load.
    job.proc.send_signal(signal.SIGSTOP)
    mlflow_server.stop()
    job.proc.send_signal(signal.SIGCONT)
    assert job.finish(300) == 0, job.err[-3000:]
    warnings = [line for line in job.err.splitlines() if "log.trackers: mlflow failed" in line]
    assert len(warnings) == 1, job.err[-3000:]
    assert re.search(r"WARNING log.trackers: mlflow failed (at step \d+|at the end of the run) \(.+\): nothing more "
                     r"goes to it; training goes on, TensorBoard and the run folder have every log", warnings[0])
    assert "final val mIoU" in job.out
    assert tb_steps(run_dir, "train/loss") == list(range(1, 13)) and tb_steps(run_dir, "val/mIoU") == [6, 12]
