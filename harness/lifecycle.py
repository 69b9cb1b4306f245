"""The run lifecycle: the states of a run's MLflow record, the tags that say why it moved, every transition.

Every status a run takes and every lifecycle tag is spelled here and nowhere else
(tests/test_architecture.py checks it); every change of state is one of the functions below,
through MLflow's public client (`MlflowClient.create_run`, `update_run`, `set_terminated`,
`set_tag`, `delete_run`). A launched run:

                      create_placeholder                  replace_placeholder
    harness.launch ----------------------> SCHEDULED ---------------------------> RUNNING
                                           (placeholder,   the job's own run:       |
                                         tag queued_at_ms) tag queued_as; the      |  terminate
                                              ^    |        placeholder deleted,    +---------> FINISHED
                                              |    |        tag replaced_by         |  fail (tag error)
                   queue_again (a relaunch    |    | fail (died before training,    +---------> FAILED
                   resumes the same run)      |    v  tag error; or its             |  kill / interrupt (tag error),
    FAILED, KILLED, or RUNNING whose job   ---+  FAILED  submission failed)         |  cancel (tag cancelled),
    is gone                                   |                                     |  supersede (tag superseded)
                                              |                                     +---------> KILLED
                                              +---------------- requeue ------------+
                                                   (tag requeued: SLURM requeues the preempted job)

    SCHEDULED --cancel / supersede--> KILLED        (a queued job cancelled, or its configuration replaced)
    SCHEDULED --interrupt--> KILLED                 (Ctrl-C to a launch before that run's job was submitted)
    SCHEDULED, RUNNING --kill_if_in_flight--> KILLED (harness.cancel, once the jobs have stopped)
    SCHEDULED, RUNNING --fail_if_in_flight--> FAILED (a search's trial whose worker is gone)
    SCHEDULED (again), FAILED, KILLED --start--> RUNNING  (a job resuming its run; a search's parent
                                                           run opened again)
    any --finish_if_open--> FINISHED               (a finished run, result.json, that a relaunch reopened)

A job ends its run through `RunTracker.finish`, which flushes its metrics, then calls `terminate`.
A run trained by hand (`harness.train`) or a search's trial is created RUNNING by its job and ends
the same way. A launch's and a search's parent runs are RUNNING while they submit, then FINISHED,
FAILED or KILLED (`terminate`); a launch killed hard is marked KILLED by the next one.

Standard library only (the MLflow client is passed in): harness.cancel and the launcher's light
paths import it without MLflow's heavy modules.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run


class _Name(str, Enum):
    """A name MLflow stores as a plain string: compares, hashes, formats and prints as its value."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    __hash__ = str.__hash__


class RunState(_Name):
    """MLflow's run statuses (`mlflow.entities.RunStatus`), the ones this project uses."""

    SCHEDULED = "SCHEDULED"  # queued: a launcher's placeholder, or a run waiting for its (re)queued job
    RUNNING = "RUNNING"  # a job trains into it (or it was killed hard and nobody marked it)
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    KILLED = "KILLED"  # stopped on purpose (cancel, Ctrl-C, preemption, superseded, pruned); resumable


class Tag(_Name):
    """The run tags that record a transition (the other tags describe the run, not its state)."""

    QUEUED_AT = "queued_at_ms"  # set at each submission of a placeholder (a relaunch reuses one)
    QUEUED_AS = "queued_as"  # on the job's run: the placeholder it replaced
    REPLACED_BY = "replaced_by"  # on a deleted placeholder: the run its job created
    REQUEUED = "requeued"  # when SLURM requeued the run's job (time limit, preemption)
    CANCELLED = "cancelled"  # when harness.cancel stopped it
    SUPERSEDED = "superseded"  # why a launch stopped it: its configuration changed
    ERROR = "error"  # why it FAILED, or why it was interrupted


IN_FLIGHT = (RunState.SCHEDULED, RunState.RUNNING)  # queued or training: a relaunch leaves it alone
ENDED = (RunState.FINISHED, RunState.FAILED, RunState.KILLED)
# tags of a placeholder that describe the placeholder, not the run its job creates
_PLACEHOLDER_ONLY_TAGS = {"mlflow.runName", Tag.ERROR.value, Tag.CANCELLED.value, Tag.REQUEUED.value}

