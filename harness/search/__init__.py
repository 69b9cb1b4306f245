"""Hyper-parameter searches over the run configuration: `python -m harness.search SPEC`.

A search spec is an experiment spec (name, base, scales; see harness/spec.py) whose runs are
not listed but sampled: its `search:` section declares a space over RunConfig keys, one or two
objectives (val/acc1 up; optionally GFLOPs down, giving a Pareto front), an Optuna sampler and
pruner, a global trial budget and the number of workers. Every worker is a submitit job (an
array on SLURM, processes locally) that runs trials from one shared Optuna study, each trial
one engine run logged as an MLflow child run of the study's parent run.

Storage follows where the workers run: SQLite for one worker, a JournalStorage file for several
workers on one machine, an RDB URL (PostgreSQL) for workers on several nodes. A trial whose
worker dies is failed (RDB: Optuna's heartbeat + fail_stale_trials; every storage: this
driver sees the worker's job end) and does not count: the budget counts COMPLETE + PRUNED.

Modules: `spec` (the `search:` section, validated before anything runs), `storage` (which
Optuna storage, opened alike by driver, workers, notebook), `worker` (the submitit callable: one
process running trials through the engine), `driver` (the study, its MLflow parent run, the
worker jobs and their watch), `cli` (`python -m harness.search`). Importing this package loads
neither torch nor Optuna: a spec error is reported in a second.
"""

from harness.search.cli import main
from harness.search.spec import SearchPlan, SearchSection, load_search
from harness.search.storage import StorageChoice, choose_storage, find_search, open_study

__all__ = [
    "SearchPlan",
    "SearchSection",
    "StorageChoice",
    "choose_storage",
    "find_search",
    "load_search",
    "main",
    "open_study",
]
