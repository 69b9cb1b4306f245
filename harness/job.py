"""The submitit callable: one launched run, preemption-safe, cancellable.

The engine turns SIGTERM/SIGUSR2 into a checkpoint at the next step boundary and raises
`Preempted`. What happens next depends on why the signal came:
- preemption or the time limit (SLURM sends USR2 ahead of both, submitit's `--signal`): the job
  hands over to submitit's own USR2 handler, which calls `checkpoint()` (inherited from
  `Checkpointable`: resubmit the same call) and requeues the job; the MLflow run goes back to
  SCHEDULED (tag `requeued`), so that a relaunch meanwhile sees it in flight and submits nothing;
  the requeued job resumes from the run's checkpoint into the same MLflow run.
- `scancel` (SLURM marks the job CANCELLED, then sends TERM) or a TERM outside SLURM
  (`python -m harness.cancel`, `kill`): no requeue; the run stays KILLED, its checkpoint kept,
  and the next launch resumes it.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

import submitit

from harness.config import RunConfig
from harness.store import unbound_requests


def slurm_job_cancelled() -> bool:
    """Whether SLURM has this job down as CANCELLED (scancel), rather than preempted or timing out."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job or not shutil.which("sacct"):
        return False
    try:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job, "-o", "State"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return any(line.startswith("CANCELLED") for line in out.stdout.split())


def stopped_for_good(stop: BaseException) -> bool:
    """A cancel, not a preemption: SLURM says CANCELLED, or a plain TERM outside SLURM."""
    if os.environ.get("SLURM_JOB_ID"):
        return slurm_job_cancelled()
    return f"signal {int(signal.SIGTERM)}" in str(stop)


def mark_requeued(cfg: RunConfig) -> None:
    """The MLflow run waits for its requeued job: SCHEDULED again (the engine marked it KILLED)."""
    if not cfg.tracking.run_id:
        return
    try:
        from mlflow import MlflowClient

        from harness.tracking import resolve_tracking_uri

        client = MlflowClient(resolve_tracking_uri(cfg.tracking))
        client.set_tag(cfg.tracking.run_id, "requeued", time.strftime("%Y-%m-%dT%H:%M:%S"))
        client.update_run(cfg.tracking.run_id, status="SCHEDULED")
    except Exception as err:  # the requeue matters more than the bookkeeping
        print(f"could not mark MLflow run {cfg.tracking.run_id} SCHEDULED for its requeue: {err}", file=sys.stderr)


class TrainJob(submitit.helpers.Checkpointable):
    """`TrainJob()(config_dict)` trains one run through the engine and returns its final metrics."""

    def __call__(self, config: dict[str, Any]) -> dict[str, float]:
        import torch

        from harness.engine import Preempted, run

        unbound_requests()  # a launcher's short MLflow timeouts are for commands, not for training
        threads = os.environ.get("SLURM_CPUS_PER_TASK") or os.environ.get("DVIT_NUM_THREADS")
        if threads:  # the cores this job was given, not every core of the node
            torch.set_num_threads(int(threads))
        cfg = RunConfig.model_validate(config)
        try:
            return run(cfg)
        except Preempted as stop:
            if stopped_for_good(stop):
                print(f"cancelled: {stop}; not requeued (the next launch resumes from the checkpoint)",
                      file=sys.stderr)
                raise
            requeue = signal.getsignal(signal.SIGUSR2)
            if callable(requeue):  # submitit's checkpoint_and_try_requeue: requeues, then exits
                mark_requeued(cfg)
                requeue(signal.SIGUSR2, None)
            raise stop
