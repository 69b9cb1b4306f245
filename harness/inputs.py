"""Checks of the files and sizes a run configuration names, before anything is submitted.

A missing pretrained file, a text file given as weights or a batch that cannot fit in any
machine's memory would otherwise be found by the job, after the queue and possibly after a
whole earlier stage. Standard library only (no torch): the launcher's dry run and the bad-input
paths of every command stay fast.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from harness.config import RunConfig
from harness.errors import show
from harness.unpickle import refused_globals, refused_line

WEIGHT_FIELDS = ("model.pretrained", "teacher.checkpoint", "train.init_from", "teacher.run_dir")
FINAL_WEIGHTS = "model.pth"  # what a run folder given as weights must hold (harness.checkpointing.FINAL_WEIGHTS)
RESUME_POINT = "checkpoint.pth"  # a run still training or stopped half-way: never loaded as weights
MAX_BATCH = 1 << 16  # per process; the paper's is 128 (96 in 2021)
MAX_PIXELS = 4096 * 4096  # one image; ImageNet crops are 224 x 224, the tiny canvas 64 x 64


def _get(cfg: RunConfig, dotted: str) -> Any:
    """The value of a dotted field (a path, a size: Any, its type depends on the field)."""
    node: object = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _unsafe(path: Path) -> str | None:
    """The refusal of a checkpoint whose pickle would import a type not admitted (harness/unpickle.py).

    A pickle that cannot be read is left to the job, which says so in one line: the launcher
    refuses what would run code or build unknown objects, the cheap checks above the rest.
    """
    try:
        refused = refused_globals(path)
    except (ValueError, OSError):
        return None
    return refused_line(refused) if refused else None


def weights_problem(value: str) -> str | None:
    """Why `value` cannot be loaded as weights (a file, a run folder), or None. URLs are not fetched here."""
    if "://" in value:
        scheme = value.split("://", 1)[0]
        return None if scheme in ("http", "https") else f"only http(s) URLs can be fetched, got {show(value)}"
    path = Path(value).expanduser()
    if path.is_dir():
        weights = path / FINAL_WEIGHTS
        if not weights.is_file():
            why = (
                f"its run has not finished (a {RESUME_POINT} is a resume point, never used as weights)"
                if (path / RESUME_POINT).is_file()
                else "not a finished run"
            )
            return f"a folder without {FINAL_WEIGHTS}: {why}, got {show(value)}"
        refused = _unsafe(weights)  # the file the job would load: it must not run code either
        return f"{weights}: {refused}, got {show(value)}" if refused else None
    if not path.exists():
        where = "" if path.is_absolute() else f" (relative to the current folder {Path.cwd()})"
        return f"no such file{where}, got {show(value)}"
    if not path.is_file():
        return f"not a regular file, got {show(value)}"
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
    except OSError as err:
        return f"cannot be read ({err.strerror}), got {show(value)}"
    if not head:
        return f"an empty file, not a checkpoint, got {show(value)}"
    if head[:2] == b"PK" and not zipfile.is_zipfile(
        path
    ):  # torch's zip format: a truncated file has no central directory
        return f"a truncated or damaged checkpoint (not a valid zip archive), got {show(value)}"
    if head[:1] == b"\x80" or head[:2] == b"PK":  # torch's legacy (pickle) or zip format
        refused = _unsafe(path)  # a pickle that would import anything but tensors and plain data
        return f"{refused}, got {show(value)}" if refused else None
    kind = "a text file" if all(32 <= b < 127 or b in (9, 10, 13) for b in head) else "not a torch checkpoint"
    return f"{kind}, not a torch checkpoint, got {show(value)}"


def check_run_inputs(
    cfg: RunConfig, source: str, locate: Callable[[str], str], produced: Iterable[str] = ()
) -> list[str]:
    """One line per file this run reads that is missing or unusable, or size that cannot fit.

    `locate(field)` names where the value was set (a spec layer); `produced` lists fields that
    name another run's output folder, which does not exist before that run has finished.
    """
    problems = []
    skip = set(produced)
    for field in WEIGHT_FIELDS:
        value = _get(cfg, field)
        if value is None or field in skip:
            continue
        problem = weights_problem(str(value))
        if problem:
            problems.append(f"{source}: {locate(field)}: {problem}")
    for field, limit in (("train.batch_size", MAX_BATCH), ("train.eval_batch_size", MAX_BATCH)):
        value = _get(cfg, field)
        if value is not None and value > limit:
            problems.append(
                f"{source}: {locate(field)}: larger than any machine's memory allows "
                f"(at most {limit} per process), got {value}"
            )
    for field in ("data.img_size", "data.canvas"):
        value = _get(cfg, field)
        if value is not None and value * value > MAX_PIXELS:
            problems.append(
                f"{source}: {locate(field)}: an image of {value} x {value} pixels is too large "
                f"(at most {int(MAX_PIXELS**0.5)}), got {value}"
            )
    return problems
