"""One launch's submission: the executor, and `Launch`, which decides each run from what MLflow
holds (skip, continue, resubmit, retire), creates its MLflow runs and submits one job array per stage."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from pathlib import Path
from typing import Any

from harness import lifecycle, runstate
from harness.cluster import job_alive, process_alive, scancel, signal_local, wait_until_gone
from harness.errors import EnvironmentProblem
from harness.launch.wait import Finished, children_ignore_sigint, failure_line, interrupts_deferred, stop_jobs
from harness.lifecycle import IN_FLIGHT, RunState, status_filter
from harness.spec import Expanded, RunPlan
from harness.store import StoreLock


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
        self.lock = lock or StoreLock(tracking_uri)
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
            for run in find_runs(
                self.uri, expanded.spec.name, f"tags.kind = 'launch' and {status_filter(RunState.RUNNING)}"
            )
        }
        for run in list(self.launches.values()):  # killed hard (SIGKILL): nobody marked it
            if run.info.run_id != self._parent_id and not launcher_alive(run.data.tags):
                lifecycle.kill(self.client, run.info.run_id)
                del self.launches[run.info.run_id]  # no longer running
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
                alive = (
                    parent is not None and parent.info.status == RunState.RUNNING and launcher_alive(parent.data.tags)
                )
            self._job_alive[run.info.run_id] = alive
        return self._job_alive[run.info.run_id]

    def decide(self, plan: RunPlan) -> tuple[str, Any | None]:
        """('skip'|'submit', the existing MLflow run to continue or None)."""
        runs = self.by_key.get(plan.key, [])
        finished = [r for r in runs if r.info.status == RunState.FINISHED]
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
        failed = [r for r in runs if r.info.status in (RunState.FAILED, RunState.KILLED)]
        return "submit", failed[0] if failed else None

    def prepare(self, plan: RunPlan, continue_run: Any | None) -> dict[str, Any]:
        """The job's config: tracking set to a child run of this launch, SCHEDULED until it starts.

        A new run is a placeholder until its job starts and replaces it with a run of its own
        (harness.tracking.replace_placeholder), so that MLflow's start time is the job's start.
        """
        tags = {
            "mlflow.source.name": "harness/launch.py",
            "mlflow.source.type": "JOB",
            **plan.config.tracking.tags,
            "run_key": plan.key,
            "variant": plan.variant,
            "mlflow.parentRunId": self.parent_id,
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
        with interrupts_deferred():  # never a placeholder left RUNNING (MLflow creates it so) by a Ctrl-C
            if continue_run is not None:
                run_id = continue_run.info.run_id
                lifecycle.queue_again(self.client, run_id, tags)
            else:
                run_id = lifecycle.create_placeholder(
                    self.client, self.experiment_id, plan.config.tracking.run_name, tags
                )
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
                done = any(r.info.status == RunState.FINISHED for r in self.by_key.get(plan.key, []))
                self.skipped[f"{stage}/{plan.name}"] = "finished" if done and not self.rerun else "waits for a stage"
                continue
            decision, existing = self.decide(plan)
            if decision == "submit":
                todo.append((plan, self.prepare(plan, existing)))
            else:
                self.skipped[f"{stage}/{plan.name}"] = decision
        if waiting and any(v == "waits for a stage" for k, v in self.skipped.items() if k.startswith(stage + "/")):
            print(
                f"{stage}: not submitted: it starts from {', '.join(waiting)}, not {RunState.FINISHED}; "
                f"the launch running it goes on to {stage} (or relaunch once it has finished)",
                file=sys.stderr,
            )
        return todo

    def unfinished(self, stages: set[str]) -> list[str]:
        """The runs of `stages` that MLflow does not show FINISHED, each with the state it shows."""
        found = []
        for stage in sorted(stages):
            for plan in self.expanded.stage_runs(stage):
                states = [r.info.status for r in self.by_key.get(plan.key, [])]
                if RunState.FINISHED not in states:
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
            with interrupts_deferred(children_too=True):  # a job submitted is a job recorded: never submitted twice
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
                with interrupts_deferred():  # recorded inside: a Ctrl-C or TERM right after still finds the job to stop
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
            lifecycle.fail(self.client, job_cfg["run_id"], f"submission failed: {failure_line(err)}"[:4000])

    def _record(self, todo: list[tuple[RunPlan, dict[str, Any]]], jobs: list[Any]) -> list[tuple[RunPlan, Any]]:
        """Tag each MLflow run with its job id; link the job's log into the run's folder."""
        for (plan, job_cfg), job in zip(todo, jobs, strict=True):
            self.run_ids.setdefault(plan.stage, []).append(job_cfg["run_id"])
            self.started.append((job_cfg["run_id"], job))
            self.tag_run(job_cfg["run_id"], "slurm_job_id" if self.cluster == "slurm" else "job_id", job.job_id)
            plan.output_dir.mkdir(parents=True, exist_ok=True)
            log = plan.output_dir / "job.log"  # the job's log under the run's own name
            if log.is_symlink():
                log.unlink()
            log.symlink_to(Path(job.paths.stdout).resolve())
        return [(plan, job) for (plan, _), job in zip(todo, jobs, strict=True)]

    def tag_run(self, run_id: str, key: str, value: str) -> None:
        """Tag a submitted run, or the run its job created if the job has already started (its
        placeholder is then deleted and MLflow refuses tags on it)."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.set_tag(run_id, key, value)
        except MlflowException:
            self.client.set_tag(lifecycle.current_run_id(self.client, run_id), key, value)

    def in_flight_job_ids(self, stage: str) -> list[str]:
        ids = []
        for plan in self.expanded.stage_runs(stage):
            for run in self.by_key.get(plan.key, []):
                if lifecycle.in_flight(run) and run.data.tags.get("slurm_job_id") and self.job_alive(run):
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
                and parent.info.status == RunState.RUNNING
                and signal_local(parent.data.tags.get("launcher_pid", ""), parent.data.tags.get("launcher_host"))
            ):
                del self.launches[parent.info.run_id]  # stopped: it would go on submitting the old runs' next stages
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
            run_id = lifecycle.current_run_id(self.client, run.info.run_id)  # its job may have started meanwhile
            lifecycle.supersede(self.client, run_id, reason)  # `by_key` is read again before any stage is decided
            print(f"{run.info.run_name}: {reason}; MLflow run {run_id} {RunState.KILLED}", file=sys.stderr)
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

    def stop(self, why: str, wait_s: float = 60.0) -> None:
        """A Ctrl-C or TERM to the launch: its runs whose job was never submitted end KILLED, its local
        jobs are stopped, each run's `error` tag says why. Its SLURM jobs go on (harness.cancel stops them).

        Local jobs ignore Ctrl-C (`children_ignore_sigint`): the launcher, their parent, ends them with TERM,
        as harness.cancel does (a checkpoint at the next step, then KILLED; the next launch resumes).
        """
        for run_id in self.unsubmitted_run_ids():  # first: quick, and no job of theirs to wait for
            lifecycle.interrupt(
                self.client, run_id, f"interrupted: {why}; its job was never submitted (the next launch submits it)"
            )
        if self.cluster == "slurm":
            return
        live = [(run_id, job) for run_id, job in self.started if not job.done()]
        if live:
            print(f"stopping {len(live)} local job(s) at their next step (up to {wait_s:.0f} s)...", file=sys.stderr)
        stop_jobs([job for _, job in live], wait_s)
        for run_id, _ in live:  # a run that FINISHED on its own meanwhile is left alone
            lifecycle.interrupt(
                self.client,
                lifecycle.current_run_id(self.client, run_id),
                f"interrupted: {why}; stopped at its last checkpoint (the next launch resumes it)",
            )

    def unsubmitted_run_ids(self) -> list[str]:
        """This launch's runs in flight that no job of it was submitted for: the interrupt came after they
        were created or queued again, before their submission (or inside `create_placeholder`, whose new
        run is RUNNING until it is made SCHEDULED). Left so, they would look queued or training for good."""
        from harness.tracking import find_runs

        if self._parent_id is None:  # nothing created
            return []
        submitted = {run_id for run_id, _ in self.started}
        submitted |= {lifecycle.current_run_id(self.client, run_id) for run_id in submitted}
        runs = find_runs(
            self.uri,
            self.expanded.spec.name,
            f"tags.mlflow.parentRunId = '{self._parent_id}' and tags.kind = 'train'",
        )
        return [r.info.run_id for r in runs if lifecycle.in_flight(r) and r.info.run_id not in submitted]

    @property
    def watch(self) -> Any:
        """Where its runs stand, read from MLflow while the launch waits (harness/progress.py)."""
        if getattr(self, "_watch", None) is None:
            from harness.progress import launch_watch

            self._watch = launch_watch(self)
        return self._watch

    def finish(self, status: RunState = RunState.FINISHED) -> None:
        if getattr(self, "_watch", None) is not None:
            self._watch.close()
        if self._parent_id is not None:
            lifecycle.terminate(self.client, self._parent_id, status)

    def submitted_run_ids(self) -> list[str]:
        """The MLflow runs of the jobs this launch submitted, in stage order (a started job's own run,
        not the placeholder the launcher created for it)."""
        return [
            lifecycle.current_run_id(self.client, run_id)
            for stage in self.expanded.stage_order
            for run_id in self.run_ids.get(stage, [])
        ]
