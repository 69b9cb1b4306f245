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

Modules: `cli` (`python -m harness.launch`: the arguments and the launch's top-level flow),
`plan` (the dry-run table and the checks of the inputs, before anything is written), `submit`
(the executor and the `Launch`: its MLflow runs and the job arrays it submits), `wait` (following
jobs to their end, stopping local ones), `report` (what a launch prints at its end: the MLflow UI
pages, after --wait the spec's tables). Importing this package loads neither torch nor MLflow:
the dry run stays light.
"""

from harness.launch.cli import main
from harness.launch.submit import Launch, make_executor
from harness.launch.wait import children_ignore_sigint, stop_jobs, wait_for

__all__ = ["Launch", "children_ignore_sigint", "main", "make_executor", "stop_jobs", "wait_for"]
