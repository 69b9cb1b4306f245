"""The only module that talks to MLflow for a run: params, metrics, tags, artifacts, resume.

It uses `mlflow.MlflowClient` with an explicit run id everywhere, never the fluent API's
global "active run", so that several runs in one process, child runs and a requeued job that
re-opens its own run id cannot step on each other.
"""
from __future__ import annotations

import os
import queue
import subprocess
import threading
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Union
from urllib.parse import unquote

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from harness.config import TrackingConfig, flatten

Status = Literal["FINISHED", "FAILED", "KILLED"]
PathLike = Union[str, "os.PathLike[str]"]

_REPO_ROOT = Path(__file__).resolve().parents[1]
_RETRIES = 5  # attempts per batch; the SQL store de-duplicates identical points, so retrying is safe
_TRUNCATED = "...[truncated]"


def resolve_tracking_uri(cfg: TrackingConfig) -> str:
    """cfg.uri, else $MLFLOW_TRACKING_URI, else an absolute `sqlite:///<cwd>/mlflow.db`.

    Absolute, so that jobs started from another working directory write to the same store.
    """
    from harness.store import resolve_uri

    return resolve_uri(cfg.uri)[0]


def code_version() -> str:
    """The git commit of this checkout (`+dirty` if it has local changes), else the package version."""
    try:
        def git(*args: str) -> str:
            return subprocess.run(
                ["git", *args], cwd=_REPO_ROOT, capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()

        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return metadata.version("dvit-harness")
    except metadata.PackageNotFoundError:
        return "unknown"


def _clip(value: Any, limit: int) -> str:
    """Stringify for MLflow and keep within its length limit (a long list would fail the run)."""
    text = str(value)
    if len(text) > limit:
        text = text[: limit - len(_TRUNCATED)] + _TRUNCATED
    return text


def _sqlite_artifact_root(uri: str) -> Optional[str]:
    """Artifacts beside the SQLite file, not in `./mlruns` of whatever the cwd happens to be."""
    if not uri.startswith("sqlite:///"):
        return None  # a server or database: its own default artifact root applies
    db = Path(unquote(uri[len("sqlite:///"):])).resolve()
    return (db.parent / "mlartifacts").as_uri()


def _get_or_create_experiment(client: MlflowClient, cfg: TrackingConfig, uri: str) -> str:
    """Experiment id by cfg.experiment_id or name; creation is race-safe across processes."""
    if cfg.experiment_id:
        return cfg.experiment_id
    error: Optional[MlflowException] = None
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
                cfg.experiment, artifact_location=_sqlite_artifact_root(uri)
            )
        except MlflowException as exc:
            error = exc  # most likely another process created it just now: look it up again
    raise RuntimeError(f"could not get or create experiment {cfg.experiment!r} in {uri}") from error


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """The id of experiment `name`, created if missing (the launcher does this once, before jobs)."""
    client = MlflowClient(tracking_uri)
    return _get_or_create_experiment(client, TrackingConfig(experiment=name), tracking_uri)


