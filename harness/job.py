"""The submitit callable: one launched run, preemption-safe.

The engine turns SIGTERM/SIGUSR2 into a checkpoint at the next step boundary and raises
`Preempted`; this job then hands over to submitit's own USR2 handler, which calls
`checkpoint()` (inherited from `Checkpointable`: resubmit the same call) and requeues the job.
The requeued job resumes from the run's checkpoint into the same MLflow run.
"""
from __future__ import annotations

import os
import signal
from typing import Any

import submitit

from harness.config import RunConfig


class TrainJob(submitit.helpers.Checkpointable):
    """`TrainJob()(config_dict)` trains one run through the engine and returns its final metrics."""

    def __call__(self, config: dict[str, Any]) -> dict[str, float]:
        import torch

        from harness.engine import Preempted, run

        threads = os.environ.get("SLURM_CPUS_PER_TASK") or os.environ.get("DVIT_NUM_THREADS")
        if threads:  # the cores this job was given, not every core of the node
            torch.set_num_threads(int(threads))
        cfg = RunConfig.model_validate(config)
        try:
            return run(cfg)
        except Preempted as stop:
            requeue = signal.getsignal(signal.SIGUSR2)
            if callable(requeue):  # submitit's checkpoint_and_try_requeue: requeues, then exits
                requeue(signal.SIGUSR2, None)
            raise stop
