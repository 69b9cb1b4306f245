"""The worker: one process (a submitit job) running trials of the shared study through the engine.

The budget is global: a worker stops once COMPLETE + PRUNED + RUNNING trials fill it (Optuna's
MaxTrialsCallback), and a trial created in the race between two workers finds itself surplus
and ends at once, so that exactly `trials` trials train. FAIL trials never count, so a trial
lost with its worker is replaced.
"""

import copy
import json
import os
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from mlflow import MlflowClient
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState

from harness import lifecycle
from harness.cluster import process_alive
from harness.config import RunConfig, set_dotted
from harness.lifecycle import Tag
from harness.search.spec import FINAL_METRICS, Dimension, PrunerSpec, SamplerSpec, SearchSection
from harness.search.storage import StorageChoice

DONE = (TrialState.COMPLETE, TrialState.PRUNED)  # what the budget counts


def make_sampler(spec: SamplerSpec, worker: int, conditional: bool = False) -> optuna.samplers.BaseSampler:
    """Optuna's sampler; worker i gets seed + i, so that parallel workers do not draw the same points.

    `conditional` (a per-method search: which parameters a trial has depends on its method): TPE
    models each group of parameters that occur together (`group=True`) instead of falling back
    to independent sampling."""
    seed = None if spec.seed is None else spec.seed + worker
    if spec.name == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=spec.population_size, seed=seed)
    if spec.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # constant_liar: a parallel worker treats the others' running trials as bad, not as absent
    return optuna.samplers.TPESampler(
        n_startup_trials=spec.n_startup_trials, seed=seed, multivariate=True, constant_liar=True, group=conditional
    )


def make_pruner(spec: PrunerSpec, epochs: int) -> optuna.pruners.BasePruner:
    """Optuna's pruner, fed one value per epoch (step = epoch index)."""
    if spec.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=spec.n_startup_trials, n_warmup_steps=spec.n_warmup_steps)
    if spec.name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=spec.min_resource, max_resource=max(epochs, 1), reduction_factor=spec.reduction_factor
        )
    return optuna.pruners.NopPruner()


def trial_counts(study: optuna.Study) -> dict[str, int]:
    """Trials per state name; `SURPLUS` counts the FAIL trials that only lost a budget race."""
    names = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING)
    counts = {**{state.name: 0 for state in names}, "SURPLUS": 0}
    for trial in study.get_trials(deepcopy=False):
        surplus = trial.user_attrs.get("surplus", False)
        counts["SURPLUS" if surplus else trial.state.name] += 1
    return counts


@dataclass(frozen=True)
class WorkerSetup:
    """Everything a worker job needs (pickled by submitit)."""

    study: str
    storage: StorageChoice
    section: SearchSection
    config: dict[str, Any]  # the base RunConfig, dumped
    study_dir: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    tags: dict[str, str]
    threads: int


class BudgetReached(RuntimeError):
    """This trial was created while the trials before it already fill the budget (a race)."""


class SearchWorker:
    """The submitit callable: trials from the shared study, one after another, until the budget is met."""

    def __call__(self, setup: WorkerSetup, index: int) -> dict[str, Any]:
        import torch

        torch.set_num_threads(setup.threads)  # the cores this job was given, not every core of the node
        section = setup.section
        study = optuna.load_study(
            study_name=setup.study,
            storage=setup.storage.open(),
            sampler=make_sampler(section.sampler, index, bool(section.methods)),
            pruner=make_pruner(section.pruner or PrunerSpec(name="none"), setup.config["train"]["epochs"]),
        )
        objective = TrialObjective(setup, study, worker_id())
        if section.trials - len(study.get_trials(deepcopy=False, states=(*DONE, TrialState.RUNNING))) > 0:
            study.optimize(
                objective,
                catch=(Exception,),
                gc_after_trial=True,
                callbacks=[
                    # RUNNING counts too: no worker starts a trial that the running ones make superfluous
                    MaxTrialsCallback(section.trials, states=(*DONE, TrialState.RUNNING)),
                    MaxTrialsCallback(section.failure_limit, states=(TrialState.FAIL,)),
                ],
            )
        return {"worker": objective.worker, "trials": objective.started}


def process_gone(attrs: dict[str, Any]) -> bool:
    """Whether a trial's worker process, recorded as running on this host, has disappeared."""
    pid = attrs.get("worker_pid")
    if not pid or attrs.get("host") != socket.gethostname():
        return False
    return not process_alive(int(pid))


def worker_id() -> str:
    """The submitit job id of this process (what the driver knows the job by), else the pid."""
    try:
        import submitit

        return str(submitit.JobEnvironment().job_id)
    except RuntimeError:
        return str(os.getpid())


