"""A run folder belongs to exactly one run: one run key and one MLflow run id.

`run.json` in the folder records both (written by the launcher when it hands the folder to a
run, and by the engine when a run starts); `result.json` and `checkpoint.pth` carry them too.
Every use checks them against the config at hand: a folder written by another configuration
(an override changed, a variant renamed onto another's folder) or for another MLflow run is
refused with a message naming the folder and both keys, or, by the launcher, moved aside so
that the new run starts clean. Nothing is ever resumed, returned or logged across runs.

Plain standard library and the config: the launcher checks folders without importing torch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import lifecycle
from harness.config import ConfigError, RunConfig
from harness.errors import EnvironmentProblem
from harness.files import write_atomic
from harness.lifecycle import RunState, Tag

BINDING = "run.json"
RESULT = "result.json"  # the engine's final metrics (harness.engine.RESULT)
CHECKPOINT = "checkpoint.pth"  # the engine's resume point (harness.checkpointing.CHECKPOINT)
STATE_FILES = (CHECKPOINT, RESULT, "model.pth")


class StaleRunFolder(ConfigError):
    """A run folder holds another run's state (one line: the folder, both keys, what to do)."""

    def __init__(self, line: str) -> None:
        super().__init__([line])


@dataclass(frozen=True)
class Binding:
    run_key: str
    mlflow_run_id: str | None
    queued_as: str | None = None  # the launcher's placeholder run that `mlflow_run_id` replaced

    def names(self, run_id: str | None) -> bool:
        """Whether `run_id` is this folder's MLflow run (or its placeholder), or either is unknown."""
        return run_id is None or self.mlflow_run_id is None or run_id in (self.mlflow_run_id, self.queued_as)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise StaleRunFolder(
            f"{path}: unreadable ({type(err).__name__}: {str(err)[:200]}); move the run "
            f"folder away to start the run over"
        ) from None
    return data if isinstance(data, dict) else None


def read_binding(folder: Path) -> Binding | None:
    """Which run the folder belongs to (`run.json`, else `result.json`), or None if it says nothing."""
    for name in (BINDING, RESULT):
        data = _read_json(folder / name)
        if data and data.get("run_key"):
            return Binding(str(data["run_key"]), data.get("mlflow_run_id"), data.get(Tag.QUEUED_AS.value))
    return None


def holds_state(folder: Path) -> bool:
    """Whether a run has written anything to resume or reuse in `folder`."""
    return any((folder / name).exists() for name in STATE_FILES)


def bind(folder: Path, run_key: str, mlflow_run_id: str | None, queued_as: str | None = None) -> None:
    """Record (atomically) that `folder` belongs to this run key and MLflow run.

    `queued_as`: the placeholder run the job replaced (harness.lifecycle.replace_placeholder): the
    other ranks of a distributed job, started with its id, still find the folder theirs.
    """
    record = {"run_key": run_key, "mlflow_run_id": mlflow_run_id}
    text = json.dumps({**record, Tag.QUEUED_AS.value: queued_as} if queued_as else record)
    write_atomic(folder / BINDING, lambda handle: handle.write(text.encode()))


def mismatch(folder: Path, run_key: str, mlflow_run_id: str | None = None) -> str | None:
    """Why `folder` is not this run's (one line), or None when it is, or says nothing."""
    bound = read_binding(folder)
    if bound is None:
        return None
    if bound.run_key != run_key:
        return (
            f"{folder}: holds the state of run key {bound.run_key}, this configuration's run key is {run_key} "
            f"(the configuration changed since the folder was written); move the folder away or choose "
            f"another output_dir, got run key {run_key}"
        )
    if not bound.names(mlflow_run_id):
        return (
            f"{folder}: belongs to MLflow run {bound.mlflow_run_id} (run key {run_key}), this job logs to "
            f"MLflow run {mlflow_run_id}; move the folder away to start over, got run id {mlflow_run_id}"
        )
    return None


