"""Launch every run of an experiment spec: `python -m harness.launch experiments/table3.yaml`.

Each stage is submitted through submitit as one job array; a stage that depends on another
waits for it with a SLURM `afterok` dependency, so the launcher returns at once (`--wait`
follows the runs to the end). Runs whose key is already FINISHED in MLflow are skipped, queued
or running ones are not submitted twice, failed or killed ones are resubmitted into the same
MLflow run and resume from their checkpoint, and so are runs that MLflow still shows RUNNING
whose process or SLURM job is gone (killed hard); `--rerun` forces fresh runs.

A run's folder is bound to its run key and MLflow run (harness/runstate.py): a folder that holds
another configuration's state is moved aside (`<run>.before-<time>`) before its new run starts;
a queued or running job of that other configuration (the old students of a teacher whose
settings changed) is cancelled first and its MLflow run marked KILLED (tag `superseded`).
Runs left SCHEDULED by a launch that was killed before it submitted them are resubmitted; a
launch killed hard is marked KILLED by the next one.

Exit codes: 0 submitted (or all done), 1 a run failed (with --wait or the local executor) or the
environment stopped the launch (an unreachable tracking server), 2 invalid spec, arguments or
files (one line each; nothing written, nothing submitted).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shlex
import signal
import socket
import stat
import sys
import time
from pathlib import Path
from typing import Any

from harness import runstate
from harness.cluster import choose_executor, job_alive, process_alive, scancel, signal_local, wait_until_gone
from harness.config import ConfigError
from harness.errors import EXIT_FAILED, EnvironmentProblem, handle
from harness.spec import MAX_RUNS, Expanded, RunPlan, differing_values, load_and_expand
from harness.store import StoreLock, bound_requests, check_store, resolve_uri

IN_FLIGHT = ("SCHEDULED", "RUNNING")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m harness.launch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("spec", help="experiment spec YAML, e.g. experiments/table3.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted spec overrides, e.g. base.train.epochs=2")
    parser.add_argument("--scale", help="which of the spec's scales (default: the spec's default_scale)")
    parser.add_argument(
        "--executor",
        choices=["auto", "slurm", "local", "debug"],
        default="auto",
        help="auto: SLURM when its controller answers (sinfo), else local processes",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the expanded runs, submit nothing")
    parser.add_argument("--rerun", action="store_true", help="run again even runs that already finished")
    parser.add_argument("--wait", action="store_true", help="follow the runs to the end, then report")
    parser.add_argument("--output-root", default="runs", help="runs/<spec>/<scale>/<stage>/<run>/ (default: runs)")
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"
    )
    parser.add_argument(
        "--max-runs",
        type=int,
        default=MAX_RUNS,
        metavar="N",
        help=f"refuse a spec that expands to more than N runs (default: {MAX_RUNS})",
    )
    return parser.parse_intermixed_args(argv)


# --------------------------------------------------------------------------------- dry run
def render_table(expanded: Expanded) -> str:
    """One row per run: stage, name, row, key, recipe, the values that differ between runs, resources."""
    varying = [k for k in differing_values(expanded.runs) if k != "recipe"]
    header = ["stage", "name", "row", "key", "recipe", *varying, "resources"]
    rows = []
    for plan in expanded.runs:
        flat = _flat(plan)
        rows.append(
            [
                plan.stage,
                plan.name,
                plan.row,
                plan.key,
                plan.config.recipe,
                *(str(flat.get(k)) for k in varying),
                plan.slurm.describe(),
            ]
        )
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *rows]]
    title = f"{expanded.spec.name} ({expanded.scale}): {len(expanded.runs)} runs in stages {' -> '.join(expanded.stage_order)}"
    return "\n".join([title, *lines])


def _flat(plan: RunPlan) -> dict[str, Any]:
    from harness.config import flatten

    return flatten(plan.config.model_dump(exclude={"output_dir", "tracking"}))


# ------------------------------------------------------------------------------ submission
def make_executor(cluster: str, folder: Path, plan: RunPlan, spec_name: str, dependency: list[str]) -> Any:
    import submitit

    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    res = plan.slurm
    params: dict[str, Any] = dict(
        name=f"{spec_name}-{plan.stage}",
        timeout_min=res.timeout_min,
        nodes=res.nodes,
        tasks_per_node=res.tasks_per_node,
        cpus_per_task=res.cpus_per_task,
        gpus_per_node=res.gpus_per_node,
    )
    if res.mem_gb:
        params["mem_gb"] = res.mem_gb
    if cluster == "slurm":
        extra = dict(res.additional)
        if dependency:
            extra["dependency"] = "afterok:" + ":".join(dependency)
        params.update(slurm_array_parallelism=res.array_parallelism, slurm_additional_parameters=extra)
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(res, key):
                params[f"slurm_{key}"] = getattr(res, key)
    executor.update_parameters(**params)
    return executor


def launcher_alive(tags: dict[str, str]) -> bool:
    """Whether the launch that created a run (its parent run's tags) may still be submitting it."""
    host, pid = tags.get("launcher_host"), tags.get("launcher_pid", "")
    if host is None or not pid.isdigit():
        return False  # a launch from before these tags: long gone
    if host != socket.gethostname():
        return True  # another machine's process: cannot be told from here
    return int(pid) != os.getpid() and process_alive(int(pid))


class Launch:
    """One launch of a spec: MLflow bookkeeping, then one job array per stage."""

    def __init__(
        self,
        expanded: Expanded,
        tracking_uri: str,
        cluster: str,
        rerun: bool,
        output_root: Path | None = None,
        lock: StoreLock | None = None,
    ) -> None:
        from mlflow import MlflowClient

        from harness.tracking import ensure_experiment

        self.expanded = expanded
        self.uri = tracking_uri
        self.cluster = cluster
        self.rerun = rerun
        self.root = output_root
        self.lock = lock or StoreLock(tracking_uri, output_root or Path("runs").resolve())
        self._parent_id: str | None = None  # created with the first run it submits
        with self.lock:  # a new store's tables are created (MlflowClient) by one process at a time
            self.client = MlflowClient(tracking_uri)
            self.experiment_id = ensure_experiment(tracking_uri, expanded.spec.name)
            self.refresh()
        self.run_ids: dict[str, list[str]] = {}  # stage -> MLflow runs of the jobs submitted
        self.jobs: dict[str, list[tuple[RunPlan, Any]]] = {}
        self.skipped: dict[str, str] = {}
        self.started: list[tuple[str, Any]] = []  # (MLflow run, job) of every job submitted

    def refresh(self) -> None:
        """What MLflow says now: the runs by key, the launches still running (those killed hard marked KILLED).

        Read again under the store lock before each stage is decided: another launch may have
        submitted or finished runs meanwhile (a local launch trains a stage outside the lock).
        """
        from harness.tracking import find_runs

        expanded = self.expanded
        self.by_key: dict[str, list[Any]] = {}
        for run in find_runs(self.uri, expanded.spec.name, f"tags.kind = 'train' and tags.scale = '{expanded.scale}'"):
            self.by_key.setdefault(run.data.tags.get("run_key", ""), []).append(run)
        self.launches = {
            run.info.run_id: run
            for run in find_runs(self.uri, expanded.spec.name, "tags.kind = 'launch' and attributes.status = 'RUNNING'")
        }
        for run in self.launches.values():  # killed hard (SIGKILL): nobody marked it
            if run.info.run_id != self._parent_id and not launcher_alive(run.data.tags):
                self.client.set_terminated(run.info.run_id, "KILLED")
                run.info._status = "KILLED"
        self._job_alive: dict[str, bool] = {}

    @property
    def parent_id(self) -> str:
        """This launch's parent run, created when first needed: a launch that submits nothing records none."""
        if self._parent_id is None:
            from harness.tracking import source_tags

            expanded = self.expanded
            self._parent_id = self.client.create_run(
                self.experiment_id,
                run_name=f"launch-{expanded.scale}",
                tags={
                    **source_tags("harness/launch.py", "LOCAL"),
                    "kind": "launch",
                    "spec": expanded.spec.name,
                    "scale": expanded.scale,
                    "table": expanded.spec.table or "",
                    "executor": self.cluster,
                    "launcher_host": socket.gethostname(),
                    "launcher_pid": str(os.getpid()),
                },
            ).info.run_id
        return self._parent_id

    def job_alive(self, run: Any) -> bool:
        """`job_alive` of an in-flight run, asked once per launch (it may call `squeue`).

        A run with no job id was created SCHEDULED by a launch that never submitted it (killed
        mid-stage, or its submission failed): it is alive only while that launch still runs.
        """
        if run.info.run_id not in self._job_alive:
            tags = run.data.tags
            if tags.get("job_id") or tags.get("slurm_job_id"):
                alive = job_alive(tags)
            else:
                parent = self.launches.get(tags.get("mlflow.parentRunId", ""))
                alive = parent is not None and parent.info.status == "RUNNING" and launcher_alive(parent.data.tags)
            self._job_alive[run.info.run_id] = alive
        return self._job_alive[run.info.run_id]

    def decide(self, plan: RunPlan) -> tuple[str, Any | None]:
        """('skip'|'submit', the existing MLflow run to continue or None)."""
        runs = self.by_key.get(plan.key, [])
        finished = [r for r in runs if r.info.status == "FINISHED"]
        flying = [r for r in runs if r.info.status in IN_FLIGHT]
        if flying and self.job_alive(flying[0]):
            return "in flight", flying[0]
        if flying:  # killed hard (SIGKILL, out of memory, a crashed machine): it never marked its run
            tags = flying[0].data.tags
            gone = (
                "its job is gone"
                if tags.get("job_id") or tags.get("slurm_job_id")
                else "it was never submitted (its launch was interrupted)"
            )
            print(
                f"{plan.stage}/{plan.name}: MLflow says {flying[0].info.status} but {gone}; "
                "resubmitting it to resume from its checkpoint",
                file=sys.stderr,
            )
            return "submit", flying[0]
        if finished and not self.rerun:
            return "finished", finished[0]
        if finished:  # --rerun: keep the old outputs beside the new ones, nothing is lost
            if plan.output_dir.exists():
                runstate.move_aside(plan.output_dir, self.root)
            return "submit", None
        failed = [r for r in runs if r.info.status in ("FAILED", "KILLED")]
        return "submit", failed[0] if failed else None

    def prepare(self, plan: RunPlan, continue_run: Any | None) -> dict[str, Any]:
        """The job's config: tracking set to a child run of this launch, SCHEDULED until it starts.

        A new run is a placeholder until its job starts and replaces it with a run of its own
        (harness.tracking.replace_placeholder), so that MLflow's start time is the job's start.
        """
        from harness.tracking import QUEUED_AT

        tags = {
            "mlflow.source.name": "harness/launch.py",
            "mlflow.source.type": "JOB",
            **plan.config.tracking.tags,
            "run_key": plan.key,
            "variant": plan.variant,
            "mlflow.parentRunId": self.parent_id,
            QUEUED_AT: str(int(time.time() * 1000)),
        }
        if continue_run is not None and not runstate.folder_is_resumable(
            plan.output_dir, plan.key, continue_run.info.run_id
        ):
            print(
                f"{plan.stage}/{plan.name}: {plan.output_dir} holds another run's state; starting a new MLflow "
                f"run instead of continuing {continue_run.info.run_id}",
                file=sys.stderr,
            )
            continue_run = None
        if continue_run is not None:
            run_id = continue_run.info.run_id
            for key, value in tags.items():
                self.client.set_tag(run_id, key, value)
        else:
            run_id = self.client.create_run(
                self.experiment_id, run_name=plan.config.tracking.run_name, tags=tags
            ).info.run_id
        self.client.update_run(run_id, status="SCHEDULED")
        moved = runstate.claim(plan.output_dir, plan.key, run_id, self.root, resume=continue_run is not None)
        if moved is not None:
            print(
                f"{plan.stage}/{plan.name}: {plan.output_dir} held another run's state (another run key or "
                f"MLflow run); kept as {moved.name}, the run starts clean",
                file=sys.stderr,
            )
        config = plan.config.model_copy(deep=True)
        config.tracking.uri = self.uri
        config.tracking.experiment_id = self.experiment_id
        config.tracking.parent_run_id = self.parent_id
        config.tracking.run_id = run_id
        config.tracking.tags.update({"mlflow.source.name": "harness/launch.py", "mlflow.source.type": "JOB"})
        return {"run_id": run_id, "config": config.model_dump()}

    def plan_stage(self, stage: str, sources: set[str]) -> list[tuple[RunPlan, dict[str, Any]]]:
        """Decide each run of the stage; create the MLflow runs of those to submit (under the store lock).

        Locally nothing orders this stage after another launch's runs of the stages it starts
        from (`sources`): while one of them has not FINISHED (it trains in another launch), the
        stage is not submitted; that launch goes on to it, or a relaunch once it has finished.
        """
        waiting = self.unfinished(sources) if self.cluster != "slurm" else []
        todo: list[tuple[RunPlan, dict[str, Any]]] = []
        for plan in self.expanded.stage_runs(stage):
            if waiting:
                done = any(r.info.status == "FINISHED" for r in self.by_key.get(plan.key, []))
                self.skipped[f"{stage}/{plan.name}"] = "finished" if done and not self.rerun else "waits for a stage"
                continue
            decision, existing = self.decide(plan)
            if decision == "submit":
                todo.append((plan, self.prepare(plan, existing)))
            else:
                self.skipped[f"{stage}/{plan.name}"] = decision
        if waiting and any(v == "waits for a stage" for k, v in self.skipped.items() if k.startswith(stage + "/")):
            print(
                f"{stage}: not submitted: it starts from {', '.join(waiting)}, not FINISHED; the launch running "
                f"it goes on to {stage} (or relaunch once it has finished)",
                file=sys.stderr,
            )
        return todo

    def unfinished(self, stages: set[str]) -> list[str]:
        """The runs of `stages` that MLflow does not show FINISHED, each with the state it shows."""
        found = []
        for stage in sorted(stages):
            for plan in self.expanded.stage_runs(stage):
                states = [r.info.status for r in self.by_key.get(plan.key, [])]
                if "FINISHED" not in states:
                    found.append(f"{stage}/{plan.name} ({states[0] if states else 'not launched'})")
        return found

    def submit_stage(
        self, stage: str, todo: list[tuple[RunPlan, dict[str, Any]]], depends_on: list[str], progress: bool = False
    ) -> tuple[list[tuple[RunPlan, Any]], bool]:
        """Submit the stage's runs that need it (`plan_stage`); (jobs, False if a run failed).

        SLURM: one job array, returned at once. Local processes: as many at once as the cores
        allow, each with its cpus_per_task threads, a freed slot starting the next run at once
        (runs of one stage differ in length); returns when the stage is done, its progress bar
        counting finished runs from the first.
        """
        from harness.job import TrainJob

        skipped = sum(1 for k in self.skipped if k.startswith(stage + "/"))
        if not todo:
            print(f"{stage}: nothing to submit, skipped {skipped}", file=sys.stderr)
            return [], True
        folder = todo[0][0].output_dir.parent / "submitit"
        executor = make_executor(self.cluster, folder, todo[0][0], self.expanded.spec.name, depends_on)
        if self.cluster == "slurm":  # one array; SLURM caps its concurrency (array_parallelism)
            try:
                array = executor.map_array(TrainJob(), [job["config"] for _, job in todo])
            except Exception as err:  # sbatch refused: the runs never got a job
                self.fail_unsubmitted(todo, err)
                raise EnvironmentProblem(f"{stage}: SLURM refused the submission: {failure_line(err)}") from None
            jobs = self._record(todo, array)
            print(f"{stage}: submitted {len(jobs)}, skipped {skipped}", file=sys.stderr)
            return jobs, True
        cpus = todo[0][0].slurm.cpus_per_task
        os.environ["DVIT_NUM_THREADS"] = str(cpus)
        at_once = max(1, min(todo[0][0].slurm.array_parallelism, (os.cpu_count() or 1) // cpus))
        print(
            f"{stage}: running {len(todo)} here, {min(at_once, len(todo))} at a time ({cpus} thread(s) each), "
            f"skipped {skipped}",
            file=sys.stderr,
        )
        submitted: list[tuple[RunPlan, Any]] = []
        running: list[tuple[RunPlan, Any]] = []
        with Finished(len(todo), progress, stage, self.watch) as finished:
            for entry in todo:
                running = finished.wait(running, leave=at_once - 1)  # a free slot
                with children_ignore_sigint():
                    job = executor.submit(TrainJob(), entry[1]["config"])
                (pair,) = self._record([entry], [job])
                submitted.append(pair)
                running.append(pair)
            finished.wait(running)
        return submitted, not finished.failed

    def fail_unsubmitted(self, todo: list[tuple[RunPlan, dict[str, Any]]], err: BaseException) -> None:
        """Runs whose submission failed are FAILED with the reason, not SCHEDULED forever."""
        for _, job_cfg in todo:
            self.client.set_tag(job_cfg["run_id"], "error", f"submission failed: {failure_line(err)}"[:4000])
            self.client.set_terminated(job_cfg["run_id"], "FAILED")

    def _record(self, todo: list[tuple[RunPlan, dict[str, Any]]], jobs: list[Any]) -> list[tuple[RunPlan, Any]]:
        """Tag each MLflow run with its job id; link the job's log into the run's folder."""
        for (plan, job_cfg), job in zip(todo, jobs):
            self.run_ids.setdefault(plan.stage, []).append(job_cfg["run_id"])
            self.started.append((job_cfg["run_id"], job))
            self.tag_run(job_cfg["run_id"], "slurm_job_id" if self.cluster == "slurm" else "job_id", job.job_id)
            plan.output_dir.mkdir(parents=True, exist_ok=True)
            log = plan.output_dir / "job.log"  # the job's log under the run's own name
            if log.is_symlink():
                log.unlink()
            log.symlink_to(Path(job.paths.stdout).resolve())
        return [(plan, job) for (plan, _), job in zip(todo, jobs)]

    def tag_run(self, run_id: str, key: str, value: str) -> None:
        """Tag a submitted run, or the run its job created if the job has already started (its
        placeholder is then deleted and MLflow refuses tags on it)."""
        from mlflow.exceptions import MlflowException

        from harness.tracking import current_run_id

        try:
            self.client.set_tag(run_id, key, value)
        except MlflowException:
            self.client.set_tag(current_run_id(self.client, run_id), key, value)

    def in_flight_job_ids(self, stage: str) -> list[str]:
        ids = []
        for plan in self.expanded.stage_runs(stage):
            for run in self.by_key.get(plan.key, []):
                if run.info.status in IN_FLIGHT and run.data.tags.get("slurm_job_id") and self.job_alive(run):
                    ids.append(run.data.tags["slurm_job_id"])
        return ids

    def retire_superseded(self, wait_s: float = 180.0) -> None:
        """Stop the queued and running jobs of runs whose place (stage/name) now has another run key.

        A changed configuration (an override, a retrained teacher: its students' keys change with
        its own) gives a run a new key, so the new run starts clean in the same folder; the old
        run's job, if still queued or running (from an earlier launch), must not go on beside it,
        writing to that folder or waiting to train a student of the old teacher. Its job is
        cancelled (`scancel`, or TERM for a local process; a launch still submitting them is
        stopped too) and its MLflow run marked KILLED with tag `superseded` saying why. Waits
        until those jobs have ended (up to `wait_s`) before any folder is handed to a new run.
        """
        from harness.tracking import current_run_id

        current = {
            p.config.tracking.run_name: p.key for s in self.expanded.stage_order for p in self.expanded.stage_runs(s)
        }
        old = [
            (run, current[run.info.run_name])
            for key, runs in self.by_key.items()
            for run in runs
            if run.info.status in IN_FLIGHT and current.get(run.info.run_name, key) != key
        ]
        waiting = []
        for run, new_key in old:
            tags = run.data.tags
            alive = self.job_alive(run)
            job = tags.get("slurm_job_id") or tags.get("job_id")
            if alive and tags.get("slurm_job_id"):
                scancel([job])
                waiting.append(run)
            elif alive and tags.get("job_id") and signal_local(job):
                waiting.append(run)
            parent = self.launches.get(tags.get("mlflow.parentRunId", ""))
            if (
                parent is not None
                and parent.info.status == "RUNNING"
                and signal_local(parent.data.tags.get("launcher_pid", ""), parent.data.tags.get("launcher_host"))
            ):
                parent.info._status = "KILLED"  # it would go on submitting the old runs' next stages
            how = (
                f"job {job} cancelled"
                if run in waiting
                else f"job {job} not stopped (not on this machine)"
                if alive
                else "no live job"
            )
            reason = (
                f"superseded: the configuration changed (run key {tags.get('run_key')} -> {new_key}); "
                f"{how} by launch {self.parent_id}"
            )
            run_id = current_run_id(self.client, run.info.run_id)  # its job may have started meanwhile
            self.client.set_tag(run_id, "superseded", reason)
            self.client.set_terminated(run_id, "KILLED")
            run.info._status = "KILLED"
            print(f"{run.info.run_name}: {reason}; MLflow run {run_id} KILLED", file=sys.stderr)
        left = wait_until_gone(
            [r.data.tags["slurm_job_id"] for r in waiting if r.data.tags.get("slurm_job_id")],
            [r.data.tags["job_id"] for r in waiting if not r.data.tags.get("slurm_job_id")],
            wait_s,
            poll_s=1,
        )
        waiting = [r for r in waiting if (r.data.tags.get("slurm_job_id") or r.data.tags.get("job_id")) in left]
        if waiting:
            names = ", ".join(r.info.run_name for r in waiting)
            raise EnvironmentProblem(
                f"the superseded jobs of {names} did not stop within {wait_s:.0f} s; relaunch once they have"
            )

    def submit_all(self, progress: bool) -> bool:
        """Submit every stage; locally, run each stage to its end before the next. False if a run failed.

        Under the store lock (one launch or search at a time): on SLURM the whole submission; locally
        each stage's decisions and MLflow runs, not its training (a relaunch meanwhile sees them in flight).
        """
        with self.lock if self.cluster == "slurm" else contextlib.nullcontext():
            with self.lock:
                self.refresh()
                self.retire_superseded()
            for stage in self.expanded.stage_order:
                stage_spec = self.expanded.spec.stages[stage]
                deps = set(stage_spec.after) | {s for s in (stage_spec.init_from, stage_spec.distill_from) if s}
                with self.lock:
                    self.refresh()
                    dependency = [job.job_id for d in sorted(deps) for _, job in self.jobs.get(d, [])]
                    dependency += [i for d in sorted(deps) for i in self.in_flight_job_ids(d)]
                    todo = self.plan_stage(stage, deps)
                self.jobs[stage], stage_ok = self.submit_stage(stage, todo, dependency, progress)
                if not stage_ok:
                    print(f"{stage}: a run failed; later stages are not submitted", file=sys.stderr)
                    return False
        return True

    def stop_local(self, why: str, wait_s: float = 60.0) -> None:
        """Stop this launch's local jobs that still run, and say why in each run's `error` tag.

        They ignore Ctrl-C (`children_ignore_sigint`): the launcher, their parent, ends them with TERM,
        as harness.cancel does (a checkpoint at the next step, then KILLED; the next launch resumes).
        """
        from harness.tracking import current_run_id

        live = [(run_id, job) for run_id, job in self.started if not job.done()]
        stop_jobs([job for _, job in live], wait_s)
        for run_id, _ in live:
            run_id = current_run_id(self.client, run_id)
            status = self.client.get_run(run_id).info.status
            if status == "FINISHED":  # it ended on its own meanwhile
                continue
            self.client.set_tag(
                run_id, "error", f"interrupted: {why}; stopped at its last checkpoint (the next launch resumes it)"
            )
            if status in IN_FLIGHT:
                self.client.set_terminated(run_id, "KILLED")

    @property
    def watch(self) -> Any:
        """Where its runs stand, read from MLflow while the launch waits (harness/progress.py)."""
        if getattr(self, "_watch", None) is None:
            from harness.progress import launch_watch

            self._watch = launch_watch(self)
        return self._watch

    def finish(self, status: str = "FINISHED") -> None:
        if getattr(self, "_watch", None) is not None:
            self._watch.close()
        if self._parent_id is not None:
            self.client.set_terminated(self._parent_id, status=status)

    def submitted_run_ids(self) -> list[str]:
        """The MLflow runs of the jobs this launch submitted, in stage order (a started job's own run,
        not the placeholder the launcher created for it)."""
        from harness.tracking import current_run_id

        return [
            current_run_id(self.client, run_id)
            for stage in self.expanded.stage_order
            for run_id in self.run_ids.get(stage, [])
        ]


POLL_S = 0.2  # how often finished local processes are looked for


def failure_line(err: BaseException) -> str:
    """The exception line of a failed job's traceback (submitit wraps it between dashed lines,
    followed by log paths), else the error's last line."""
    lines = [line.strip() for line in str(err).strip().splitlines()]
    dashes = [i for i, line in enumerate(lines) if line and set(line) == {"-"}]
    if len(dashes) >= 2:
        inside = [line for line in lines[dashes[-2] + 1 : dashes[-1]] if line]
        if inside:
            return inside[-1]
    return next((line for line in reversed(lines) if line), repr(err))


class Finished:
    """Counts a stage's finished jobs on a progress bar and keeps the failed ones."""

    def __init__(self, total: int, progress: bool, desc: str, watch: Any = None) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="run", disable=not progress)
        self.failed: list[RunPlan] = []
        self.watch = watch  # harness.progress.Watch: the runs' epochs, steps and ETAs while waiting

    def __enter__(self) -> Finished:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.close()

    def collect(self, pending: list[tuple[RunPlan, Any]]) -> list[tuple[RunPlan, Any]]:
        """Count the jobs of `pending` that are done (saying which failed); return the others."""
        still = []
        for plan, job in pending:
            if not job.done():
                still.append((plan, job))
                continue
            try:
                job.result()
            except Exception as err:  # the job's own log has the traceback
                self.failed.append(plan)
                print(
                    f"\n{plan.stage}/{plan.name} failed: {failure_line(err)} (log: {plan.output_dir / 'job.log'})",
                    file=sys.stderr,
                )
            self.bar.update(1)
        return still

    def wait(self, pending: list[tuple[RunPlan, Any]], leave: int = 0) -> list[tuple[RunPlan, Any]]:
        """Collect finished jobs until at most `leave` of `pending` are still running; those."""
        pending = self.collect(pending)
        while len(pending) > leave:
            time.sleep(POLL_S)
            pending = self.collect(pending)
            if self.watch is not None:
                self.watch.tick()
        if self.watch is not None:
            self.watch.pause()
        return pending


def wait_for(jobs: list[tuple[RunPlan, Any]], progress: bool, desc: str = "runs", watch: Any = None) -> bool:
    """Follow jobs to the end with a progress bar of finished runs; False if any failed."""
    with Finished(len(jobs), progress, desc, watch) as finished:
        finished.wait(list(jobs))
    return not finished.failed


def check_report_inputs(expanded: Expanded) -> None:
    """The spec's notebooks and paper table must exist before any run trains for them."""
    spec, path = expanded.spec, expanded.path
    if not spec.notebooks:
        return
    from analysis.report import ReportError, resolve_notebook

    problems = []
    for index, notebook in enumerate(spec.notebooks):
        try:
            resolve_notebook(notebook)
        except ReportError:
            problems.append(f"{path}: notebooks[{index}]: no such notebook, got {notebook!r}")
    if spec.table:
        from analysis.reference import resolve_table

        try:
            resolve_table(spec.table)
        except KeyError as err:
            problems.append(f"{path}: {err.args[0]}")
    if problems:
        raise ConfigError(problems)


def check_output_root(root: Path) -> None:
    """The output root must be a writable folder (created if missing) before anything is submitted."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError([f"--output-root: cannot create the folder ({err.strerror}), got {str(root)!r}"]) from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise ConfigError([f"--output-root: not writable, got {str(root)!r}"])


def check_run_folders(expanded: Expanded, root: Path) -> None:
    """Every run folder's existing part must be a folder: a symlink loop or a file in the way is
    refused before any MLflow run is created (it would otherwise fail the launch half-way)."""
    for folder in sorted({plan.output_dir for plan in expanded.runs}):
        for part in [*reversed(folder.parents), folder]:
            if part != root and root not in part.parents:
                continue
            try:
                is_dir = stat.S_ISDIR(os.stat(part).st_mode)
            except FileNotFoundError:
                break  # created later, with everything below it
            except OSError as err:  # ELOOP: a symlink loop; EACCES: a folder nobody may enter
                raise ConfigError(
                    [
                        f"--output-root: {part}: {(err.strerror or str(err)).lower()}"
                        f"{' (a symlink loop)' if err.errno == errno.ELOOP else ''}, "
                        f"got {str(root)!r}"
                    ]
                ) from None
            if not is_dir:
                raise ConfigError(
                    [f"--output-root: {part}: not a folder (a run folder lies under it), got {str(root)!r}"]
                )


def stop_jobs(jobs: list[Any], wait_s: float, every_s: float = 2.0) -> None:
    """TERM local jobs (their submitit controller, which passes it on) until they have ended, for at most
    `wait_s`. Again every `every_s`: a job still starting ignores TERM (submitit's handler) until the
    engine listens; from then on the engine writes a checkpoint at the next step and stops."""
    deadline = time.monotonic() + wait_s
    signalled = 0.0
    while time.monotonic() < deadline:
        live = [job for job in jobs if not job.done()]
        if not live:
            return
        if time.monotonic() - signalled >= every_s:
            for job in live:
                signal_local(job.job_id)
            signalled = time.monotonic()
        time.sleep(POLL_S)


@contextlib.contextmanager
def children_ignore_sigint() -> Any:
    """Local jobs started inside ignore SIGINT (an ignored signal stays ignored across exec).

    Ctrl-C reaches the terminal's whole process group: submitit's job controller died of it with a
    KeyboardInterrupt traceback and the training job with an empty FAILED run. The launcher stops
    its jobs itself (`Launch.stop_local`).
    """
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class _Terminated(KeyboardInterrupt):
    """SIGTERM (scancel of a launcher job, `kill`, harness.cancel): stop like Ctrl-C."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return handle("harness.launch", lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    output_root = Path(args.output_root).resolve()
    if args.max_runs < 1:
        raise ConfigError([f"--max-runs: must be at least 1, got {args.max_runs}"])
    expanded = load_and_expand(args.spec, args.overrides, args.scale, str(output_root), max_runs=args.max_runs)
    check_report_inputs(expanded)
    for note in expanded.notes:  # an override that some runs' own layers undo: which ones, and why
        print(note, file=sys.stderr)
    if args.dry_run:
        print(render_table(expanded))
        return 0
    uri, source = resolve_uri(args.tracking_uri)
    check_store(uri, source, must_exist=False, write=True)
    check_output_root(output_root)
    check_run_folders(expanded, output_root)
    bound_requests()
    cluster = choose_executor(args.executor)
    launch = Launch(expanded, uri, cluster, args.rerun, output_root, StoreLock(uri, output_root))
    progress = sys.stderr.isatty()
    status = "KILLED"  # unless the launch gets to the end
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        ok = launch.submit_all(progress)
        if ok and args.wait and cluster == "slurm":
            ok = wait_for([j for jobs in launch.jobs.values() for j in jobs], progress, watch=launch.watch)
        status = "FINISHED" if ok else "FAILED"
    except KeyboardInterrupt as stop:  # Ctrl-C, or TERM (_Terminated): the local jobs end with the launch
        if cluster != "slurm":
            launch.stop_local(
                "SIGTERM to the launch" if isinstance(stop, _Terminated) else "Ctrl-C (SIGINT) to the launch"
            )
        raise
    except Exception:
        status = "FAILED"
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        launch.finish(status)
    submitted = sum(len(j) for j in launch.jobs.values())
    print(
        f"{expanded.spec.name} ({expanded.scale}): {submitted} submitted, {len(launch.skipped)} skipped "
        f"({', '.join(sorted(set(launch.skipped.values()))) or 'none'}); MLflow experiment "
        f"{expanded.spec.name!r} at {uri}, parent run {launch._parent_id or 'none (nothing submitted)'}"
    )
    if ok and args.wait:
        report(expanded, uri, launch._parent_id)
    print_urls(launch, uri, finished=cluster == "local" or args.wait)
    return 0 if ok else EXIT_FAILED


def print_urls(launch: Launch, uri: str, finished: bool) -> None:
    """The UI pages of this launch: the runs table, and the compare view of the runs it ran to the end."""
    from harness.tracking import compare_url, runs_table_url

    if not uri.startswith(("http://", "https://")):
        print(f"MLflow UI: mlflow ui --backend-store-uri {shlex.quote(uri)}   (then open the pages below)")
    print(f"runs table: {runs_table_url(uri, launch.experiment_id)}")
    run_ids = launch.submitted_run_ids()
    if finished and run_ids:
        print(f"compare the runs of this launch: {compare_url(uri, launch.experiment_id, run_ids)}")


def report(expanded: Expanded, uri: str, parent_id: str | None) -> None:
    """After --wait: regenerate the spec's tables (analysis notebooks), put them on the launch's
    MLflow run (that of the latest launch of the spec and scale if this one submitted nothing)."""
    notebooks = expanded.spec.notebooks
    if notebooks:
        from analysis.mlflow_report import NoParentRun, find_parent
        from analysis.report import make_report

        chosen = ""
        if parent_id is None:
            try:
                parent_id, chosen = find_parent(uri, expanded.spec.name, expanded.scale)
            except NoParentRun as err:
                print(f"not put on MLflow: {err}", file=sys.stderr)
        out = Path("reports") / expanded.spec.name / expanded.scale
        tables, where = make_report(
            expanded.spec.name, expanded.scale, uri, notebooks, str(out), expanded.spec.table, parent_id, chosen
        )
        print(tables)
        print(f"tables and figures: {out}/")
        if where:
            print(where)


if __name__ == "__main__":
    sys.exit(main())
