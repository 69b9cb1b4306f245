"""The submitit callable: one launched run, preemption-safe, cancellable.

The engine turns SIGTERM/SIGUSR2 into a checkpoint at the next step boundary and raises
`Preempted` with the signals that arrived. What happens next depends on why they came:
- USR2 among them: SLURM's advance warning of the time limit (submitit's `--signal=USR2@90`),
  or a preemption on a cluster that sends it (PreemptParameters=send_user_signal; submitit's
  own `_interrupt` sends TERM then USR2). The job hands over to submitit's USR2 handler, which
  calls `checkpoint()` (inherited from `Checkpointable`: resubmit the same call) and requeues
  the job; the MLflow run goes back to SCHEDULED (tag `requeued`), so that a relaunch meanwhile
  sees it in flight and submits nothing; the requeued job resumes from the run's checkpoint
  into the same MLflow run.
- TERM alone inside SLURM: `scancel`, or a preemption on a cluster that sends no USR2 (TERM at
  selection, the job keeps running through its GraceTime). The controller tells them apart
  (`scontrol show job`, which needs no accounting database, unlike `sacct`, asked only when
  scontrol does not answer): CANCELLED, or COMPLETING without a PreemptTime (scancel: the
  controller is already ending the job), or no answer at all: stop for good: the run stays
  KILLED, its checkpoint kept, and the next launch resumes it. Preempted (a PreemptTime) or
  still RUNNING (a bare `scancel --signal TERM`): requeue as above.
- TERM outside SLURM (`python -m harness.cancel` of a local job, `kill`): stop for good.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import submitit

from harness.cluster import slurm_job_state
from harness.config import RunConfig
from harness.lifecycle import RunState, requeue, was_cancelled
from harness.store import unbound_requests


def stopped_for_good(stop: BaseException) -> tuple[bool, str]:
    """(a cancel, not the time limit or a preemption; why it is taken so): see the module docstring."""
    signals: frozenset[int] = getattr(stop, "signals", frozenset())
    if signal.SIGUSR2 in signals:
        return False, "USR2: SLURM's warning of the time limit or a preemption"
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        term = signal.SIGTERM in signals or f"signal {int(signal.SIGTERM)}" in str(stop)
        return term, "TERM outside SLURM" if term else "not TERM"
    state, source = slurm_job_state(job)
    if state is None:
        return True, f"TERM alone and {source} for job {job}"
    return state.startswith(("CANCELLED", "COMPLETING")), f"SLURM job {job} is {state} ({source})"


def mark_requeued(cfg: RunConfig) -> None:
    """The MLflow run waits for its requeued job: SCHEDULED again (the engine marked it KILLED)."""
    if not cfg.tracking.run_id:
        return
    try:
        from mlflow import MlflowClient

        from harness.tracking import resolve_tracking_uri

        requeue(MlflowClient(resolve_tracking_uri(cfg.tracking)), cfg.tracking.run_id)
    except Exception as err:  # the requeue matters more than the bookkeeping
        print(
            f"could not mark MLflow run {cfg.tracking.run_id} {RunState.SCHEDULED} for its requeue: {err}",
            file=sys.stderr,
        )


def cancelled_before_start(cfg: RunConfig) -> bool:
    """Whether `harness.cancel` ended this run (KILLED, tag `cancelled`) after this job was submitted.

    Why: SLURM's TERM for a job still starting reaches submitit, which ignores it, before the engine
    listens; such a job would otherwise train on until SLURM's KillWait. A relaunch makes the run
    SCHEDULED again before it submits, so a resumed run starts as usual.
    """
    if not cfg.tracking.run_id:
        return False
    try:
        from mlflow import MlflowClient

        from harness.tracking import resolve_tracking_uri

        run = MlflowClient(resolve_tracking_uri(cfg.tracking)).get_run(cfg.tracking.run_id)
    except Exception:  # the engine reports an unreachable store itself
        return False
    return was_cancelled(run)


def job_id_tags() -> dict[str, str]:
    """This job's id, tagged as the launcher tags it: a job that starts before the launcher's tag
    reaches its placeholder run still names its job (relaunches and harness.cancel need it)."""
    try:
        env = submitit.JobEnvironment()
        job = env.job_id
    except Exception:  # not inside a submitit job (tests, harness.train)
        return {}
    if env.cluster == "slurm":
        return {"slurm_job_id": job}
    return {"job_id": job} if env.cluster == "local" else {}


class TrainJob(submitit.helpers.Checkpointable):
    """`TrainJob()(config_dict)` trains one run through the engine and returns its final metrics."""

    run_id: str | None = None  # the MLflow run this job trained into (its placeholder's replacement)

    def checkpoint(self, config: dict[str, Any]) -> submitit.helpers.DelayedSubmission:
        """The requeued call: the same config, logging into the run this job started, not the placeholder."""
        if self.run_id:
            config = {**config, "tracking": {**config["tracking"], "run_id": self.run_id}}
        return super().checkpoint(config)

    def __call__(self, config: dict[str, Any]) -> dict[str, float]:
        import torch

        from harness.engine import Preempted, run

        unbound_requests()  # a launcher's short MLflow timeouts are for commands, not for training
        threads = os.environ.get("SLURM_CPUS_PER_TASK") or os.environ.get("DVIT_NUM_THREADS")
        if threads:  # the cores this job was given, not every core of the node
            torch.set_num_threads(int(threads))
        cfg = RunConfig.model_validate(config)
        cfg.tracking.tags.update(job_id_tags())
        if cancelled_before_start(cfg):
            raise RuntimeError(
                f"MLflow run {cfg.tracking.run_id} was cancelled (harness.cancel) before this job "
                "started; not training (the next launch resumes it)"
            )
        try:
            return run(cfg)
        except Preempted as stop:
            self.run_id = cfg.tracking.run_id  # the engine's own run, which the requeued job resumes
            cancelled, why = stopped_for_good(stop)
            if cancelled:
                print(
                    f"cancelled: {stop}; {why}; not requeued (the next launch resumes from the checkpoint)",
                    file=sys.stderr,
                )
                raise
            print(f"preempted: {stop}; {why}; requeueing", file=sys.stderr)
            requeue = signal.getsignal(signal.SIGUSR2)
            if callable(requeue):  # submitit's checkpoint_and_try_requeue: requeues, then exits
                mark_requeued(cfg)
                requeue(signal.SIGUSR2, None)
            raise stop
