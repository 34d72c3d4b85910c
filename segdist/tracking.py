"""Where a training run logs (`log.trackers`): segdist's own TensorBoard writer (segdist.tblog) and any
other of Accelerate's trackers (W&B, MLflow, Comet, Aim, ClearML, DVCLive, SwanLab, Trackio), on the
main process. `Tracking` is what the trainer logs to: every call goes to TensorBoard and to each
tracker that takes its kind (scalars to all; images and text where the tracker has them; the recipe
as hyperparameters when a run starts). docs/trackers.md says what goes where.

Accelerate's tracker classes are made here, not through `Accelerator(log_with=...)`:
- `accelerator.log` calls one tracker after the other and lets an exception through, so one dead
  server would end the run; and MLflow's client retries a refused request for minutes, holding the
  step up. Here each tracker's calls run in order on a thread of its own: the loop only queues them;
  the first call that fails is one warning, the tracker gets nothing more, and training goes on.
- TensorBoard stays our writer: its tags, and `purge_step` on resume (events a crashed run logged
  past its last checkpoint are dropped), which Accelerate's TensorBoardTracker does not take.
- Accelerate's trackers log through its logger, which needs the Accelerator made first: so they
  start once it exists (`Tracking.open`, in the Trainer), and whatever can be checked earlier is
  checked by `check_trackers` in segdist.train.setup.check_run, before anything is written.

A resumed run continues the same MLflow and W&B runs: their ids are kept in `<run_dir>/trackers.json`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import queue
import re
import threading
import urllib.error
import urllib.request
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from segdist.errors import UserError, one_line
from segdist.fileio import atomic_write_json
from segdist.recipe import LogConfig, Recipe
from segdist.tblog import TensorBoard

log = logging.getLogger("segdist")

IDS_FILE = "trackers.json"
"""In the run folder: the MLflow and W&B run ids a resumed run continues."""

IMAGES = ("wandb", "mlflow", "aim", "clearml", "swanlab")
"""Trackers that take images (strips and figures): those whose Accelerate class has log_images, and
MLflow through mlflow.log_image (step-indexed images)."""

TEXT = ("wandb", "mlflow", "comet_ml")
"""Trackers that take text: W&B and Comet in their log, MLflow as a Markdown artifact per step
(text/<tag>/step-<N>.md)."""

CLOSE_TIMEOUT = 120.0
"""Seconds the end of a run waits for a tracker to send what it still holds."""

PROBE_TIMEOUT = 10.0
"""Seconds a tracker's server has to answer at start."""


# -- before anything starts ------------------------------------------------------------------------

def check_trackers(cfg: LogConfig, is_main: bool) -> None:
    """On the main process (the one that logs), before anything is written: each tracker's package is
    installed, and a server the environment names answers (MLFLOW_TRACKING_URI for MLflow over
    http(s), WANDB_BASE_URL for W&B online), else one line naming the tracker and the fix."""
    if not is_main:
        return
    for name in cfg.trackers:
        if name == "tensorboard":
            continue
        if importlib.util.find_spec(name) is None:
            raise UserError(f"log.trackers: {name} is not installed: pip install 'segdist[{name}]'")
        server = server_of(name)
        if server is not None:
            url, variable = server
            why = unreachable(url)
            if why is not None:
                raise UserError(f"log.trackers: {name} cannot reach its server {url} ({variable}): {why}; "
                                f"start the server or fix {variable}")


def server_of(name: str) -> tuple[str, str] | None:
    """(URL, environment variable) of the server tracker `name` logs to, where the environment names one."""
    env = os.environ
    if name == "mlflow":
        uri = env.get("MLFLOW_TRACKING_URI", "")
        return (uri, "MLFLOW_TRACKING_URI") if uri.startswith(("http://", "https://")) else None
    if name == "wandb" and env.get("WANDB_BASE_URL") and env.get("WANDB_MODE", "online") not in (
            "offline", "disabled", "dryrun"):
        return env["WANDB_BASE_URL"], "WANDB_BASE_URL"
    return None


def unreachable(url: str, timeout: float = PROBE_TIMEOUT) -> str | None:
    """Why `url` gives no HTTP answer; None when it answers at all (an error status is an answer)."""
    try:
        urllib.request.urlopen(url, timeout=timeout).close()
    except urllib.error.HTTPError:
        return None
    except urllib.error.URLError as exc:
        return str(exc.reason)
    except (OSError, ValueError) as exc:
        return str(exc)
    return None


# -- the trackers ----------------------------------------------------------------------------------

