"""A run's MLflow tracking from inside its job: params, metrics, tags, artifacts, resume, outages.

`RunTracker` is what the engine logs through. It is not the only module that talks to MLflow:
harness/lifecycle.py makes every change of a run's state (placeholders, resume, the ends, cancel,
requeue) through a client it is given by harness/launch/submit.py, harness/cancel.py,
harness/job.py, harness/runstate.py and the search (harness/search/driver.py, worker.py); the
launcher and the search also create their experiment, parent and trial runs, tag and find runs;
harness/status.py and harness/progress.py read runs; harness/store.py asks whether a store
answers (over HTTP or SQLite, before MLflow's client is made); analysis/collect.py,
figures.py and mlflow_report.py read finished runs and put a report on a launch's run.

It uses `mlflow.MlflowClient` with an explicit run id everywhere, never the fluent API's
global "active run", so that several runs in one process, child runs and a requeued job that
re-opens its own run id cannot step on each other.

Outages: a tracking server (or the database behind it) that stops answering does not stop
training. Metric points are buffered (at most `tracking.buffer_points`) and retried with
backoff, with one warning; other calls retry in place. An outage longer than
`tracking.outage_limit_s` raises `TrackingUnavailable`: the engine checkpoints, writes the
unsent points beside the checkpoint (UNSENT) and fails; the resumed job sends them first.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, unquote

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from harness.config import DataConfig, TrackingConfig, flatten
from harness.errors import EnvironmentProblem
from harness.files import PathLike
from harness.lifecycle import RunState, Tag, end_state, is_placeholder, replace_placeholder, terminate
from harness.lifecycle import start as mark_started

_REPO_ROOT = Path(__file__).resolve().parents[1]
_TRUNCATED = "...[truncated]"
UNSENT = "mlflow_unsent.jsonl"  # metric points an outage kept from MLflow, beside the checkpoint
# the UI's training view (runs table), not the GenAI overview (MLflow 3's `mlflow.experimentKind`)
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# what a server says when it, or the database behind it, fails: worth retrying; any other answer is a refusal
_SERVER_FAILURES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}
# a database that cannot be reached or is locked (SQLAlchemy's errors, by name: no import needed)
_DB_FAILURES = {"OperationalError", "DisconnectionError", "InterfaceError", "TimeoutError"}
T = TypeVar("T")


class TrackingUnavailable(EnvironmentProblem):
    """MLflow did not answer for longer than `tracking.outage_limit_s` (exit 1, resumable)."""


# How the server's database reports a row inserted twice (PostgreSQL, SQLite, MySQL).
_DUPLICATE_KEY = ("UniqueViolation", "UNIQUE constraint failed", "Duplicate entry")


def transient(error: BaseException) -> bool:
    """Whether an MLflow call may succeed later: the server or database did not answer, or failed.

    A request MLflow refused (bad value, deleted run) or a local mistake is not retried.
    """
    import requests
    from mlflow.exceptions import RestException

    if isinstance(error, RestException):  # the server answered
        return error.error_code in _SERVER_FAILURES
    seen: BaseException | None = error
    for _ in range(10):
        if seen is None:
            return False
        if isinstance(seen, (ConnectionError, TimeoutError, requests.RequestException)):
            return True
        if type(seen).__name__ in _DB_FAILURES or (
            isinstance(seen, MlflowException) and seen.message.startswith("API request to")
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def http_client_settings() -> None:
    """One HTTP attempt per call with a bounded wait, so that `RunTracker.call` (which knows the
    outage limit) decides, not MLflow's own retries (7, up to 120 s each: minutes per call).

    For a job's process (engine.run calls it): it sets environment variables, which the whole
    process sees. The user's own settings of these variables win.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


def resolve_tracking_uri(cfg: TrackingConfig) -> str:
    """cfg.uri, else $MLFLOW_TRACKING_URI, else an absolute `sqlite:///<cwd>/mlflow.db`.

    Absolute, so that jobs started from another working directory write to the same store.
    """
    from harness.store import resolve_uri

    return resolve_uri(cfg.uri)[0]


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=_REPO_ROOT, capture_output=True, text=True, check=True, timeout=10
    ).stdout.strip()


