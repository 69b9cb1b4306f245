"""Live progress while a launch waits (issue 23, point 1): what the runs record in MLflow, shown as
plain lines in a log (a real local launch, stdout and stderr a pipe), redrawn in place on a
terminal, and as `harness.status` columns."""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric

from harness import status
from harness.progress import Expected, Watch
from harness.spec import load_and_expand
from tests.test_launch import MINI

REPO = Path(__file__).resolve().parents[1]
LINE_S = 1.0  # DVIT_PROGRESS_LINE_S in the launch below (60 s by default)
POLL_S = (
    0.5  # DVIT_PROGRESS_POLL_S: MLflow read often enough that the run is seen while it trains, on a fast machine too
)


def spec_file(tmp: Path, teacher_only: bool) -> Path:
    spec = json.loads(json.dumps(MINI))
    spec["base"]["data"]["train_digits"] = 512  # 16 steps of 32 an epoch
    spec["base"]["train"]["epochs"] = 2
    spec["base"]["optim"]["log_every"] = 1
    if teacher_only:
        spec["stages"] = {"teacher": spec["stages"]["teacher"]}
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_a_local_launch_logs_progress_lines_while_its_run_trains(tmp_path: Path) -> None:
    """Not a terminal: one line per state change, a progress line every LINE_S s (never more often)
    with the running run's epoch, step of the total and ETA, before the run ends; then the load."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(PYTHONPATH=str(REPO), DVIT_PROGRESS_LINE_S=str(LINE_S), DVIT_PROGRESS_POLL_S=str(POLL_S))
    command = [
        sys.executable,
        "-m",
        "harness.launch",
        str(spec_file(tmp_path, teacher_only=True)),
        "--executor",
        "local",
        "--output-root",
        str(tmp_path / "runs"),
        "--tracking-uri",
        f"sqlite:///{tmp_path}/mlflow.db",
    ]
    lines: list[tuple[float, str]] = []
    with subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as launch:
        assert launch.stdout is not None
        for line in launch.stdout:
            lines.append((time.monotonic(), line.rstrip("\n")))
        code = launch.wait(timeout=300)
    text = "\n".join(line for _, line in lines)
    assert code == 0, text

    def first(pattern: str) -> tuple[float, str]:
        found = [(when, line) for when, line in lines if re.search(pattern, line)]
        assert found, f"no line matches {pattern!r} in:\n{text}"
        return found[0]

    started, _ = first(r"^teacher/teacher: running \(0 finished, 1 running, 0 queued, 0 failed\)$")
    ended, _ = first(r"^teacher/teacher: finished after \d+:\d\d \(1 finished, 0 running, 0 queued, 0 failed\)$")
    midway = [
        (when, line)
        for when, line in lines
        if re.search(
            r"^progress: teacher: 0 finished, 1 running, 0 queued, 0 failed \| teacher/teacher epoch [12]/2 "
            r"step ([1-9]|[12]\d|3[01])/32 ETA \d+:\d\d$",
            line,
        )
    ]
    assert midway and started <= midway[0][0] < ended, text  # seen while it trains, not only at the end
    progress = [when for when, line in lines if line.startswith("progress: teacher:")]
    gaps = [b - a for a, b in itertools.pairwise(progress)]
    assert len(progress) >= 3 and min(gaps) >= LINE_S - 0.5, (gaps, text)  # never more often than every LINE_S
    (load,) = [
        float(m.group(1))
        for m in re.finditer(
            r"^progress: waited \d+:\d\d; the waiting loop used "
            r"(\d+\.\d\d)% of a core$",
            text,
            re.M,
        )
    ]
    assert load < 5.0, text  # (the README's number is measured at the default intervals)
    (summary,) = [when for when, line in lines if line.startswith("mini (tiny): 1 submitted, 0 skipped")]
    assert summary >= ended  # the launch's own end comes after the run's


def add_run(
    client: MlflowClient,
    experiment: str,
    parent: str,
    key: str,
    name: str,
    steps_per_epoch: int,
    points: list[tuple[int, int]],
    epochs_done: int,
    started_ms: int,
) -> str:
    """A launched run as the engine records it: tags, `train/loss_step` (step, time) points, `epoch_time_s`."""
    run = client.create_run(
        experiment,
        run_name=name,
        start_time=started_ms,
        tags={
            "kind": "train",
            "scale": "tiny",
            "run_key": key,
            "mlflow.parentRunId": parent,
            "steps_per_epoch": str(steps_per_epoch),
        },
    )
    metrics = [Metric("train/loss_step", 1.0, ms, step) for step, ms in points]
    metrics += [Metric("epoch_time_s", 20.0, started_ms + 20_000 * (e + 1), e) for e in range(epochs_done)]
    if metrics:
        client.log_batch(run.info.run_id, metrics=metrics)
    return run.info.run_id


def test_the_watch_and_status_show_each_running_runs_epoch_step_and_eta(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read from a real MLflow store: per stage finished / running / queued / failed, then each running
    run's epoch, step of the total and ETA; redrawn in place on a terminal, lines in a log; status columns."""
    monkeypatch.chdir(tmp_path)
    spec = spec_file(tmp_path, teacher_only=False)
    plans = {p.name: p for p in load_and_expand(str(spec), [], None, str(tmp_path / "runs")).runs}
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("mini")
    parent = client.create_run(experiment, tags={"kind": "launch"}).info.run_id
    now = int(time.time() * 1000)
    teacher = add_run(
        client, experiment, parent, plans["teacher"].key, "teacher/teacher", 8, [(15, now - 60_000)], 2, now - 100_000
    )
    client.set_terminated(teacher, "FINISHED")
    # 10 of 16 steps done in 40 s since its start: 6 steps left at 0.25 steps/s, the last point 4 s ago
    dynamic = add_run(
        client,
        experiment,
        parent,
        plans["dynamic"].key,
        "students/dynamic",
        8,
        [(0, now - 44_000), (9, now - 4_000)],
        1,
        now - 44_000,
    )
    client.update_run(dynamic, "RUNNING")
    expected = [Expected(p.stage, p.name, p.key, p.config.train.epochs) for p in plans.values()]

    screen = io.StringIO()
    monkeypatch.setenv("DVIT_PROGRESS_POLL_S", "3600")  # polls only when told here (force)
    on_terminal = Watch(client, experiment, [parent], expected=expected, stream=screen, terminal=True)
    on_terminal.tick(force=True)
    drawn = screen.getvalue()
    assert "teacher: 1 finished, 0 running, 0 queued, 0 failed" in drawn
    assert "students: 0 finished, 1 running, 1 queued, 0 failed" in drawn
    assert re.search(r"students/dynamic epoch 2/2 step 10/16 ETA 0:(20|1\d)", drawn)  # 6 / 0.25 - 4 s - this test's
    assert "\r" in drawn and "\n" not in drawn.rstrip("\n").split("\r")[-1]  # redrawn in place (tqdm)
    on_terminal.close()
    monkeypatch.delenv("DVIT_PROGRESS_POLL_S")
    assert Watch(client, experiment, [parent], expected=expected, stream=io.StringIO(), terminal=True).poll_s <= 15

    log = io.StringIO()
    in_a_log = Watch(client, experiment, [parent], expected=expected, stream=log, terminal=False)
    assert in_a_log.line_s == 60
    in_a_log.tick(force=True)
    in_a_log.tick(force=True)  # nothing changed, and 60 s have not passed: silent
    client.set_terminated(dynamic, "FAILED")
    in_a_log.tick(force=True)
    first, change = log.getvalue().splitlines()
    assert re.fullmatch(
        r"progress: teacher: 1 finished, 0 running, 0 queued, 0 failed; students: 0 finished, "
        r"1 running, 1 queued, 0 failed \| students/dynamic epoch 2/2 step 10/16 ETA 0:(20|1\d)",
        first,
    )
    assert re.fullmatch(r"students/dynamic: failed after 0:4\d \(0 finished, 0 running, 1 queued, 1 failed\)", change)

    client.update_run(dynamic, "RUNNING")
    assert status.main([str(spec), "--output-root", str(tmp_path / "runs"), "--tracking-uri", uri]) == 0
    rows = {line.split()[1]: line.split() for line in capsys.readouterr().out.splitlines()}
    assert rows["name"][2:6] == ["state", "epoch", "step", "ETA"]
    assert rows["teacher"][2:6] == ["FINISHED", "2/2", "16/16", "-"]
    assert rows["dynamic"][2:5] == ["RUNNING", "2/2", "10/16"] and re.fullmatch(r"0:\d\d", rows["dynamic"][5])
    assert rows["static"][2:6] == ["not", "launched", "-", "-"]