def find_runs(tracking_uri: str, experiment_name: str, filter_string: str = "") -> list[Run]:
    """Active runs of an experiment matching an MLflow filter (e.g. `tags.run_key = 'abc'`).

    An experiment that does not exist yet has no runs: the launcher uses this for idempotence.
    """
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None:
        return []
    runs: list[Run] = []
    token: Optional[str] = None
    while True:
        page = client.search_runs([exp.experiment_id], filter_string, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


class RunTracker:
    """One MLflow run, addressed by id. Create it with `RunTracker.start(...)`.

    With `async_logging=True` metric batches go through a background thread, so a slow
    tracking server never stalls a training step; `flush()`/`finish()` wait for them.
    Usable as a context manager: an exception marks the run FAILED (KILLED on Ctrl-C).
    """

    def __init__(self, client: MlflowClient, run_id: str, *, async_logging: bool = False) -> None:
        self.client = client
        self._run_id = run_id
        self._finished = False
        self._queue: Optional[queue.Queue[Optional[list[Metric]]]] = None
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self._unsent: list[Metric] = []  # points the worker failed to send; retried on flush
        if async_logging:
            self._queue = queue.Queue()
            self._thread = threading.Thread(target=self._worker, name=f"mlflow-{run_id[:8]}", daemon=True)
            self._thread.start()

    # ----------------------------------------------------------------------------- creation
    @classmethod
    def start(
        cls,
        cfg: TrackingConfig,
        *,
        params: Mapping[str, Any],
        tags: Optional[Mapping[str, str]] = None,
        resume_run_id: Optional[str] = None,
        async_logging: bool = False,
    ) -> "RunTracker":
        """Create a run (or re-open `resume_run_id`) and record params and tags.

        `params` is the nested resolved config; it is logged with dotted keys. On resume,
        only params that the run lacks are logged (MLflow refuses to change a param) and no
        new run is created.
        """
        uri = resolve_tracking_uri(cfg)
        client = MlflowClient(uri)
        all_tags: dict[str, str] = {**cfg.tags, **(tags or {}), "code_version": code_version()}
        if cfg.parent_run_id:
            all_tags["mlflow.parentRunId"] = cfg.parent_run_id
        flat = {k: _clip(v, MAX_PARAM_VAL_LENGTH) for k, v in flatten(dict(params)).items()}

        if resume_run_id is not None:
            run = client.get_run(resume_run_id)
            client.update_run(resume_run_id, status="RUNNING")
            have = run.data.params
            changed = sorted(k for k, v in flat.items() if k in have and have[k] != v)
            if changed:
                warnings.warn(f"resumed run {resume_run_id}: params differ and are kept as logged: {changed}")
            flat = {k: v for k, v in flat.items() if k not in have}
            run_id = resume_run_id
        else:
            experiment_id = _get_or_create_experiment(client, cfg, uri)
            run_id = client.create_run(experiment_id, run_name=cfg.run_name).info.run_id

        tracker = cls(client, run_id, async_logging=async_logging)
        tracker._log_params(flat)
        tracker.set_tags(all_tags)
        return tracker

    @property
    def run_id(self) -> str:
        return self._run_id

    # ------------------------------------------------------------------------------ logging
    def _log_params(self, params: Mapping[str, str]) -> None:
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self._run_id, params=items[i : i + MAX_PARAMS_TAGS_PER_BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set (or overwrite) tags; values are stringified and clipped to MLflow's limit."""
        items = [RunTag(k, _clip(v, MAX_TAG_VAL_LENGTH)) for k, v in tags.items()]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self._run_id, tags=items[i : i + MAX_PARAMS_TAGS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log several metrics at one step in one `log_batch` call.

        Values may be Python numbers, numpy scalars or one-element tensors (`float()` of each).
        Sync mode retries and then raises; async mode queues, and a failure is raised by the
        next call or by `flush()`, with the unsent points kept for the next attempt.
        """
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"MLflow logging failed for run {self._run_id}") from error
        ts = int(time.time() * 1000)
        batch = [Metric(key, float(value), ts, int(step)) for key, value in metrics.items()]
        if self._queue is None:
            self._send(batch)
        else:
            self._queue.put(batch)

    def last_step(self, key: str) -> int:
        """The highest step logged for `key` in this run, -1 if none (a resumed job skips what a killed one sent)."""
        return max((m.step for m in self.client.get_metric_history(self._run_id, key)), default=-1)

    def log_metrics_if_missing(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log `metrics` at `step` unless the run has them already.

        A job killed hard loses the points still queued for the background thread; its resume
        passes the checkpoint's copy of the last epoch's metrics here. One `log_metrics` call is
        one `log_batch`, written whole or not at all, so looking for one key's point tells.
        """
        if not metrics:
            return
        probe = next(iter(metrics))
        if not any(m.step == step for m in self.client.get_metric_history(self._run_id, probe)):
            self.log_metrics(metrics, step)

    def _send(self, batch: list[Metric]) -> None:
        """log_batch in chunks, retrying transient failures (locked SQLite, server restart)."""
        for i in range(0, len(batch), MAX_METRICS_PER_BATCH):
            chunk = batch[i : i + MAX_METRICS_PER_BATCH]
            for attempt in range(_RETRIES):
                try:
                    self.client.log_batch(self._run_id, metrics=chunk)
                    break
                except Exception:
                    if attempt == _RETRIES - 1:
                        raise
                    time.sleep(0.5 * 2**attempt)

    def _worker(self) -> None:
        """Drain whatever is queued into one batch per round trip; None stops the thread."""
        assert self._queue is not None
        stop = False
        while not stop:
            items = [self._queue.get()]
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(item is None for item in items)
            batch = self._unsent + [m for item in items if item for m in item]
            self._unsent = []
            try:
                if batch:
                    self._send(batch)
            except Exception as exc:  # keep the points; flush() or the next log call reports it
                self._unsent = batch
                self._error = exc
            finally:
                for _ in items:
                    self._queue.task_done()

    def flush(self) -> None:
        """Wait until every queued metric is written; raise if some could not be."""
        if self._queue is None:
            return
        self._queue.join()
        self._error = None  # reported below, if the points still cannot be sent
        if self._unsent:  # one more synchronous try before giving up
            batch, self._unsent = self._unsent, []
            try:
                self._send(batch)
            except Exception as exc:
                self._unsent = batch
                raise RuntimeError(
                    f"MLflow logging failed for run {self._run_id}: {len(batch)} metric points unsent"
                ) from exc

    def log_artifact(self, path: PathLike, artifact_path: Optional[str] = None) -> None:
        """Upload a file, or a folder's contents, under `artifact_path` of the run."""
        if Path(path).is_dir():
            self.client.log_artifacts(self._run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self._run_id, str(path), artifact_path)

    # ------------------------------------------------------------------------------- ending
    def finish(self, status: Status = "FINISHED") -> None:
        """Flush pending metrics and mark the run terminated. Calling it twice is harmless."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"status must be FINISHED, FAILED or KILLED, got {status!r}")
        if self._finished:
            return
        try:
            self.flush()
        finally:
            if self._queue is not None and self._thread is not None:
                self._queue.put(None)
                self._thread.join()
            self._finished = True
            self.client.set_terminated(self._run_id, status)

    def __enter__(self) -> "RunTracker":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.finish("KILLED")
        else:
            self.finish("FAILED")
