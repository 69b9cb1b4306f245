"""The driver: one study, its MLflow parent run, `workers` worker jobs kept on the budget.

It replaces workers that end before the budget is met, fails the RUNNING trials of workers that
are gone (their job ended, or their process vanished from this host; RDB storages also by
heartbeat), and at the end tags every trial's MLflow run with its state and the best trial(s).
"""

import sys
import time
from typing import Any

import optuna
from mlflow import MlflowClient
from mlflow.entities import RunTag
from mlflow.exceptions import MlflowException
from optuna.storages import fail_stale_trials
from optuna.trial import TrialState
from submitit.core.utils import FailedJobError
from tqdm import tqdm

from harness import lifecycle
from harness.config import ConfigError
from harness.launch import children_ignore_sigint, make_executor, stop_jobs
from harness.lifecycle import RunState
from harness.progress import trial_watch
from harness.search.spec import PrunerSpec, SearchPlan
from harness.search.storage import StorageChoice
from harness.search.worker import SearchWorker, WorkerSetup, process_gone, trial_counts
from harness.tracking import ensure_experiment

POLL_S = 1.0


class Search:
    """One invocation: the study and its MLflow parent run, the worker jobs, their watch, the tags."""

    def __init__(self, plan: SearchPlan, storage: StorageChoice, cluster: str, tracking_uri: str) -> None:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.plan, self.storage, self.cluster, self.uri = plan, storage, cluster, tracking_uri
        self.section = plan.section
        directions = [o.direction for o in self.section.objectives]
        self.study = optuna.create_study(
            study_name=plan.study, storage=storage.open(), directions=directions, load_if_exists=True
        )
        if [d.name.lower() for d in self.study.directions] != directions:
            raise ConfigError(
                [
                    f"{plan.path}: search.objectives: study {plan.study!r} in {storage.shown} has "
                    f"directions {[d.name.lower() for d in self.study.directions]}, got {directions}"
                ]
            )
        self.client = MlflowClient(tracking_uri)
        self.experiment_id = ensure_experiment(tracking_uri, plan.name)
        self.parent_id = self._parent_run()
        self.live: list[Any] = []  # worker jobs of this invocation that have not ended
        self.closed: set[int] = set()  # FAIL trials whose MLflow run is closed
        self.submitted = 0
        self.fail_lost_trials(set())  # an earlier invocation's trials whose worker is gone (Ctrl-C, a lost node)
        self.enqueue_points()

    def enqueue_points(self) -> None:
        """The spec's enqueued points, each until it has a result: one whose trial failed or was
        interrupted (Ctrl-C during the first trial) is enqueued again by the next invocation; one
        waiting, running, complete or pruned is not. (Optuna's `skip_if_exists` skips failed ones too.)"""
        kept = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)
        trials = self.study.get_trials(deepcopy=False, states=kept)
        for point in self.section.enqueue:
            params = self.section.optuna_point(point)
            if not any(t.system_attrs.get("fixed_params", t.params) == params for t in trials):
                self.study.enqueue_trial(params)

    def interrupt(self, why: str, wait_s: float = 60.0) -> None:
        """Stop this invocation's local workers (TERM: their trials fail at the next step), fail their
        trials, and end the parent run KILLED with `why` in its `error` tag (not RUNNING until a rerun).

        Local workers ignore Ctrl-C (they were started under `children_ignore_sigint`); SLURM workers
        go on (harness.cancel, or scancel, stops them).
        """
        local = [job for job in self.live if self.cluster != "slurm"]
        stop_jobs(local, wait_s)
        self.fail_lost_trials({job.job_id for job in local if job.done()})
        self.live = []  # submitit's jobs cancel themselves when collected: now, not during the interpreter's exit
        lifecycle.kill(self.client, self.parent_id, f"interrupted: {why}")

    def _parent_run(self) -> str:
        """The study's one parent run, kept in the study so that a re-run continues under it."""
        known = self.study.user_attrs.get("mlflow_parent_run_id")
        if known and self.study.user_attrs.get("mlflow_tracking_uri") == self.uri:
            try:
                lifecycle.start(self.client, known)
                return known
            except MlflowException:  # deleted from MLflow meanwhile: start a new parent
                pass
        tags = {
            "kind": "search",
            "spec": self.plan.name,
            "scale": self.plan.scale,
            "study": self.plan.study,
            "table": self.plan.table or "",
            "storage": self.storage.recorded,
            "storage_kind": self.storage.kind,
            "executor": self.cluster,
            "sampler": self.section.sampler.name,
            "pruner": (self.section.pruner or PrunerSpec(name="none")).name,
            "objectives": ", ".join(f"{o.metric} {o.direction}" for o in self.section.objectives),
        }
        run_id = self.client.create_run(self.experiment_id, run_name=f"search-{self.plan.study}", tags=tags).info.run_id
        params: dict[str, Any] = {f"space.{key}": dim.describe() for key, dim in self.section.space.items()}
        params.update(trials=self.section.trials, workers=self.section.workers)
        for key, value in params.items():
            self.client.log_param(run_id, key, value)
        self.study.set_user_attr("mlflow_parent_run_id", run_id)
        self.study.set_user_attr("mlflow_tracking_uri", self.uri)
        self.study.set_user_attr("mlflow_experiment", self.plan.name)
        return run_id

    def setup(self) -> WorkerSetup:
        """What each worker job gets: the base config, the study, and where to log (tags mark trials)."""
        tags = {k: v for k, v in self.plan.run.config.tracking.tags.items() if k not in ("stage", "row")}
        tags.update(kind="trial", study=self.plan.study)
        return WorkerSetup(
            self.plan.study,
            self.storage,
            self.section,
            self.plan.run.config.model_dump(),
            str(self.plan.study_dir.resolve()),
            self.uri,
            self.experiment_id,
            self.parent_id,
            tags,
            self.plan.slurm.cpus_per_task,
        )

    def submit(self, count: int) -> None:
        """`count` more worker jobs: one array on SLURM, processes locally (same resources as a stage's runs)."""
        executor = make_executor(self.cluster, self.plan.study_dir / "submitit", self.plan.run, self.plan.name, [])
        indices = list(range(self.submitted, self.submitted + count))
        with children_ignore_sigint():  # Ctrl-C reaches the driver, which stops them (`interrupt`)
            jobs = executor.map_array(SearchWorker(), [self.setup()] * count, indices)
        self.live += jobs
        self.submitted += count
        print(
            f"{self.plan.study}: submitted {count} worker(s) ({self.cluster}): {', '.join(j.job_id for j in jobs)}",
            file=sys.stderr,
        )

    def fail_lost_trials(self, ended: set[str]) -> None:
        """RUNNING trials whose worker is gone will never finish: fail them, in Optuna and in MLflow.

        Gone: its job (one of ours) has ended, or its process on this host no longer exists (a
        worker of an earlier invocation). RDB storages also fail trials by heartbeat (`watch`);
        every FAIL trial's MLflow run is closed FAILED once.
        """
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.FAIL)):
            worker = trial.user_attrs.get("worker")
            if trial.state == TrialState.RUNNING:
                if not (worker in ended or process_gone(trial.user_attrs)):
                    continue
                self.study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
                print(f"{self.plan.study}: trial {trial.number} failed: its worker ({worker}) is gone", file=sys.stderr)
            if trial.number not in self.closed:  # also those failed by a heartbeat or by their worker
                self.closed.add(trial.number)
                self._close_run(trial.user_attrs.get("mlflow_run_id"), "FAIL")

    def _close_run(self, run_id: str | None, state: str) -> None:
        if not run_id:
            return
        self.client.set_tag(run_id, "trial_state", state)
        lifecycle.fail_if_in_flight(self.client, run_id)

    def watch(self, progress: bool) -> bool:
        """Keep up to `workers` jobs on the budget until it is met; True if it was."""
        section = self.section
        cap = section.workers + section.failure_limit  # every replacement job follows a failure
        ended: set[str] = set()
        self.progress = trial_watch(self)  # the running trials' epochs, steps and ETAs (closed by `finish`)
        with tqdm(total=section.trials, desc=self.plan.study, unit="trial", disable=not progress) as bar:
            while True:
                broken = False
                for job in [j for j in self.live if j.done()]:
                    self.live.remove(job)
                    ended.add(job.job_id)
                    broken |= self._report_job_error(job)
                self.fail_lost_trials(ended)
                if self.storage.heartbeat:
                    fail_stale_trials(self.study)  # RDB: trials whose heartbeat stopped (e.g. a lost node)
                counts = trial_counts(self.study)
                finished = counts["COMPLETE"] + counts["PRUNED"]
                bar.n = min(finished, section.trials)
                running = counts[TrialState.RUNNING.name]
                bar.set_postfix(pruned=counts["PRUNED"], failed=counts["FAIL"], running=running)
                bar.refresh()
                self.progress.tick()
                if finished >= section.trials and not self.live:
                    return True
                left = section.trials - finished - running
                wanted = min(section.workers - len(self.live), left, cap - self.submitted)
                if broken:  # a worker failed before its first trial: a replacement would too
                    for job in self.live:
                        job.cancel(check=False)
                    return False
                if wanted > 0 and counts["FAIL"] < section.failure_limit:
                    self.submit(wanted)
                elif not self.live and running == 0:
                    return False  # nobody is left to finish the budget
                time.sleep(POLL_S)

    def _report_job_error(self, job: Any) -> bool:
        """Say why a worker job ended abnormally; True if it raised before starting any trial (a broken
        set-up, e.g. an unreadable storage), not when it was killed (a replacement then makes sense)."""
        log = job.paths.stderr
        if not job.paths.result_pickle.exists():  # killed: never wait for a result that cannot come
            print(
                f"{self.plan.study}: worker job {job.job_id} ended without a result (killed?) (log: {log})",
                file=sys.stderr,
            )
            return False
        try:
            job.result()
            return False
        except Exception as err:
            lines = [line for line in str(err).strip().splitlines() if line.strip()]
            print(
                f"{self.plan.study}: worker job {job.job_id} failed: {lines[-1] if lines else err} (log: {log})",
                file=sys.stderr,
            )
            if not isinstance(err, FailedJobError):
                return False
        return not any(t.user_attrs.get("worker") == job.job_id for t in self.study.get_trials(deepcopy=False))

    def finish(self, ok: bool) -> dict[str, Any]:
        """Tag every trial's run with its final state and mark the best (single) or Pareto (several) trials."""
        if getattr(self, "progress", None) is not None:
            self.progress.close()
        trials = [t for t in self.study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        if not complete:
            best = []
        elif len(self.section.objectives) == 1:
            best = [self.study.best_trial]
        else:
            best = list(self.study.best_trials)
        best_numbers = {t.number for t in best}
        for trial in trials:
            run_id = trial.user_attrs.get("mlflow_run_id")
            if not run_id:
                continue
            tags = {"trial_state": trial.state.name, "best_trial": str(trial.number in best_numbers).lower()}
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            if trial.state == TrialState.FAIL:
                self._close_run(run_id, "FAIL")
        counts = trial_counts(self.study)
        summary = {"best_trials": ",".join(map(str, sorted(best_numbers))), **{k.lower(): v for k, v in counts.items()}}
        self.client.log_batch(self.parent_id, tags=[RunTag(k, str(v)) for k, v in summary.items()])
        for objective, value in zip(self.section.objectives, best[0].values if len(best) == 1 else [], strict=False):
            self.client.log_metric(self.parent_id, f"best/{objective.metric}", value)
        lifecycle.terminate(self.client, self.parent_id, RunState.FINISHED if ok else RunState.FAILED)
        return {"best": best, **summary}
