"""Live progress of a launch's runs (or a search's trials), read from what the runs record in MLflow.

No extra work in the training loop: a run's latest `train/loss_step` point (logged every
`optim.log_every` steps) gives its step and when it was reached, its latest `epoch_time_s`
(once per epoch) the epochs done, its start time and the tag `steps_per_epoch` (set once when
it starts) the total and the ETA. MLflow returns each metric's latest point (value, step,
time) with the run itself, so one search per poll covers every run of the launch.

`Watch.tick()` is called from a wait loop (harness.launch, harness.search); it reads MLflow
at most every `DVIT_PROGRESS_POLL_S` seconds (default 10, or the line interval if shorter; 5 on
a terminal) and renders:
- on a terminal, a block of lines redrawn in place (tqdm): per stage finished / running /
  queued / failed, then one line per running run with its epoch, step and ETA;
- elsewhere (CI logs, SLURM output), plain lines: one per state change of a run, and while runs
  are running (or queued: a SLURM queue can hold them for hours) a progress line every
  `DVIT_PROGRESS_LINE_S` seconds (default 60), never more often, so that a log is never silent
  for more than a minute. At the end, one line with the waiting loop's own load (its process's
  CPU time over the wall time it spent waiting).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TextIO

from harness.lifecycle import RunState, in_flight

STEP_METRIC, EPOCH_METRIC = "train/loss_step", "epoch_time_s"  # logged by harness/engine.py
STEPS_TAG = "steps_per_epoch"  # tag harness/engine.py sets when a run starts
STATES = ("finished", "running", "queued", "failed")
_STATE_OF = {
    RunState.FINISHED: "finished",
    RunState.RUNNING: "running",
    RunState.SCHEDULED: "queued",
    RunState.FAILED: "failed",
    RunState.KILLED: "failed",
}


@dataclass(frozen=True)
class Expected:
    """A run the watch waits for: where it sits in the spec, its run key and its epochs."""

    stage: str
    name: str
    key: str
    epochs: int


@dataclass
class RunProgress:
    """Where one run stands. `epoch`: the epoch being trained (1-based), or the epochs done once it ended."""

    stage: str
    name: str
    state: str  # one of STATES
    epoch: int = 0
    epochs: int = 0
    step: int | None = None  # optimiser steps done, when the run has logged one
    steps: int | None = None  # in all, when the run has tagged its steps per epoch
    eta_s: float | None = None
    started_ms: int | None = None
    ended_ms: int | None = None

    def columns(self) -> tuple[str, str, str]:
        """(epoch, step, ETA) as `harness.status` and the progress lines show them."""
        epoch = f"{self.epoch}/{self.epochs}"
        if self.step is None:
            step = "-"
        else:
            step = f"{self.step}/{self.steps}" if self.steps else str(self.step)
        eta = format_duration(self.eta_s) if self.state == "running" and self.eta_s is not None else "-"
        return epoch, step, eta

    def describe(self) -> str:
        """`students/dynamic epoch 2/3 step 70/93 ETA 0:40`, for a running run."""
        if self.epochs == 0:
            return f"{self.stage}/{self.name} evaluating"
        epoch, step, eta = self.columns()
        return f"{self.stage}/{self.name} epoch {epoch} step {step} ETA {eta}"


def format_duration(seconds: float) -> str:
    seconds = max(0, round(float(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _latest(run: Any, key: str) -> Any | None:
    """The run's latest point of a metric (MLflow keeps it with the run: value, step, timestamp)."""
    return next((m for m in getattr(run.data, "_metric_objs", []) if m.key == key), None)


