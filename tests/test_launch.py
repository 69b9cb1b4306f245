"""Specs and the launcher through their CLIs: validation, dry run, local and SLURM submission,
idempotence and preemption (against the real local SLURM of scripts/slurm-local.sh)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[1]

MINI: dict[str, Any] = {
    "name": "mini",
    "description": "a tiny two-stage spec for the tests",
    "table": "sparsification-strategies",
    "default_scale": "tiny",
    "base": {
        "model": {"name": "dynamicvit_tiny_patch8_64", "keep_ratio": 0.7},
        "data": {"name": "cluttered_mnist", "train_digits": 128, "val_digits": 32, "val_placements": 1},
        "aug": {"mixup": 0.0, "cutmix": 0.0, "label_smoothing": 0.0},
        "optim": {"warmup_epochs": 0, "backbone_freeze_epochs": 0, "lr_base_batch": 32},
        "train": {"epochs": 1, "batch_size": 32},
        "tracking": {"visualize_images": 0},
    },
    "scales": {
        "tiny": {"slurm": {"cpus_per_task": 1, "timeout_min": 20}},
        "paper": {
            "model.name": "dynamicvit_deit_small_patch16_224",
            "data": {"name": "imagenet", "root": "/nonexistent/ILSVRC2012"},
            "slurm": {"partition": "gpu", "gpus_per_node": 8, "tasks_per_node": 8},
        },
    },
    "stages": {
        "teacher": {"model.variant": "dense", "optim": {"backbone_lr_scale": 1.0, "freeze": []}, "row": "teacher"},
        "students": {
            "after": "teacher",
            "init_from": "teacher",
            "distill_from": "teacher",
            "runs": {
                "variants": [
                    {"name": "dynamic", "row": "a/dynamic", "set": {"model.variant": "dynamic"}},
                    {"name": "static", "row": "a/static", "set": {"model.variant": "static"}},
                ]
            },
        },
    },
}


def write_spec(tmp: Path, spec: dict[str, Any], name: str = "mini.yaml") -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def launch(tmp: Path, spec: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "harness.launch",
            str(spec),
            "--output-root",
            str(tmp / "runs"),
            "--tracking-uri",
            f"sqlite:///{tmp}/mlflow.db",
            *args,
        ],
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def status(tmp: Path, spec: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "harness.status",
            str(spec),
            "--output-root",
            str(tmp / "runs"),
            "--tracking-uri",
            f"sqlite:///{tmp}/mlflow.db",
            *args,
        ],
        cwd=tmp,
        capture_output=True,
        text=True,
    )


def train_runs(tmp: Path, experiment: str = "mini") -> list:
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], "tags.kind = 'train'") if exp else []


# ------------------------------------------------------------------------------ validation
def test_every_spec_error_at_once_and_nothing_submitted(tmp_path: Path) -> None:
    spec = yaml.safe_load(yaml.safe_dump(MINI))
    spec["base"]["model"]["keep_ratoi"] = 0.5
    spec["base"]["train"]["epochs"] = "many"
    spec["stages"]["students"]["runs"]["variants"].append(
        {"name": "bad", "set": {"model.keep_ratio": 1.5, "model.variant": "magic"}}
    )
    spec["stages"]["extra"] = {"after": ["nowhere", "extra"]}
    result = launch(tmp_path, write_spec(tmp_path, spec))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    path = str(tmp_path / "mini.yaml")
    expected = [
        "base.model.keep_ratoi: unknown key (did you mean 'keep_ratio'?)",
        "base.train.epochs: Input should be a valid integer",
        "stages.students.runs.variants[2].set.model.keep_ratio: Input should be less than or equal to 1, got 1.5",
        "stages.students.runs.variants[2].set.model.variant: Input should be 'dense', 'dynamic'",
        "stages.extra.after: no stage named 'nowhere'",
        "stages.extra.after: a stage cannot depend on itself",
    ]
    for fragment in expected:
        assert any(line.startswith(path + ": ") and fragment in line for line in lines), (fragment, lines)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (
            lambda s: s["base"]["model"].update(name="dynamicvit_tiny_patch8_46"),
            "base.model.name: unknown model (did you mean 'dynamicvit_tiny_patch8_64'?)",
        ),
        (
            lambda s: s["stages"]["students"].update(after="teachers"),
            "stages.students.after: no stage named 'teachers'",
        ),
        (lambda s: s["stages"]["teacher"].update(after="students"), "stages: dependency cycle among students, teacher"),
        (
            lambda s: s["stages"]["students"]["runs"]["variants"][0]["set"].update({"model.pruning_loc": [2, 9]}),
            "stages.students.runs.variants[0].set.model.pruning_loc: "
            "each location must be a block index in [0, 7], got [2, 9]",
        ),
    ],
)
def test_spec_errors_name_the_field(tmp_path: Path, mutate, fragment: str) -> None:
    spec = yaml.safe_load(yaml.safe_dump(MINI))
    mutate(spec)
    result = launch(tmp_path, write_spec(tmp_path, spec), "--dry-run")
    assert result.returncode == 2
    assert fragment in result.stderr, result.stderr


def test_missing_dataset_of_the_chosen_scale_and_yaml_syntax(tmp_path: Path) -> None:
    path = write_spec(tmp_path, MINI)
    result = launch(tmp_path, path, "--scale", "paper", "--dry-run")
    assert result.returncode == 2
    assert f"{path}: scales.paper.data.root: no such folder, got '/nonexistent/ILSVRC2012'" in result.stderr
    ok = launch(tmp_path, path, "--scale", "paper", "--dry-run", f"scales.paper.data.root={tmp_path}")
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nbase:\n  model: {name: a\n  data: 1\n")
    result = launch(tmp_path, bad, "--dry-run")
    assert result.returncode == 2 and "bad.yaml: YAML syntax error at line 4" in result.stderr


def test_dry_run_of_a_100_run_sweep_without_torch(tmp_path: Path) -> None:
    spec = yaml.safe_load(yaml.safe_dump(MINI))
    spec["stages"]["students"]["runs"]["grid"] = {
        "model.keep_ratio": [0.5, 0.6, 0.7, 0.8, 0.9],
        "train.seed": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
    }
    path = write_spec(tmp_path, spec)
    code = (
        "import sys, runpy; sys.argv = ['harness.launch', sys.argv[1], '--dry-run'];\n"
        "try:\n    runpy.run_module('harness.launch', run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code == 0, e.code\n"
        "assert 'torch' not in sys.modules and 'mlflow' not in sys.modules, 'dry run imported torch/mlflow'\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("mini (tiny): 101 runs in stages teacher -> students")
    assert len(lines) == 1 + 1 + 101
    header = lines[1].split()
    assert "model.keep_ratio" in header and "train.seed" in header and "key" in header
    assert any(line.split()[1] == "dynamic-keep_ratio0.9-seed9" for line in lines[2:])


# ------------------------------------------------------------------------------ submission
def test_a_failed_local_run_stops_the_launch_before_the_next_stage(tmp_path: Path) -> None:
    spec = yaml.safe_load(yaml.safe_dump(MINI))
    spec["stages"]["teacher"]["optim"]["lr"] = 1e30  # the second step's loss is not finite
    result = launch(tmp_path, write_spec(tmp_path, spec), "--executor", "local", "--wait")
    assert result.returncode == 1, result.stderr
    assert "teacher: running 1 here, 1 at a time" in result.stderr
    assert "teacher/teacher failed: " in result.stderr and "non-finite loss" in result.stderr
    assert "teacher: a run failed; later stages are not submitted" in result.stderr
    (run,) = train_runs(tmp_path)  # no student was created
    assert run.data.tags["stage"] == "teacher" and run.info.status == "FAILED"
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert client.get_run(run.data.tags["mlflow.parentRunId"]).info.status == "FAILED"


def test_local_launch_is_idempotent(tmp_path: Path) -> None:
    path = write_spec(tmp_path, MINI)
    first = launch(tmp_path, path, "--executor", "local")
    assert first.returncode == 0, first.stderr
    runs = train_runs(tmp_path)
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
    parents = {r.data.tags["mlflow.parentRunId"] for r in runs}
    assert len(parents) == 1
    assert {r.data.tags["row"] for r in runs} == {"teacher", "a/dynamic", "a/static"}
    students = [r for r in runs if r.data.tags["stage"] == "students"]
    assert all(r.data.params["teacher.run_dir"].endswith("runs/mini/tiny/teacher/teacher") for r in students)
    assert (tmp_path / "runs/mini/tiny/students/dynamic/job.log").is_file()

    again = launch(tmp_path, path, "--executor", "local")
    assert again.returncode == 0 and "0 submitted, 3 skipped (finished)" in again.stdout
    # one more student, of 2 epochs validated every 2nd: only it runs, and status counts its epochs
    spec = yaml.safe_load(yaml.safe_dump(MINI))
    spec["stages"]["students"]["runs"]["variants"].append(
        {
            "name": "random",
            "row": "b/random",
            "set": {"model.variant": "random", "train.epochs": 2, "train.eval_every": 2},
        }
    )
    more = write_spec(tmp_path, spec, "more.yaml")
    half = launch(tmp_path, more, "--executor", "local")
    assert half.returncode == 0 and "1 submitted, 3 skipped" in half.stdout, half.stdout
    assert len(train_runs(tmp_path)) == 4
    table = status(tmp_path, more)
    assert table.returncode == 0, table.stderr
    rows = {line.split()[1]: line.split() for line in table.stdout.splitlines()[1:]}
    assert rows["teacher"][2:4] == ["FINISHED", "1/1"]
    assert rows["random"][2:4] == ["FINISHED", "2/2"]  # validated once, trained two epochs
    # --rerun: a fresh run of a finished one, its old folder kept aside (the teacher alone: one job)
    spec["stages"] = {"teacher": spec["stages"]["teacher"]}
    rerun = launch(tmp_path, write_spec(tmp_path, spec, "teacher.yaml"), "--executor", "local", "--rerun")
    assert rerun.returncode == 0 and "1 submitted, 0 skipped" in rerun.stdout, rerun.stderr
    teachers = [r for r in train_runs(tmp_path) if r.data.tags["stage"] == "teacher"]
    assert len(teachers) == 2 and all(r.info.status == "FINISHED" for r in teachers)
    assert any(p.name.startswith("teacher.before-") for p in (tmp_path / "runs/mini/tiny/teacher").iterdir())


def test_a_run_killed_hard_is_resumed_by_the_next_launch(tmp_path: Path) -> None:
    """SIGKILL to the launcher and its job (a crash, the OOM killer): MLflow still says RUNNING.
    The next launch sees that the job is gone and resumes the same MLflow run."""
    import os
    import signal

    spec = yaml.safe_load(yaml.safe_dump(MINI))
    spec["stages"] = {"teacher": spec["stages"]["teacher"]}
    spec["base"]["train"]["epochs"] = 3
    path = write_spec(tmp_path, spec)
    cmd = [
        sys.executable,
        "-m",
        "harness.launch",
        str(path),
        "--output-root",
        str(tmp_path / "runs"),
        "--tracking-uri",
        f"sqlite:///{tmp_path}/mlflow.db",
        "--executor",
        "local",
    ]
    launcher = subprocess.Popen(
        cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    checkpoint = tmp_path / "runs/mini/tiny/teacher/teacher/checkpoint.pth"
    deadline = time.time() + 300
    while not checkpoint.exists() and time.time() < deadline:  # killed after its first epoch
        time.sleep(0.2)
    assert checkpoint.exists(), "the run never wrote its first checkpoint"
    (run,) = train_runs(tmp_path)
    job_pid = int(run.data.tags["job_id"].split("_")[0])
    os.killpg(launcher.pid, signal.SIGKILL)
    os.kill(job_pid, signal.SIGKILL)
    launcher.wait(timeout=30)
    time.sleep(0.5)
    (stale,) = train_runs(tmp_path)
    assert stale.info.status == "RUNNING"

    again = launch(tmp_path, path, "--executor", "local")
    assert again.returncode == 0, again.stderr
    assert "its job is gone; resubmitting it" in again.stderr
    (resumed,) = train_runs(tmp_path)
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    history = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_metric_history(run.info.run_id, "val/acc1")
    steps = [m.step for m in history]  # resumed, not restarted: no epoch twice (epoch 0's point may
    assert len(steps) == len(set(steps)) and {1, 2} <= set(steps)  # die queued in the killed process)


def test_auto_executor_falls_back_to_local_when_the_controller_is_down(tmp_path: Path, monkeypatch, capsys) -> None:
    """SLURM client installed, controller down (a laptop with the packages, a stopped cluster).

    Fixture, labelled: `sbatch` and `sinfo` here are two-line scripts standing in for the SLURM
    client of such a machine; `sinfo` fails the way the real one does without a controller.
    """
    from harness.cluster import choose_executor

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sinfo").write_text(
        "#!/bin/sh\necho 'slurm_load_partitions: Unable to contact slurm controller (connect failure)' >&2\nexit 1\n"
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    assert choose_executor("auto") == "local"
    assert "Unable to contact slurm controller" in capsys.readouterr().err
    assert choose_executor("slurm") == "slurm"  # an explicit choice is kept
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert choose_executor("auto") == "local"


def slurm_available() -> bool:
    from harness.cluster import slurm_reachable

    return bool(shutil.which("sbatch")) and slurm_reachable(timeout_s=30)[0]


needs_slurm = pytest.mark.skipif(not slurm_available(), reason="no SLURM cluster (bash scripts/slurm-local.sh start)")


def sacct(job_id: str, fields: str) -> list[str]:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", fields], capture_output=True, text=True)
    return out.stdout.strip().splitlines()


def sacct_state(job_id: str) -> str:
    """The job's state in accounting; '' while slurmdbd has not recorded the job yet (just submitted)."""
    return (sacct(job_id, "State") or [""])[0]


