"""harness/lifecycle.py: every transition of a run, read back from a real MLflow store (SQLite).

The statuses and tag values are spelled out here on purpose: they are what MLflow holds, and an
existing store (relaunches, harness.cancel, the runs table, analysis) depends on them staying the
same. The launcher, cancel, job and engine tests cover the same transitions through the commands.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Run

from harness import lifecycle
from harness.lifecycle import RunState, Tag

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def client(tmp_path: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")


def test_the_names_are_mlflows_strings(client: MlflowClient) -> None:
    """States and tags compare, hash, format and serialise as the plain strings MLflow stores."""
    assert [s.value for s in RunState] == ["SCHEDULED", "RUNNING", "FINISHED", "FAILED", "KILLED"]
    assert {t.value for t in Tag} == {
        "queued_at_ms",
        "queued_as",
        "replaced_by",
        "requeued",
        "cancelled",
        "superseded",
        "error",
    }
    assert RunState.KILLED == "KILLED" and {"KILLED": 1}[RunState.KILLED] == 1 and f"{RunState.KILLED}" == "KILLED"
    assert str(Tag.ERROR) == "error" and {"error": 1}[Tag.ERROR] == 1
    assert lifecycle.status_filter(*lifecycle.IN_FLIGHT) == (
        "attributes.status = 'SCHEDULED' or attributes.status = 'RUNNING'"
    )
    with pytest.raises(ValueError, match=r"^status must be FINISHED, FAILED or KILLED, got 'RUNNING'$"):
        lifecycle.terminate(client, "no-such-run", "RUNNING")


def test_a_launched_run_from_placeholder_to_each_end(client: MlflowClient) -> None:
    experiment = client.create_experiment("lifecycle")

    def get(run_id: str) -> Run:
        return client.get_run(run_id)

    # placeholder created: SCHEDULED, stamped; replaced by the job's run: RUNNING, the placeholder deleted
    placeholder = lifecycle.create_placeholder(client, experiment, "teacher", {"run_key": "k1", "job_id": "7"})
    run = get(placeholder)
    assert run.info.status == "SCHEDULED" and run.data.tags["queued_at_ms"].isdigit()
    assert lifecycle.is_placeholder(run)
    client.set_tag(placeholder, "error", "an earlier attempt")  # placeholder-only tags stay behind
    own, queued_s = lifecycle.replace_placeholder(client, get(placeholder))
    assert queued_s >= 0
    replaced, started = get(placeholder), get(own)
    assert replaced.info.lifecycle_stage == "deleted" and replaced.data.tags["replaced_by"] == own
    assert started.info.status == "RUNNING" and started.data.tags["queued_as"] == placeholder
    assert started.data.tags["run_key"] == "k1" and started.data.tags["job_id"] == "7"
    assert "error" not in started.data.tags and started.info.run_name == "teacher"
    assert lifecycle.current_run_id(client, placeholder) == own and lifecycle.current_run_id(client, own) == own

    # requeued (SLURM requeues the preempted job): SCHEDULED, tag requeued; resumed: RUNNING
    lifecycle.terminate(client, own, RunState.KILLED)
    lifecycle.requeue(client, own)
    assert get(own).info.status == "SCHEDULED" and re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", get(own).data.tags["requeued"]
    )
    lifecycle.start(client, own)
    assert get(own).info.status == "RUNNING"

    # cancelled: KILLED, tag cancelled; queued again by a relaunch: SCHEDULED, no longer "cancelled"
    lifecycle.cancel(client, own, "2026-12-05T11:00:00")
    assert get(own).info.status == "KILLED" and get(own).data.tags["cancelled"] == "2026-12-05T11:00:00"
    assert lifecycle.was_cancelled(get(own))
    lifecycle.kill_if_in_flight(client, own)  # ended already: left alone
    assert get(own).info.status == "KILLED"
    lifecycle.queue_again(client, own, {"run_key": "k1", "mlflow.parentRunId": "p2"})
    again = get(own)
    assert again.info.status == "SCHEDULED" and again.data.tags["mlflow.parentRunId"] == "p2"
    assert not lifecycle.was_cancelled(again) and lifecycle.in_flight(again)

    # interrupted (Ctrl-C to its launch): tag error, KILLED; a FINISHED run is left alone
    lifecycle.interrupt(client, own, "interrupted: Ctrl-C (SIGINT) to the launch")
    assert get(own).info.status == "KILLED" and get(own).data.tags["error"].startswith("interrupted: Ctrl-C")
    lifecycle.finish_if_open(client, own)
    assert get(own).info.status == "FINISHED"
    lifecycle.interrupt(client, own, "too late")
    assert get(own).info.status == "FINISHED" and get(own).data.tags["error"].startswith("interrupted: Ctrl-C")


def test_superseded_failed_and_killed_runs(client: MlflowClient) -> None:
    experiment = client.create_experiment("lifecycle")
    old = lifecycle.create_placeholder(client, experiment, "student", {"run_key": "old"})
    lifecycle.supersede(client, old, "superseded: the configuration changed (run key old -> new)")
    run = client.get_run(old)
    assert run.info.status == "KILLED" and run.data.tags["superseded"].endswith("(run key old -> new)")

    failed = lifecycle.create_placeholder(client, experiment, "student", {"run_key": "new"})
    lifecycle.fail(client, failed, "submission failed: sbatch: error")
    run = client.get_run(failed)
    assert run.info.status == "FAILED" and run.data.tags["error"] == "submission failed: sbatch: error"
    assert run.info.end_time is not None

    trial = client.create_run(experiment).info.run_id  # a search's trial: created RUNNING by its worker
    lifecycle.fail_if_in_flight(client, trial)
    assert client.get_run(trial).info.status == "FAILED"
    parent = client.create_run(experiment).info.run_id
    lifecycle.kill(client, parent, "interrupted: Ctrl-C")
    assert client.get_run(parent).info.status == "KILLED" and client.get_run(parent).data.tags["error"] == (
        "interrupted: Ctrl-C"
    )
    lifecycle.start(client, parent)  # a search run again continues under its parent
    assert client.get_run(parent).info.status == "RUNNING"


def test_an_interrupt_keeps_the_reason_of_a_run_that_ended_on_its_own(client: MlflowClient) -> None:
    """Review 2 L3: a launch's Ctrl-C reaches runs whose job submitit has not reaped yet. A run that
    FAILED meanwhile keeps its own reason, a superseded one its tag; a run its job ended KILLED at the
    launch's TERM (the engine records no reason) gets the launch's, as one still in flight does."""
    experiment = client.create_experiment("lifecycle")
    why = "interrupted: Ctrl-C (SIGINT) to the launch; stopped at its last checkpoint (the next launch resumes it)"

    failed = client.create_run(experiment).info.run_id  # a job's run, RUNNING
    lifecycle.fail(client, failed, "NonFiniteLoss: loss is nan at epoch 2")
    lifecycle.interrupt(client, failed, why)
    run = client.get_run(failed)
    assert run.info.status == "FAILED" and run.data.tags["error"] == "NonFiniteLoss: loss is nan at epoch 2"

    superseded = client.create_run(experiment).info.run_id
    lifecycle.supersede(client, superseded, "superseded: the configuration changed (run key a -> b)")
    lifecycle.interrupt(client, superseded, why)
    run = client.get_run(superseded)
    assert run.info.status == "KILLED" and "error" not in run.data.tags

    stopped = client.create_run(experiment).info.run_id
    lifecycle.terminate(client, stopped, RunState.KILLED)  # the engine at the launch's TERM: no reason
    lifecycle.interrupt(client, stopped, why)
    run = client.get_run(stopped)
    assert run.info.status == "KILLED" and run.data.tags["error"] == why

    running = client.create_run(experiment).info.run_id
    lifecycle.interrupt(client, running, why)
    run = client.get_run(running)
    assert run.info.status == "KILLED" and run.data.tags["error"] == why


def test_the_state_diagram_names_every_transition() -> None:
    """The module docstring's diagram names each public function that changes a run's state."""
    tree = ast.parse((REPO / "harness" / "lifecycle.py").read_text())
    doc = ast.get_docstring(tree) or ""
    writes = {"update_run", "set_terminated", "create_run", "delete_run", "set_tag", "terminate", "set_error"}

    def changes_a_run(function: ast.FunctionDef) -> bool:  # calls, or hands to `call`, one of `writes`
        named = {n.attr for n in ast.walk(function) if isinstance(n, ast.Attribute)}
        named |= {n.id for n in ast.walk(function) if isinstance(n, ast.Name)}
        return bool(named & writes)

    transitions = {
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_") and changes_a_run(node)
    } - {"terminate", "set_error"}  # the steps the transitions share
    assert {"create_placeholder", "replace_placeholder", "requeue", "cancel", "supersede", "fail"} <= transitions
    missing = sorted(name for name in transitions if not re.search(rf"\b{name}\b", doc))
    assert not missing, f"transitions missing from harness/lifecycle.py's diagram: {missing}"


def test_a_finished_run_that_a_relaunch_reopened_is_finished_again_without_training(tmp_path: Path) -> None:
    """A job whose run folder holds a finished result (result.json) but whose MLflow run a relaunch
    set back to SCHEDULED (its job died after writing the result) does not train again: it marks the
    run FINISHED and returns (harness.runstate.mark_finished_if_open -> lifecycle.finish_if_open)."""
    from tests.test_engine import runs, train, write_config

    config = write_config(tmp_path, "done", train__epochs=0, tracking__visualize_images=0)
    first = train(config)
    assert first.returncode == 0, first.stderr
    (run,) = runs(tmp_path)
    assert run.info.status == "FINISHED"
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    client.update_run(run.info.run_id, status="SCHEDULED")
    result = (tmp_path / "done" / "result.json").read_bytes()
    again = train(config, f"tracking.run_id={run.info.run_id}")
    assert again.returncode == 0, again.stderr
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert (tmp_path / "done" / "result.json").read_bytes() == result  # nothing trained or written again
    assert len(runs(tmp_path)) == 1