def run_progress(
    run: Any,
    stage: str,
    name: str,
    epochs: int | None = None,
    now_ms: int | None = None,
    rate: float | None = None,
) -> RunProgress:
    """A run's progress from its MLflow record alone (no metric history is read).

    `epochs`: the run's total when known from its spec (else its `train.epochs` param).
    `rate`: steps per second observed by the caller (a watch); else from the run's start.
    """
    now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    state = _STATE_OF.get(run.info.status, "queued")
    if run.data.tags.get("trial_state") == "PRUNED":  # a search's trial stopped early by its pruner: done
        state = "finished"
    if epochs is None:
        param = run.data.params.get("train.epochs", "")
        epochs = int(param) if param.isdigit() else 0
    per_epoch = run.data.tags.get(STEPS_TAG, "")
    steps_per_epoch = int(per_epoch) if per_epoch.isdigit() and int(per_epoch) > 0 else None
    epoch_point, step_point = _latest(run, EPOCH_METRIC), _latest(run, STEP_METRIC)
    done = min(epochs, epoch_point.step + 1) if epoch_point is not None else 0
    progress = RunProgress(
        stage, name, state, epochs=epochs, started_ms=run.info.start_time, ended_ms=run.info.end_time
    )
    if state == "queued":
        return progress
    progress.epoch = done if state != "running" else min(epochs, done + 1)
    if steps_per_epoch is not None:
        progress.steps = epochs * steps_per_epoch
        logged = step_point.step + 1 if step_point is not None else 0
        progress.step = min(progress.steps, max(logged, done * steps_per_epoch))
        if state == "finished" and done == epochs:  # its last points may be fewer than its steps (log_every)
            progress.step = progress.steps
    elif step_point is not None:
        progress.step = step_point.step + 1
    if state == "running":
        progress.eta_s = _eta(progress, run, step_point, epoch_point, done, now_ms, rate)
    return progress


def _eta(
    progress: RunProgress, run: Any, step_point: Any, epoch_point: Any, done: int, now_ms: int, rate: float | None
) -> float | None:
    """Seconds left: the steps left at the observed step rate, else the epochs left at the last epoch's time."""
    if progress.epochs == 0:
        return None
    if progress.steps and progress.step and step_point is not None:
        if rate is None and run.info.start_time and step_point.timestamp > run.info.start_time:
            rate = progress.step / ((step_point.timestamp - run.info.start_time) / 1000)
        if rate:
            since = max(0.0, (now_ms - step_point.timestamp) / 1000)
            return max(0.0, (progress.steps - progress.step) / rate - since)
    if epoch_point is not None and done:
        since = max(0.0, (now_ms - epoch_point.timestamp) / 1000)
        return max(0.0, (progress.epochs - done) * epoch_point.value - since)
    return None


def search_children(client: Any, experiment_id: str, parents: Iterable[str], kind: str) -> list[Any]:
    """The active runs of `kind` under these parent runs (a launch's children, a search's trials)."""
    runs: list[Any] = []
    for parent in dict.fromkeys(parents):
        token = None
        while True:
            page = client.search_runs(
                [experiment_id],
                f"tags.mlflow.parentRunId = '{parent}' and tags.kind = '{kind}'",
                max_results=1000,
                page_token=token,
            )
            runs += list(page)
            token = page.token
            if not token:
                break
    return runs


def _env_seconds(name: str, default: float) -> float:
    text = os.environ.get(name, "")
    try:
        return float(text) if text and float(text) > 0 else default
    except ValueError:
        return default


