"""Searches through their CLI: real Optuna storages (journal file, SQLite), real worker processes
(local submitit jobs and the local SLURM of scripts/slurm-local.sh), MLflow's contents."""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import jupytext
import optuna
import pytest
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState

from harness import search as search_cli
from tests.test_launch import needs_slurm, sacct

REPO = Path(__file__).resolve().parents[1]
TEACHER = REPO / "checkpoints" / "tiny_teacher_dense.pth"  # the shipped tiny dense teacher
DONE = (TrialState.COMPLETE, TrialState.PRUNED)

SPEC: dict[str, Any] = {
    "name": "mini_search",
    "table": "keep-ratio",
    "default_scale": "tiny",
    "notebooks": ["analysis/notebooks/search_notebook.ipynb"],
    "base": {
        "model": {"name": "dynamicvit_tiny_patch8_64", "variant": "dynamic", "keep_ratio": 0.7},
        "data": {"name": "cluttered_mnist", "train_digits": 128, "val_digits": 32, "val_placements": 1},
        "aug": {"mixup": 0.0, "cutmix": 0.0, "label_smoothing": 0.0},
        "optim": {"warmup_epochs": 0, "backbone_freeze_epochs": 0, "lr_base_batch": 32},
        "losses": {"kl": 0, "token": 0},
        "train": {"epochs": 1, "batch_size": 32},
        "tracking": {"visualize_images": 0, "log_checkpoint": False},
    },
    "scales": {
        "tiny": {"slurm": {"cpus_per_task": 1, "timeout_min": 20}},
        "paper": {
            "model.name": "dynamicvit_deit_small_patch16_224",
            "data": {"name": "imagenet", "root": "/nonexistent/ILSVRC2012"},
        },
    },
    "search": {
        "space": {
            "model.keep_ratio": {"low": 0.5, "high": 0.9},
            "gumbel.tau": {"low": 0.1, "high": 10.0, "log": True},
            "gumbel.tau1": {"low": 0.1, "high": 10.0, "log": True},
            "gumbel.schedule": ["constant", "linear", "cosine", "exponential"],
        },
        "objectives": ["val/acc1", "gflops"],
        "sampler": {"name": "tpe", "seed": 0},
        "trials": 6,
        "workers": 2,
    },
}


def spec_with(**search: Any) -> dict[str, Any]:
    spec = copy.deepcopy(SPEC)
    spec["search"].update(search)
    return spec


def write_spec(tmp: Path, spec: dict[str, Any], name: str = "search.yaml") -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def cli_args(tmp: Path, spec: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "harness.search",
        str(spec),
        "--output-root",
        str(tmp / "runs"),
        "--tracking-uri",
        f"sqlite:///{tmp}/mlflow.db",
        *args,
    ]


def run_search(tmp: Path, spec: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cli_args(tmp, spec, *args), cwd=tmp, capture_output=True, text=True, timeout=timeout)


def study_dir(tmp: Path, name: str = "mini_search") -> Path:
    return tmp / "runs" / name / "tiny" / f"{name}-tiny"


def load(tmp: Path, storage: str = "study.journal", name: str = "mini_search") -> optuna.Study:
    location = study_dir(tmp, name) / storage
    assert location.is_file(), f"no {storage}: {sorted(p.name for p in study_dir(tmp, name).iterdir())}"
    url = f"sqlite:///{location}" if storage.endswith(".db") else str(location)
    return search_cli.open_study(url, f"{name}-tiny")


def mlflow_runs(tmp: Path, kind: str, experiment: str = "mini_search") -> list:
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], f"tags.kind = '{kind}'") if exp else []