Call = Callable[..., Any]  # runs one MLflow request (RunTracker.call waits out an outage)


def _direct(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


def status_filter(*states: RunState) -> str:
    """An MLflow search filter for runs in any of `states`."""
    return " or ".join(f"attributes.status = '{state.value}'" for state in states)


def in_flight(run: Run) -> bool:
    """Whether `run` is queued or training (or was, until a hard kill nobody recorded)."""
    return run.info.status in IN_FLIGHT


def was_cancelled(run: Run) -> bool:
    """Whether harness.cancel ended `run` (KILLED, tag cancelled) and nothing queued it again since."""
    return run.info.status == RunState.KILLED and Tag.CANCELLED.value in run.data.tags


# ----------------------------------------------------------------- queued runs (placeholders)
def create_placeholder(client: MlflowClient, experiment_id: str, run_name: str | None, tags: Mapping[str, str]) -> str:
    """A new run standing for a job about to be submitted: SCHEDULED, tagged with when; its id.

    MLflow cannot move a run's start time later (UpdateRun takes status, end time and name), so
    the job replaces it with a run of its own (`replace_placeholder`).
    """
    stamped = {**tags, Tag.QUEUED_AT.value: str(int(time.time() * 1000))}
    run_id = str(client.create_run(experiment_id, run_name=run_name, tags=stamped).info.run_id)
    client.update_run(run_id, status=RunState.SCHEDULED.value)
    return run_id


def queue_again(client: MlflowClient, run_id: str, tags: Mapping[str, str]) -> None:
    """A failed, killed or lost run that a relaunch resubmits, to resume into: SCHEDULED again, re-tagged."""
    stamped = {**tags, Tag.QUEUED_AT.value: str(int(time.time() * 1000))}
    for key, value in stamped.items():
        client.set_tag(run_id, key, value)
    client.update_run(run_id, status=RunState.SCHEDULED.value)


def is_placeholder(run: Run) -> bool:
    """Whether `run` only stands for a queued job: SCHEDULED and nothing logged by a job yet.

    The launcher creates one per submitted run, so that relaunches, `harness.cancel` and the
    runs table see the job queued.
    """
    return run.info.status == RunState.SCHEDULED and not run.data.params and not run.data.metrics


def replace_placeholder(client: MlflowClient, placeholder: Run, call: Call = _direct) -> tuple[str, float]:
    """Create the job's run in the placeholder's place; (its id, seconds the job was queued).

    The new run (RUNNING) has the placeholder's name, parent and tags (job ids, run key), tag
    `queued_as`, metric `queue_time_s` (logged by the caller); the placeholder gets tag
    `replaced_by` and is deleted (the runs table shows active runs; `current_run_id` follows it).
    Created before the placeholder is deleted: a relaunch meanwhile sees the run in flight.
    """
    tags = {k: v for k, v in placeholder.data.tags.items() if k not in _PLACEHOLDER_ONLY_TAGS}
    tags[Tag.QUEUED_AS.value] = placeholder.info.run_id
    created = call(client.create_run, placeholder.info.experiment_id, run_name=placeholder.info.run_name, tags=tags)
    call(client.set_tag, placeholder.info.run_id, Tag.REPLACED_BY.value, created.info.run_id)
    call(client.delete_run, placeholder.info.run_id)
    queued_at = placeholder.data.tags.get(Tag.QUEUED_AT.value, "")
    since = int(queued_at) if queued_at.isdigit() else placeholder.info.start_time
    queued_s = max(0.0, (created.info.start_time - since) / 1000)
    return str(created.info.run_id), queued_s


def current_run_id(client: MlflowClient, run_id: str) -> str:
    """The run that stands for `run_id` now: the job's run if `run_id` was a replaced placeholder."""
    for _ in range(5):  # a chain only if a placeholder was replaced more than once (never, but bounded)
        run = client.get_run(run_id)
        successor = run.data.tags.get(Tag.REPLACED_BY.value)
        if run.info.lifecycle_stage != "deleted" or not successor:
            return run_id
        run_id = successor
    return run_id


# ------------------------------------------------------------------------------ transitions
def start(client: MlflowClient, run_id: str, call: Call = _direct) -> None:
    """A run resumed by its job (or a search's parent run opened again): RUNNING."""
    call(client.update_run, run_id, status=RunState.RUNNING.value)


def end_state(state: RunState | str) -> RunState:
    """`state` as one of the states a run ends in (ValueError for any other)."""
    if state not in ENDED:
        raise ValueError(f"status must be {RunState.FINISHED}, {RunState.FAILED} or {RunState.KILLED}, got {state!r}")
    return RunState(state)


def terminate(client: MlflowClient, run_id: str, state: RunState | str, call: Call = _direct) -> None:
    """End a run FINISHED, FAILED or KILLED (`RunTracker.finish` calls it after flushing its metrics)."""
    call(client.set_terminated, run_id, end_state(state).value)


def set_error(client: MlflowClient, run_id: str, reason: str) -> None:
    """Record why a run failed or was interrupted (tag `error`), leaving its state alone."""
    client.set_tag(run_id, Tag.ERROR.value, reason)


def fail(client: MlflowClient, run_id: str, reason: str | None = None) -> None:
    """FAILED, with the reason in tag `error` when given."""
    if reason is not None:
        set_error(client, run_id, reason)
    terminate(client, run_id, RunState.FAILED)


def kill(client: MlflowClient, run_id: str, reason: str | None = None) -> None:
    """KILLED (stopped on purpose, resumable), with the reason in tag `error` when given."""
    if reason is not None:
        set_error(client, run_id, reason)
    terminate(client, run_id, RunState.KILLED)


def finish_if_open(client: MlflowClient, run_id: str) -> None:
    """A finished run (its result.json written) that a relaunch reopened is FINISHED again."""
    if client.get_run(run_id).info.status != RunState.FINISHED:
        terminate(client, run_id, RunState.FINISHED)


def fail_if_in_flight(client: MlflowClient, run_id: str) -> None:
    """FAILED unless it has ended already (a search's trial whose worker is gone)."""
    if client.get_run(run_id).info.status in IN_FLIGHT:
        terminate(client, run_id, RunState.FAILED)


def kill_if_in_flight(client: MlflowClient, run_id: str) -> None:
    """KILLED unless it has ended already (a cancelled job that was still starting may have opened it since)."""
    if client.get_run(run_id).info.status in IN_FLIGHT:
        terminate(client, run_id, RunState.KILLED)


def cancel(client: MlflowClient, run_id: str, stamp: str) -> None:
    """harness.cancel stopped the run's job: KILLED, tag `cancelled` (when); the next launch resumes it."""
    client.set_tag(run_id, Tag.CANCELLED.value, stamp)
    terminate(client, run_id, RunState.KILLED)


def supersede(client: MlflowClient, run_id: str, reason: str) -> None:
    """A launch stopped the run because its place now has another configuration: KILLED, tag `superseded`."""
    client.set_tag(run_id, Tag.SUPERSEDED.value, reason)
    terminate(client, run_id, RunState.KILLED)


def interrupt(client: MlflowClient, run_id: str, reason: str) -> None:
    """A launch stopped its local job (Ctrl-C, TERM): tag `error` says why, KILLED if it was in flight.

    A run KILLED by its job at the launch's TERM gets the reason too (the engine records none). A run
    that ended on its own before its job was reaped keeps its own outcome and reason: FINISHED, FAILED
    (its `error`, e.g. a non-finite loss) or superseded (tag `superseded`; no launch resumes it).
    """
    run = client.get_run(run_id)
    if run.info.status in (RunState.FINISHED, RunState.FAILED) or Tag.SUPERSEDED.value in run.data.tags:
        return
    set_error(client, run_id, reason)
    if run.info.status in IN_FLIGHT:
        terminate(client, run_id, RunState.KILLED)


def requeue(client: MlflowClient, run_id: str) -> None:
    """SLURM requeues the run's job (time limit, preemption): SCHEDULED again (the engine had marked it
    KILLED), tag `requeued` (when), so that a relaunch meanwhile sees it in flight and submits nothing."""
    client.set_tag(run_id, Tag.REQUEUED.value, time.strftime("%Y-%m-%dT%H:%M:%S"))
    client.update_run(run_id, status=RunState.SCHEDULED.value)
