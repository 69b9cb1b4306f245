"""Every question put to SLURM and to this machine's processes, in one place.

Why: launch, cancel, job and search all need to know whether a controller answers, whether a
job or process still exists, how many nodes a partition has, and to cancel jobs and wait until
they are gone. Each `sinfo`/`squeue`/`scancel`/`scontrol`/`sacct` call lives here (as submitit
keeps its SLURM commands in submitit/slurm/slurm.py), with one answer for each question: a
process that exists but belongs to another user (PermissionError on signal 0) is alive, and a
job whose state cannot be told is taken as alive. Submission itself goes through submitit
(harness.launch.make_executor); this module imports only the standard library, so that the
dry-run path and the CLIs' error paths stay light.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping

# squeue states of a job that still exists (queued, running or being stopped)
SLURM_ALIVE = (
    "PENDING",
    "RUNNING",
    "CONFIGURING",
    "COMPLETING",
    "SUSPENDED",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "RESIZING",
    "SIGNALING",
    "STAGE_OUT",
)


# ------------------------------------------------------------------------------ the controller
def slurm_reachable(timeout_s: float = 15.0) -> tuple[bool, str]:
    """Whether a SLURM controller answers (`sinfo`), and why not when it does not.

    `sbatch` on the PATH is not enough: the client packages are often installed on a laptop or
    a login node whose controller is down, and every submission would then fail.
    """
    try:
        probe = subprocess.run(
            ["sinfo", "--noheader", "--format=%P"], capture_output=True, text=True, timeout=timeout_s
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return False, f"sinfo failed: {error}"
    if probe.returncode != 0:
        lines = (probe.stderr or probe.stdout).strip().splitlines()
        return False, f"sinfo: {lines[-1] if lines else f'exit {probe.returncode}'}"
    return True, ""


def choose_executor(name: str) -> str:
    """`auto`: SLURM when a controller answers, else local processes (and say why)."""
    if name != "auto":
        return name
    if not shutil.which("sbatch"):
        return "local"
    reachable, why = slurm_reachable()
    if not reachable:
        print(
            f"SLURM is installed but not reachable ({why}); running local processes (--executor slurm to insist)",
            file=sys.stderr,
        )
    return "slurm" if reachable else "local"


def partition_nodes(partition: str | None) -> int | None:
    """How many nodes the partition has, or the default one (`*`: where a job without -p lands) when
    none is named; None if sinfo cannot say. Not every node of the cluster: scripts/slurm-local.sh's
    second node is only in the partition `multi`."""
    command = ["sinfo", "-h", "-o", "%P %D"] + (["-p", partition] if partition else [])
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True).stdout
        rows = [line.split() for line in out.splitlines() if line.strip()]
        if not partition:
            rows = [row for row in rows if row[0].endswith("*")]
        return sum(int(count) for _, count in rows) if rows else None
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


# ------------------------------------------------------------------------------ jobs
def _ask(command: list[str]) -> str:
    """A SLURM command's output, or '' when it is missing, fails (no accounting) or hangs."""
    if not shutil.which(command[0]):
        return ""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout if done.returncode == 0 else ""


def slurm_job_state(job: str) -> tuple[str | None, str]:
    """(what SLURM says of `job`: CANCELLED, COMPLETING, RUNNING, PREEMPTED ... or None; which command said it).

    The controller first: `scontrol` answers with or without accounting, live. While the job is
    being stopped it shows COMPLETING (for scancel as for a time-out) whatever the cause, and a
    preempted job carries a PreemptTime: reported as PREEMPTED. Then accounting (`sacct`, which
    records CANCELLED at once), for a controller that does not answer.
    """
    shown = _ask(["scontrol", "show", "job", "--oneliner", job])
    state = re.search(r"\bJobState=(\S+)", shown)
    if state:
        preempt = re.search(r"\bPreemptTime=(\S+)", shown)
        preempted = preempt is not None and preempt.group(1) not in ("None", "Unknown", "0")
        return ("PREEMPTED" if preempted else state.group(1)), "scontrol"
    accounted = _ask(["sacct", "-n", "-X", "-P", "-j", job, "-o", "State"]).split()
    return (accounted[0], "sacct") if accounted else (None, "neither scontrol nor sacct answered")


