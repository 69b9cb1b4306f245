"""Reliability (issue 16): bad input is one line and nothing written, no command hangs, a run's
folder, key and MLflow record are never mixed up, stuck runs are resubmitted.

Everything goes through the real commands as subprocesses (`python -m harness.launch`, `.status`,
`.train`, `.cancel`, `analysis.report`), against real SQLite stores, a real closed port and a real
socket that never answers; the SLURM tests (marked `slurm`) use the real local cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.servers import free_port
from tests.test_launch import MINI, needs_slurm, sacct, train_runs

REPO = Path(__file__).resolve().parents[1]
CASE_LIMIT_S = 5  # issue 16's bound on a refused command (each takes about a second here)
CASE_TIMEOUT_S = 8  # per bad-input case, fixtures included: the test's hard stop
NOTEBOOKS = ["analysis/notebooks/table3_notebook.ipynb"]  # a notebook that exists (the report checks notebooks first)


def cli(
    module: str, *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    full_env["PYTHONPATH"] = str(REPO)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )


def spec_dict(**changes: Any) -> dict[str, Any]:
    """MINI with a scale layer that sets train.epochs (so a base override of it is shadowed)."""
    spec = json.loads(json.dumps(MINI))
    spec["scales"]["tiny"]["train"] = {"epochs": 1}
    for dotted, value in changes.items():
        node = spec
        *parents, leaf = dotted.split("/")
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        node[leaf] = value
    return spec


def write(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under root with its size and modification time."""
    out = {}
    for path in root.rglob("*"):
        with contextlib.suppress(OSError):
            st = path.lstat()
            out[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


# ---------------------------------------------------------------------------- the bad-input table
@dataclass
class Ctx:
    tmp: Path
    readonly: Path  # a folder nobody may write (a read-only mount when running as root)

    @property
    def db(self) -> str:
        return f"sqlite:///{self.tmp}/mlflow.db"

    def spec(self, **changes: Any) -> str:
        return str(write(self.tmp / "spec.yaml", spec_dict(**changes)))

    def launch(self, spec: str, *extra: str) -> list[str]:
        return [
            "harness.launch",
            spec,
            "--executor",
            "local",
            "--output-root",
            str(self.tmp / "runs"),
            "--tracking-uri",
            self.db,
            *extra,
        ]

    def search_spec(self) -> str:
        """A tiny search spec whose tiny scale sets train.epochs and search.trials again."""
        spec = search_spec_dict()
        return str(write(self.tmp / "search.yaml", spec))

    def search(self, spec: str, *extra: str, root: Path | None = None) -> list[str]:
        return [
            "harness.search",
            spec,
            "--executor",
            "local",
            "--output-root",
            str(root or self.tmp / "runs"),
            "--tracking-uri",
            self.db,
            *extra,
        ]

    def train_cfg(self, **changes: Any) -> str:
        cfg: dict[str, Any] = {
            "model": {"name": "dynamicvit_micro_patch4_32", "variant": "dense"},
            "data": {"name": "synthetic"},
            "train": {"epochs": 1},
            "output_dir": str(self.tmp / "run"),
            "tracking": {"uri": self.db},
        }
        for dotted, value in changes.items():
            node = cfg
            *parents, leaf = dotted.split("/")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        return str(write(self.tmp / "run.yaml", cfg))


def search_spec_dict() -> dict[str, Any]:
    """tests/test_search.py's tiny search spec with a scale layer that sets train.epochs and search.trials."""
    from tests.test_search import SPEC

    spec = json.loads(json.dumps(SPEC))
    spec["scales"]["tiny"].update({"train": {"epochs": 1}, "search": {"trials": 4}})
    return spec


# (argv, exit code, the line's start, a fragment naming the field)
Built = tuple[list[str], int, str, str]


def _bomb() -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    return "\n".join(lines) + "\nname: bomb\nbase: {train: {epochs: *a8}}\n"


class _RunsCode:
    """Unpickling it runs `touch MARKER` (issue 24: no checkpoint may run code when it is loaded)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def _code_running_checkpoint(path: Path) -> Path:
    """A whole torch zip checkpoint (`<archive>/data.pkl`) whose pickle calls os.system."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps({"model": {}, "x": _RunsCode(path.with_name("MARKER"))}, 2))
    return path


def _truncated_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00." * 200)
    path.write_bytes(path.read_bytes()[:300])
    return path


def _case_list() -> list[tuple[str, Callable[[Ctx], Built]]]:
    cases: list[tuple[str, Callable[[Ctx], Built]]] = []

    def case(name: str) -> Callable[[Callable[[Ctx], Built]], Callable[[Ctx], Built]]:
        def register(fn: Callable[[Ctx], Built]) -> Callable[[Ctx], Built]:
            cases.append((name, fn))
            return fn

        return register

    # -- the spec file itself (item 8)
    @case("spec-missing")
    def _(c: Ctx) -> Built:
        return c.launch(str(c.tmp / "nope.yaml")), 2, str(c.tmp / "nope.yaml"), "no such file"

    @case("spec-is-a-folder")
    def _(c: Ctx) -> Built:
        (c.tmp / "specdir").mkdir()
        return c.launch(str(c.tmp / "specdir")), 2, str(c.tmp / "specdir"), "is a folder"

    @case("spec-binary")
    def _(c: Ctx) -> Built:
        p = write(c.tmp / "bin.yaml", b"name: x\n\x00\x01\x02\x03")
        return c.launch(str(p)), 2, str(p), "NUL byte"

    @case("spec-not-utf8")
    def _(c: Ctx) -> Built:
        p = write(c.tmp / "latin.yaml", "name: caf\u00e9\n".encode("latin-1"))
        return c.launch(str(p)), 2, str(p), "not UTF-8"

    @case("spec-a-fifo")
    def _(c: Ctx) -> Built:
        os.mkfifo(c.tmp / "fifo.yaml")
        return c.launch(str(c.tmp / "fifo.yaml")), 2, str(c.tmp / "fifo.yaml"), "not a regular file"

    @case("spec-under-a-file")
    def _(c: Ctx) -> Built:
        write(c.tmp / "plain", "x")
        return (
            c.launch(str(c.tmp / "plain/spec.yaml")),
            2,
            str(c.tmp / "plain/spec.yaml"),
            "cannot be read (Not a directory)",
        )

    @case("spec-too-large")
    def _(c: Ctx) -> Built:
        p = write(c.tmp / "big.yaml", "# " + "x" * (5 << 20) + "\nname: big\n")
        return c.launch(str(p)), 2, str(p), "too large"

    @case("spec-yaml-syntax")
    def _(c: Ctx) -> Built:
        p = write(c.tmp / "syntax.yaml", "name: x\nbase:\n  model: {name: a\n")
        return c.launch(str(p)), 2, str(p), "YAML syntax error at line"

    @case("spec-top-level-list")
    def _(c: Ctx) -> Built:
        p = write(c.tmp / "list.yaml", "- a\n- b\n")
        return c.launch(str(p)), 2, str(p), "expected a mapping at the top level, got list"

    @case("spec-alias-bomb")
    def _(c: Ctx) -> Built:
        p = write(c.tmp / "bomb.yaml", _bomb())
        return c.launch(str(p)), 2, str(p), "alias bomb"

    @case("spec-nested-too-deep")
    def _(c: Ctx) -> Built:
        p = write(c.tmp / "deep.yaml", "name: " + "[" * 5000 + "]" * 5000 + "\n")
        return c.launch(str(p)), 2, str(p), "nested too deeply"

    # -- names are names, never paths (item 2)
    @case("variant-name-escapes-root")
    def _(c: Ctx) -> Built:
        return (
            c.launch(c.spec(**{"stages/students/runs/variants/0/name": "../../../../victim"})),
            2,
            str(c.tmp / "spec.yaml"),
            "stages.students.runs.variants[0].name: must be",
        )

    @case("variant-name-dotdot")
    def _(c: Ctx) -> Built:
        return (
            c.launch(c.spec(**{"stages/students/runs/variants/1/name": ".."})),
            2,
            str(c.tmp / "spec.yaml"),
            "variants[1].name: must be",
        )

    @case("variant-name-too-long")
    def _(c: Ctx) -> Built:
        return (
            c.launch(c.spec(**{"stages/students/runs/variants/1/name": "v" * 101})),
            2,
            str(c.tmp / "spec.yaml"),
            "variants[1].name: must be 1-100",
        )

    @case("stage-name-is-a-path")
    def _(c: Ctx) -> Built:
        spec = spec_dict()
        spec["stages"]["../up"] = {"row": "x"}
        return c.launch(str(write(c.tmp / "spec.yaml", spec))), 2, str(c.tmp / "spec.yaml"), "stages: '../up'"

    @case("scale-name-is-a-path")
    def _(c: Ctx) -> Built:
        spec = spec_dict()
        spec["scales"]["a/b"] = {}
        return c.launch(str(write(c.tmp / "spec.yaml", spec))), 2, str(c.tmp / "spec.yaml"), "scales: 'a/b'"

    @case("spec-name-is-a-path")
    def _(c: Ctx) -> Built:
        return c.launch(c.spec(name="../etc")), 2, str(c.tmp / "spec.yaml"), "name: must be"

    # -- command-line overrides take effect or are refused (item 6)
    @case("override-shadowed-by-scale")
    def _(c: Ctx) -> Built:
        return (
            c.launch(c.spec(), "base.train.epochs=3"),
            2,
            str(c.tmp / "spec.yaml"),
            "base.train.epochs: has no effect on any run: scales.tiny sets train.epochs = 1 after it; override "
            "scales.tiny.train.epochs instead",
        )

    @case("override-shadowed-and-invalid")
    def _(c: Ctx) -> Built:
        return c.launch(c.spec(), "base.train.epochs=abc"), 2, str(c.tmp / "spec.yaml"), "base.train.epochs:"

    @case("override-run-key-invalid")
    def _(c: Ctx) -> Built:
        return (
            c.launch(c.spec(), "train.epochs=abc"),
            2,
            str(c.tmp / "spec.yaml"),
            "train.epochs (command line): Input should be a valid integer",
        )

    @case("override-run-key-out-of-range")
    def _(c: Ctx) -> Built:
        return (
            c.launch(c.spec(), "model.keep_ratio=2"),
            2,
            str(c.tmp / "spec.yaml"),
            "model.keep_ratio (command line): Input should be less than or equal to 1",
        )

    @case("override-batch-zero")
    def _(c: Ctx) -> Built:
        return c.launch(c.spec(), "train.batch_size=0"), 2, str(c.tmp / "spec.yaml"), "train.batch_size (command line)"

    @case("override-unknown-head")
    def _(c: Ctx) -> Built:
        return c.launch(c.spec(), "trian.epochs=1"), 2, str(c.tmp / "spec.yaml"), "trian.epochs: unknown override key"

    @case("override-search-in-experiment-spec")
    def _(c: Ctx) -> Built:
        return c.launch(c.spec(), "search.trials=8"), 2, str(c.tmp / "spec.yaml"), "search.trials: unknown override key"

    @case("override-without-equals")
    def _(c: Ctx) -> Built:
        return c.launch(c.spec(), "train.epochs"), 2, "override 'train.epochs'", "expected key=value"

    @case("override-empty-key-part")
    def _(c: Ctx) -> Built:
        return c.launch(c.spec(), "train..epochs=1"), 2, "override 'train..epochs=1'", "expected key=value"

    @case("override-output-dir")
    def _(c: Ctx) -> Built:
        return (
            c.launch(c.spec(), "output_dir=/tmp/elsewhere"),
            2,
            str(c.tmp / "spec.yaml"),
            "output_dir (command line): cannot be overridden",
        )

    @case("override-experiment-name")
    def _(c: Ctx) -> Built:
        return (
            c.launch(c.spec(), "tracking.experiment=other"),
            2,
            str(c.tmp / "spec.yaml"),
            "tracking.experiment (command line): cannot be overridden",
        )

    @case("override-init-from-derived")
    def _(c: Ctx) -> Built:
        write(c.tmp / "other/model.pth", b"\x80\x02")  # fine for the teacher, whose init_from is not derived
        return (
            c.launch(c.spec(), f"train.init_from={c.tmp / 'other'}"),
            2,
            str(c.tmp / "spec.yaml"),
            "train.init_from (command line): cannot be overridden",
        )

    @case("empty-grid-drops-a-stage")
    def _(c: Ctx) -> Built:
        return (
            c.launch(c.spec(), "stages.students.runs.grid={train.seed: []}"),
            2,
            str(c.tmp / "spec.yaml"),
            "stages.students.runs.grid.train.seed: an empty list expands to no runs",
        )

    @case("unknown-scale")
    def _(c: Ctx) -> Built:
        return c.launch(c.spec(), "--scale", "huge"), 2, str(c.tmp / "spec.yaml"), "scale: unknown scale"

    # -- files a spec names are checked before anything runs (item 7)
    @case("pretrained-missing")
    def _(c: Ctx) -> Built:
        return (
            c.launch(c.spec(**{"stages/teacher/model.pretrained": str(c.tmp / "none.pth")})),
            2,
            str(c.tmp / "spec.yaml"),
            "stages.teacher.model.pretrained: no such file",
        )

    @case("pretrained-relative-missing")
    def _(c: Ctx) -> Built:
        return (
            c.launch(c.spec(**{"stages/teacher/model.pretrained": "ckpts/none.pth"})),
            2,
            str(c.tmp / "spec.yaml"),
            "relative to the current folder",
        )

    @case("pretrained-a-text-file")
    def _(c: Ctx) -> Built:
        p = write(c.tmp / "weights.pth", "<html>not found</html>\n")
        return (
            c.launch(c.spec(**{"stages/teacher/model.pretrained": str(p)})),
            2,
            str(c.tmp / "spec.yaml"),
            "model.pretrained: a text file, not a torch checkpoint",
        )

    @case("pretrained-empty")
    def _(c: Ctx) -> Built:
        p = write(c.tmp / "empty.pth", b"")
        return (
            c.launch(c.spec(**{"stages/teacher/model.pretrained": str(p)})),
            2,
            str(c.tmp / "spec.yaml"),
            "model.pretrained: an empty file",
        )

    @case("pretrained-truncated")
    def _(c: Ctx) -> Built:
        p = _truncated_zip(c.tmp / "cut.pth")
        return (
            c.launch(c.spec(**{"stages/teacher/model.pretrained": str(p)})),
            2,
            str(c.tmp / "spec.yaml"),
            "model.pretrained: a truncated or damaged checkpoint",
        )

    @case("pretrained-would-run-code")
    def _(c: Ctx) -> Built:
        p = _code_running_checkpoint(c.tmp / "evil.pth")
        return (
            c.launch(c.spec(**{"stages/teacher/model.pretrained": str(p)})),
            2,
            str(c.tmp / "spec.yaml"),
            "model.pretrained: refused: unpickling it would import posix.system",
        )

    @case("pretrained-a-folder-without-weights")
    def _(c: Ctx) -> Built:
        (c.tmp / "notarun").mkdir()
        return (
            c.launch(c.spec(**{"stages/teacher/model.pretrained": str(c.tmp / "notarun")})),
            2,
            str(c.tmp / "spec.yaml"),
            "model.pretrained: a folder without model.pth",
        )

    @case("pretrained-an-unfinished-run-folder")
    def _(c: Ctx) -> Built:
        run = c.tmp / "halfway"  # a run stopped half-way: a resume point, no final weights
        run.mkdir()
        (run / "checkpoint.pth").write_bytes(b"PK")  # never read: the folder is refused for what it lacks
        return (
            c.launch(c.spec(**{"stages/teacher/model.pretrained": str(run)})),
            2,
            str(c.tmp / "spec.yaml"),
            "model.pretrained: a folder without model.pth: its run has not finished",
        )

    @case("teacher-checkpoint-ftp")
    def _(c: Ctx) -> Built:
        return (
            c.launch(c.spec(**{"base/teacher": {"checkpoint": "ftp://host/w.pth"}})),
            2,
            str(c.tmp / "spec.yaml"),
            "base.teacher.checkpoint: only http(s) URLs",
        )

    @case("init-from-missing")
    def _(c: Ctx) -> Built:
        spec = spec_dict()
        del spec["stages"]["students"]["init_from"]
        spec["stages"]["students"]["train"] = {"init_from": str(c.tmp / "gone")}
        return (
            c.launch(str(write(c.tmp / "spec.yaml", spec))),
            2,
            str(c.tmp / "spec.yaml"),
            "stages.students.train.init_from: no such file",
        )

    @case("notebook-missing")
    def _(c: Ctx) -> Built:
        return (
            c.launch(c.spec(notebooks=["analysis/nope.ipynb"])),
            2,
            str(c.tmp / "spec.yaml"),
            "notebooks[0]: no such notebook",
        )

    @case("table-unknown")
    def _(c: Ctx) -> Built:
        return (
            c.launch(c.spec(notebooks=["analysis/notebooks/table3_notebook.ipynb"], table="table99")),
            2,
            str(c.tmp / "spec.yaml"),
            "table: unknown table",
        )

    @case("imagenet-root-missing")
    def _(c: Ctx) -> Built:
        return (
            c.launch(c.spec(), "--scale", "paper"),
            2,
            str(c.tmp / "spec.yaml"),
            "scales.paper.data.root: no such folder",
        )

    @case("batch-1e23")
    def _(c: Ctx) -> Built:
        return (
            c.launch(c.spec(), "train.batch_size=100000000000000000000000"),
            2,
            str(c.tmp / "spec.yaml"),
            "train.batch_size (command line): larger than any machine's memory allows",
        )

    @case("batch-1e23-as-yaml-float")
    def _(c: Ctx) -> Built:
        return (
            c.launch(c.spec(), "train.batch_size=1e23"),
            2,
            str(c.tmp / "spec.yaml"),
            "train.batch_size (command line): Input should be a valid integer",
        )

    @case("canvas-1e5")
    def _(c: Ctx) -> Built:
        return (
            c.launch(c.spec(), "data.canvas=100000"),
            2,
            str(c.tmp / "spec.yaml"),
            "data.canvas (command line): an image of 100000 x 100000 pixels is too large",
        )

    @case("img-size-1e5")
    def _(c: Ctx) -> Built:
        return (
            c.launch(c.spec(**{"base/data/img_size": 100000})),
            2,
            str(c.tmp / "spec.yaml"),
            "base.data.img_size: an image of 100000 x 100000",
        )

    # -- the tracking store and the output root (items 3, 7, 8)
    @case("launch-dead-server")
    def _(c: Ctx) -> Built:
        uri = f"http://127.0.0.1:{free_port()}"
        return (
            [
                "harness.launch",
                c.spec(),
                "--executor",
                "local",
                "--output-root",
                str(c.tmp / "runs"),
                "--tracking-uri",
                uri,
            ],
            1,
            "--tracking-uri: cannot reach the MLflow tracking server",
            uri,
        )

    @case("launch-dead-server-from-env")
    def _(c: Ctx) -> Built:
        uri = f"http://127.0.0.1:{free_port()}"
        argv = ["harness.launch", c.spec(), "--executor", "local", "--output-root", str(c.tmp / "runs")]
        return [*argv, f"--env=MLFLOW_TRACKING_URI={uri}"], 1, "$MLFLOW_TRACKING_URI: cannot reach", uri

    @case("launch-store-not-sqlite")
    def _(c: Ctx) -> Built:
        write(c.tmp / "mlflow.db", "this is not a database\n")
        return c.launch(c.spec()), 2, "--tracking-uri: not an SQLite database", "mlflow.db"

    @case("launch-store-damaged")
    def _(c: Ctx) -> Built:
        write(c.tmp / "mlflow.db", b"SQLite format 3\x00" + b"\xff" * 200)
        return c.launch(c.spec()), 2, "--tracking-uri:", "SQLite database"

    @case("launch-store-folder-missing")
    def _(c: Ctx) -> Built:
        argv = c.launch(c.spec())
        argv[argv.index("--tracking-uri") + 1] = f"sqlite:///{c.tmp}/no/such/dir/mlflow.db"
        return argv, 2, "--tracking-uri: the folder of the SQLite file does not exist", "no/such/dir"

    @case("launch-store-is-a-folder")
    def _(c: Ctx) -> Built:
        (c.tmp / "dbdir").mkdir()
        argv = c.launch(c.spec())
        argv[argv.index("--tracking-uri") + 1] = f"sqlite:///{c.tmp}/dbdir"
        return argv, 2, "--tracking-uri: a folder, not an SQLite file", "dbdir"

    @case("launch-store-read-only")
    def _(c: Ctx) -> Built:
        argv = c.launch(c.spec())
        argv[argv.index("--tracking-uri") + 1] = f"sqlite:///{c.readonly}/mlflow.db"
        return argv, 2, "--tracking-uri: cannot create the SQLite file (folder not writable)", str(c.readonly)

    @case("launch-output-root-read-only")
    def _(c: Ctx) -> Built:
        argv = c.launch(c.spec())
        argv[argv.index("--output-root") + 1] = str(c.readonly / "runs")
        return argv, 2, "--output-root: cannot create the folder", str(c.readonly)

    @case("launch-output-root-is-a-file")
    def _(c: Ctx) -> Built:
        write(c.tmp / "afile", "x")
        argv = c.launch(c.spec())
        argv[argv.index("--output-root") + 1] = str(c.tmp / "afile")
        return argv, 2, "--output-root: cannot create the folder", "afile"

    @case("status-mistyped-sqlite")
    def _(c: Ctx) -> Built:
        return (
            ["harness.status", c.spec(), "--tracking-uri", f"sqlite:///{c.tmp}/mlfow.db"],
            2,
            "--tracking-uri: no such SQLite file",
            "mlfow.db",
        )

    @case("status-no-store-here")
    def _(c: Ctx) -> Built:
        return ["harness.status", c.spec()], 2, "tracking store (default ./mlflow.db): no such SQLite file", "mlflow.db"

    @case("status-dead-server")
    def _(c: Ctx) -> Built:
        uri = f"http://127.0.0.1:{free_port()}"
        return ["harness.status", c.spec(), "--tracking-uri", uri], 1, "--tracking-uri: cannot reach", uri

    @case("status-bad-spec")
    def _(c: Ctx) -> Built:
        return ["harness.status", c.spec(), "--scale", "huge"], 2, str(c.tmp / "spec.yaml"), "scale: unknown scale"

    @case("cancel-spec-missing")
    def _(c: Ctx) -> Built:
        return ["harness.cancel", str(c.tmp / "x.yaml")], 2, str(c.tmp / "x.yaml"), "no such file"

    @case("cancel-unknown-scale")
    def _(c: Ctx) -> Built:
        return ["harness.cancel", c.spec(), "--scale", "huge"], 2, str(c.tmp / "spec.yaml"), "scale: unknown scale"

    @case("cancel-no-store")
    def _(c: Ctx) -> Built:
        return (
            ["harness.cancel", c.spec(), "--tracking-uri", c.db],
            2,
            "--tracking-uri: no such SQLite file",
            "mlflow.db",
        )

    # -- analysis.report (item 7)
    @case("report-unknown-scale")
    def _(c: Ctx) -> Built:
        return (
            ["analysis.report", c.spec(notebooks=NOTEBOOKS), "--scale", "huge", "--tracking-uri", c.db],
            2,
            "--scale: not a scale of",
            "got 'huge'",
        )

    @case("report-notebook-missing")
    def _(c: Ctx) -> Built:
        return (
            ["analysis.report", c.spec(notebooks=["analysis/nope.ipynb"]), "--tracking-uri", c.db],
            2,
            str(c.tmp / "spec.yaml"),
            "notebooks: no such notebook",
        )

    @case("report-no-store")
    def _(c: Ctx) -> Built:
        return (
            ["analysis.report", c.spec(notebooks=NOTEBOOKS), "--tracking-uri", c.db],
            2,
            "--tracking-uri: no such SQLite file",
            "mlflow.db",
        )

    @case("report-dead-server")
    def _(c: Ctx) -> Built:
        uri = f"http://127.0.0.1:{free_port()}"
        return (
            ["analysis.report", c.spec(notebooks=NOTEBOOKS), "--tracking-uri", uri],
            1,
            "--tracking-uri: cannot reach",
            uri,
        )

    @case("report-spec-is-a-folder")
    def _(c: Ctx) -> Built:
        return ["analysis.report", str(c.tmp), "--tracking-uri", c.db], 2, str(c.tmp), "is a folder"

    # -- harness.train with a run config (items 1, 7, 8)
    @case("train-config-missing")
    def _(c: Ctx) -> Built:
        return ["harness.train", str(c.tmp / "none.yaml")], 2, str(c.tmp / "none.yaml"), "no such file"

    @case("train-config-binary")
    def _(c: Ctx) -> Built:
        p = write(c.tmp / "cfg.yaml", bytes(range(256)))
        return ["harness.train", str(p)], 2, str(p), "not UTF-8"

    @case("train-config-unknown-key")
    def _(c: Ctx) -> Built:
        return (
            ["harness.train", c.train_cfg(**{"train/epochz": 1})],
            2,
            str(c.tmp / "run.yaml"),
            "train.epochz: unknown key",
        )

    @case("train-override-invalid")
    def _(c: Ctx) -> Built:
        return (
            ["harness.train", c.train_cfg(), "model.variant=magic"],
            2,
            str(c.tmp / "run.yaml"),
            "model.variant: Input should be",
        )

    @case("train-pretrained-text")
    def _(c: Ctx) -> Built:
        p = write(c.tmp / "w.pth", "hello\n")
        return (
            ["harness.train", c.train_cfg(**{"model/pretrained": str(p)})],
            2,
            str(c.tmp / "run.yaml"),
            "model.pretrained: a text file",
        )

    @case("train-init-from-would-run-code")
    def _(c: Ctx) -> Built:
        p = _code_running_checkpoint(c.tmp / "evil.pth")
        return (
            ["harness.train", c.train_cfg(**{"train/init_from": str(p)})],
            2,
            str(c.tmp / "run.yaml"),
            "train.init_from: refused: unpickling it would import posix.system",
        )

    @case("train-teacher-missing")
    def _(c: Ctx) -> Built:
        return (
            ["harness.train", c.train_cfg(**{"teacher/run_dir": str(c.tmp / "teacher")})],
            2,
            str(c.tmp / "run.yaml"),
            "teacher.run_dir: no such file",
        )

    @case("train-batch-absurd")
    def _(c: Ctx) -> Built:
        return (
            ["harness.train", c.train_cfg(), "train.batch_size=10000000"],
            2,
            str(c.tmp / "run.yaml"),
            "train.batch_size: larger than any machine's memory allows",
        )

    @case("train-dead-server")
    def _(c: Ctx) -> Built:
        uri = f"http://127.0.0.1:{free_port()}"
        return (
            ["harness.train", c.train_cfg(**{"tracking/uri": uri})],
            1,
            f"{c.tmp / 'run.yaml'}: tracking.uri: cannot reach",
            uri,
        )

    @case("train-output-dir-is-a-file")
    def _(c: Ctx) -> Built:
        write(c.tmp / "afile", "x")
        return (
            ["harness.train", c.train_cfg(output_dir=str(c.tmp / "afile"))],
            2,
            str(c.tmp / "run.yaml"),
            "output_dir: cannot create the folder",
        )

    @case("train-output-dir-read-only")
    def _(c: Ctx) -> Built:
        return (
            ["harness.train", c.train_cfg(output_dir=str(c.readonly / "run"))],
            2,
            str(c.tmp / "run.yaml"),
            "output_dir: cannot create the folder",
        )

    @case("train-store-damaged")
    def _(c: Ctx) -> Built:
        write(c.tmp / "mlflow.db", "garbage\n")
        return (
            ["harness.train", c.train_cfg()],
            2,
            f"{c.tmp / 'run.yaml'}: tracking.uri: not an SQLite database",
            "mlflow.db",
        )

    # -- search storages (issue 16 item 8): refused by the dry run and before any worker is submitted
    @case("search-storage-driver-missing")
    def _(c: Ctx) -> Built:
        return (
            c.search(c.search_spec(), "search.storage.url=mysql://optuna@db-host/dvit"),
            1,
            f"{c.tmp / 'search.yaml'}: search.storage.url: the mysql+mysqldb driver is not installed",
            "MySQLdb",
        )

    @case("search-storage-driver-missing-dry-run")
    def _(c: Ctx) -> Built:
        return (
            c.search(c.search_spec(), "search.storage.url=mssql+pyodbc://u@h/db", "--dry-run"),
            1,
            f"{c.tmp / 'search.yaml'}: search.storage.url: the mssql+pyodbc driver is not installed",
            "pyodbc",
        )

    @case("search-storage-unknown-dialect")
    def _(c: Ctx) -> Built:
        return (
            c.search(c.search_spec(), "search.storage.url=postgersql://u@h/db", "--dry-run"),
            2,
            f"{c.tmp / 'search.yaml'}: search.storage.url: not a database URL",
            "postgersql",
        )

    @case("search-storage-journal-read-only")
    def _(c: Ctx) -> Built:
        return (
            c.search(c.search_spec(), f"search.storage.url={c.readonly}/study.journal", "--dry-run"),
            2,
            f"{c.tmp / 'search.yaml'}: search.storage.url: {c.readonly} cannot be written",
            "study.journal",
        )

    @case("search-storage-journal-under-a-file")
    def _(c: Ctx) -> Built:
        write(c.tmp / "afile", "x")
        return (
            c.search(c.search_spec(), f"search.storage.url={c.tmp}/afile/study.journal"),
            2,
            f"{c.tmp / 'search.yaml'}: search.storage.url: {c.tmp / 'afile'} is a file",
            "study.journal",
        )

    @case("search-storage-journal-is-a-folder")
    def _(c: Ctx) -> Built:
        return (
            c.search(c.search_spec(), f"--storage={c.tmp}", "--dry-run"),
            2,
            "--storage: a folder, not a storage file",  # the field the user wrote: the option
            str(c.tmp),
        )

    @case("search-storage-sqlite-read-only")
    def _(c: Ctx) -> Built:
        return (
            c.search(c.search_spec(), "--workers=1", f"--storage=sqlite:///{c.readonly}/study.db"),
            2,
            f"--storage: {c.readonly} cannot be written",
            "study.db",
        )

    @case("search-storage-auto-output-root-read-only")
    def _(c: Ctx) -> Built:
        return (
            c.search(c.search_spec(), "--dry-run", root=c.readonly),
            2,
            f"{c.tmp / 'search.yaml'}: search.storage.url (auto, under --output-root): {c.readonly} cannot be written",
            "study.journal",
        )

    @case("search-storage-env-unset")
    def _(c: Ctx) -> Built:
        return (
            c.search(c.search_spec(), "search.storage.url=${DVIT_TEST_UNSET_STORAGE}", "--dry-run"),
            2,
            f"{c.tmp / 'search.yaml'}: search.storage.url: an environment variable in it is not set",
            "DVIT_TEST_UNSET_STORAGE",
        )

    @case("search-base-override-shadowed")
    def _(c: Ctx) -> Built:
        return (
            c.search(c.search_spec(), "base.train.epochs=2", "--dry-run"),
            2,
            f"{c.tmp / 'search.yaml'}: base.train.epochs: has no effect",
            "scales.tiny sets train.epochs",
        )

    @case("search-override-whole-section")
    def _(c: Ctx) -> Built:
        return (
            c.search(c.search_spec(), "search=8", "--dry-run"),
            2,
            f"{c.tmp / 'search.yaml'}: search: override a key of the section",
            "search=8",
        )

    @case("search-override-trials-invalid")
    def _(c: Ctx) -> Built:
        return (
            c.search(c.search_spec(), "search.trials=0", "--dry-run"),
            2,
            f"{c.tmp / 'search.yaml'}: search.trials",
            "greater than 0",
        )

    # -- issue 24: duplicate keys, limits, folders and arguments refused before anything is written
    @case("spec-duplicate-key")
    def _(c: Ctx) -> Built:
        text = yaml.safe_dump(spec_dict(), sort_keys=False).replace(
            "base:\n", "base:\n  train:\n    batch_size: 8\n    ema: 0.99\n", 1
        )
        p = write(c.tmp / "dup.yaml", text)
        first, again = [i for i, row in enumerate(text.splitlines(), 1) if row == "  train:"]
        return c.launch(str(p)), 2, f"{p}: line {again}: duplicate key 'train'", f"first at line {first}"

    @case("train-config-duplicate-key")
    def _(c: Ctx) -> Built:
        p = write(c.tmp / "run.yaml", "model: {name: dynamicvit_micro_patch4_32}\ntrain: {epochs: 1, epochs: 2}\n")
        return ["harness.train", str(p)], 2, f"{p}: line 2: duplicate key 'epochs'", "first at line 2"

    @case("override-value-duplicate-key")
    def _(c: Ctx) -> Built:
        return (
            c.launch(c.spec(), "train={epochs: 1, epochs: 2}"),
            2,
            "override 'train={epochs: 1, epochs: 2}'",
            "duplicate key 'epochs'",
        )

    @case("grid-over-max-runs")
    def _(c: Ctx) -> Built:  # 2 variants x 100 x 50: 10,001 runs in all
        return (
            c.launch(
                c.spec(), f"stages.students.runs.grid={{train.seed: {list(range(100))}, data.seed: {list(range(50))}}}"
            ),
            2,
            f"{c.tmp / 'spec.yaml'}: stages.students.runs: the spec expands to 10001 runs",
            "more than the limit of 1000; pass --max-runs 10001",
        )

    @case("grid-over-a-lowered-max-runs")
    def _(c: Ctx) -> Built:
        return (
            c.launch(c.spec(), "--max-runs", "2"),
            2,
            f"{c.tmp / 'spec.yaml'}: stages.",
            "expands to 3 runs at scale tiny (2 in stage students), more than the limit of 2",
        )

    @case("max-runs-zero")
    def _(c: Ctx) -> Built:
        return c.launch(c.spec(), "--max-runs=0"), 2, "--max-runs: must be at least 1", "got 0"

    @case("output-root-symlink-loop")
    def _(c: Ctx) -> Built:
        (c.tmp / "runs").mkdir()
        (c.tmp / "runs/mini").symlink_to(c.tmp / "runs/loop")
        (c.tmp / "runs/loop").symlink_to(c.tmp / "runs/mini")
        return c.launch(c.spec()), 2, f"--output-root: {c.tmp / 'runs/mini'}", "a symlink loop"

    @case("output-root-run-folder-is-a-file")
    def _(c: Ctx) -> Built:
        write(c.tmp / "runs/mini/tiny", "x")
        return c.launch(c.spec()), 2, f"--output-root: {c.tmp / 'runs/mini/tiny'}: not a folder", "runs"

    @case("train-digits-below-one-batch")
    def _(c: Ctx) -> Built:
        return (
            c.launch(c.spec(), "data.train_digits=10", "train.batch_size=64"),
            2,
            f"{c.tmp / 'spec.yaml'}: data.train_digits (command line): too few training images for one optimiser "
            f"step of train.batch_size 64 (train.batch_size (command line))",
            "at least 64 needed, got 10",
        )

    @case("train-size-below-accumulated-batches")
    def _(c: Ctx) -> Built:
        return (
            c.launch(c.spec(**{"base/data": {"name": "synthetic", "train_size": 100}}), "train.accum_steps=4"),
            2,
            f"{c.tmp / 'spec.yaml'}: base.data.train_size: too few training images",
            "x train.accum_steps 4",
        )

    @case("cancel-takes-status-overrides")
    def _(c: Ctx) -> Built:  # accepted (the store is what is missing), as `status` accepts them
        return (
            ["harness.cancel", c.spec(), "train.epochs=2", "--tracking-uri", c.db],
            2,
            "--tracking-uri: no such SQLite file",
            "mlflow.db",
        )

    @case("cancel-override-invalid")
    def _(c: Ctx) -> Built:
        return (
            ["harness.cancel", c.spec(), "train.epochs=abc", "--tracking-uri", c.db],
            2,
            f"{c.tmp / 'spec.yaml'}: train.epochs (command line)",
            "valid integer",
        )

    @case("tracking-uri-with-password")
    def _(c: Ctx) -> Built:
        argv = c.launch(c.spec())
        argv[argv.index("--tracking-uri") + 1] = f"http://admin:hunter2secret@127.0.0.1:{free_port()}"
        return argv, 2, "--tracking-uri: a password in the URI shows in `ps`", "http://admin:***@127.0.0.1"

    @case("status-tracking-uri-with-password")
    def _(c: Ctx) -> Built:
        uri = f"https://u:hunter2secret@127.0.0.1:{free_port()}/mlflow"
        return ["harness.status", c.spec(), "--tracking-uri", uri], 2, "--tracking-uri: a password", "u:***@"

    @case("search-journal-damaged")
    def _(c: Ctx) -> Built:
        journal = write(
            c.tmp / "study.journal",
            '{"op_code": 0, "worker_id": "w", "study_name": "s", "directions": [1]}\n\x00garbage\n{"op_code": 0}\n',
        )
        return (
            c.search(c.search_spec(), f"--storage={journal}", "--workers=2"),
            2,
            f"--storage: {journal}: line 2: not an Optuna journal record",
            "move the file aside",
        )

    @case("search-auto-journal-damaged")
    def _(c: Ctx) -> Built:  # the search's own file, not one the user named: the environment's problem
        journal = write(
            c.tmp / "runs/mini_search/tiny/mini_search-tiny/study.journal", b'{"op_code": 0}\n\xff\xfe\n{}\n'
        )
        return (
            c.search(c.search_spec(), "--workers=2"),
            1,
            f"{c.tmp / 'search.yaml'}: search.storage.url (auto, "
            f"under --output-root): {journal}: line 2: not an Optuna journal record",
            "move the file aside",
        )

    # -- a store that is not MLflow's: the reading commands set up no tables in it (review M1)
    def foreign_db(c: Ctx) -> str:
        with contextlib.closing(sqlite3.connect(c.tmp / "other.db")) as con, con:
            con.execute("create table trials (id integer primary key, value real)")
            con.execute("insert into trials (value) values (0.5)")
        return f"sqlite:///{c.tmp}/other.db"

    def empty_file(c: Ctx) -> str:
        (c.tmp / "empty.db").touch()
        return f"sqlite:///{c.tmp}/empty.db"

    for command in ("status", "report"):
        for kind, make, problem in (
            ("empty-file", empty_file, "an empty file"),
            ("foreign", foreign_db, "it holds 1 other table: trials"),
        ):

            @case(f"{command}-store-{kind}")
            def _(c: Ctx, command: str = command, make: Callable[[Ctx], str] = make, problem: str = problem) -> Built:
                uri = make(c)
                spec = c.spec(notebooks=NOTEBOOKS)
                argv = ["analysis.report" if command == "report" else "harness.status", spec, "--tracking-uri", uri]
                return argv, 2, f"--tracking-uri: not an MLflow store (no MLflow tables; {problem}), got", uri

    @case("launch-store-foreign")
    def _(c: Ctx) -> Built:
        argv = c.launch(c.spec())
        argv[argv.index("--tracking-uri") + 1] = uri = foreign_db(c)
        return argv, 2, "--tracking-uri: not an MLflow store (no MLflow tables; it holds 1 other table: trials)", uri

    return cases


CASES = _case_list()


@pytest.fixture(scope="module")
def readonly_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder that cannot be written: a read-only tmpfs when root (root ignores permission bits)."""
    path = tmp_path_factory.mktemp("readonly")
    mounted = False
    if os.geteuid() == 0:
        mounted = (
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True
            ).returncode
            == 0
        )
        if not mounted:
            pytest.skip("running as root without `mount`: no read-only folder to test with")
    else:
        path.chmod(0o555)
    try:
        yield path
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], check=False)
        else:
            path.chmod(0o755)


def test_the_table_has_at_least_sixty_cases() -> None:
    assert len(CASES) >= 60, len(CASES)


@pytest.mark.timeout(CASE_TIMEOUT_S)
@pytest.mark.parametrize("name, build", CASES, ids=[name for name, _ in CASES])
def test_bad_input_is_one_line_and_nothing_is_written(
    tmp_path: Path, readonly_dir: Path, name: str, build: Callable[[Ctx], Built]
) -> None:
    ctx = Ctx(tmp_path, readonly_dir)
    argv, code, start, fragment = build(ctx)
    env = {}
    for arg in [a for a in argv if a.startswith("--env=")]:
        key, _, value = arg[len("--env=") :].partition("=")
        env[key] = value
        argv.remove(arg)
    before = snapshot(tmp_path)
    started = time.monotonic()
    result = cli(argv[0], *argv[1:], cwd=tmp_path, env=env, timeout=CASE_TIMEOUT_S)
    elapsed = time.monotonic() - started
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    assert len(lines) == 1, lines
    assert lines[0].startswith(start) and fragment in lines[0], lines[0]
    # nothing written, so nothing submitted either: a submission writes the run folders, the
    # submitit folder and the MLflow runs, all under tmp_path
    assert snapshot(tmp_path) == before, "a rejected command wrote something"
    assert elapsed < CASE_LIMIT_S, f"refused after {elapsed:.1f} s"
    assert not (tmp_path / "mlflow.db").exists() or name in (
        "launch-store-not-sqlite",
        "launch-store-damaged",
        "train-store-damaged",
    )


def test_a_new_store_prints_none_of_mlflows_setup_lines(tmp_path: Path) -> None:
    """MLflow logs INFO lines while it creates a store's tables (and alembic one per migration):
    the commands keep them off their output."""
    path = write(tmp_path / "spec.yaml", spec_dict())
    for command in (("harness.launch", "--dry-run"), ("harness.status",), ("harness.cancel",)):
        store = tmp_path / f"{command[0]}.db"
        store.touch()  # a fresh SQLite store: an empty file (a launch sets it up; harness.train's test)
        result = cli(command[0], str(path), *command[1:], "--tracking-uri", f"sqlite:///{store}", cwd=tmp_path)
        output = result.stdout + result.stderr
        assert " INFO " not in output and "Creating initial MLflow database tables" not in output, output
        assert "alembic" not in output.lower(), output
        if command[0] == "harness.launch":
            assert result.returncode == 0, result.stderr
        else:  # status and cancel set up no store (review M1): one line, the file left empty
            assert result.returncode == 2 and "not an MLflow store (no MLflow tables; an empty file)" in output
            assert store.stat().st_size == 0


# ------------------------------------------------------------------ no command hangs (item 3)
@contextlib.contextmanager
def silent_server() -> Iterator[str]:
    """A real socket that accepts connections and never answers (a hung tracking server)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("module", ["harness.launch", "harness.status"])
def test_a_tracking_server_that_never_answers_is_one_line_in_seconds(tmp_path: Path, module: str) -> None:
    spec = write(tmp_path / "spec.yaml", spec_dict())
    with silent_server() as uri:
        result = cli(
            module, str(spec), "--tracking-uri", uri, "--output-root", str(tmp_path / "runs"), cwd=tmp_path, timeout=45
        )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("--tracking-uri: cannot reach the MLflow tracking server within 5 s"), lines
    assert not (tmp_path / "runs").exists()


def test_values_in_error_messages_are_bounded() -> None:
    from pydantic import ValidationError

    from harness.config import RunConfig, format_validation_error

    bomb: list = ["x"] * 9
    for _ in range(8):
        bomb = [bomb] * 9  # 9**9 leaves if expanded
    with pytest.raises(ValidationError) as err:
        RunConfig.model_validate({"train": {"epochs": bomb}})
    (line,) = format_validation_error(err.value, "cfg.yaml", RunConfig)
    assert line.startswith("cfg.yaml: train.epochs: Input should be a valid integer") and len(line) < 400


# ------------------------------------------------- names, keys and overrides (items 2, 6, 9)
def expand(tmp: Path, spec: dict[str, Any], *overrides: str, root: str = "runs"):
    from harness.spec import load_and_expand

    return load_and_expand(str(write(tmp / "spec.yaml", spec)), list(overrides), None, str(tmp / root))


def test_grid_values_become_safe_folder_names_and_nothing_is_moved_outside_the_root(tmp_path: Path) -> None:
    from harness.config import ConfigError
    from harness.runstate import move_aside

    weights = write(tmp_path / "w/a b.pth", b"\x80\x02")
    spec = spec_dict(**{"stages/students/runs/grid": {"teacher.checkpoint": [str(weights), "https://x/y.pth"]}})
    names = [p.name for p in expand(tmp_path, spec).stage_runs("students")]
    assert all("/" not in name and name not in (".", "..") for name in names), names
    assert any(name.startswith("dynamic-checkpoint_") for name in names)
    victim = tmp_path / "victim"
    victim.mkdir()
    with pytest.raises(ConfigError, match="outside the output root"):
        move_aside(victim, tmp_path / "runs")
    assert victim.is_dir()


def test_run_keys_do_not_depend_on_where_the_checkout_lives(tmp_path: Path) -> None:
    spec = spec_dict()
    here = {p.name: p.key for p in expand(tmp_path, spec, root="runs").runs}
    moved = {p.name: p.key for p in expand(tmp_path, spec, root="elsewhere/mount/runs").runs}
    assert here == moved
    student = expand(tmp_path, spec).stage_runs("students")[0]
    assert student.config.teacher.run_dir.startswith(str(tmp_path / "runs"))  # the job still gets a real path
    retrained = {p.name: p.key for p in expand(tmp_path, spec, "stages.teacher.train.seed=5").runs}
    assert retrained["teacher"] != here["teacher"]
    assert retrained["dynamic"] != here["dynamic"]  # a student of another teacher is another run


def test_a_command_line_override_reaches_every_run_or_is_refused(tmp_path: Path) -> None:
    """Refused only when it reaches no run (tests/test_spec.py: one that reaches some runs applies)."""
    from harness.spec import SpecError

    spec = spec_dict()  # scales.tiny sets train.epochs: 1, the teacher stage sets nothing
    runs = expand(tmp_path, spec, "train.epochs=4").runs
    assert {p.config.train.epochs for p in runs} == {4}
    assert {p.config.train.epochs for p in expand(tmp_path, spec, "scales.tiny.train.epochs=3").runs} == {3}
    with pytest.raises(SpecError) as err:
        expand(tmp_path, spec, "base.train.epochs=3")
    assert err.value.lines == [
        f"{tmp_path / 'spec.yaml'}: base.train.epochs: has no effect on any run: "
        "scales.tiny sets train.epochs = 1 after it; override scales.tiny.train.epochs "
        "instead, got 3"
    ]
    del spec["scales"]["tiny"]["train"]
    assert {p.config.train.epochs for p in expand(tmp_path, spec, "base.train.epochs=3").runs} == {3}


# ------------------------------------- a run's folder, key and MLflow run stay together (item 1)
def teacher_only(**changes: Any) -> dict[str, Any]:
    spec = spec_dict(**changes)
    spec["stages"] = {"teacher": spec["stages"]["teacher"]}
    return spec


def launch_local(tmp: Path, spec: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return cli(
        "harness.launch",
        str(spec),
        "--executor",
        "local",
        "--output-root",
        str(tmp / "runs"),
        "--tracking-uri",
        f"sqlite:///{tmp}/mlflow.db",
        *args,
        cwd=tmp,
        timeout=timeout,
    )


def test_a_changed_override_starts_clean_and_leaves_the_old_run_alone(tmp_path: Path) -> None:
    spec = write(tmp_path / "spec.yaml", teacher_only())
    folder = tmp_path / "runs/mini/tiny/teacher/teacher"
    first = launch_local(tmp_path, spec)
    assert first.returncode == 0, first.stderr
    (old,) = train_runs(tmp_path)
    old_key = old.data.tags["run_key"]
    changed = launch_local(tmp_path, spec, "stages.teacher.optim.lr=0.01")
    assert changed.returncode == 0, changed.stderr
    assert "held another run's state (another run key or MLflow run); kept as teacher.before-" in changed.stderr
    runs = {r.info.run_id: r for r in train_runs(tmp_path)}
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs.values())
    assert runs[old.info.run_id].data.tags["run_key"] == old_key  # the old run is not reused or re-tagged
    (new,) = [r for r in runs.values() if r.info.run_id != old.info.run_id]
    assert new.data.tags["run_key"] != old_key and new.data.params["optim.lr"] == "0.01"
    result = json.loads((folder / "result.json").read_text())
    assert (result["run_key"], result["mlflow_run_id"]) == (new.data.tags["run_key"], new.info.run_id)
    (kept,) = folder.parent.glob("teacher.before-*")
    assert json.loads((kept / "result.json").read_text())["mlflow_run_id"] == old.info.run_id
    again = launch_local(tmp_path, spec, "stages.teacher.optim.lr=0.01")
    assert again.returncode == 0 and "0 submitted, 1 skipped (finished)" in again.stdout, again.stdout


def test_train_uses_a_folder_per_run_key_and_refuses_another_keys_folder(tmp_path: Path) -> None:
    cfg = write(
        tmp_path / "run.yaml",
        {
            "model": {"name": "dynamicvit_micro_patch4_32", "variant": "dense"},
            "data": {"name": "synthetic", "train_size": 32, "val_size": 16},
            "aug": {"mixup": 0, "cutmix": 0, "label_smoothing": 0, "auto_augment": None},
            "train": {"epochs": 1, "batch_size": 16},
            "losses": {"kl": 0, "token": 0},
            "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "visualize_images": 0},
        },
    )
    first = cli("harness.train", str(cfg), cwd=tmp_path, timeout=300)
    assert first.returncode == 0, first.stderr
    second = cli("harness.train", str(cfg), "train.seed=1", cwd=tmp_path, timeout=300)
    assert second.returncode == 0, second.stderr
    folders = sorted((tmp_path / "runs/debug").iterdir())
    assert len(folders) == 2  # another configuration, another folder: nothing resumed or returned across
    keys = {json.loads((f / "result.json").read_text())["run_key"]: f for f in folders}
    assert set(keys) == {f.name for f in folders}
    seed0 = next(f for f in folders if f.name in first.stderr)
    for out in (first, second):  # a new store: none of MLflow's INFO lines about creating its tables
        assert " INFO " not in out.stderr and "Creating initial MLflow database tables" not in out.stderr
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs_before = len(client.search_runs([e.experiment_id for e in client.search_experiments()]))
    before = snapshot(seed0)
    longer = cli("harness.train", str(cfg), "train.epochs=2", f"output_dir={seed0}", cwd=tmp_path, timeout=300)
    lines = longer.stderr.strip().splitlines()
    assert longer.returncode == 2 and len(lines) == 1, longer.stderr  # a finished run is not extended
    assert lines[0].startswith(
        f"{seed0}: holds a finished run (run key {seed0.name}, result.json) and this "
        "configuration is another (changed: train.epochs 1 -> 2); a finished run is not "
        "extended in place: give this configuration another output_dir"
    ), lines[0]
    assert f"add train.init_from={seed0} to start from its weights" in lines[0]
    assert snapshot(seed0) == before
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == runs_before
    (seed0 / "result.json").unlink()  # the folder of a run that has not finished
    refused = cli("harness.train", str(cfg), "train.seed=2", f"output_dir={seed0}", cwd=tmp_path, timeout=300)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr
    assert lines[0].startswith(f"{seed0}: holds the state of run key {seed0.name}, this configuration's run key is ")
    write(seed0 / "checkpoint.pth", b"\x80\x02garbage")  # damaged resume point of this very run
    damaged = cli("harness.train", str(cfg), f"output_dir={seed0}", cwd=tmp_path, timeout=300)
    lines = damaged.stderr.strip().splitlines()
    assert damaged.returncode == 2 and len(lines) == 1, damaged.stderr
    assert lines[0].startswith(f"{seed0 / 'checkpoint.pth'}: cannot be loaded (") and "move it away" in lines[0]


# ------------------------------------------------------------------------- stuck runs (item 4)
# The launcher under a parent that reaps its orphans late: PID 1 of this VM reaps a killed launcher's job
# 1-2 s after it dies (the relaunch decided within that window on an idle machine, and skipped it as in
# flight); a container's init may never reap it. Until then the job's pid is a zombie: ended, not alive.
LATE_REAPER = """
import ctypes, subprocess, sys
prctl = getattr(ctypes.CDLL(None), "prctl", None)
if prctl is not None:
    prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER (Linux): the launcher's orphans become this process's children
launcher = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
print(launcher.pid, flush=True)
print(launcher.wait(), flush=True)
sys.stdin.read()  # the orphans are reaped when this process ends: once the test closes stdin
"""


def test_runs_a_killed_launch_never_submitted_are_resubmitted(tmp_path: Path) -> None:
    """SIGKILL the launcher (and its job) while the first of two runs trains: the second is still
    SCHEDULED without a job. The next launch resubmits both, though the first job's process is not
    yet reaped (a zombie), and marks the dead launch KILLED."""
    spec = teacher_only(**{"scales/tiny/slurm/array_parallelism": 1})
    spec["stages"]["teacher"]["runs"] = {"variants": [{"name": "a"}, {"name": "b", "set": {"train.seed": 1}}]}
    path = write(tmp_path / "spec.yaml", spec)
    cmd = [
        sys.executable,
        "-m",
        "harness.launch",
        str(path),
        "--executor",
        "local",
        "--output-root",
        str(tmp_path / "runs"),
        "--tracking-uri",
        f"sqlite:///{tmp_path}/mlflow.db",
    ]
    reaper = subprocess.Popen(
        [sys.executable, "-c", LATE_REAPER, *cmd],
        cwd=tmp_path,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        launcher_pid = int(reaper.stdout.readline())
        log = tmp_path / "runs/mini/tiny/teacher/a/job.log"  # linked once run a's job is submitted
        deadline = time.time() + 120
        while not log.is_symlink() and time.time() < deadline:
            time.sleep(0.2)
        runs = train_runs(tmp_path)  # a job that starts at once replaces its placeholder: its run shows
        while not any(r.data.tags.get("job_id") for r in runs) and time.time() < deadline:  # the job id a moment later
            time.sleep(0.2)
            runs = train_runs(tmp_path)
        job = next(r.data.tags["job_id"] for r in runs if r.data.tags.get("job_id"))
        os.killpg(launcher_pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(job.split("_")[0]), signal.SIGKILL)
        assert reaper.stdout.readline().strip() == str(-signal.SIGKILL)  # the launcher is gone
        if sys.platform == "linux":  # the job's pid is a zombie while the next launch decides
            assert Path(f"/proc/{job.split('_')[0]}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
        states = sorted((r.info.status, bool(r.data.tags.get("job_id"))) for r in train_runs(tmp_path))
        assert states in ([("RUNNING", True), ("SCHEDULED", False)], [("SCHEDULED", False), ("SCHEDULED", True)])
        again = launch_local(tmp_path, path)
    finally:
        reaper.stdin.close()
        reaper.wait(timeout=30)
    assert again.returncode == 0, again.stderr
    assert re.search(r"teacher/a: MLflow says (RUNNING|SCHEDULED) but its job is gone; resubmitting", again.stderr), (
        again.stderr
    )
    assert "teacher/b: MLflow says SCHEDULED but it was never submitted (its launch was interrupted); resubmitting" in (
        again.stderr
    )
    assert "2 submitted" in again.stdout, again.stdout
    final = train_runs(tmp_path)
    assert len(final) == 2 and all(r.info.status == "FINISHED" for r in final)
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parents = {r.data.tags["mlflow.parentRunId"] for r in runs}
    assert {client.get_run(p).info.status for p in parents} == {"KILLED"}  # the dead launch, marked by the next


def test_a_job_that_fails_before_training_marks_its_run_failed_with_the_reason(tmp_path: Path) -> None:
    import torch

    weights = tmp_path / "wrong.pth"
    torch.save({"model": {"not_a_layer.weight": torch.zeros(2)}}, weights)  # loads, fits no model
    path = write(tmp_path / "spec.yaml", teacher_only(**{"stages/teacher/model.pretrained": str(weights)}))
    result = launch_local(tmp_path, path)
    assert result.returncode == 1, result.stderr
    (run,) = train_runs(tmp_path)
    assert run.info.status == "FAILED"  # not SCHEDULED forever, and a relaunch resubmits it
    assert "missing keys" in run.data.tags["error"] and str(weights) in run.data.tags["error"]


# ---------------------------------------------------------- cancel stops for good (item 5)
def test_cancel_stops_a_local_launch_and_its_job_and_the_next_launch_resumes(tmp_path: Path) -> None:
    spec = teacher_only(**{"base/train/epochs": 3, "scales/tiny/train/epochs": 3, "base/data/train_digits": 512})
    path = write(tmp_path / "spec.yaml", spec)
    cmd = [
        sys.executable,
        "-m",
        "harness.launch",
        str(path),
        "--executor",
        "local",
        "--output-root",
        str(tmp_path / "runs"),
        "--tracking-uri",
        f"sqlite:///{tmp_path}/mlflow.db",
    ]
    launcher = subprocess.Popen(
        cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    checkpoint = tmp_path / "runs/mini/tiny/teacher/teacher/checkpoint.pth"
    deadline = time.time() + 300
    while not checkpoint.exists() and time.time() < deadline:  # cancelled after its first epoch
        time.sleep(0.2)
    assert checkpoint.exists()
    (run,) = train_runs(tmp_path)
    job_pid = int(run.data.tags["job_id"].split("_")[0])
    cancelled = cli("harness.cancel", str(path), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", cwd=tmp_path)
    assert cancelled.returncode == 0, cancelled.stderr
    assert "teacher/teacher: local job" in cancelled.stdout and "KILLED" in cancelled.stdout
    assert launcher.wait(timeout=60) != 0
    deadline = time.time() + 60
    while time.time() < deadline and os.path.exists(f"/proc/{job_pid}"):
        time.sleep(0.2)
    assert not os.path.exists(f"/proc/{job_pid}") or open(f"/proc/{job_pid}/stat").read().split()[2] == "Z"
    (stopped,) = train_runs(tmp_path)
    assert stopped.info.status == "KILLED" and stopped.data.tags.get("cancelled")
    resumed = launch_local(tmp_path, path)
    assert resumed.returncode == 0, resumed.stderr
    (done,) = train_runs(tmp_path)
    assert done.info.run_id == run.info.run_id and done.info.status == "FINISHED"


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.5) -> None:
    deadline = time.time() + timeout_s
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(poll_s)


def squeue(job_ids: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_ids], capture_output=True, text=True).stdout.strip()


def slurm_state(job_id: str) -> str:
    states = sacct(job_id, "State")
    return states[0].split()[0] if states else ""


def without_accounting(tmp: Path) -> dict[str, str]:
    """The environment of a launcher whose jobs see a cluster without accounting (no slurmdbd):
    their `sacct` fails as it does there. The launcher keeps the real one (submitit asks it)."""
    shim = write(
        tmp / "no-accounting/sacct",
        "#!/bin/sh\necho 'sacct: error: Slurm accounting storage is disabled' >&2\nexit 1\n",
    )
    shim.chmod(0o755)
    job_env = {"SBATCH_EXPORT": f"ALL,PATH={shim.parent}:{os.environ['PATH']}"}  # sbatch --export for every job
    probe = subprocess.run(
        ["sbatch", "--wait", "--parsable", "-o", str(tmp / "probe.out"), "--wrap", "sacct"],
        env={**os.environ, **job_env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert probe.returncode != 0 and "accounting storage is disabled" in (tmp / "probe.out").read_text()
    return job_env


@pytest.mark.slurm
@needs_slurm
def test_scancel_stops_for_good_and_the_run_is_killed_not_requeued(tmp_path: Path) -> None:
    """Without accounting for the job (sacct fails in it): the controller (scontrol) says it is ending the job."""
    spec = teacher_only(**{"base/train/epochs": 3, "scales/tiny/train/epochs": 3, "base/data/train_digits": 512})
    path = write(tmp_path / "spec.yaml", spec)
    result = cli(
        "harness.launch",
        str(path),
        "--executor",
        "slurm",
        "--output-root",
        str(tmp_path / "runs"),
        "--tracking-uri",
        f"sqlite:///{tmp_path}/mlflow.db",
        cwd=tmp_path,
        env=without_accounting(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    (run,) = train_runs(tmp_path)
    job_id = run.data.tags["slurm_job_id"]
    checkpoint = tmp_path / "runs/mini/tiny/teacher/teacher/checkpoint.pth"
    wait_for(checkpoint.exists, 300, "the first checkpoint")
    subprocess.run(["scancel", job_id], check=True)
    wait_for(lambda: train_runs(tmp_path)[0].info.status == "KILLED", 90, "the run to be marked KILLED")
    wait_for(lambda: not squeue(job_id), 90, "the job to leave the queue")
    time.sleep(3)  # a requeued job would be back in the queue by now
    assert slurm_state(job_id) == "CANCELLED" and not squeue(job_id), sacct(job_id, "State,Restarts")
    (stopped,) = train_runs(tmp_path)
    assert stopped.info.status == "KILLED" and "requeued" not in stopped.data.tags
    (stderr,) = (tmp_path / "runs/mini/tiny/teacher/submitit").glob(f"{job_id}_*_log.err")
    assert "cancelled: signal 15" in stderr.read_text() and "not requeued" in stderr.read_text()
    assert re.search(rf"SLURM job {job_id} is (CANCELLED|COMPLETING) \(scontrol\)", stderr.read_text())


@pytest.mark.slurm
@needs_slurm
def test_harness_cancel_cancels_queued_and_running_slurm_jobs(tmp_path: Path) -> None:
    spec = spec_dict(**{"base/train/epochs": 3, "scales/tiny/train/epochs": 3, "base/data/train_digits": 512})
    path = write(tmp_path / "spec.yaml", spec)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = cli(
        "harness.launch",
        str(path),
        "--executor",
        "slurm",
        "--output-root",
        str(tmp_path / "runs"),
        "--tracking-uri",
        uri,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    jobs = {r.data.tags["slurm_job_id"] for r in train_runs(tmp_path)}
    assert len(train_runs(tmp_path)) == 3
    wait_for(lambda: any(slurm_state(j) == "RUNNING" for j in jobs), 120, "the teacher to start")
    cancelled = cli("harness.cancel", str(path), "--tracking-uri", uri, cwd=tmp_path)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.count("cancelled; MLflow run") == 3, cancelled.stdout
    arrays = {j.split("_")[0] for j in jobs}  # tasks that never started are accounted under their array
    wait_for(lambda: all(slurm_state(j) == "CANCELLED" for j in arrays), 90, "every job to be CANCELLED")
    runs = train_runs(tmp_path)
    assert {r.info.status for r in runs} == {"KILLED"} and all(r.data.tags.get("cancelled") for r in runs)
    wait_for(lambda: not squeue(",".join(sorted(jobs))), 90, "the jobs to leave the queue")


@pytest.mark.slurm
@needs_slurm
def test_a_relaunch_with_a_changed_teacher_cancels_the_old_teacher_and_students_jobs(tmp_path: Path) -> None:
    """The teacher trains, its students wait for it (afterok); a relaunch with another teacher seed
    changes every run key: the old teacher's and students' jobs are cancelled (not left to train
    students of the old teacher beside the new ones), their runs KILLED with the reason, and the
    folder is handed to the new teacher only once the old job has stopped writing to it."""
    spec = spec_dict(**{"base/train/epochs": 3, "scales/tiny/train/epochs": 3, "base/data/train_digits": 512})
    path = write(tmp_path / "spec.yaml", spec)
    args = (
        "--executor",
        "slurm",
        "--output-root",
        str(tmp_path / "runs"),
        "--tracking-uri",
        f"sqlite:///{tmp_path}/mlflow.db",
    )
    first = cli("harness.launch", str(path), *args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    folder = tmp_path / "runs/mini/tiny/teacher/teacher"
    wait_for((folder / "checkpoint.pth").exists, 300, "the old teacher's first checkpoint")
    old = {r.info.run_id: r for r in train_runs(tmp_path)}  # the teacher's own run (it replaced its placeholder)
    old_jobs = {r.data.tags["slurm_job_id"] for r in old.values()}
    again = cli("harness.launch", str(path), *args, "stages.teacher.train.seed=5", cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "3 submitted" in again.stdout, again.stdout
    for run in old.values():
        assert (
            f"{run.info.run_name}: superseded: the configuration changed (run key {run.data.tags['run_key']} -> "
            in again.stderr
        ), again.stderr
    runs = {r.info.run_id: r for r in train_runs(tmp_path)}
    assert len(runs) == 6
    for run_id, run in old.items():
        assert runs[run_id].info.status == "KILLED", runs[run_id].info
        assert "job " + run.data.tags["slurm_job_id"] + " cancelled" in runs[run_id].data.tags["superseded"]
    assert not squeue(",".join(sorted(old_jobs)))  # gone before the new teacher got the folder
    assert all(slurm_state(j) == "CANCELLED" for j in {j.split("_")[0] for j in old_jobs})
    new = [r for run_id, r in runs.items() if run_id not in old]
    assert {r.info.status for r in new} <= {"SCHEDULED", "RUNNING"} and not {
        r.data.tags["slurm_job_id"] for r in new
    } & old_jobs
    teacher = next(r for r in new if r.data.tags["stage"] == "teacher")
    assert json.loads((folder / "run.json").read_text())["run_key"] == teacher.data.tags["run_key"]
    (kept,) = folder.parent.glob("teacher.before-*")  # the old teacher's state, moved aside whole
    assert (kept / "checkpoint.pth").exists()
    assert json.loads((kept / "run.json").read_text())["run_key"] != teacher.data.tags["run_key"]
    cancelled = cli("harness.cancel", str(path), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", cwd=tmp_path)
    assert cancelled.returncode == 0, cancelled.stderr
    wait_for(
        lambda: not squeue(",".join(sorted(r.data.tags["slurm_job_id"] for r in new))),
        90,
        "the new jobs to leave the queue",
    )


@contextlib.contextmanager
def tiny_disk(path: Path, size: str) -> Iterator[Path]:
    """A real, nearly full file system: a tmpfs of `size` (needs root, as in CI)."""
    path.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def test_a_full_disk_is_one_line_naming_the_folder_and_the_run_is_failed(tmp_path: Path) -> None:
    cfg = write(
        tmp_path / "run.yaml",
        {
            "model": {"name": "dynamicvit_micro_patch4_32", "variant": "dense"},
            "data": {"name": "synthetic", "train_size": 32, "val_size": 16},
            "aug": {"mixup": 0, "cutmix": 0, "label_smoothing": 0, "auto_augment": None},
            "train": {"epochs": 1, "batch_size": 16},
            "losses": {"kl": 0, "token": 0},
            "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "visualize_images": 0, "experiment": "full"},
        },
    )
    with tiny_disk(tmp_path / "disk", "48k") as disk:
        result = cli("harness.train", str(cfg), f"output_dir={disk / 'run'}", cwd=tmp_path, timeout=300)
    lines = result.stderr.strip().splitlines()  # a new store, but none of MLflow's INFO lines on creating it
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{disk / 'run'}: no space left on the device (disk full) (traceback: "), lines
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("full").experiment_id])
    assert run.info.status == "FAILED" and "no space left on the device (disk full)" in run.data.tags["error"]


@pytest.mark.slurm
@needs_slurm
def test_students_waiting_on_a_failed_teacher_are_resubmitted_with_it(tmp_path: Path) -> None:
    """The teacher's job fails (its weights file is damaged); SLURM keeps the students' jobs pending
    forever (DependencyNeverSatisfied). Once the file is repaired, a relaunch cancels those jobs and
    submits the students again, behind the new teacher job."""
    weights = tmp_path / "teacher.pth"
    with zipfile.ZipFile(weights, "w") as archive:  # a valid zip that is no torch checkpoint
        archive.writestr("x/data.pkl", b"not a pickle")
    path = write(
        tmp_path / "spec.yaml",
        spec_dict(**{"stages/teacher/model.pretrained": str(weights), "stages/teacher/train": {"epochs": 0}}),
    )
    args = (
        "--executor",
        "slurm",
        "--output-root",
        str(tmp_path / "runs"),
        "--tracking-uri",
        f"sqlite:///{tmp_path}/mlflow.db",
    )
    first = cli("harness.launch", str(path), *args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    runs = {r.data.tags["row"]: r for r in train_runs(tmp_path)}
    teacher_job = runs["teacher"].data.tags["slurm_job_id"]
    student_job = runs["a/dynamic"].data.tags["slurm_job_id"]
    wait_for(lambda: slurm_state(teacher_job) == "FAILED", 180, "the teacher's job to fail")
    reason = ["squeue", "-h", "-j", student_job, "-o", "%r"]
    wait_for(
        lambda: "DependencyNeverSatisfied" in subprocess.run(reason, capture_output=True, text=True).stdout,
        60,
        "the students to wait forever",
    )
    weights.write_bytes((REPO / "checkpoints/tiny_teacher_dense.pth").read_bytes())  # repaired, same path
    again = cli("harness.launch", str(path), *args, "--wait", cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "3 submitted" in again.stdout, again.stdout
    final = train_runs(tmp_path)
    assert len(final) == 3 and {r.info.status for r in final} == {"FINISHED"}
    assert slurm_state(student_job.split("_")[0]) == "CANCELLED"


# ------------------------------------------------- search overrides after every layer (issue 16 item 6)
def test_search_overrides_take_effect_after_the_scale_layer(tmp_path: Path) -> None:
    """The tiny scale sets search.trials=4 and train.epochs=1; the command line wins over both."""
    spec = write(tmp_path / "search.yaml", search_spec_dict())
    args = ["--executor", "local", "--output-root", str(tmp_path / "runs"), "--dry-run"]
    plain = cli("harness.search", str(spec), *args, cwd=tmp_path)
    assert plain.returncode == 0 and "budget 4 trials" in plain.stdout, plain.stderr
    result = cli(
        "harness.search",
        str(spec),
        "search.trials=8",
        "train.epochs=3",
        "search.workers=3",
        "search.space.model.keep_ratio.low=0.6",
        *args,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "budget 8 trials" in result.stdout and "3 worker(s)" in result.stdout
    assert "float [0.6, 0.9]" in result.stdout  # the override merged into the spec's range
    from harness.search.spec import load_search

    plan = load_search(str(spec), ["search.trials=8", "train.epochs=3"], output_root=str(tmp_path / "runs"))
    assert plan.section.trials == 8 and plan.run.config.train.epochs == 3
    assert load_search(str(spec), ["search.trials=8"], trials=5).section.trials == 5  # --trials is the last word