@pytest.mark.slurm
@needs_slurm
def test_slurm_launch_with_afterok_dependency(tmp_path: Path) -> None:
    path = write_spec(tmp_path, MINI)
    result = launch(tmp_path, path, "--executor", "slurm", "--wait")
    assert result.returncode == 0, result.stderr
    runs = {r.data.tags["row"]: r for r in train_runs(tmp_path)}
    assert set(runs) == {"teacher", "a/dynamic", "a/static"}
    assert all(r.info.status == "FINISHED" for r in runs.values())
    teacher_job = runs["teacher"].data.tags["slurm_job_id"]
    student_job = runs["a/dynamic"].data.tags["slurm_job_id"]
    (teacher_end,) = sacct(teacher_job, "End")
    (student_start,) = sacct(student_job, "Start")
    assert student_start >= teacher_end  # ISO timestamps: afterok held the students back
    table = status(tmp_path, path)
    assert table.returncode == 0
    assert table.stdout.count("FINISHED") == 3 and teacher_job in table.stdout
    again = launch(tmp_path, path, "--executor", "slurm")
    assert again.returncode == 0 and "0 submitted, 3 skipped (finished)" in again.stdout, again.stdout


@pytest.mark.slurm
@needs_slurm
def test_slurm_preemption_requeues_into_the_same_mlflow_run(tmp_path: Path) -> None:
    spec = yaml.safe_load(yaml.safe_dump(MINI))
    spec["stages"] = {
        "only": {
            "model.variant": "random",
            "train.epochs": 3,
            "row": "b/random",
            "data.train_digits": 512,
            "losses": {"kl": 0, "token": 0},
        }
    }
    path = write_spec(tmp_path, spec)
    result = launch(tmp_path, path, "--executor", "slurm")
    assert result.returncode == 0, result.stderr
    (run,) = train_runs(tmp_path)
    job_id = run.data.tags["slurm_job_id"]
    checkpoint = tmp_path / "runs/mini/tiny/only/only/checkpoint.pth"
    deadline = time.time() + 300
    while not checkpoint.exists() and time.time() < deadline:
        assert sacct_state(job_id) in ("PENDING", "RUNNING", ""), (
            tmp_path / "runs/mini/tiny/only/only/job.log"
        ).read_text()
        time.sleep(0.2)
    assert checkpoint.exists()
    subprocess.run(["scancel", "--signal", "USR2", job_id], check=True)  # what SLURM sends before a time-out
    deadline = time.time() + 120
    while "requeued" not in train_runs(tmp_path)[0].data.tags and time.time() < deadline:
        time.sleep(0.5)
    waiting = train_runs(tmp_path)[0]
    assert "requeued" in waiting.data.tags and waiting.info.status in ("SCHEDULED", "RUNNING")  # never KILLED
    again = launch(tmp_path, path, "--executor", "slurm")  # while SLURM holds it for requeue: no second job
    assert again.returncode == 0 and "0 submitted, 1 skipped (in flight)" in again.stdout, again.stdout
    log = tmp_path / "runs/mini/tiny/only/only/job.log"
    deadline = time.time() + 420
    while time.time() < deadline:
        state = sacct_state(job_id)
        if (
            state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
            and (tmp_path / "runs/mini/tiny/only/only/result.json").exists()
        ):
            break
        time.sleep(2)
    assert state == "COMPLETED", (state, log.read_text()[-3000:])
    (final,) = train_runs(tmp_path)
    assert final.info.run_id == waiting.info.run_id and final.info.status == "FINISHED"  # the job's own run
    assert run.info.run_id in (final.data.tags["queued_as"], final.info.run_id)  # it replaced the placeholder
    history = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_metric_history(final.info.run_id, "val/acc1")
    assert [m.step for m in history] == [0, 1, 2]
    assert "preempted" in log.read_text().lower() or "requeu" in log.read_text().lower()
