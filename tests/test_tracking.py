"""harness.tracking against real MLflow stores: a SQLite file and a live `mlflow server`."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from harness.config import RunConfig, TrackingConfig
from harness.tracking import RunTracker, find_runs, resolve_tracking_uri
from tests.servers import mlflow_server


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store per module: creating a store runs MLflow's migrations (seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def server_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with mlflow_server(tmp_path_factory.mktemp("server")) as server:
        yield server.uri


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_resolve_tracking_uri(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert resolve_tracking_uri(TrackingConfig(uri="http://x:5000")) == "http://x:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri(TrackingConfig()) == "http://env:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(TrackingConfig()) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


def test_run_lifecycle_and_resume(sqlite_uri: str, tmp_path: Path) -> None:
    client = MlflowClient(sqlite_uri)
    exp_id = client.create_experiment("lifecycle", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp_id, run_name="parent").info.run_id
    config = RunConfig()
    config.model.pretrained = "/weights/" + "x" * 7000 + ".pth"  # a value longer than MLflow allows
    cfg = TrackingConfig(
        uri=sqlite_uri, experiment="lifecycle", run_name="dynamic", parent_run_id=parent,
        tags={"spec": "table3"},
    )  # fmt: skip
    params = config.model_dump()
    tracker = RunTracker.start(cfg, params=params, tags={"run_key": config.run_key(), "variant": "dynamic"})
    run_id = tracker.run_id
    losses = [torch.tensor(2.0), np.float32(1.5), 1.25]
    for step, loss in enumerate(losses):
        tracker.log_metrics({"train/loss": loss, "lr": 1e-3 * (step + 1)}, step=step)
    artifact = tmp_path / "config.yaml"
    artifact.write_text("model: {keep_ratio: 0.7}\n")
    tracker.log_artifact(artifact)
    tracker.finish()

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "dynamic"
    assert run.data.params["model.keep_ratio"] == "0.7"
    assert run.data.params["optim.lr"] == "0.001"
    assert run.data.params["losses.kl.weight"] == "0.5"
    assert run.data.params["teacher.checkpoint"] == "None"  # None values are logged as such
    assert run.data.params["model.pretrained"].endswith("[truncated]")
    tags = run.data.tags
    assert tags["mlflow.parentRunId"] == parent
    assert tags["spec"] == "table3" and tags["variant"] == "dynamic"
    assert tags["run_key"] == config.run_key()
    assert tags["code_version"]
    assert history(client, run_id, "train/loss") == [(0, 2.0), (1, 1.5), (2, 1.25)]
    assert [m.step for m in client.get_metric_history(run_id, "lr")] == [0, 1, 2]
    assert [f.path for f in client.list_artifacts(run_id)] == ["config.yaml"]

    resumed = RunTracker.start(cfg, params=params, tags={"run_key": config.run_key()}, resume_run_id=run_id)
    assert resumed.run_id == run_id
    assert client.get_run(run_id).info.status == "RUNNING"
    resumed.log_metrics({"train/loss": 1.0}, step=3)
    resumed.finish("FAILED")

    assert client.get_run(run_id).info.status == "FAILED"
    assert [s for s, _ in history(client, run_id, "train/loss")] == [0, 1, 2, 3]
    assert len(client.search_runs([exp_id])) == 2  # the parent and this child, nothing new
    found = find_runs(sqlite_uri, "lifecycle", f"tags.run_key = '{config.run_key()}'")
    assert [r.info.run_id for r in found] == [run_id]
    assert find_runs(sqlite_uri, "no-such-experiment", "") == []


def test_async_logging_and_context_manager(sqlite_uri: str) -> None:
    cfg = TrackingConfig(uri=sqlite_uri, experiment="async")
    with RunTracker.start(cfg, params={"a": {"b": 1}}, async_logging=True) as tracker:
        for step in range(30):
            tracker.log_metrics({f"m{i}": step + i for i in range(10)}, step=step)
    client = MlflowClient(sqlite_uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"a.b": "1"}
    assert [s for s, _ in history(client, tracker.run_id, "m9")] == list(range(30))

    with pytest.raises(ZeroDivisionError):
        with RunTracker.start(cfg, params={}) as failing:
            failing.log_metrics({"x": 1.0}, step=0)
            raise ZeroDivisionError("a failure inside the run")
    assert client.get_run(failing.run_id).info.status == "FAILED"


def test_async_failure_keeps_points(sqlite_uri: str) -> None:
    """A batch that cannot be written is reported by flush() and sent later, not dropped."""
    tracker = RunTracker.start(TrackingConfig(uri=sqlite_uri, experiment="failures"), params={}, async_logging=True)
    tracker.client.delete_run(tracker.run_id)  # writes to a deleted run fail
    tracker.log_metrics({"x": 1.0}, step=0)
    tracker.log_metrics({"x": 2.0}, step=1)
    with pytest.raises(RuntimeError, match="2 metric points unsent"):
        tracker.flush()
    tracker.client.restore_run(tracker.run_id)
    tracker.log_metrics({"x": 3.0}, step=2)
    tracker.finish()
    assert history(tracker.client, tracker.run_id, "x") == [(0, 1.0), (1, 2.0), (2, 3.0)]


_JOB = """
import sys
from harness.config import TrackingConfig
from harness.tracking import RunTracker
uri, index = sys.argv[1], int(sys.argv[2])
cfg = TrackingConfig(uri=uri, experiment="concurrent", run_name=f"job{index}")
tracker = RunTracker.start(
    cfg, params={"job": {"index": index}}, tags={"run_key": f"k{index}"}, async_logging=index % 2 == 1
)
for step in range(50):
    tracker.log_metrics({"train/loss": 1.0 / (step + 1), "lr": float(index)}, step=step)
tracker.finish()
print(tracker.run_id)
"""


def test_concurrent_processes_against_server(server_uri: str) -> None:
    """8 OS processes, like 8 jobs of an array, each with its own run: no point is lost.

    Odd jobs log through the background thread, even ones synchronously: both paths are checked.
    """
    root = Path(__file__).resolve().parents[1]
    procs = [
        subprocess.Popen([sys.executable, "-c", _JOB, server_uri, str(i)], cwd=root, stdout=subprocess.PIPE, text=True)
        for i in range(8)
    ]
    run_ids = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        run_ids.append(out.strip().splitlines()[-1])
    assert len(set(run_ids)) == 8
    client = MlflowClient(server_uri)
    runs = find_runs(server_uri, "concurrent", "")
    assert sorted(r.info.run_id for r in runs) == sorted(run_ids)
    for run in runs:
        assert run.info.status == "FINISHED"
        points = client.get_metric_history(run.info.run_id, "train/loss")
        assert sorted(m.step for m in points) == list(range(50))