def done(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(states=DONE)


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (
            lambda s: s["search"]["space"]["model.keep_ratio"].update(low=0.9, high=0.5),
            "search.space.model.keep_ratio: low must not exceed high, got low=0.9, high=0.5",
        ),
        (
            lambda s: s["search"]["space"]["gumbel.tau"].update(low=0.0),
            "search.space.gumbel.tau: a log scale needs low > 0, got low=0.0",
        ),
        (
            lambda s: s["search"]["space"].update({"model.keep_ratoi": s["search"]["space"].pop("model.keep_ratio")}),
            "search.space.model.keep_ratoi: unknown key (did you mean 'keep_ratio'?)",
        ),
        (
            lambda s: s["search"]["space"].update({"optim.learning_rate": {"low": 1e-4, "high": 1e-2}}),
            "search.space.optim.learning_rate: unknown key",
        ),
        (
            lambda s: s["search"]["space"]["model.keep_ratio"].update(high=1.5),
            "search.space.model.keep_ratio: Input should be less than or equal to 1, got 1.5",
        ),
        (
            lambda s: s["search"]["space"].update({"gumbel.schedule": ["constant", "zigzag"]}),
            "search.space.gumbel.schedule: Input should be 'constant', 'linear', 'cosine' or 'exponential', "
            "got 'zigzag'",
        ),
        (
            lambda s: s["search"].update(pruner={"name": "median"}),
            "search.pruner: Optuna prunes single-objective studies only (use none), got 'median'",
        ),
        (lambda s: s["search"].update(objectives=["val/top1"]), "search.objectives.0.metric: unknown metric"),
        (lambda s: s["search"].update(storage="sqlite:///study.db"), "search.storage.url: SQLite is for one process"),
        (lambda s: s["search"].update(trials=0), "search.trials: Input should be greater than 0, got 0"),
        (
            lambda s: s["base"]["model"].update(keep_ratio=2),
            "base.model.keep_ratio: Input should be less than or equal to 1",
        ),
    ],
)
def test_invalid_search_specs_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mutate, fragment: str
) -> None:
    spec = copy.deepcopy(SPEC)
    mutate(spec)
    path = write_spec(tmp_path, spec)
    code = search_cli.main(
        [
            str(path),
            "--executor",
            "local",
            "--output-root",
            str(tmp_path / "runs"),
            "--tracking-uri",
            f"sqlite:///{tmp_path}/mlflow.db",
        ]
    )
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith(f"{path}: ") and fragment in lines[0], lines
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_dry_run_validates_without_torch_and_chooses_the_storage(tmp_path: Path) -> None:
    spec = copy.deepcopy(SPEC)
    spec["search"]["space"] = {
        "model": {"keep_ratio": {"low": 0.5, "high": 0.9}},
        "optim.lr": {"low": 1e-5, "high": 1e-3, "log": True},
    }
    path = write_spec(tmp_path, spec)
    code = (
        "import sys, runpy; sys.argv = ['harness.search', *sys.argv[1:]]\n"
        "try:\n    runpy.run_module('harness.search', run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code == 0, e.code\n"
        "assert 'torch' not in sys.modules and 'optuna' not in sys.modules, 'a dry run imported torch/optuna'\n"
    )
    common = [str(path), "--dry-run", "--executor", "local", "--output-root", str(tmp_path / "runs")]
    several = subprocess.run([sys.executable, "-c", code, *common], cwd=REPO, capture_output=True, text=True)
    assert several.returncode == 0, several.stderr
    assert f"storage journal {study_dir(tmp_path)}/study.journal" in several.stdout
    assert "model.keep_ratio  float [0.5, 0.9]  (base 0.7)" in several.stdout and "optim.lr" in several.stdout
    one = subprocess.run(
        [sys.executable, "-c", code, *common, "--workers", "1"], cwd=REPO, capture_output=True, text=True
    )
    assert one.returncode == 0 and f"storage sqlite sqlite:///{study_dir(tmp_path)}/study.db" in one.stdout, one.stderr
    assert not (tmp_path / "runs").exists()


def test_a_password_written_into_the_storage_url_is_warned_about_and_never_shown(tmp_path: Path) -> None:
    """A typed-out password ends up in the job files and MLflow's tag: say so, and how to avoid it;
    the same URL through ${OPTUNA_STORAGE} gets no warning. Neither prints the password."""
    url = "postgresql+psycopg://harness:s3cret-pw@127.0.0.1:1/optuna"
    common = ["--dry-run", "--executor", "local"]
    typed = run_search(tmp_path, write_spec(tmp_path, spec_with(storage={"url": url})), *common)
    assert typed.returncode == 0, typed.stderr
    (warning,) = [line for line in typed.stderr.splitlines() if line.startswith("warning: ")]
    assert "search.storage.url: the password is written out" in warning and "${OPTUNA_STORAGE}" in warning
    via_env = subprocess.run(
        cli_args(tmp_path, write_spec(tmp_path, spec_with(storage={"url": "${OPTUNA_STORAGE}"}), "env.yaml"), *common),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "OPTUNA_STORAGE": url},
    )
    assert via_env.returncode == 0 and "warning: " not in via_env.stderr, via_env.stderr
    assert "s3cret-pw" not in typed.stdout + typed.stderr + via_env.stdout + via_env.stderr