def slurm_job_alive(job: str) -> bool:
    """Whether SLURM job `job` is queued, running or being stopped; True when that cannot be told.

    A job left PENDING with DependencyNeverSatisfied (it waits for a stage that failed) would never
    start: it is cancelled here and reported gone, so that a resubmission replaces it.
    """
    if not shutil.which("squeue"):
        return True
    try:
        queue = subprocess.run(
            ["squeue", "--noheader", "--jobs", job, "--states=all", "--format=%T %r"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return True
    if queue.returncode != 0:  # a job SLURM has forgotten, or no controller to ask
        return "invalid job id" not in queue.stderr.lower()
    rows = [[*line.split(None, 1), ""] for line in queue.stdout.strip().splitlines() if line.strip()]
    if any(state == "PENDING" and reason.strip() == "DependencyNeverSatisfied" for state, reason, *_ in rows):
        subprocess.run(["scancel", job], capture_output=True, timeout=30)
        return False
    return any(state in SLURM_ALIVE for state, *_ in rows)


def scancel(jobs: list[str], timeout_s: float = 60.0) -> str | None:
    """Cancel SLURM jobs; None when done (or SLURM no longer knows them), else why not, in one line."""
    if not shutil.which("scancel"):
        return "scancel: not found"
    done = subprocess.run(["scancel", *jobs], capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0 and "invalid job id" not in done.stderr.lower():
        return f"scancel: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}"
    return None


def job_alive(tags: Mapping[str, str]) -> bool:
    """Whether the job a run's tags name (`job_id`: a local process, `slurm_job_id`) still exists;
    True when that cannot be told (no job named, no squeue, no answer)."""
    if tags.get("job_id"):  # a local process on this machine: submitit's local job id is its pid
        pid = tags["job_id"].split("_")[0]
        return process_alive(int(pid)) if pid.isdigit() else True
    if tags.get("slurm_job_id"):
        return slurm_job_alive(tags["slurm_job_id"])
    return True


# ------------------------------------------------------------------------------ processes
def process_alive(pid: int) -> bool:
    """Whether a process of this machine exists (one owned by another user counts as alive).

    A zombie (ended, not yet reaped by its parent) is not alive, though signal 0 still finds it: a
    killed launcher's local job stays one until init reaps it (1-2 s later on some machines, never
    under an init that does not reap), and a relaunch meanwhile must resubmit its run, not skip it.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists; we may not signal it
        pass
    try:  # Linux: the state after the command's name, Z (zombie) or X (dead) for an ended process
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[:1] not in (["Z"], ["X"])
    except OSError:  # no /proc (not Linux): signal 0 is all there is to go by
        return True


def signal_local(pid_text: str, host: str | None = None) -> bool:
    """TERM a process of this machine (a local job or a launcher); False if it is not here."""
    pid = pid_text.split("_")[0]
    if not pid.isdigit() or (host is not None and host != socket.gethostname()) or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return False
    return True


# ------------------------------------------------------------------------------ waiting
def wait_until_gone(slurm_ids: list[str], local_ids: list[str], timeout_s: float, poll_s: float = 0.5) -> list[str]:
    """Wait until the SLURM jobs have left the queue and the local job processes have ended; the ids
    of those still there after `timeout_s` (empty: all gone).

    Why: a job cancelled while it starts can still mark its run RUNNING, and a superseded job could
    still write to the folder handed to its successor; once it is gone, neither can happen.
    """
    pids = {
        job: int(job.split("_")[0])
        for job in local_ids
        if job.split("_")[0].isdigit() and int(job.split("_")[0]) != os.getpid()
    }
    slurm = sorted(set(slurm_ids))
    deadline = time.monotonic() + timeout_s
    while True:
        left = [job for job in slurm if slurm_job_alive(job)] + [job for job, pid in pids.items() if process_alive(pid)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(poll_s)
