"""Issue 22 point 7: a store the code before the refactor filled is still recognised by this code.

A small two-stage spec is launched with the code of commit 33f6e0f (main's head before issue 22's
refactor round, extracted from this checkout's git history) and relaunched with this checkout's code
on the same store and output root: nothing is submitted, MLflow gets no new run, the run folders are
left as they were, and the run keys the old jobs recorded are the ones this code computes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from mlflow.entities import ViewType

from tests.test_launch import MINI
from tests.test_reliability import cli, snapshot

REPO = Path(__file__).resolve().parents[1]
BEFORE = "33f6e0f"  # main before issue 22's refactor (cluster, lifecycle, launch package, helpers, ruff)
OVERRIDES = ["base.data.train_digits=64"]  # two optimiser steps per run: the launch trains in seconds


def old_checkout(dest: Path) -> Path:
    """The tree of commit BEFORE under dest; skipped, saying why, where the history does not hold it."""
    try:
        found = subprocess.run(
            ["git", "-C", str(REPO), "cat-file", "-e", f"{BEFORE}^{{commit}}"], capture_output=True, timeout=30
        )
    except FileNotFoundError:
        pytest.skip(f"no git here: the code of {BEFORE} (before issue 22's refactor) cannot be extracted")
    if found.returncode != 0:
        pytest.skip(
            f"commit {BEFORE} (before issue 22's refactor) is not in {REPO}'s git history (a shallow clone, "
            "or no .git): this compatibility test needs it; clone with history (git fetch --unshallow)"
        )
    archive = subprocess.run(["git", "-C", str(REPO), "archive", BEFORE], capture_output=True, check=True, timeout=60)
    dest.mkdir()
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True, timeout=60)
    return dest


def launch(code: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m harness.launch` of the code under `code` (its harness on PYTHONPATH, run from there)."""
    return cli(
        "harness.launch",
        str(tmp / "spec.yaml"),
        "--executor",
        "local",
        "--output-root",
        str(tmp / "runs"),
        "--tracking-uri",
        f"sqlite:///{tmp}/mlflow.db",
        *OVERRIDES,
        *args,
        cwd=code,
        env={"PYTHONPATH": str(code)},
        timeout=600,
    )


def dry_run_keys(out: str) -> dict[str, str]:
    """stage/name -> run key, from a dry run's table (columns stage, name, row, key, ...)."""
    rows = [line.split() for line in out.splitlines()[2:]]
    return {f"{row[0]}/{row[1]}": row[3] for row in rows if len(row) > 4}


def test_a_store_launched_with_the_code_before_the_refactor_is_finished_for_this_code(tmp_path: Path) -> None:
    old = old_checkout(tmp_path / "old")
    imported = subprocess.run(
        [sys.executable, "-c", "import harness.launch; print(harness.launch.__file__)"],
        cwd=old,
        env={**os.environ, "PYTHONPATH": str(old)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert imported.stdout.strip() == str(old / "harness/launch.py"), imported  # not this checkout's package
    spec = json.loads(json.dumps(MINI))
    spec["stages"]["students"]["runs"]["variants"] = spec["stages"]["students"]["runs"]["variants"][:1]  # dynamic
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))

    first = launch(old, tmp_path)
    assert first.returncode == 0, first.stderr
    assert "mini (tiny): 2 submitted, 0 skipped" in first.stdout, first.stdout
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("mini")

    def runs() -> dict[str, tuple[str, str, str, int | None]]:
        found = client.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL)
        return {r.info.run_id: (r.info.run_name, r.info.status, r.info.lifecycle_stage, r.info.end_time) for r in found}

    before_runs, before_files = runs(), snapshot(tmp_path / "runs")
    trained = {
        r.info.run_name: r.data.tags["run_key"]
        for r in client.search_runs([experiment.experiment_id], "tags.kind = 'train'")
        if r.info.status == "FINISHED"
    }
    assert set(trained) == {"teacher/teacher", "students/dynamic"}, before_runs

    again = launch(REPO, tmp_path)
    assert again.returncode == 0, again.stderr
    assert "mini (tiny): 0 submitted, 2 skipped (finished)" in again.stdout, again.stdout
    assert "parent run none (nothing submitted)" in again.stdout
    assert runs() == before_runs  # no new run (not even a launch's parent run), none changed
    assert snapshot(tmp_path / "runs") == before_files  # no folder moved aside, no file written

    old_dry, new_dry = launch(old, tmp_path, "--dry-run"), launch(REPO, tmp_path, "--dry-run")
    assert old_dry.returncode == new_dry.returncode == 0, old_dry.stderr + new_dry.stderr
    assert dry_run_keys(new_dry.stdout) == trained  # the keys this code computes are those the old jobs recorded
    assert new_dry.stdout == old_dry.stdout  # and the dry-run table is the same, line for line
    for name, key in trained.items():
        assert json.loads((tmp_path / "runs/mini/tiny" / name / "run.json").read_text())["run_key"] == key