# ------------------------------------------------------------------- a search, end to end
@pytest.fixture(scope="module")
def tiny_search(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """6 trials, 2 local worker processes, journal storage, two objectives (a Pareto front)."""
    tmp = tmp_path_factory.mktemp("search")
    started = time.time()
    result = run_search(tmp, write_spec(tmp, SPEC), "--executor", "local")
    assert result.returncode == 0, result.stderr[-4000:]
    return {"tmp": tmp, "result": result, "seconds": time.time() - started}


def test_tiny_search_meets_the_budget_with_one_child_run_per_trial(tiny_search: dict[str, Any]) -> None:
    tmp = tiny_search["tmp"]
    study = load(tmp)  # the journal file, as workers and optuna-dashboard open it
    trials = [t for t in study.trials if not t.user_attrs.get("surplus")]
    assert len(done(study)) == 6 and len(trials) == 6
    assert len({t.user_attrs["worker"] for t in trials}) == 2, "both workers ran trials"
    children = mlflow_runs(tmp, "trial")
    (parent,) = mlflow_runs(tmp, "search")
    assert len(children) == 6 and {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert parent.info.status == "FINISHED" and parent.data.tags["storage_kind"] == "journal"
    assert study.user_attrs["mlflow_parent_run_id"] == parent.info.run_id
    by_number = {int(r.data.tags["trial_number"]): r for r in children}
    assert sorted(by_number) == sorted(t.number for t in trials)
    pareto = {t.number for t in study.best_trials}
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    for trial in trials:
        run = by_number[trial.number]
        assert run.info.run_id == trial.user_attrs["mlflow_run_id"]
        assert run.data.tags["trial_state"] == trial.state.name
        assert run.data.tags["best_trial"] == str(trial.number in pareto).lower()
        assert json.loads(run.data.tags["search_params"]) == trial.params
        assert float(run.data.params["model.keep_ratio"]) == pytest.approx(trial.params["model.keep_ratio"])
        assert run.data.params["gumbel.schedule"] == trial.params["gumbel.schedule"]
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc1")] == [0]
        assert trial.values == pytest.approx([run.data.metrics["val/acc1"], run.data.metrics["gflops"]])
    assert parent.data.tags["best_trials"] == ",".join(map(str, sorted(pareto)))
    assert f"dashboard: optuna-dashboard {study_dir(tmp)}/study.journal" in tiny_search["result"].stdout


def test_search_notebook_runs_headless_on_the_study(tiny_search: dict[str, Any]) -> None:
    tmp = tiny_search["tmp"]
    notebook, source = (
        jupytext.read(REPO / "analysis" / "notebooks" / f"search_notebook.{ext}") for ext in ("ipynb", "py")
    )
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    assert [c.source for c in notebook.cells] == [c.source for c in source.cells], "run jupytext --sync"
    (parameters,) = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    for key in ("storage", "study_name", "tracking_uri", "output_dir"):
        assert f"{key} = " in parameters.source, key
    # the same command again: the budget is met, so nothing is submitted; --report runs the notebook,
    # which finds the study (storage, name) through the MLflow parent run
    again = run_search(tmp, tmp / "search.yaml", "--executor", "local", "--report")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "submitted" not in again.stderr and len(mlflow_runs(tmp, "search")) == 1
    out = tmp / "reports" / "mini_search" / "tiny"
    assert "# Search mini_search-tiny" in again.stdout and "(6 complete)" in again.stdout
    assert "no finished runs in MLflow experiment 'table1'" in (out / "search.md").read_text()
    for name in ("search_history.png", "search_pareto.png", "search_tau.png", "search_importance.png", "search.ipynb"):
        assert (out / name).is_file(), name
    assert (out / "search_pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_optuna_dashboard_serves_the_journal_study(tiny_search: dict[str, Any]) -> None:
    dashboard = Path(sys.executable).with_name("optuna-dashboard")
    if not dashboard.exists():
        pytest.skip("optuna-dashboard is not installed (pip install -e '.[dev]')")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [str(dashboard), str(study_dir(tiny_search["tmp"]) / "study.journal"), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline, body = time.time() + 60, ""
        while time.time() < deadline and not body:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as response:
                    body = response.read().decode()
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                time.sleep(0.5)
        studies = json.loads(body)["study_summaries"]
        assert [s["study_name"] for s in studies] == ["mini_search-tiny"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ---------------------------------------------------------------------------------- pruning
@pytest.mark.skipif(not TEACHER.is_file(), reason=f"needs the tiny teacher {TEACHER} (experiments/pretrain_tiny.yaml)")
def test_median_pruner_stops_a_clearly_bad_trial(tmp_path: Path) -> None:
    # Fine-tuning starts from the trained dense teacher: a small learning rate keeps its accuracy,
    # lr 1.0 wrecks it at the first epoch. One worker (SQLite with heartbeats), trials in a known order.
    spec = spec_with(
        space={"optim.lr": {"low": 1e-5, "high": 1.0, "log": True}},
        objectives=["val/acc1"],
        pruner={"name": "median", "n_startup_trials": 2, "n_warmup_steps": 0},
        trials=4,
        workers=1,
        enqueue=[{"optim.lr": 1e-4}, {"optim.lr": 3e-4}, {"optim.lr": 1.0}],
    )
    spec["base"]["model"]["pretrained"] = str(TEACHER)
    spec["base"]["train"]["epochs"] = 2
    spec["base"]["data"]["val_digits"] = 64
    result = run_search(tmp_path, write_spec(tmp_path, spec), "--executor", "local")
    assert result.returncode == 0, result.stderr[-4000:]
    study = load(tmp_path, "study.db")
    assert len(done(study)) == 4
    bad = next(t for t in study.trials if t.params.get("optim.lr") == 1.0)
    assert bad.state == TrialState.PRUNED, [(t.number, t.state.name, t.intermediate_values) for t in study.trials]
    assert list(bad.intermediate_values) == [0], "pruned after its first epoch, not trained to the end"
    good = [t for t in study.trials if t.params["optim.lr"] in (1e-4, 3e-4)]
    assert all(t.state == TrialState.COMPLETE and t.value > bad.intermediate_values[0] + 20 for t in good)
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(bad.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["trial_state"] == "PRUNED"
    assert run.data.tags["best_trial"] == "false" and "gflops" not in run.data.metrics
    best = [r for r in mlflow_runs(tmp_path, "trial") if r.data.tags["best_trial"] == "true"]
    assert [r.info.run_id for r in best] == [study.best_trial.user_attrs["mlflow_run_id"]]


# ---------------------------------------------------------------------------- failed worker
def test_killed_worker_fails_its_trial_and_the_budget_is_still_met(tmp_path: Path) -> None:
    spec = spec_with(objectives=["val/acc1"], pruner={"name": "none"})
    proc = subprocess.Popen(
        cli_args(tmp_path, write_spec(tmp_path, spec), "--executor", "local"),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    journal = study_dir(tmp_path) / "study.journal"
    victim = None
    deadline = time.time() + 300
    while victim is None and time.time() < deadline and proc.poll() is None:
        try:  # the journal file can exist a moment before the study is written into it
            running = load(tmp_path).get_trials(states=(TrialState.RUNNING,)) if journal.is_file() else []
        except KeyError:
            running = []
        victim = next((t for t in running if "mlflow_run_id" in t.user_attrs), None)  # training has begun
        time.sleep(0.1)
    assert victim is not None, "no trial started"
    os.kill(victim.user_attrs["worker_pid"], signal.SIGKILL)
    _out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    assert f"trial {victim.number} failed: its worker ({victim.user_attrs['worker']}) is gone" in err
    study = load(tmp_path)  # the study is intact: every trial ended, the budget is met without the failed one
    assert study.trials[victim.number].state == TrialState.FAIL
    assert len(done(study)) == 6
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(victim.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["trial_state"] == "FAIL"
    children = mlflow_runs(tmp_path, "trial")
    assert sum(r.data.tags["trial_state"] == "COMPLETE" for r in children) == 6
    assert len({r.data.tags["mlflow.parentRunId"] for r in children}) == 1


# ------------------------------------------------------------------------------------ SLURM
@pytest.mark.slurm
@needs_slurm
def test_two_workers_on_slurm(tmp_path: Path) -> None:
    name = f"search_slurm_{os.getpid()}"  # a job name of its own, to cancel exactly these jobs if it fails
    spec = spec_with(trials=4)
    spec["name"] = name
    try:  # generous: other users' jobs may hold the test cluster's two cores for a while
        result = run_search(tmp_path, write_spec(tmp_path, spec), "--executor", "slurm", timeout=840)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", "--name", f"{name}-trials"], capture_output=True)
        raise
    assert result.returncode == 0, result.stderr[-4000:]
    study = load(
        tmp_path, name=name
    )  # auto storage: a journal file, the default partition of the test cluster being one node
    assert len(done(study)) == 4
    workers = {t.user_attrs["worker"] for t in study.trials}
    assert all("_" in w for w in workers), workers  # SLURM array tasks: <array job>_<index>
    deadline = time.time() + 60  # a job's result is written just before SLURM sees it end
    while {s for w in workers for s in sacct(w, "State")} & {"RUNNING", "COMPLETING"} and time.time() < deadline:
        time.sleep(1)
    assert {state for w in workers for state in sacct(w, "State")} == {"COMPLETED"}
    assert len(mlflow_runs(tmp_path, "trial", name)) == 4
    (parent,) = mlflow_runs(tmp_path, "search", name)
    assert parent.data.tags["executor"] == "slurm" and parent.data.tags["storage_kind"] == "journal"