class TrialObjective:
    """One trial: sample the space, train through the engine (pruned per epoch), return the objectives."""

    def __init__(self, setup: WorkerSetup, study: optuna.Study, worker: str) -> None:
        self.setup = setup
        self.study = study
        self.worker = worker
        self.client = MlflowClient(setup.tracking_uri)
        self.started = 0

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        from harness.engine import Preempted, Pruned, run

        trial.set_user_attr("worker", self.worker)  # first: the driver fails RUNNING trials of dead workers
        trial.set_user_attr("worker_pid", os.getpid())
        trial.set_user_attr("host", socket.gethostname())
        if self._surplus(trial.number):
            trial.set_user_attr("surplus", True)
            self.study.stop()
            raise BudgetReached(
                f"trial {trial.number}: the budget of {self.setup.section.trials} is already filled by earlier trials"
            )
        params = sample(trial, self.setup.section)
        cfg = self.config(trial.number, params)
        if Path(cfg.output_dir).exists():  # left by a deleted study of the same name: never resume it
            shutil.rmtree(cfg.output_dir)
        run_id = self.client.create_run(
            self.setup.experiment_id,
            run_name=cfg.tracking.run_name,
            tags={
                **cfg.tracking.tags,
                "mlflow.parentRunId": self.setup.parent_run_id,
                "trial_state": TrialState.RUNNING.name,
            },
        ).info.run_id
        cfg.tracking.run_id = run_id
        trial.set_user_attr("mlflow_run_id", run_id)
        trial.set_user_attr("output_dir", cfg.output_dir)
        trial.set_user_attr("gumbel", cfg.gumbel.model_dump())
        self.started += 1
        try:
            final = run(cfg, on_epoch=self._reporter(trial, cfg.train.epochs))
        except Pruned as stop:
            self._tag_state(run_id, "PRUNED")
            _drop_resume_point(cfg.output_dir)
            raise optuna.TrialPruned(str(stop)) from None
        except Preempted:  # the job is being stopped: fail this trial and end the worker
            self._tag_state(run_id, "FAIL")
            self.study.stop()
            raise
        except BaseException as err:
            self._tag_state(run_id, "FAIL")
            self._record_error(trial, run_id, err)
            raise
        for key in FINAL_METRICS:
            if key in final:
                trial.set_user_attr(key, float(final[key]))
        _drop_resume_point(cfg.output_dir)
        values = [float(final[o.metric]) for o in self.setup.section.objectives]
        self._tag_state(run_id, "COMPLETE")
        return values[0] if len(values) == 1 else values

    def _surplus(self, number: int) -> bool:
        """Exactly `trials` trials run: those before this one (by number) may already fill the budget."""
        ahead = self.study.get_trials(deepcopy=False, states=(*DONE, TrialState.RUNNING))
        return sum(t.number < number for t in ahead) >= self.setup.section.trials

    def config(self, number: int, params: dict[str, Any]) -> RunConfig:
        """The base configuration with this trial's values, folder, and MLflow child-run settings."""
        data = copy.deepcopy(self.setup.config)
        for key, value in params.items():
            if key != "method":  # a per-method search's choice: its settings are among the params
                set_dotted(data, key, value)
        name = f"trial-{number:04d}"
        data["output_dir"] = str(Path(self.setup.study_dir) / "trials" / name)
        method = {"search_method": str(params["method"])} if "method" in params else {}
        data["tracking"].update(
            uri=self.setup.tracking_uri,
            experiment_id=self.setup.experiment_id,
            parent_run_id=self.setup.parent_run_id,
            run_name=name,
            run_id=None,
            tags={**self.setup.tags, "trial_number": str(number), "search_params": json.dumps(params), **method},
        )
        return RunConfig.model_validate(data)

    def _reporter(self, trial: optuna.Trial, epochs: int) -> Any:
        """The engine's per-epoch hook: report the objective to the pruner, stop if it says so."""
        from harness.engine import Pruned

        objectives = self.setup.section.objectives
        metric = objectives[0].metric if len(objectives) == 1 else None  # Optuna: no pruning of multi-objective

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            if metric is None or metric not in metrics:
                return
            trial.report(metrics[metric], epoch)
            if epoch + 1 < epochs and trial.should_prune():
                raise Pruned(f"trial {trial.number} pruned after epoch {epoch + 1}: {metric} {metrics[metric]:.2f}")

        return on_epoch

    def _record_error(self, trial: optuna.Trial, run_id: str, err: BaseException) -> None:
        """Why the trial failed, in one line: the search's summary names each distinct reason."""
        lines = [line for line in str(err).strip().splitlines() if line.strip()]
        reason = f"{type(err).__name__}: {lines[-1] if lines else ''}".rstrip(": ")[:500]
        try:
            trial.set_user_attr(Tag.ERROR.value, reason)  # the run's tag's name
            if Tag.ERROR.value not in self.client.get_run(run_id).data.tags:  # the engine's own, if it got that far
                lifecycle.set_error(self.client, run_id, reason)
        except Exception as problem:  # the trial's failure matters more
            print(f"could not record trial {trial.number}'s error: {problem}", file=sys.stderr)

    def _tag_state(self, run_id: str, state: str) -> None:
        try:
            self.client.set_tag(run_id, "trial_state", state)
        except Exception as err:  # the driver re-tags every trial at the end
            print(f"could not tag MLflow run {run_id}: {err}", file=sys.stderr)


def _drop_resume_point(output_dir: str) -> None:
    """A trial never resumes (a new trial is a new number): its optimiser-state checkpoint is dead weight."""
    Path(output_dir, "checkpoint.pth").unlink(missing_ok=True)


def sample(trial: optuna.Trial, section: SearchSection) -> dict[str, Any]:
    """A trial's config values: the shared space, then (per-method search) a method, its settings, its space.

    A method's dimensions are suggested as `<method>:<key>` so that each keeps its own range; the
    returned keys are RunConfig keys (plus `method`).
    """
    params = {key: suggest(trial, key, dim) for key, dim in section.space.items()}
    if section.methods:
        name = trial.suggest_categorical("method", list(section.methods))
        method = section.methods[name]
        own = {key: suggest(trial, f"{name}:{key}", dim) for key, dim in method.space.items()}
        params = {"method": name, **method.set, **params, **own}
    return params


def suggest(trial: optuna.Trial, key: str, dim: Dimension) -> Any:
    if dim.type == "categorical":
        return trial.suggest_categorical(key, dim.choices or [])
    assert dim.low is not None and dim.high is not None  # a range: the spec requires both (Dimension)
    if dim.type == "int":
        return trial.suggest_int(key, int(dim.low), int(dim.high), step=int(dim.step or 1), log=dim.log)
    return trial.suggest_float(key, float(dim.low), float(dim.high), step=dim.step, log=dim.log)
