"""The training engine end to end, through `python -m harness.train` and MLflow's contents."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
import yaml
from mlflow import MlflowClient

from harness.config import set_dotted

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "model": {"name": "dynamicvit_tiny_patch8_64", "variant": "dense"},
    "data": {"name": "cluttered_mnist", "train_digits": 256, "val_digits": 64, "val_placements": 1},
    "aug": {"mixup": 0.0, "cutmix": 0.0, "label_smoothing": 0.0},
    "optim": {
        "lr": 1e-3,
        "warmup_epochs": 0,
        "backbone_lr_scale": 1.0,
        "backbone_freeze_epochs": 0,
        "freeze": [],
        "lr_base_batch": 64,
    },
    "train": {"epochs": 2, "batch_size": 32, "ema": None},  # the default recipe's EMA only where a test asks
    "tracking": {"experiment": "engine-tests", "visualize_images": 2},
}


def write_config(tmp: Path, name: str, **overrides: Any) -> Path:
    data = json.loads(json.dumps(TINY))
    data["output_dir"] = str(tmp / name)
    data["tracking"]["uri"] = f"sqlite:///{tmp}/mlflow.db"
    for key, value in overrides.items():
        set_dotted(data, key.replace("__", "."), value)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def train(config: Path, *args: str, **popen: Any) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "harness.train", str(config), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        **popen,
    )


def runs(tmp: Path, experiment: str = "engine-tests") -> list[mlflow.entities.Run]:
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dense tiny teacher trained here (1 epoch): the stand-in for pretrained DeiT weights."""
    tmp = tmp_path_factory.mktemp("teacher")
    result = train(write_config(tmp, "teacher", train__epochs=1))
    assert result.returncode == 0, result.stderr
    return tmp / "teacher"


def student_overrides(teacher: Path) -> dict[str, Any]:
    return {
        "model__variant": "dynamic",
        "model__keep_ratio": 0.7,
        "optim__backbone_lr_scale": 0.1,
        "optim__freeze": ["cls_token", "pos_embed"],
        "aug__mixup": 0.8,
        "aug__cutmix": 1.0,
        "aug__label_smoothing": 0.1,
        "teacher__run_dir": str(teacher),
        "train__init_from": str(teacher),
        "tracking__tags": {"spec": "tests", "table": "engine"},
    }


def test_two_epoch_run_lands_in_mlflow(tmp_path: Path, teacher: Path) -> None:
    config = write_config(tmp_path, "student", train__ema=0.99, **student_overrides(teacher))
    result = train(config)
    assert result.returncode == 0, result.stderr
    (run,) = runs(tmp_path)
    assert run.info.status == "FINISHED"
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    assert params["model.variant"] == "dynamic" and params["model.keep_ratio"] == "0.7"
    assert params["losses.ratio.weight"] == "2.0" and params["teacher.run_dir"] == str(teacher)
    assert {"spec", "table", "variant", "run_key", "code_version"} <= set(tags)
    assert tags["variant"] == "dynamic" and len(tags["run_key"]) == 12
    per_epoch = [
        "train/loss",
        "train/loss_cls",
        "train/loss_ratio",
        "train/loss_kl",
        "train/loss_token",
        "train/keep_stage1",
        "train/keep_stage3",
        "val/acc1",
        "val/acc5",
        "val/loss",
        "val/keep_stage1",
        "val/keep_stage2",
        "val/keep_stage3",
        "lr",
        "lr_backbone",
        "tau",
        "val/acc1_best",
        "val/acc1_best_epoch",
        "val_ema/acc1",
        "val_ema/acc1_best",
    ]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    for key in per_epoch:
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [0, 1], key
    for key in ("gflops", "params_m", "throughput_img_s"):
        assert metrics[key] > 0, key
    assert metrics["val/keep_stage1"] == pytest.approx(44 / 64)
    assert metrics["tau"] == 1.0
    # the official codes report the best epoch's top-1 (and, with EMA, the EMA model's): so do we
    accs = [m.value for m in client.get_metric_history(run.info.run_id, "val/acc1")]
    assert metrics["val/acc1_best"] == max(accs) and metrics["val/acc1_best_epoch"] == accs.index(max(accs))
    ema_accs = [m.value for m in client.get_metric_history(run.info.run_id, "val_ema/acc1")]
    assert metrics["val_ema/acc1_best"] == max(ema_accs)
    assert tags["recipe"] == "dynamicvit-tpami" and tags["precision"] == "fp32"  # the CPU trains in fp32
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "kept_tokens.png", "model.pth"} <= artifacts
    png = Path(client.download_artifacts(run.info.run_id, "kept_tokens.png", str(tmp_path / "dl")))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    # a second call with the same config is answered from the finished run, nothing retrained
    again = train(config)
    assert again.returncode == 0 and len(runs(tmp_path)) == 1


def final_metrics(run: mlflow.entities.Run) -> dict[str, float]:
    timing = {"throughput_img_s", "epoch_time_s"}  # wall-clock measurements, never reproducible
    return {k: v for k, v in run.data.metrics.items() if k not in timing}


