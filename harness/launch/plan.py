"""What a launch would do, shown and checked before anything is written: the dry-run table and the
checks of the notebooks, the paper table and the output folders a spec names."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any

from harness.config import ConfigError
from harness.spec import Expanded, RunPlan, differing_values


def render_table(expanded: Expanded) -> str:
    """One row per run: stage, name, row, key, recipe, the values that differ between runs, resources."""
    varying = [k for k in differing_values(expanded.runs) if k != "recipe"]
    header = ["stage", "name", "row", "key", "recipe", *varying, "resources"]
    rows = []
    for plan in expanded.runs:
        flat = _flat(plan)
        rows.append(
            [
                plan.stage,
                plan.name,
                plan.row,
                plan.key,
                plan.config.recipe,
                *(str(flat.get(k)) for k in varying),
                plan.slurm.describe(),
            ]
        )
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in [header, *rows]]
    stages = " -> ".join(expanded.stage_order)
    title = f"{expanded.spec.name} ({expanded.scale}): {len(expanded.runs)} runs in stages {stages}"
    return "\n".join([title, *lines])


def _flat(plan: RunPlan) -> dict[str, Any]:
    from harness.config import flatten

    return flatten(plan.config.model_dump(exclude={"output_dir", "tracking"}))


def check_report_inputs(expanded: Expanded) -> None:
    """The spec's notebooks and paper table must exist before any run trains for them."""
    spec, path = expanded.spec, expanded.path
    if not spec.notebooks:
        return
    from analysis.report import ReportError, resolve_notebook

    problems = []
    for index, notebook in enumerate(spec.notebooks):
        try:
            resolve_notebook(notebook)
        except ReportError:
            problems.append(f"{path}: notebooks[{index}]: no such notebook, got {notebook!r}")
    if spec.table:
        from analysis.reference import resolve_table

        try:
            resolve_table(spec.table)
        except KeyError as err:
            problems.append(f"{path}: {err.args[0]}")
    if problems:
        raise ConfigError(problems)


def check_output_root(root: Path) -> None:
    """The output root must be a writable folder (created if missing) before anything is submitted."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError([f"--output-root: cannot create the folder ({err.strerror}), got {str(root)!r}"]) from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise ConfigError([f"--output-root: not writable, got {str(root)!r}"])


def check_run_folders(expanded: Expanded, root: Path) -> None:
    """Every run folder's existing part must be a folder: a symlink loop or a file in the way is
    refused before any MLflow run is created (it would otherwise fail the launch half-way)."""
    for folder in sorted({plan.output_dir for plan in expanded.runs}):
        for part in [*reversed(folder.parents), folder]:
            if part != root and root not in part.parents:
                continue
            try:
                is_dir = stat.S_ISDIR(os.stat(part).st_mode)
            except FileNotFoundError:
                break  # created later, with everything below it
            except OSError as err:  # ELOOP: a symlink loop; EACCES: a folder nobody may enter
                raise ConfigError(
                    [
                        f"--output-root: {part}: {(err.strerror or str(err)).lower()}"
                        f"{' (a symlink loop)' if err.errno == errno.ELOOP else ''}, "
                        f"got {str(root)!r}"
                    ]
                ) from None
            if not is_dir:
                raise ConfigError(
                    [f"--output-root: {part}: not a folder (a run folder lies under it), got {str(root)!r}"]
                )
