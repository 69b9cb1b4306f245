"""MLflow as its users expect, read back from a launch of a tiny spec (local executor, SQLite):
a training experiment, the UI's runs table and compare view printed at the end, a run's start
time at its job's start with the queue time apart, the standard source tags, the dataset inputs, the final model as a
loadable MLflow model linked to its metrics, and no new parent run for a launch that submits
nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import mlflow
import mlflow.pytorch
import pytest
import torch
import yaml
from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[1]
SPEC: dict[str, Any] = {
    "name": "usage",
    "description": "two tiny dense runs for the MLflow usage tests",
    "default_scale": "tiny",
    "base": {
        "model": {"name": "dynamicvit_tiny_patch8_64", "variant": "dense"},
        "data": {"name": "cluttered_mnist", "train_digits": 64, "val_digits": 32, "val_placements": 1},
        "aug": {"mixup": 0.0, "cutmix": 0.0, "label_smoothing": 0.0},
        "optim": {
            "warmup_epochs": 0,
            "backbone_lr_scale": 1.0,
            "backbone_freeze_epochs": 0,
            "freeze": [],
            "lr_base_batch": 32,
        },
        "train": {"epochs": 1, "batch_size": 32, "ema": None},
        "tracking": {"visualize_images": 0},
    },
    "scales": {"tiny": {"slurm": {"cpus_per_task": 1, "array_parallelism": 1}}},  # seed1 queues behind seed0
    "stages": {
        "seeds": {
            "row": "dense",
            "runs": {
                "variants": [
                    {"name": "seed0", "set": {"train.seed": 0}},
                    {"name": "seed1", "set": {"train.seed": 1}},
                ]
            },
        }
    },
}


def launch(tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "harness.launch",
            str(tmp / "usage.yaml"),
            "--executor",
            "local",
            "--output-root",
            str(tmp / "runs"),
            "--tracking-uri",
            f"sqlite:///{tmp}/mlflow.db",
        ],
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("usage")
    (tmp / "usage.yaml").write_text(yaml.safe_dump(SPEC, sort_keys=False))
    first = launch(tmp)
    assert first.returncode == 0, first.stderr[-3000:]
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("usage")
    return {
        "tmp": tmp,
        "uri": uri,
        "client": client,
        "experiment": experiment,
        "stdout": first.stdout,
        "runs": client.search_runs([experiment.experiment_id], "tags.kind = 'train'"),
    }


def test_training_experiment_and_the_printed_ui_pages(launched: dict[str, Any]) -> None:
    experiment, runs = launched["experiment"], launched["runs"]
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    lines = launched["stdout"].splitlines()
    # the UI's model-training mode: MLflow 3.17's UI opens its GenAI mode unless asked (tests/test_ui.py sees it)
    assert (
        f"runs table: http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"
    ) in lines
    (compare,) = [line for line in lines if line.startswith("compare the runs of this launch: ")]
    query = unquote(compare.split("#/compare-runs?", 1)[1])
    listed = json.loads(query.split("runs=", 1)[1].split("&experiments=", 1)[0])
    assert sorted(listed) == sorted(r.info.run_id for r in runs) and len(listed) == 2
    assert query.endswith(f"&experiments={json.dumps([experiment.experiment_id])}&workflowType=machine_learning")


def test_source_tags_queue_time_and_dataset_inputs(launched: dict[str, Any]) -> None:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    for run in launched["runs"]:
        tags = run.data.tags
        assert tags["mlflow.source.git.commit"] == commit
        assert (tags["mlflow.source.name"], tags["mlflow.source.type"]) == ("harness/launch.py", "JOB")
        assert tags["code_version"].startswith(commit)
        inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
        assert set(inputs) == {"cluttered_mnist-train", "cluttered_mnist-val"}
        assert [t.value for t in inputs["cluttered_mnist-train"].tags] == ["training"]
        assert inputs["cluttered_mnist-train"].dataset.digest != inputs["cluttered_mnist-val"].dataset.digest
        assert json.loads(inputs["cluttered_mnist-val"].dataset.source)["tags"]["split"] == "val"


def test_start_time_is_the_jobs_start_and_queue_time_is_apart(launched: dict[str, Any]) -> None:
    """Both runs were submitted at once, one job at a time: seed1's job waited for seed0's whole run.
    Its MLflow start time is when its job started, not the submission (the launcher's placeholder,
    deleted once the job's own run exists, which names it)."""
    from mlflow.entities import ViewType

    client, experiment = launched["client"], launched["experiment"]
    seed0, seed1 = sorted(launched["runs"], key=lambda r: r.info.run_name)
    assert seed1.info.start_time >= seed0.info.end_time - 1000  # not its submission, before seed0 trained
    waited = seed1.data.metrics["queue_time_s"]
    assert waited >= (seed0.info.end_time - seed0.info.start_time) / 1000  # seed0's whole run
    assert seed0.data.metrics["queue_time_s"] < waited
    placeholders = client.search_runs(
        [experiment.experiment_id], "tags.kind = 'train'", run_view_type=ViewType.DELETED_ONLY
    )
    assert sorted(p.data.tags["replaced_by"] for p in placeholders) == sorted(r.info.run_id for r in launched["runs"])
    for run in (seed0, seed1):
        (placeholder,) = [p for p in placeholders if p.data.tags["replaced_by"] == run.info.run_id]
        assert run.data.tags["queued_as"] == placeholder.info.run_id
        assert placeholder.info.start_time <= seed0.info.start_time  # both created at submission
        assert run.data.tags["mlflow.parentRunId"] == placeholder.data.tags["mlflow.parentRunId"]
        assert run.data.tags["job_id"] == placeholder.data.tags["job_id"]  # the job's id, for relaunch and cancel
    binding = json.loads((launched["tmp"] / "runs" / "usage" / "tiny" / "seeds" / "seed1" / "run.json").read_text())
    assert binding["mlflow_run_id"] == seed1.info.run_id and binding["queued_as"] == seed1.data.tags["queued_as"]


def test_final_model_is_a_loadable_mlflow_model_linked_to_its_metrics(launched: dict[str, Any]) -> None:
    client, run = launched["client"], launched["runs"][0]
    (logged,) = client.search_logged_models(
        [launched["experiment"].experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
    )
    assert logged.name == "model" and logged.status == "READY"
    linked = {m.key for m in logged.metrics}
    assert {"val/acc1", "gflops", "throughput_img_s"} <= linked
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc1")] == [0]  # linked, not doubled
    mlflow.set_tracking_uri(launched["uri"])
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    assert model(torch.zeros(2, 1, 64, 64)).shape == (2, 10)
    assert "model.pth" in {a.path for a in client.list_artifacts(run.info.run_id)}  # the weights stay an artifact


def test_a_relaunch_that_submits_nothing_records_no_parent_run(launched: dict[str, Any]) -> None:
    client, experiment = launched["client"], launched["experiment"]
    parents = lambda: client.search_runs([experiment.experiment_id], "tags.kind = 'launch'")  # noqa: E731
    assert len(parents()) == 1
    again = launch(launched["tmp"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 submitted, 2 skipped" in again.stdout and "parent run none (nothing submitted)" in again.stdout
    assert len(parents()) == 1
    assert "compare the runs" not in again.stdout and "runs table: " in again.stdout
