"""Smoke tests against a real SLURM cluster through submitit.

Start one on this machine with ``bash scripts/slurm-local.sh start`` (as root);
without a cluster that answers, every test here is skipped with the reason.

The submitted callables are stdlib functions (``operator``, ``os.getenv``) on
purpose: submitit pickles functions by reference, and this test module is not
importable from the job's interpreter.
"""

from __future__ import annotations

import operator
import os
import shutil
import subprocess
import time

import pytest

pytestmark = pytest.mark.slurm

USABLE_NODE_STATES = {"idle", "mix", "mixed", "alloc", "allocated", "comp", "completing"}


def _cluster_problem() -> str | None:
    """Why no SLURM cluster is usable here, or None when one answers."""
    if shutil.which("sinfo") is None:
        return "sinfo is not on PATH (start a cluster: bash scripts/slurm-local.sh start)"
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 15 s"
    if proc.returncode != 0:
        return f"the SLURM controller does not answer: {proc.stderr.strip() or proc.returncode}"
    states = {s.strip().rstrip("*~#!%$@^-") for s in proc.stdout.split()}
    if not states & USABLE_NODE_STATES:
        return f"no usable SLURM node (sinfo states: {sorted(states) or 'none'})"
    return None


@pytest.fixture(scope="module")
def slurm_cluster() -> None:
    problem = _cluster_problem()
    if problem:
        pytest.skip(f"no SLURM cluster: {problem}")


@pytest.fixture
def executor(slurm_cluster, tmp_path):
    submitit = pytest.importorskip("submitit")
    ex = submitit.AutoExecutor(folder=tmp_path / "submitit" / "%j", cluster="slurm")
    ex.update_parameters(timeout_min=5, cpus_per_task=1, name="test-slurm-local")
    return ex


def _result(job, timeout: float = 120.0):
    """job.result(), but cancel the job and fail instead of waiting forever."""
    deadline = time.monotonic() + timeout
    while not job.done():
        if time.monotonic() > deadline:
            subprocess.run(["scancel", str(job.job_id)], check=False)
            pytest.fail(f"SLURM job {job.job_id} not done after {timeout:.0f} s")
        time.sleep(0.5)
    return job.result()


def test_submit_returns_result(executor):
    job = executor.submit(operator.add, 2, 3)
    assert _result(job) == 5


def test_job_runs_inside_slurm(executor):
    job = executor.submit(os.getenv, "SLURM_JOB_ID")
    assert _result(job) == str(job.job_id)


def test_map_array_two_tasks(executor):
    jobs = executor.map_array(operator.mul, [1, 2], [10, 20])
    assert len(jobs) == 2
    array_ids = {str(job.job_id).split("_")[0] for job in jobs}
    assert len(array_ids) == 1, f"expected one array job, got ids {[j.job_id for j in jobs]}"
    assert [_result(job) for job in jobs] == [10, 40]