def check_folder(cfg: RunConfig) -> None:
    """Refuse a folder that holds another run's state (StaleRunFolder)."""
    folder = Path(cfg.output_dir)
    problem = mismatch(folder, cfg.run_key(), cfg.tracking.run_id)
    bound = read_binding(folder) if problem else None
    if bound is not None and bound.run_key != cfg.run_key() and (folder / RESULT).exists():
        problem = finished_elsewhere(folder, bound.run_key, cfg)
    if problem:
        raise StaleRunFolder(problem)


def finished_elsewhere(folder: Path, finished_key: str, cfg: RunConfig) -> str:
    """Why a finished run is not extended (more epochs, another setting) in place, and what to do.

    Continuing it would mix two configurations in one folder, one result and one MLflow run.
    """
    import yaml

    from harness.config import flatten

    changes = ""
    try:
        before = flatten(yaml.safe_load((folder / "config.yaml").read_text()) or {})
        after = flatten(cfg.model_dump())
        diff = [
            f"{k} {before.get(k)!r} -> {after.get(k)!r}"
            for k in sorted(set(before) | set(after))
            if before.get(k) != after.get(k) and not k.startswith(("tracking.", "output_dir"))
        ]
        changes = f" (changed: {'; '.join(diff[:3])}{'; ...' if len(diff) > 3 else ''})" if diff else ""
    except (OSError, ValueError, yaml.YAMLError, AttributeError):
        pass  # no readable config.yaml: the keys alone say it
    return (
        f"{folder}: holds a finished run (run key {finished_key}, result.json) and this configuration is "
        f"another{changes}; a finished run is not extended in place: give this configuration another "
        f"output_dir (without one it gets its own folder), and add train.init_from={folder} to start from "
        f"its weights, "
        f"got run key {cfg.run_key()}"
    )


def check_checkpoint(path: Path, state: dict[str, Any], cfg: RunConfig) -> None:
    """The checkpoint must be this run's: same run key, same MLflow run when the job names one."""
    key = state.get("run_key")
    if key != cfg.run_key():
        raise StaleRunFolder(
            f"{path}: written by run key {key}, this configuration's run key is {cfg.run_key()}; "
            f"move the folder away or choose another output_dir, got run key {cfg.run_key()}"
        )
    run_id = cfg.tracking.run_id
    if run_id and state.get("mlflow_run_id") and state["mlflow_run_id"] != run_id:
        raise StaleRunFolder(
            f"{path}: belongs to MLflow run {state['mlflow_run_id']}, this job logs to MLflow run "
            f"{run_id}; move the folder away to start over, got run id {run_id}"
        )


def load_checkpoint(path: Path, cfg: RunConfig) -> dict[str, Any] | None:
    """The run's checkpoint (checked against `cfg`), None if there is none; one line if it is unreadable."""
    from harness import checkpointing

    if path.exists() and not path.is_file():
        raise StaleRunFolder(f"{path}: not a file, got a {'folder' if path.is_dir() else 'special file'}")
    from harness.unpickle import UnsafeCheckpoint

    try:
        state = checkpointing.load(path)
    except UnsafeCheckpoint as err:  # it would run code or build an unknown type: names the file and type
        raise StaleRunFolder(f"{err}; move it away to start the run over") from None
    except Exception as err:  # empty, truncated, not a checkpoint: torch raises many kinds
        message = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise StaleRunFolder(
            f"{path}: cannot be loaded ({type(err).__name__}: {message}); it is corrupt or "
            f"truncated: move it away to start the run over, got a {path.stat().st_size}-byte "
            f"file"
        ) from None
    if state is not None:
        if not isinstance(state, dict):
            raise StaleRunFolder(f"{path}: not a training checkpoint, got a {type(state).__name__}")
        check_checkpoint(path, state, cfg)
    return state


class SourceNotFinished(EnvironmentProblem):
    """A run this one starts or distils from has not FINISHED (exit 1: relaunch once it has)."""