def git_commit() -> str | None:
    """The commit of this checkout, None outside git."""
    try:
        return _git("rev-parse", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return None


def code_version() -> str:
    """The git commit of this checkout (`+dirty` if it has local changes), else the package version."""
    commit = git_commit()
    if commit:
        try:
            return commit + ("+dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")
        except (OSError, subprocess.SubprocessError):
            return commit
    try:
        return metadata.version("dvit-harness")
    except metadata.PackageNotFoundError:
        return "unknown"


def source_tags(entry_point: str, source_type: str) -> dict[str, str]:
    """MLflow's standard source tags (the UI's Source column), beside our own `code_version`.

    `entry_point`: the file a user runs (harness/train.py, harness/launch.py); `source_type`:
    LOCAL for a run trained by hand, JOB for one a launch submitted.
    """
    tags = {"mlflow.source.name": entry_point, "mlflow.source.type": source_type, "code_version": code_version()}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def ui_base(uri: str) -> str:
    """Where the MLflow UI of a store is: the server itself, else a local `mlflow ui`'s default."""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"


# MLflow 3's UI opens an experiment in its GenAI mode (traces, "Training runs" under GenAI) whatever the
# experiment's kind tag says; this query parameter selects its "Model training" mode, where runs live.
_TRAINING_MODE = "workflowType=machine_learning"


def runs_table_url(uri: str, experiment_id: str) -> str:
    """The UI page of an experiment's runs table, in the UI's model-training mode."""
    return f"{ui_base(uri)}/#/experiments/{experiment_id}/runs?{_TRAINING_MODE}"


def compare_url(uri: str, experiment_id: str, run_ids: list[str]) -> str:
    """The UI's compare view of `run_ids` (its route takes JSON lists)."""
    runs, experiments = quote(json.dumps(run_ids)), quote(json.dumps([experiment_id]))
    return f"{ui_base(uri)}/#/compare-runs?runs={runs}&experiments={experiments}&{_TRAINING_MODE}"


def _clip(value: Any, limit: int) -> str:
    """Stringify for MLflow and keep within its length limit (a long list would fail the run)."""
    text = str(value)
    if len(text) > limit:
        text = text[: limit - len(_TRUNCATED)] + _TRUNCATED
    return text


def _sqlite_artifact_root(uri: str) -> str | None:
    """Artifacts beside the SQLite file, not in `./mlruns` of whatever the cwd happens to be."""
    if not uri.startswith("sqlite:///"):
        return None  # a server or database: its own default artifact root applies
    db = Path(unquote(uri[len("sqlite:///") :])).resolve()
    return (db.parent / "mlartifacts").as_uri()


def _get_or_create_experiment(client: MlflowClient, cfg: TrackingConfig, uri: str) -> str:
    """Experiment id by cfg.experiment_id or name; creation is race-safe across processes."""
    if cfg.experiment_id:
        return cfg.experiment_id
    error: MlflowException | None = None
    for _ in range(2):
        exp = client.get_experiment_by_name(cfg.experiment)
        if exp is not None:
            if exp.lifecycle_stage != "active":
                raise ValueError(
                    f"tracking.experiment: experiment is deleted in {uri} "
                    f"(restore it or pick another name), got {cfg.experiment!r}"
                )
            return exp.experiment_id
        try:
            return client.create_experiment(
                cfg.experiment, artifact_location=_sqlite_artifact_root(uri), tags=EXPERIMENT_KIND
            )
        except MlflowException as exc:
            error = exc  # most likely another process created it just now: look it up again
    raise RuntimeError(f"could not get or create experiment {cfg.experiment!r} in {uri}") from error


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """The id of experiment `name`, created if missing (the launcher does this once, before jobs).

    An experiment without a kind (created before, or by MLflow's UI) is marked a training one,
    so that the UI opens it on the runs table; a kind someone set is left alone.
    """
    client = MlflowClient(tracking_uri)
    experiment_id = _get_or_create_experiment(client, TrackingConfig(experiment=name), tracking_uri)
    if not client.get_experiment(experiment_id).tags.get("mlflow.experimentKind"):
        for key, value in EXPERIMENT_KIND.items():
            client.set_experiment_tag(experiment_id, key, value)
    return experiment_id


def dataset_inputs(data: DataConfig) -> list[Any]:
    """The run's data as MLflow dataset inputs (the UI's Datasets column): train and eval splits.

    The digest hashes the settings that decide the images (generated sets are made from them);
    the source is the folder for ImageNet, else the generator in harness/data.py.
    """
    from mlflow.entities import Dataset, DatasetInput, InputTag

    settings = data.model_dump(exclude={"num_workers"})
    inputs = []
    source: dict[str, Any]
    for split, context in (("train", "training"), ("val", "eval")):
        digest = hashlib.sha1(json.dumps({**settings, "split": split}, sort_keys=True, default=str).encode())
        if data.name == "imagenet" and data.root:
            kind, source = "local", {"uri": str(Path(data.root).resolve() / split)}
        else:
            kind, source = "code", {"tags": {"generator": f"harness/data.py:{data.name}", "split": split}}
        dataset = Dataset(
            name=f"{data.name}-{split}", digest=digest.hexdigest()[:8], source_type=kind, source=json.dumps(source)
        )
        inputs.append(DatasetInput(dataset, [InputTag("mlflow.data.context", context)]))
    return inputs


def find_runs(tracking_uri: str, experiment_name: str, filter_string: str = "") -> list[Run]:
    """Active runs of an experiment matching an MLflow filter (e.g. `tags.run_key = 'abc'`).

    An experiment that does not exist yet has no runs: the launcher uses this for idempotence.
    """
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None:
        return []
    runs: list[Run] = []
    token: str | None = None
    while True:
        page = client.search_runs([exp.experiment_id], filter_string, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


class RunTracker:
    """One MLflow run, addressed by id. Create it with `RunTracker.start(...)`.

    With `async_logging=True` metric points go to a bounded buffer that a background thread
    sends, so a slow or absent tracking server never stalls a training step; `flush()` and
    `finish()` wait for them. Every call waits out an outage up to `outage_limit_s` (see the
    module docstring). Usable as a context manager: an exception marks the run FAILED (KILLED
    on Ctrl-C).
    """

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        *,
        async_logging: bool = False,
        outage_limit_s: float = 600.0,
        buffer_points: int = 100_000,
    ) -> None:
        self.client = client
        self._run_id = run_id
        self._finished = False
        self.outage_limit_s = outage_limit_s
        self._capacity = buffer_points
        self._buffer: collections.deque[Metric] = collections.deque()
        self._cond = threading.Condition()
        self._sending = False
        self._closing = False
        self._dropped = 0
        self._error: BaseException | None = None
        self._down_since: float | None = None  # monotonic time of the first failure of an outage
        self._warned = False
        self._thread: threading.Thread | None = None
        if async_logging:
            self._thread = threading.Thread(target=self._worker, name=f"mlflow-{run_id[:8]}", daemon=True)
            self._thread.start()

    # ----------------------------------------------------------------------------- creation
    @classmethod
    def start(
        cls,
        cfg: TrackingConfig,
        *,
        params: Mapping[str, Any],
        tags: Mapping[str, str] | None = None,
        resume_run_id: str | None = None,
        async_logging: bool = False,
        data: DataConfig | None = None,
    ) -> RunTracker:
        """Create a run (or re-open `resume_run_id`) and record params, tags and `data` as inputs.

        `params` is the nested resolved config; it is logged with dotted keys. On resume,
        only params that the run lacks are logged (MLflow refuses to change a param) and no
        new run is created. A launcher's placeholder (`is_placeholder`) is replaced by the
        job's own run, so that the run's start time is its job's start (`replace_placeholder`).
        """
        uri = resolve_tracking_uri(cfg)
        client = MlflowClient(uri)
        all_tags: dict[str, str] = {**source_tags("harness/train.py", "LOCAL"), **cfg.tags, **(tags or {})}
        if cfg.parent_run_id:
            all_tags["mlflow.parentRunId"] = cfg.parent_run_id
        flat = {k: _clip(v, MAX_PARAM_VAL_LENGTH) for k, v in flatten(dict(params)).items()}
        probe = cls(client, "", outage_limit_s=cfg.outage_limit_s)  # waits out an outage at the job's start
        queued_s: float | None = None
        run = probe.call(client.get_run, resume_run_id) if resume_run_id is not None else None
        if run is not None and is_placeholder(run):  # a new run, RUNNING, nothing logged yet
            run_id, queued_s = replace_placeholder(client, run, probe.call)
        elif run is not None:
            run_id = run.info.run_id
            mark_started(client, run_id, probe.call)
            have = run.data.params
            changed = sorted(k for k, v in flat.items() if k in have and have[k] != v)
            if changed:
                warnings.warn(f"resumed run {run_id}: params differ and are kept as logged: {changed}", stacklevel=1)
            flat = {k: v for k, v in flat.items() if k not in have}
        else:
            experiment_id = probe.call(_get_or_create_experiment, client, cfg, uri)
            run_id = probe.call(client.create_run, experiment_id, run_name=cfg.run_name).info.run_id

        tracker = cls(
            client,
            run_id,
            async_logging=async_logging,
            outage_limit_s=cfg.outage_limit_s,
            buffer_points=cfg.buffer_points,
        )
        tracker._log_params(flat)
        if queued_s is not None:
            tracker.call(
                client.log_batch, run_id, metrics=[Metric("queue_time_s", queued_s, int(time.time() * 1000), 0)]
            )
        tracker.set_tags(all_tags)
        if data is not None:
            tracker.log_inputs(dataset_inputs(data))
        return tracker

    def log_inputs(self, datasets: list[Any]) -> None:
        """Link the run to its datasets.

        MLflow's server adds an experiment's dataset row by look-up-then-insert, so runs of one
        experiment that start together (a job array) can both insert it: the later one is refused
        with a unique-key violation. The row exists by then, so the same request links it on a retry.
        """
        for attempt in range(5):
            try:
                self.call(self.client.log_inputs, self._run_id, datasets=datasets)
                return
            except Exception as error:
                duplicate = any(mark in str(error) for mark in _DUPLICATE_KEY)
                if not duplicate or attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))

    @property
    def run_id(self) -> str:
        return self._run_id

    # --------------------------------------------------------------------------- outages
    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)`, retried with backoff while MLflow is unreachable.

        The first failure of an outage warns once; an outage longer than `outage_limit_s`
        raises `TrackingUnavailable`. A refusal (bad value, unknown run) is raised at once.
        """
        delay = 0.5
        while True:
            try:
                result = fn(*args, **kwargs)
            except Exception as error:
                if not transient(error):
                    raise
                now = time.monotonic()
                with self._cond:
                    if self._down_since is None:
                        self._down_since = now
                    down_for = now - self._down_since
                    if not self._warned:
                        self._warned = True
                        print(
                            f"warning: MLflow is not answering ({_first_line(error)}); metrics are buffered "
                            f"and retried for up to {self.outage_limit_s:.0f} s (tracking.outage_limit_s)",
                            file=sys.stderr,
                            flush=True,
                        )
                if down_for > self.outage_limit_s:
                    raise TrackingUnavailable(
                        f"MLflow has not answered for {down_for:.0f} s (tracking.outage_limit_s = "
                        f"{self.outage_limit_s:g}): {_first_line(error)}"
                    ) from error
                time.sleep(min(delay, max(0.1, self.outage_limit_s - down_for + 0.1)))
                delay = min(delay * 2, 10.0)
                continue
            with self._cond:
                if self._down_since is not None:
                    print(
                        f"MLflow answers again after {time.monotonic() - self._down_since:.0f} s; "
                        f"sending {len(self._buffer)} buffered metric points",
                        file=sys.stderr,
                        flush=True,
                    )
                    self._down_since = None
                    self._warned = False  # a later outage warns again
            return result

    # ------------------------------------------------------------------------------ logging
    def _log_params(self, params: Mapping[str, str]) -> None:
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self.call(self.client.log_batch, self._run_id, params=items[i : i + MAX_PARAMS_TAGS_PER_BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set (or overwrite) tags; values are stringified and clipped to MLflow's limit."""
        items = [RunTag(k, _clip(v, MAX_TAG_VAL_LENGTH)) for k, v in tags.items()]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self.call(self.client.log_batch, self._run_id, tags=items[i : i + MAX_PARAMS_TAGS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, Any], step: int, model_id: str | None = None) -> None:
        """Log several metrics at one step (one `log_batch` when sent).

        Values may be Python numbers, numpy scalars or one-element tensors (`float()` of each).
        `model_id` links them to a logged model. Sync mode sends at once (waiting out an outage);
        async mode buffers, and an outage past the limit is raised by the next call or by
        `flush()`, the points kept for `spill()`; any other failure is raised by `flush()`.
        """
        ts = int(time.time() * 1000)
        batch = [Metric(key, float(value), ts, int(step), model_id=model_id) for key, value in metrics.items()]
        if self._thread is None:
            self._send(batch)
            return
        with self._cond:
            room = self._capacity - len(self._buffer)
            if room < len(batch):
                if not self._dropped:
                    print(
                        f"warning: MLflow metric buffer full ({self._capacity} points, tracking.buffer_points); "
                        "newer points are dropped until it drains",
                        file=sys.stderr,
                        flush=True,
                    )
                self._dropped += len(batch) - max(room, 0)
                batch = batch[: max(room, 0)]
            self._buffer.extend(batch)
            self._cond.notify_all()
            error = self._error
        if isinstance(error, TrackingUnavailable):  # other errors: flush() reports them
            raise error

    def last_step(self, key: str) -> int:
        """The highest step logged for `key` in this run, -1 if none (a resumed job skips what a killed one sent)."""
        history = self.call(self.client.get_metric_history, self._run_id, key)
        return max((m.step for m in history), default=-1)

    def log_metrics_if_missing(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log `metrics` at `step` unless the run has them already.

        A job killed hard loses the points still queued for the background thread; its resume
        passes the checkpoint's copy of the last epoch's metrics here. One `log_metrics` call is
        one `log_batch`, written whole or not at all, so looking for one key's point tells.
        """
        if not metrics:
            return
        probe = next(iter(metrics))
        if not any(m.step == step for m in self.call(self.client.get_metric_history, self._run_id, probe)):
            self.log_metrics(metrics, step)

    def _send(self, batch: list[Metric]) -> None:
        """log_batch in chunks; the SQL store de-duplicates identical points, so a retry is safe."""
        for i in range(0, len(batch), MAX_METRICS_PER_BATCH):
            self.call(self.client.log_batch, self._run_id, metrics=batch[i : i + MAX_METRICS_PER_BATCH])

    def _worker(self) -> None:
        """Send the buffer's oldest points, one batch per round trip, until closed and drained.

        Points leave the buffer only once MLflow has them; after an outage past the limit the
        thread stops and leaves them for `spill()`.
        """
        while True:
            with self._cond:
                while not self._buffer and not self._closing:
                    self._cond.wait()
                if not self._buffer:
                    return
                chunk = [self._buffer[i] for i in range(min(len(self._buffer), MAX_METRICS_PER_BATCH))]
                self._sending = True
            try:
                self.call(self.client.log_batch, self._run_id, metrics=chunk)
            except Exception as exc:
                with self._cond:
                    self._error, self._sending = exc, False
                    self._cond.notify_all()
                return
            with self._cond:
                for _ in chunk:
                    self._buffer.popleft()
                self._sending = False
                self._cond.notify_all()

    def flush(self) -> None:
        """Wait until every buffered metric is written; raise if the outage limit passed first."""
        if self._thread is None:
            return
        with self._cond:
            while (self._buffer or self._sending) and self._error is None:
                self._cond.wait()
            error, points = self._error, list(self._buffer)
        if error is None:
            return
        if isinstance(error, TrackingUnavailable):
            raise error
        try:  # refused (e.g. the run was deleted meanwhile): one more try, then report and keep them
            self._send(points)
        except Exception as exc:
            self._restart_sender()  # the points stay buffered: the new sender tries them again
            raise RuntimeError(
                f"MLflow logging failed for run {self._run_id}: {len(points)} metric points unsent"
            ) from exc
        with self._cond:  # sent: out of the buffer before a new sender could take them again
            for _ in points:
                self._buffer.popleft()
        self._restart_sender()

    def _restart_sender(self) -> None:
        """A new background sender after the last one stopped on an error."""
        with self._cond:
            self._error = None
        self._thread = threading.Thread(target=self._worker, name=f"mlflow-{self._run_id[:8]}", daemon=True)
        self._thread.start()

    def spill(self, path: PathLike) -> int:
        """Write the points MLflow has not got to `path` (JSON lines) for `resend()`; how many.

        Called when the job gives up on an outage: it stops the sender and closes the run here
        (MLflow is unreachable, so the run stays RUNNING there; a relaunch resumes it).
        """
        with self._cond:
            self._closing = True
            points = list(self._buffer)
            self._buffer.clear()
            self._cond.notify_all()
        self._finished = True
        if points:
            with open(path, "a") as out:
                for m in points:
                    out.write(
                        json.dumps(
                            {
                                "key": m.key,
                                "value": m.value,
                                "timestamp": m.timestamp,
                                "step": m.step,
                                "model_id": m.model_id,
                            }
                        )
                        + "\n"
                    )
        return len(points)

    def resend(self, path: PathLike) -> int:
        """Send the points a previous job spilled to `path`, then remove the file; how many."""
        path = Path(path)
        if not path.exists():
            return 0
        points = [
            Metric(d["key"], d["value"], d["timestamp"], d["step"], model_id=d.get("model_id"))
            for d in map(json.loads, path.read_text().splitlines())
            if d
        ]
        self._send(points)
        path.unlink()
        return len(points)

    def log_artifact(self, path: PathLike, artifact_path: str | None = None) -> None:
        """Upload a file, or a folder's contents, under `artifact_path` of the run."""
        if Path(path).is_dir():
            self.call(self.client.log_artifacts, self._run_id, str(path), artifact_path)
        else:
            self.call(self.client.log_artifact, self._run_id, str(path), artifact_path)

    def log_pytorch_model(self, model: Any, step: int, name: str = "model") -> str:
        """Log `model` as an MLflow 3 logged model of this run; its model id.

        MLflow links the run's metrics at `step` to it (the UI's model page shows them); pass its
        id to `log_metrics` for later ones. Loadable with `mlflow.pytorch.load_model("runs:/<run
        id>/model")`. The model lives in the run's experiment (the fluent API would put it in the
        default one); the requirements are given, not inferred (that imports the model in a
        subprocess: slow).
        """
        import logging

        import mlflow
        import mlflow.pytorch
        import torch

        self.flush()  # the points at `step` must be in the store to be linked
        experiment_id = self.call(self.client.get_run, self._run_id).info.experiment_id
        logged = self.call(
            self.client.create_logged_model, experiment_id, name=name, source_run_id=self._run_id, model_type="pytorch"
        )
        mlflow.set_tracking_uri(self.client.tracking_uri)  # log_model reads the global URI
        requirements = [
            f"torch=={torch.__version__.split('+')[0]}",
            f"timm=={metadata.version('timm')}",
            f"mlflow=={mlflow.__version__}",
        ]
        quiet = logging.getLogger("mlflow.pytorch")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # a warning about pickles on every run: the project's own models
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "no signature": images of a run-dependent size
                self.call(
                    mlflow.pytorch.log_model,
                    model,
                    name=name,
                    run_id=self._run_id,
                    model_id=logged.model_id,
                    step=step,
                    pip_requirements=requirements,
                    serialization_format="pickle",
                )
        finally:
            quiet.setLevel(level)
        return str(logged.model_id)

    # ------------------------------------------------------------------------------- ending
    def finish(self, status: RunState | str = RunState.FINISHED, reason: str | None = None) -> None:
        """Flush pending metrics and end the run (harness/lifecycle.py's `terminate`); `reason`, set first,
        is tag `error`. Calling it twice is harmless."""
        status = end_state(status)
        if reason is not None:
            self.set_tags({Tag.ERROR.value: reason})
        if self._finished:
            return
        try:
            self.flush()
        finally:
            if self._thread is not None:
                with self._cond:
                    self._closing = True
                    if self._error is not None:
                        self._buffer.clear()  # reported by flush(); the thread has stopped
                    self._cond.notify_all()
                self._thread.join()
            self._finished = True
            terminate(self.client, self._run_id, status, self.call)

    def __enter__(self) -> RunTracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.finish(RunState.FINISHED)
        elif issubclass(exc_type, KeyboardInterrupt):
            self.finish(RunState.KILLED)
        else:
            self.finish(RunState.FAILED)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__
