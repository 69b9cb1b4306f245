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
import signal
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


# ------------------------------------------ review 2 M2: Ctrl-C or TERM to a launch that submits to SLURM
def held_sbatch(tmp):
    """The environment of a launcher whose `sbatch` (a script first on PATH, then the real one) says it was
    called (file sbatch-called) and waits for the file sbatch-go: a signal lands while the launcher waits
    for sbatch. The real sbatch's output is kept in sbatch-out. In Python: sh would unblock the signals
    that the launcher blocks for it."""
    import sys

    shim = tmp / "held" / "sbatch"
    shim.parent.mkdir()
    shim.write_text(
        f"#!{sys.executable}\n"
        "import pathlib, subprocess, sys, time\n"
        f"tmp = pathlib.Path({str(tmp)!r})\n"
        "(tmp / 'sbatch-called').touch()\n"
        "while not (tmp / 'sbatch-go').exists():\n"
        "    time.sleep(0.05)\n"
        f"done = subprocess.run([{shutil.which('sbatch')!r}, *sys.argv[1:]], capture_output=True, text=True)\n"
        "(tmp / 'sbatch-out').write_text(done.stdout)\n"
        "print(done.stdout, end='')\n"
        "print(done.stderr, end='', file=sys.stderr)\n"
        "sys.exit(done.returncode)\n"
    )
    shim.chmod(0o755)
    return {"PATH": f"{shim.parent}:{os.environ['PATH']}"}


def slurm_launch(tmp, spec, env=None):
    """`python -m harness.launch --executor slurm` in its own process group (a terminal's foreground job)."""
    from tests.test_reliability_races import popen

    args = ["--executor", "slurm", "--output-root", str(tmp / "runs"), "--tracking-uri", f"sqlite:///{tmp}/mlflow.db"]
    return popen("harness.launch", str(spec), *args, cwd=tmp, env=env)


def test_ctrl_c_and_term_while_a_launch_waits_for_sbatch_end_it_with_the_job_recorded(slurm_cluster, tmp_path):
    """A Ctrl-C (to the whole process group, sbatch included) and a TERM (harness.cancel, a superseding
    launch, scancel of the launcher) while sbatch submits: sbatch ends its submission and the job is tagged
    on its run before the launch stops, so that the next launch sees it in flight (`Launch.job_alive`).
    Before, the launch stopped with the job queued but recorded nowhere, and the next launch submitted a
    second array onto the same MLflow run and folder."""
    from tests.test_launch import train_runs
    from tests.test_reliability import teacher_only, write

    spec = write(tmp_path / "t.yaml", teacher_only(**{"base/data/train_digits": 512, "scales/tiny/train/epochs": 3}))
    launch = slurm_launch(tmp_path, spec, held_sbatch(tmp_path))
    job = ""
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "sbatch-called").exists() and launch.poll() is None:
            assert time.monotonic() < deadline, "the launch never called sbatch"
            time.sleep(0.05)
        os.killpg(launch.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: sbatch gets it too
        os.kill(launch.pid, signal.SIGTERM)  # both pending before the real sbatch even starts
        (tmp_path / "sbatch-go").touch()
        _, err = launch.communicate(timeout=120)
        out = tmp_path / "sbatch-out"  # none: sbatch died of the Ctrl-C
        job = "".join(c for c in out.read_text().split(";")[0] if c.isdigit()) if out.exists() else "none"
        assert launch.returncode == 130 and err.strip().splitlines()[-1] == "harness.launch: interrupted", err
        assert "Traceback" not in err, err
        (run,) = train_runs(tmp_path)
        assert run.data.tags.get("slurm_job_id") == job and run.info.status in ("SCHEDULED", "RUNNING"), run
    finally:
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGKILL)
        for submitted in [job] + [p.name.split("_")[0] for p in tmp_path.glob("runs/*/*/*/submitit/*_submitted.pkl")]:
            if submitted:
                subprocess.run(["scancel", submitted], check=False)


def test_ctrl_c_to_a_slurm_launch_before_sbatch_ends_the_run_killed(slurm_cluster, tmp_path):
    """Ctrl-C after a run's MLflow record is made, before its job is submitted: the run ends KILLED with
    the reason, as with local processes (it stayed SCHEDULED with no job for good). The launcher is frozen
    (SIGSTOP) as soon as the run shows up, and gets the Ctrl-C there; its sbatch waits, so it is caught
    before submitting anything."""
    from tests.test_launch import train_runs
    from tests.test_reliability import teacher_only, write
    from tests.test_reliability_races import placeholder_states

    spec = write(tmp_path / "t.yaml", teacher_only())
    for attempt in range(3):  # the window is tens of ms wide: polled every 2 ms, caught on the first try here
        folder = tmp_path / f"try{attempt}"
        folder.mkdir()
        launch = slurm_launch(folder, spec, held_sbatch(folder))
        while launch.poll() is None and not placeholder_states(folder):
            time.sleep(0.002)
        os.kill(launch.pid, signal.SIGSTOP)
        if placeholder_states(folder) and not (folder / "sbatch-called").exists():
            break
        os.killpg(launch.pid, signal.SIGKILL)  # past the window (sbatch waits: nothing submitted): again
        launch.wait(timeout=30)
    else:
        pytest.fail("the launcher was never caught between its run's record and sbatch")
    try:
        os.killpg(launch.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
        os.kill(launch.pid, signal.SIGCONT)
        _, err = launch.communicate(timeout=120)
    finally:
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGKILL)
    assert launch.returncode == 130 and err.strip().splitlines()[-1] == "harness.launch: interrupted", err
    assert "Traceback" not in err and not (folder / "sbatch-called").exists(), err
    (run,) = train_runs(folder)
    assert run.info.status == "KILLED", run.info.status
    assert run.data.tags["error"] == (
        "interrupted: Ctrl-C (SIGINT) to the launch; its job was never submitted (the next launch submits it)"
    ), run.data.tags.get("error")