def sources(cfg: RunConfig) -> list[tuple[str, str, str | None]]:
    """(field, run folder, the run key the spec expects there) of every other run whose weights this one loads."""
    teacher = None
    if cfg.needs_teacher:
        teacher = (
            ("teacher.checkpoint", cfg.teacher.checkpoint)
            if cfg.teacher.checkpoint
            else ("teacher.run_dir", cfg.teacher.run_dir)
        )
    found = []
    for field, value, tag in (
        ("model.pretrained", cfg.model.pretrained, None),
        ("train.init_from", cfg.train.init_from, "init_from_run_key"),
        (*(teacher or ("teacher.run_dir", None)), "teacher_run_key"),
    ):
        if value and Path(value).is_dir():  # a file or URL is loaded as given
            found.append((field, value, cfg.tracking.tags.get(tag) if tag else None))
    return found


def check_sources(cfg: RunConfig) -> None:
    """Refuse to start unless every run folder this run initialises or distils from holds a FINISHED run.

    Why: on the local executor nothing orders a relaunch's stages after another launch's, and a
    job may start while its teacher still trains; it would read no final weights (or, before, the
    teacher's half-trained checkpoint). Finished means: `model.pth` and `result.json` there, the
    run key the spec expects, and its MLflow run (named by `result.json`) FINISHED when this store
    has it: `result.json` is written just before the run is marked FINISHED.
    """
    for field, folder, expected in sources(cfg):
        where = Path(folder)
        result = _read_json(where / RESULT)
        if result is None or not (where / "model.pth").is_file():
            missing = " and ".join(n for n in (RESULT, "model.pth") if not (where / n).is_file()) or RESULT
            raise SourceNotFinished(
                f"{field}: {folder} holds no finished run (no {missing}: it is still training "
                f"or was stopped); a run starts only from a {RunState.FINISHED} run's final weights: "
                f"relaunch once it has finished, got {folder}"
            )
        if expected and result.get("run_key") != expected:
            raise SourceNotFinished(
                f"{field}: {folder} holds run key {result.get('run_key')}, the spec's run there "
                f"is {expected} (it was replaced since this job was submitted); relaunch, "
                f"got {folder}"
            )
        status = _mlflow_status(cfg, result.get("mlflow_run_id"))
        if status is not None and status != RunState.FINISHED:
            raise SourceNotFinished(
                f"{field}: {folder}: its MLflow run {result['mlflow_run_id']} is {status}, not "
                f"{RunState.FINISHED}; a run starts only from a {RunState.FINISHED} run: relaunch once it has "
                f"finished, got {folder}"
            )


def _mlflow_status(cfg: RunConfig, run_id: str | None) -> str | None:
    """The status of MLflow run `run_id` in this run's store; None when the store has no such run
    (a folder trained against another store is judged by its files)."""
    if not run_id:
        return None
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from harness.tracking import resolve_tracking_uri

    try:
        run = MlflowClient(resolve_tracking_uri(cfg.tracking)).get_run(run_id)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return None if run.info.lifecycle_stage == "deleted" else run.info.status


def finished_metrics(cfg: RunConfig) -> dict[str, float] | None:
    """A finished run's metrics from its `result.json` (after checking the folder is this run's)."""
    check_folder(cfg)
    data = _read_json(Path(cfg.output_dir) / RESULT)
    if data is None:
        return None
    if not isinstance(data.get("metrics"), dict):
        raise StaleRunFolder(
            f"{Path(cfg.output_dir) / RESULT}: no metrics in it; move the folder away to start the run over"
        )
    return data["metrics"]


def move_aside(folder: Path, root: Path | None = None) -> Path:
    """Rename `folder` to `<name>.before-<time>` beside it (nothing is deleted); the new path.

    `root`: the folder must lie inside it (a run name is never a path out of the output root).
    """
    if root is not None and not folder.resolve().is_relative_to(root.resolve()):
        raise ConfigError([f"{folder}: outside the output root {root}, not moved"])
    target = folder.with_name(f"{folder.name}.before-{time.strftime('%Y%m%d-%H%M%S')}")
    index = 1
    while target.exists():
        target = folder.with_name(f"{folder.name}.before-{time.strftime('%Y%m%d-%H%M%S')}-{index}")
        index += 1
    folder.rename(target)
    return target