def test_resume_after_sigterm_is_exact(tmp_path: Path, teacher: Path) -> None:
    overrides = {**student_overrides(teacher), "train__epochs": 3}
    straight = train(write_config(tmp_path, "straight", **overrides, tracking__experiment="straight"))
    assert straight.returncode == 0, straight.stderr

    config = write_config(tmp_path, "killed", **overrides, tracking__experiment="killed")
    checkpoint = tmp_path / "killed" / "checkpoint.pth"
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.train", str(config)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while not checkpoint.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert checkpoint.exists(), "no checkpoint after epoch 1"
    proc.send_signal(signal.SIGTERM)  # what SLURM sends before preemption
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    state = torch.load(checkpoint, weights_only=False)
    assert (state["epoch"], state["batches_done"]) != (3, 0), "the run must be interrupted"
    assert checkpoint.stat().st_mode & 0o040, "checkpoints are readable by the group (shared clusters)"
    (killed_run,) = runs(tmp_path, "killed")
    assert killed_run.info.status == "KILLED"

    resumed = train(config)
    assert resumed.returncode == 0, resumed.stderr
    (run_a,) = runs(tmp_path, "straight")
    (run_b,) = runs(tmp_path, "killed")
    assert run_b.info.run_id == killed_run.info.run_id and run_b.info.status == "FINISHED"
    assert final_metrics(run_b) == final_metrics(run_a)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    for key in ("val/acc1", "train/loss", "val/loss"):
        history = client.get_metric_history(run_b.info.run_id, key)
        assert [m.step for m in history] == [0, 1, 2], key
        expected = client.get_metric_history(run_a.info.run_id, key)
        assert [m.value for m in history] == [m.value for m in expected], key
    if state["batches_done"]:  # interrupted mid-epoch: that epoch's time counts the part before the kill
        times = {m.step: m.value for m in client.get_metric_history(run_b.info.run_id, "epoch_time_s")}
        assert state["epoch_elapsed"] > 0 and times[state["epoch"]] >= state["epoch_elapsed"]


def test_ctrl_c_to_a_run_trained_by_hand_ends_it_killed_with_the_reason(tmp_path: Path) -> None:
    """SIGINT (Ctrl-C) to `python -m harness.train` once its run is RUNNING: KILLED, tag `error` says why
    (it was FAILED with an empty `error` before: str(KeyboardInterrupt()) is '')."""
    config = write_config(tmp_path, "ctrl-c", train__epochs=50)
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.train", str(config)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    deadline = time.time() + 300
    started: list[Any] = []
    while not started and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        experiment = client.get_experiment_by_name("engine-tests") if (tmp_path / "mlflow.db").exists() else None
        if experiment is not None:  # a metric logged: the session is open and training
            started = [r for r in client.search_runs([experiment.experiment_id]) if r.data.metrics]
    assert started, "the run never logged a metric"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    (run,) = client.search_runs([started[0].info.experiment_id])
    assert run.info.status == "KILLED", run.info.status
    # the reason says whether there is a checkpoint to resume from (the first is written at epoch 1's end)
    resumable = (tmp_path / "ctrl-c" / "checkpoint.pth").exists()
    assert run.data.tags["error"] == (
        "interrupted: Ctrl-C (SIGINT); the same command resumes from the last checkpoint"
        if resumable
        else "interrupted: Ctrl-C (SIGINT) before the first checkpoint (written at each epoch's end); the same "
        "command starts over, in a new MLflow run"
    ), run.data.tags


def test_a_hard_killed_run_resumes_without_logging_a_step_twice(tmp_path: Path) -> None:
    """SIGKILL mid-epoch 2: the steps logged since the epoch-1 checkpoint are not logged again."""
    config = write_config(tmp_path, "hard", train__epochs=3, optim__log_every=1)
    checkpoint = tmp_path / "hard" / "checkpoint.pth"
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.train", str(config)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    steps_per_epoch = 256 // 32
    deadline = time.time() + 300
    logged: list[int] = []
    while time.time() < deadline and proc.poll() is None:
        found = runs(tmp_path) if checkpoint.exists() else []
        logged = [m.step for m in client.get_metric_history(found[0].info.run_id, "train/loss_step")] if found else []
        if any(step > steps_per_epoch for step in logged):
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait(timeout=60)
    assert any(step > steps_per_epoch for step in logged), "killed after epoch 2 logged a step"
    assert train(config).returncode == 0
    (run,) = runs(tmp_path)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss_step")]
    assert sorted(steps) == list(range(3 * steps_per_epoch))