class Tracker:
    """One of Accelerate's trackers on the main process, every call run in order on a thread of its
    own. The first call that fails (after start) is one warning; nothing more is sent to it."""

    def __init__(self, name: str, tensorboard: bool) -> None:
        self.name = name
        self.tracker = None
        self.failed = False
        self._tensorboard = tensorboard
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=f"tracker-{name}", daemon=True)
        self._thread.start()

    def start(self, project: str, run_name: str, run_id: str | None) -> None:
        """Make and start the tracker on its thread (MLflow keeps its active run per thread); raises
        what the start raised."""
        self._submit(None, self._make, project, run_name, run_id).result()

    def _make(self, project: str, run_name: str, run_id: str | None) -> None:
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        cls = LOGGER_TYPE_TO_CLASS[self.name]
        kwargs: dict = {}
        if self.name == "mlflow":
            kwargs = {"run_name": run_name, "run_id": run_id}
        elif self.name == "wandb":
            kwargs = {"name": run_name, **({"id": run_id, "resume": "allow"} if run_id else {})}
        # As Accelerator.init_trackers makes them; Aim's repository is the working folder.
        tracker = cls(project, ".", **kwargs) if cls.requires_logging_directory else cls(project, **kwargs)
        tracker.main_process_only = False  # made on the main process only: no PartialState check per call
        tracker.start()
        self.tracker = tracker

    @property
    def run_id(self) -> str | None:
        """The id a resumed run continues (MLflow, W&B); None for the others."""
        if self.name == "mlflow":
            return self.tracker.active_run.info.run_id
        if self.name == "wandb":
            return self.tracker.run.id
        return None

    def hparams(self, values: dict) -> None:
        self._submit("with the hyperparameters", self.tracker.store_init_configuration, values)

    def log(self, values: dict, step: int) -> None:
        if self.name == "mlflow":
            values = {mlflow_key(k): v for k, v in values.items()}
        self._submit(f"at step {step}", self.tracker.log, values, step=step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        if self.name not in IMAGES:
            return
        if self.name == "mlflow":
            import mlflow

            self._submit(f"at step {step}", mlflow.log_image, image, key=mlflow_key(tag), step=step)
        elif self.name in ("wandb", "swanlab"):  # a list of images per key
            self._submit(f"at step {step}", self.tracker.log_images, {tag: [image]}, step=step)
        else:  # aim, clearml: one image per key
            self._submit(f"at step {step}", self.tracker.log_images, {tag: image}, step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.name not in TEXT:
            return
        if self.name == "mlflow":
            import mlflow

            self._submit(f"at step {step}", mlflow.log_text, text, f"text/{mlflow_key(tag)}/step-{step}.md")
        else:
            self._submit(f"at step {step}", self.tracker.log, {tag: text}, step=step)

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Send what is queued, finish the tracker's run, end the thread (waiting `timeout` s at most)."""
        if self.tracker is not None:
            self._submit("at the end of the run", self.tracker.finish)
        self._calls.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("log.trackers: %s was still sending %.0f s after the run ended; what it held is lost",
                        self.name, timeout)

    def _submit(self, when: str | None, fn, *args, **kwargs) -> Future:
        """Queue `fn(*args, **kwargs)`; `when` names the call in the warning if it fails (None: the
        caller takes the exception from the Future)."""
        future: Future = Future()
        self._calls.put((future, when, fn, args, kwargs))
        return future

    def _serve(self) -> None:
        while True:
            item = self._calls.get()
            if item is None:
                return
            future, when, fn, args, kwargs = item
            if self.failed:
                future.cancel()
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except Exception as exc:  # noqa: BLE001 - any failure of a tracker is the tracker's
                self.failed = True
                future.set_exception(exc)
                if when is not None:
                    rest = "TensorBoard and the run folder have every log" if self._tensorboard else "the run folder has the metrics"
                    log.warning("log.trackers: %s failed %s (%s): nothing more goes to it; training goes on, %s",
                                self.name, when, brief(exc), rest)


def brief(exc: BaseException, limit: int = 300) -> str:
    """A tracker's exception in one line of at most about `limit` characters: its start and its end,
    where the cause usually is ("... Connection refused")."""
    text = one_line(exc)
    return text if len(text) <= limit else f"{text[:limit // 2]} ... {text[-limit // 2:]}"


def mlflow_key(tag: str) -> str:
    """`tag` as a name MLflow takes (letters, digits, _ - . space and /): a class name may hold others."""
    return re.sub(r"[^\w\-. /]", "_", tag)


def start_trackers(cfg: LogConfig, run_dir: Path, resumed: bool, accelerator) -> list[Tracker]:
    """Start the trackers of `cfg.trackers` but TensorBoard on the main process, continuing the runs
    of `<run_dir>/trackers.json` when `resumed`. Every rank learns the outcome (one broadcast, only
    when there are such trackers): a tracker that does not start is the same one-line error on every
    rank, before the run folder is made."""
    names = [n for n in cfg.trackers if n != "tensorboard"]
    if not names:
        return []
    started: list[Tracker] = []
    error = None
    if accelerator.is_main_process:
        ids = saved_ids(run_dir) if resumed else {}
        for name in names:
            tracker = Tracker(name, tensorboard="tensorboard" in cfg.trackers)
            try:
                tracker.start(cfg.project, run_dir.resolve().name, ids.get(name))
            except Exception as exc:  # noqa: BLE001 - whatever a tracker's start raises, the user fixes
                error = f"log.trackers: {name} did not start ({brief(exc)}): check its settings (docs/trackers.md)"
                tracker.close()  # nothing started: its thread just ends
                for other in started:
                    other.close()
                started = []
                break
            started.append(tracker)
    from accelerate.utils import broadcast_object_list

    error = broadcast_object_list([error])[0]
    if error is not None:
        agreed = UserError(error)
        agreed.alike_on_every_rank = True  # the main process alone says so (segdist.errors)
        raise agreed
    return started


def saved_ids(run_dir: Path) -> dict:
    """The tracker run ids a run folder keeps ({} without them)."""
    try:
        ids = json.loads((run_dir / IDS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return ids if isinstance(ids, dict) else {}


def hparams_of(recipe: Recipe) -> dict:
    """The resolved recipe as flat `section.key` hyperparameters: numbers, strings and booleans as they
    are, null as "null", lists and tables as JSON."""
    values = {}
    for section, table in dataclasses.asdict(recipe).items():
        for key, value in table.items():
            if value is None:
                value = "null"
            elif isinstance(value, (list, dict)):
                value = json.dumps(value)
            values[f"{section}.{key}"] = value
    return values


# -- what the trainer logs to ----------------------------------------------------------------------

class Tracking:
    """Every call goes to TensorBoard (when log.trackers names it) and to each other tracker that takes
    its kind. A step's scalars reach a tracker in one call, when the step changes or on `flush`."""

    def __init__(self, tb: TensorBoard, trackers: list[Tracker]) -> None:
        self.tb, self.trackers = tb, trackers
        self._pending: dict = {}
        self._pending_step: int | None = None

    @classmethod
    def open(cls, recipe: Recipe, accelerator, step: int, resumed: bool) -> Tracking:
        """The run's tracking from `step` on: the trackers first (one that does not start is an error
        before the run folder is made), then TensorBoard; the recipe as hyperparameters when a run
        starts (a resumed one has them)."""
        run_dir = Path(recipe.train.run_dir)
        trackers = start_trackers(recipe.log, run_dir, resumed, accelerator)
        main = accelerator.is_main_process
        ids = {t.name: t.run_id for t in trackers if t.run_id is not None}
        if main and ids:
            atomic_write_json(run_dir / IDS_FILE, ids)
        tb = TensorBoard(run_dir, main and "tensorboard" in recipe.log.trackers,
                         purge_step=step + 1 if step else None)
        tracking = cls(tb, trackers)
        if not resumed:
            tracking.hparams(hparams_of(recipe))
        return tracking

    def scalar(self, tag: str, value: float | None, step: int) -> None:
        if value is None:  # nothing to log (e.g. a class with no union)
            return
        self.tb.scalar(tag, value, step)
        if self.trackers:
            if step != self._pending_step:
                self._send()
            self._pending_step = step
            self._pending[tag] = float(value)

    def text(self, tag: str, text: str, step: int) -> None:
        self.tb.text(tag, text, step)
        self._send()
        for tracker in self.trackers:
            tracker.text(tag, text, step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """An HxWx3 uint8 image (a strip or a figure from segdist.report)."""
        self.tb.image(tag, image, step)
        self._send()
        for tracker in self.trackers:
            tracker.image(tag, image, step)

    def strip(self, tag: str, image: np.ndarray, truth: np.ndarray, pred: np.ndarray,
              palette: list[list[int]], ignore_index: int, step: int) -> None:
        """input | truth | prediction, each panel at least report.MIN_PANEL pixels high, drawn once."""
        if self.tb.writer is None and not any(t.name in IMAGES for t in self.trackers):
            return
        from segdist.report import strip

        self.image(tag, strip(image, truth, pred, palette, ignore_index), step)

    def hparams(self, values: dict) -> None:
        self.tb.hparams(values, metrics=("val/mIoU",))
        for tracker in self.trackers:
            tracker.hparams(values)

    def flush(self) -> None:
        self._send()
        self.tb.flush()

    def close(self) -> None:
        self._send()
        self.tb.close()
        for tracker in self.trackers:
            tracker.close()

    def _send(self) -> None:
        if self._pending:
            values, self._pending = self._pending, {}
            for tracker in self.trackers:
                tracker.log(values, self._pending_step)