def claim(folder: Path, run_key: str, mlflow_run_id: str, root: Path | None = None, resume: bool = True) -> Path | None:
    """Hand `folder` to a run: state of any other run (or any state when not `resume`) is moved
    aside first. Returns where the old state went, or None."""
    moved = None
    if folder.exists() and holds_state(folder):
        bound = read_binding(folder)
        ours = bound is not None and bound.run_key == run_key and bound.names(mlflow_run_id)
        if not (resume and ours):
            moved = move_aside(folder, root)
    bind(folder, run_key, mlflow_run_id)
    return moved


def folder_is_resumable(folder: Path, run_key: str, mlflow_run_id: str) -> bool:
    """Whether `folder` holds this MLflow run's own state (or nothing at all)."""
    if not folder.exists() or not holds_state(folder):
        return True
    bound = read_binding(folder)
    return bound is not None and bound.run_key == run_key and bound.names(mlflow_run_id)


# ------------------------------------------------------------------ the MLflow side of a job
def _one_line(err: BaseException, folder: Path | None = None) -> str:
    """The error in one line; an I/O error buried under another (torch.save on a full disk) by its cause."""
    from harness.errors import os_error_line, root_os_error

    cause = root_os_error(err)
    if cause is not None:
        return f"OSError: {os_error_line(cause, folder)[0]}"[:4000]
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:4000]


@contextmanager
def failure_marks_run(cfg: RunConfig) -> Iterator[None]:
    """A job that fails before its training started marks its MLflow run FAILED with the reason.

    The launcher creates each run SCHEDULED; only the engine's tracker sets it RUNNING. A run that
    is still SCHEDULED when the job dies of an exception (a bad pretrained file, a corrupt
    checkpoint, another run's folder) would otherwise wait forever. Preemption is not a failure.
    """
    try:
        yield
    except Exception as err:
        if type(err).__name__ not in ("Preempted", "Pruned"):
            mark_failed(cfg, err)
        raise


def mark_failed(cfg: RunConfig, err: BaseException) -> None:
    """A run nothing started yet is FAILED with the reason; one that failed on I/O gets the real cause
    as its `error` tag (torch reports a full disk as 'unexpected pos'). A store that fails is left alone."""
    from harness.errors import root_os_error

    run_id = cfg.tracking.run_id
    buried = root_os_error(err) is not None
    if not run_id and not buried:
        return
    try:
        from mlflow import MlflowClient

        from harness.tracking import resolve_tracking_uri

        client = MlflowClient(resolve_tracking_uri(cfg.tracking))
        if not run_id:  # harness.train without a launcher: the run id is in the folder's binding
            bound = read_binding(Path(cfg.output_dir))
            run_id = bound.mlflow_run_id if bound else None
            if not run_id:
                return
        run_id = lifecycle.current_run_id(client, run_id)  # another rank's job may have replaced the placeholder
        status = client.get_run(run_id).info.status
        reason = _one_line(err, Path(cfg.output_dir))
        if status == RunState.SCHEDULED:
            lifecycle.fail(client, run_id, reason)
        elif buried:
            lifecycle.set_error(client, run_id, reason)
    except Exception as problem:  # the original error matters more; say why the run was not marked
        import sys

        print(f"could not mark MLflow run {run_id} {RunState.FAILED}: {_one_line(problem)}", file=sys.stderr)


def mark_finished_if_open(cfg: RunConfig) -> None:
    """A finished run (result.json) whose MLflow run a relaunch reopened is FINISHED again."""
    if not cfg.tracking.run_id:
        return
    from mlflow import MlflowClient

    from harness.tracking import resolve_tracking_uri

    lifecycle.finish_if_open(MlflowClient(resolve_tracking_uri(cfg.tracking)), cfg.tracking.run_id)