class Watch:
    """Follows runs in MLflow while a launch or a search waits, and shows where they stand.

    `expected`: the runs of a launch (their stage, name, key, epochs); runs found under
    `parents` whose key is not expected are shown under `open_stage` (a search's trials,
    `open_total` of them in all). `done`: keys already finished before this launch (skipped).
    """

    def __init__(
        self,
        client: Any,
        experiment_id: str,
        parents: Iterable[str],
        kind: str = "train",
        expected: Iterable[Expected] = (),
        done: Iterable[str] = (),
        open_stage: str | None = None,
        open_total: int = 0,
        stream: TextIO | None = None,
        terminal: bool | None = None,
    ) -> None:
        self.client, self.experiment_id, self.kind = client, experiment_id, kind
        self.parents = list(parents)
        self.expected = list(expected)
        self.done = set(done)
        self.open_stage, self.open_total = open_stage, open_total
        self.stream = stream or sys.stderr
        self.terminal = self.stream.isatty() if terminal is None else terminal
        self.line_s = _env_seconds("DVIT_PROGRESS_LINE_S", 60.0)
        self.poll_s = _env_seconds("DVIT_PROGRESS_POLL_S", 5.0 if self.terminal else min(10.0, self.line_s))
        self.states: dict[tuple[str, str], str] = {}
        self.seen: dict[str, tuple[int, float]] = {}  # run id -> (step, time) when first seen running
        self.unanswered = False  # the last reading failed (said once)
        self.next_poll = 0.0
        self.last_line: float | None = None
        self.bars: list[Any] = []
        self.cpu_s = self.wall_s = 0.0  # this process's CPU and wall time between ticks of a wait loop
        self._last_tick: tuple[float, float] | None = None  # (wall, CPU) at the last tick, None when paused

    # ------------------------------------------------------------------------- reading
    def read(self) -> list[RunProgress]:
        """Every expected (or open-stage) run's progress now, in spec order."""
        now_ms = int(time.time() * 1000)
        latest: dict[str, Any] = {}
        for run in sorted(
            search_children(self.client, self.experiment_id, self.parents, self.kind),
            key=lambda r: r.info.start_time or 0,
        ):
            latest[run.data.tags.get("run_key", "") if self.expected else run.info.run_id] = run
        rows = []
        for plan in self.expected:
            run = latest.pop(plan.key, None)
            if run is not None:
                rows.append(run_progress(run, plan.stage, plan.name, plan.epochs, now_ms, self._rate(run)))
            else:
                state = "finished" if plan.key in self.done else "queued"
                rows.append(
                    RunProgress(
                        plan.stage,
                        plan.name,
                        state,
                        epoch=plan.epochs if state == "finished" else 0,
                        epochs=plan.epochs,
                    )
                )
        if self.open_stage is not None:
            for run in latest.values():
                rows.append(run_progress(run, self.open_stage, run.info.run_name, None, now_ms, self._rate(run)))
            missing = self.open_total - sum(1 for r in rows if r.stage == self.open_stage)
            rows += [RunProgress(self.open_stage, f"queued-{i}", "queued") for i in range(max(0, missing))]
        return rows

    def _rate(self, run: Any) -> float | None:
        """Steps per second seen by this watch (robust to a resumed run's earlier job); None until it moved."""
        point = _latest(run, STEP_METRIC)
        if run.info.status != RunState.RUNNING or point is None:
            return None
        first = self.seen.setdefault(run.info.run_id, (point.step, point.timestamp / 1000))
        if point.step > first[0] and point.timestamp / 1000 > first[1]:
            return (point.step - first[0]) / (point.timestamp / 1000 - first[1])
        return None

    # ----------------------------------------------------------------------- rendering
    def counts(self, rows: list[RunProgress]) -> list[str]:
        """`students: 2 finished, 2 running, 3 queued, 0 failed`, per stage in order."""
        stages = list(dict.fromkeys(r.stage for r in rows))
        return [
            f"{stage}: " + ", ".join(f"{sum(1 for r in rows if r.stage == stage and r.state == s)} {s}" for s in STATES)
            for stage in stages
        ]

    def progress_line(self, rows: list[RunProgress]) -> str:
        running = [r.describe() for r in rows if r.state == "running"]
        return "progress: " + "; ".join(self.counts(rows)) + (" | " + ", ".join(running) if running else "")

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def tick(self, force: bool = False) -> None:
        """Read and show progress if a poll is due (cheap otherwise: call it on every turn of a wait loop)."""
        now, cpu = time.monotonic(), time.process_time()
        if self._last_tick is not None:  # the loop's time since the last tick, this tick's reading included
            self.wall_s += now - self._last_tick[0]
            self.cpu_s += cpu - self._last_tick[1]
        self._last_tick = (now, cpu)
        if not force and now < self.next_poll:
            return
        self.next_poll = now + self.poll_s
        try:
            rows = self.read()
        except Exception as err:  # progress is advice: a tracking hiccup must never stop a wait
            if not self.terminal and not self.unanswered:  # one line per outage
                self._print(f"progress: MLflow did not answer ({(str(err) or repr(err)).splitlines()[0][:200]})")
            self.unanswered = True
            return
        self.unanswered = False
        if self.terminal:
            self._draw(rows)
        else:
            self._log(rows, now)

    def pause(self) -> None:
        """The wait loop has ended: what the process does until the next tick is not waiting."""
        if self._last_tick is not None:
            now, cpu = time.monotonic(), time.process_time()
            self.wall_s += now - self._last_tick[0]
            self.cpu_s += cpu - self._last_tick[1]
        self._last_tick = None

    def _log(self, rows: list[RunProgress], now: float) -> None:
        """Plain lines: each state change, and a progress line every `line_s` while runs are queued or running."""
        for row in rows:
            before = self.states.get((row.stage, row.name))
            self.states[(row.stage, row.name)] = row.state
            if self.last_line is None or row.state == before or (before is None and row.state == "queued"):
                continue  # the first reading is one progress line; a trial seen first queued is no change
            took = ""
            if row.state in ("finished", "failed") and row.started_ms and row.ended_ms:
                took = f" after {format_duration((row.ended_ms - row.started_ms) / 1000)}"
            self._print(f"{row.stage}/{row.name}: {row.state}{took} ({self._stage_counts(rows, row.stage)})")
        if self.last_line is None or (
            now - self.last_line >= self.line_s and any(r.state in ("running", "queued") for r in rows)
        ):
            self.last_line = now
            self._print(self.progress_line(rows))

    def _stage_counts(self, rows: list[RunProgress], stage: str) -> str:
        line = next(c for c in self.counts(rows) if c.startswith(stage + ": "))
        return line[len(stage) + 2 :]

    def _draw(self, rows: list[RunProgress]) -> None:
        """A block of lines redrawn in place under any other progress bar (tqdm keeps them apart)."""
        from tqdm import tqdm

        lines = self.counts(rows) + ["  " + r.describe() for r in rows if r.state == "running"]
        while len(self.bars) < len(lines):
            self.bars.append(tqdm(total=0, bar_format="{desc}", file=self.stream, leave=False, dynamic_ncols=True))
        for index, bar in enumerate(self.bars):
            bar.set_description_str(lines[index] if index < len(lines) else "", refresh=False)
            bar.refresh()

    def load(self) -> float | None:
        """The waiting loop's CPU time over its wall time (a fraction of one core), None before any wait."""
        return self.cpu_s / self.wall_s if self.wall_s > 1.0 else None

    def close(self) -> None:
        """Show the last state (every run's end) and, in a log, the waiting loop's own load."""
        if self.next_poll:
            self.tick(force=True)
        for bar in reversed(self.bars):
            bar.close()
        self.bars = []
        load = self.load()
        if not self.terminal and load is not None:
            self._print(
                f"progress: waited {format_duration(self.wall_s)}; the waiting loop used {100 * load:.2f}% of a core"
            )


def launch_watch(launch: Any) -> Watch:
    """The watch of a `harness.launch.Launch`: every run of its spec, found under this launch's parent
    run, or under the launch that still runs it; those that had finished before count as finished."""
    expected = [Expected(p.stage, p.name, p.key, p.config.train.epochs) for p in launch.expanded.runs]
    parents = [launch._parent_id] if launch._parent_id else []  # none until it submits a run
    done = set()
    for key, runs in launch.by_key.items():
        for run in runs:
            if in_flight(run) and run.data.tags.get("mlflow.parentRunId"):
                parents.append(run.data.tags["mlflow.parentRunId"])
            elif run.info.status == RunState.FINISHED and not launch.rerun:
                done.add(key)
    return Watch(launch.client, launch.experiment_id, parents, "train", expected, done)


def trial_watch(search: Any) -> Watch:
    """The watch of a `harness.search.driver.Search`: its trials' MLflow runs, under the study's parent run."""
    return Watch(
        search.client,
        search.experiment_id,
        [search.parent_id],
        "trial",
        open_stage=search.plan.study,
        open_total=search.section.trials,
    )
