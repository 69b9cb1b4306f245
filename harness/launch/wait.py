"""Following a launch's jobs to their end (a progress bar, the failed ones named) and stopping local
jobs: TERM until they have ended, Ctrl-C kept from them."""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

from harness.cluster import signal_local
from harness.spec import RunPlan

POLL_S = 0.2  # how often finished local processes are looked for
STOPS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C, and TERM (harness.cancel, scancel, kill)


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
def interrupts_deferred(children_too: bool = False) -> Iterator[None]:
    """A Ctrl-C (SIGINT) or TERM meanwhile is raised once the block is done, not inside it (the first
    one, through the handler it had before: `_Terminated` for a launch's TERM).

    Why: MLflow creates a run RUNNING and the launcher makes it SCHEDULED a moment later; a Ctrl-C
    between the two left a placeholder RUNNING with no job for good, and a KeyboardInterrupt inside
    SQLAlchemy's query made it log "Error closing cursor" with a traceback. A job submitted but not
    recorded (its job id tagged on its run) was submitted a second time by the next launch.
    `children_too`: the commands started inside (sbatch) do not get a Ctrl-C, which a terminal sends
    to its whole process group, either: SIGINT is blocked, a mask they inherit, so that sbatch ends
    the submission it started. Only for short commands: a blocked SIGINT stays blocked in them.
    """
    caught: list[int] = []
    handlers = {signum: signal.signal(signum, lambda signum, frame: caught.append(signum)) for signum in STOPS}
    masked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if children_too else None
    try:
        yield
    finally:
        if masked is not None:  # a Ctrl-C held back meanwhile reaches the handler above here
            signal.pthread_sigmask(signal.SIG_SETMASK, masked)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    if caught:
        signal.raise_signal(caught[0])  # what it would have done: raise, or nothing if it was ignored


@contextlib.contextmanager
def children_ignore_sigint() -> Any:
    """Local jobs started inside ignore SIGINT (an ignored signal stays ignored across exec).

    Ctrl-C reaches the terminal's whole process group: submitit's job controller died of it with a
    KeyboardInterrupt traceback and the training job with an empty FAILED run. The launcher stops
    its jobs itself (`Launch.stop`).
    """
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