def test_nan_loss_fails_the_run_and_keeps_the_checkpoint(tmp_path: Path) -> None:
    # epoch 1: backbone frozen (lr 0) -> a good checkpoint; epoch 2: lr 1e30 -> the loss blows up
    config = write_config(tmp_path, "nan", optim__lr=1e30, optim__backbone_freeze_epochs=1, train__epochs=3)
    result = train(config)
    assert result.returncode == 1
    assert "non-finite loss at step" in result.stderr and "loss_cls=" in result.stderr
    (run,) = runs(tmp_path)
    assert run.info.status == "FAILED"
    assert "non-finite loss at step" in run.data.tags["error"]
    state = torch.load(tmp_path / "nan" / "checkpoint.pth", weights_only=False)
    assert state["epoch"] == 1 and state["batches_done"] == 0
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_two_process_gloo_ddp_logs_once(tmp_path: Path) -> None:
    config = write_config(tmp_path, "ddp", train__batch_size=16)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--standalone",
            "-m",
            "harness.train",
            str(config),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = runs(tmp_path)
    assert run.info.status == "FINISHED"
    history = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_metric_history(run.info.run_id, "val/acc1")
    assert [m.step for m in history] == [0, 1]
    assert run.data.params["train.batch_size"] == "16"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model__keep_ratoi": 0.5}, "model.keep_ratoi: unknown key (did you mean 'keep_ratio'?)"),
        ({"train__epochs": "many"}, "train.epochs: Input should be a valid integer"),
        ({"model__keep_ratio": 1.5}, "model.keep_ratio: Input should be less than or equal to 1"),
        ({"data__name": "imagenet", "data__root": "/nonexistent/imagenet"}, "/nonexistent/imagenet"),
    ],
)
def test_bad_configs_are_one_line_errors(tmp_path: Path, overrides: dict, message: str) -> None:
    config = write_config(tmp_path, "bad", **overrides)
    result = train(config)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(str(config)) and message in lines[0]
    assert not (tmp_path / "mlflow.db").exists() or not runs(tmp_path)


def test_overrides_on_the_command_line(tmp_path: Path) -> None:
    config = write_config(tmp_path, "cli")
    result = train(config, "train.epochs=1", "model.variant=static", "losses.kl=0", "losses.token=0")
    assert result.returncode == 0, result.stderr
    (run,) = runs(tmp_path)
    assert run.data.params["train.epochs"] == "1" and run.data.params["model.variant"] == "static"
    assert "train/loss_kl" not in run.data.metrics and "train/loss_ratio" in run.data.metrics


def test_eval_every_validates_every_nth_and_the_last_epoch(tmp_path: Path) -> None:
    result = train(write_config(tmp_path, "sparse-eval", train__epochs=3, train__eval_every=2))
    assert result.returncode == 0, result.stderr
    (run,) = runs(tmp_path)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [0, 1, 2]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc1")] == [1, 2]
    result_json = json.loads((tmp_path / "sparse-eval" / "result.json").read_text())
    assert result_json["metrics"]["val/acc1"] == run.data.metrics["val/acc1"]


def test_resume_logs_the_last_epochs_metrics_again_only_if_mlflow_lost_them(tmp_path: Path) -> None:
    """A hard kill loses the metric points still queued for the async logger. Simulated here by
    deleting the last epoch's points from the SQLite store after a finished run, then resuming
    from its checkpoint (result.json removed): the checkpoint's copy is logged once, not twice."""
    import sqlite3

    config = write_config(tmp_path, "lost", train__epochs=2)
    assert train(config).returncode == 0
    (run,) = runs(tmp_path)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    logged = [m.value for m in client.get_metric_history(run.info.run_id, "val/acc1") if m.step == 1]
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        db.execute(
            "DELETE FROM metrics WHERE run_uuid = ? AND step = 1 AND key != 'train/loss_step'", (run.info.run_id,)
        )
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc1")] == [0]

    for _ in range(2):  # the second resume finds the points and logs nothing
        (tmp_path / "lost" / "result.json").unlink()
        result = train(config)
        assert result.returncode == 0, result.stderr
        history = client.get_metric_history(run.info.run_id, "val/acc1")
        assert sorted(m.step for m in history) == [0, 1]
        assert [m.value for m in history if m.step == 1] == logged
    assert len(runs(tmp_path)) == 1 and runs(tmp_path)[0].info.status == "FINISHED"


def test_how_often_a_run_validates_does_not_change_its_training(tmp_path: Path) -> None:
    """Validation draws from torch's RNG (the val loader's seed, the `random` variant's picks);
    it runs on a copy of the RNG state, so validating after every epoch or only after the last
    trains the same model: the same second-epoch loss and the same final accuracy."""
    results = {}
    for every in (1, 2):
        name = f"every{every}"
        config = write_config(
            tmp_path,
            name,
            model__variant="random",
            model__keep_ratio=0.7,
            train__eval_every=every,
            tracking__experiment=name,
        )
        result = train(config, "losses.kl=0", "losses.token=0")
        assert result.returncode == 0, result.stderr
        (run,) = runs(tmp_path, name)
        client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
        history = {
            k: [m.value for m in client.get_metric_history(run.info.run_id, k)]
            for k in ("train/loss", "val/acc1", "val/loss")
        }
        results[every] = history
    assert len(results[1]["val/acc1"]) == 2 and len(results[2]["val/acc1"]) == 1
    assert results[1]["train/loss"] == results[2]["train/loss"]
    assert results[1]["val/acc1"][-1] == results[2]["val/acc1"][-1]
    assert results[1]["val/loss"][-1] == results[2]["val/loss"][-1]
