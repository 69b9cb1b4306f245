"""Cancel a spec's queued and running work: `python -m harness.cancel experiments/table3.yaml [--scale tiny]`.

Stops, for the spec's MLflow experiment at one scale: the launches still running on this
machine (so that they submit nothing more), every SLURM job of a queued or running run
(`scancel`: SLURM marks it CANCELLED, and the job does not requeue itself), every local job
process (TERM: the engine writes a checkpoint and stops); then marks those runs KILLED (tag
`cancelled`). A later launch resumes them from their checkpoints. Runs that already ended are
left alone; nothing is deleted.
Exit codes: 0 done (also when nothing was in flight), 1 the tracking server did not answer or
`scancel` failed, 2 invalid spec or arguments.
"""

from __future__ import annotations

import argparse
import sys
import time

from harness import lifecycle
from harness.cluster import scancel, signal_local, wait_until_gone
from harness.errors import EnvironmentProblem, handle
from harness.lifecycle import RunState
from harness.spec import load_and_expand
from harness.store import bound_requests, open_store, resolve_uri

GONE_TIMEOUT_S = 90  # past SLURM's default KillWait (30 s), after which a cancelled job is SIGKILLed


def cancel(experiment: str, scale: str, uri: str) -> list[str]:
    """Stop the experiment's launches and jobs at `scale`, mark the runs KILLED; one line per run."""
    from mlflow import MlflowClient

    from harness.tracking import find_runs

    client = MlflowClient(uri)
    where = f"tags.scale = '{scale}'"
    runs = [r for r in find_runs(uri, experiment, f"tags.kind = 'train' and {where}") if lifecycle.in_flight(r)]
    launches = [
        r for r in find_runs(uri, experiment, f"tags.kind = 'launch' and {where}") if r.info.status == RunState.RUNNING
    ]
    for launch in launches:  # first, so that no launch submits the next run or stage meanwhile
        signal_local(launch.data.tags.get("launcher_pid", ""), launch.data.tags.get("launcher_host"))
    slurm_ids = sorted({r.data.tags["slurm_job_id"] for r in runs if r.data.tags.get("slurm_job_id")})
    if slurm_ids:
        problem = scancel(slurm_ids)
        if problem == "scancel: not found":
            raise EnvironmentProblem(f"scancel: not found, got SLURM jobs {', '.join(slurm_ids)} to cancel")
        if problem:
            raise EnvironmentProblem(f"{problem}, got jobs {', '.join(slurm_ids)}")
    lines, stopped = [], []  # stopped: the local jobs TERMed here, waited for below
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    for run in runs:
        tags = run.data.tags
        if tags.get("slurm_job_id"):
            how = f"SLURM job {tags['slurm_job_id']} cancelled"
        elif tags.get("job_id"):
            term = signal_local(tags["job_id"])
            stopped += [tags["job_id"]] if term else []
            how = f"local job {tags['job_id']} " + ("stopped" if term else "not running")
        else:
            how = "never submitted"
        run_id = lifecycle.current_run_id(client, run.info.run_id)  # a job that started meanwhile replaced it
        lifecycle.cancel(client, run_id, stamp)
        lines.append(
            f"{tags.get('stage', '?')}/{run.info.run_name or run.info.run_id}: {how}; "
            f"MLflow run {run_id} {RunState.KILLED}"
        )
    for launch in launches:
        lifecycle.kill(client, launch.info.run_id)
    # a process that TERM could not reach (gone, or its pid now another user's) is not waited for
    if runs and wait_until_gone(slurm_ids, stopped, GONE_TIMEOUT_S):
        print(
            f"warning: some jobs had not stopped after {GONE_TIMEOUT_S} s; their runs are marked "
            f"{RunState.KILLED} as of now",
            file=sys.stderr,
        )
    for run in runs:  # a job that was still starting when cancelled may have marked its run RUNNING since
        lifecycle.kill_if_in_flight(client, lifecycle.current_run_id(client, run.info.run_id))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m harness.cancel", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("spec", help="experiment spec YAML, e.g. experiments/table3.yaml")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="the launch's overrides, as `status` takes them (e.g. name=other "
        "names another experiment); checked like the launch's",
    )
    parser.add_argument("--scale", help="which of the spec's scales (default: the spec's default_scale)")
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"
    )
    args = parser.parse_intermixed_args(argv)
    return handle("harness.cancel", lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    # validated as `status` and `launch` validate them (the runs' input files do not matter here)
    expanded = load_and_expand(args.spec, args.overrides, args.scale, check_files=False)
    spec, scale = expanded.spec, expanded.scale
    uri, source = resolve_uri(args.tracking_uri)
    bound_requests()
    open_store(uri, source, write=True)  # waits while a launch sets the store up; `cancel` reuses its set-up
    lines = cancel(spec.name, scale, uri)
    for line in lines:
        print(line)
    print(f"{spec.name} ({scale}): {len(lines)} run(s) cancelled", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
