"""Regenerate a spec's report: execute its notebook(s) headless, print the Markdown table.

    python -m analysis.report experiments/table3.yaml [--scale tiny] [--tracking-uri URI]
                                                      [--output-dir DIR]

The notebooks live in analysis/notebooks/, each `<name>_notebook.ipynb` with its jupytext `.py`
pair (the suffix keeps their names from colliding with any module). Each gets the papermill
parameters `tracking_uri`, `experiment` (the spec name), `scale` and `output_dir` (plus `table`
when the spec names one) and writes `<output_dir>/<name>.{md,tex,csv}` and its figures; the
executed notebook goes there as `<name>.ipynb`.
Default output: `reports/<spec>/<scale>/` under the current directory. Then the same results go
to MLflow (`analysis.mlflow_report`): the tables (Markdown and HTML), figures, executed notebooks
(ipynb and HTML) and the headline numbers as metrics on the most recent launch (or search) parent
run of the spec at that scale, replacing what an earlier report put there; the last line printed
names that run and its page. A store without such a run keeps the report on disk only (said on stderr).
Exit codes: 0 done, 1 a notebook failed or the tracking server did not answer, 2 invalid input
(one line on stderr: an unknown scale, a missing notebook or table, a store that does not exist).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import EXIT_FAILED, EXIT_INVALID, handle
from harness.files import PathLike

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_SUFFIX = "_notebook"  # analysis/notebooks/<name>_notebook.ipynb writes the report files <name>.*


class ReportError(ValueError):
    """Invalid input, said in one line: `path: field: problem, got X`."""


@dataclass
class ReportSpec:
    """The few spec keys a report needs (until `harness.spec.load_spec` provides them)."""

    name: str
    table: str | None = None
    default_scale: str | None = None
    notebooks: list[str] = field(default_factory=list)
    scales: list[str] = field(default_factory=list)


def read_report_spec(path: PathLike) -> ReportSpec:
    """The spec's `name`, `table`, `default_scale` and `notebooks`, read by `harness.spec.load_spec`
    (so a report refuses exactly the specs the launcher refuses)."""
    from harness.config import ConfigError
    from harness.spec import load_spec

    try:
        spec = load_spec(str(path))
    except ConfigError as err:
        raise ReportError(str(err)) from None
    default = f"analysis/notebooks/{spec.name}{NOTEBOOK_SUFFIX}.ipynb"
    notebooks = spec.notebooks or [default]  # absent or [] -> the default
    return ReportSpec(spec.name, spec.table, spec.default_scale, notebooks, list(spec.scales))


def resolve_notebook(path: str, spec_path: PathLike = "") -> Path:
    """A notebook path as given, else relative to the repository root (where `analysis/` lives)."""
    for candidate in (Path(path), REPO / path):
        if candidate.is_file():
            return candidate.resolve()
    prefix = f"{spec_path}: " if spec_path else ""
    raise ReportError(f"{prefix}notebooks: no such notebook, got {path!r}")


def report_name(notebook: PathLike) -> str:
    """The name of a notebook's report files: its stem less `_notebook` (`table3_notebook.ipynb`
    writes `table3.md` and is kept executed as `table3.ipynb`), the name MLflow shows them under."""
    return Path(notebook).stem.removesuffix(NOTEBOOK_SUFFIX)


def run_notebooks(
    spec_name: str, scale: str, tracking_uri: str, notebooks: list[str], output_dir: str, table: str | None = None
) -> str:
    """Execute each notebook with papermill (kernel python3, cwd = repo root); return their tables.

    The returned Markdown is each notebook's `<output_dir>/<name>.md` (`report_name`), read back
    from disk, so it is exactly what the notebook wrote. Raises papermill's PapermillExecutionError when
    a cell fails; the executed notebook (with the traceback) is kept in `output_dir`.
    """
    import papermill
    from traitlets.config import Config

    # the kernel talks over local sockets (IPC), not TCP: nothing to eavesdrop on, and no
    # "Kernel is running over TCP without encryption" warning in every report
    kernel = Config({"KernelManager": {"transport": "ipc"}})
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    texts = []
    for notebook in notebooks:
        source = resolve_notebook(notebook)
        parameters = {"tracking_uri": tracking_uri, "experiment": spec_name, "scale": scale, "output_dir": str(out)}
        if table:
            parameters["table"] = table
        name = report_name(source)
        papermill.execute_notebook(
            str(source),
            str(out / f"{name}.ipynb"),
            parameters=parameters,
            kernel_name="python3",
            cwd=str(REPO),
            progress_bar=False,
            log_output=False,
            config=kernel,
        )
        written = out / f"{name}.md"
        if not written.is_file():
            raise RuntimeError(f"{source}: ran, but wrote no {written} (each notebook must write <name>.md)")
        texts.append(written.read_text())
    return "\n".join(texts)


def make_report(
    spec_name: str,
    scale: str,
    tracking_uri: str,
    notebooks: list[str],
    output_dir: str,
    table: str | None = None,
    parent_run_id: str | None = None,
    chosen: str = "",
) -> tuple[str, str]:
    """Run the notebooks, then put their results on the MLflow run `parent_run_id` (`analysis.mlflow_report`).

    Returns (the tables' Markdown, the line naming the parent run and its page; "" without a run).
    `chosen`: how the run was chosen, said in that line (`mlflow_report.find_parent`).
    """
    from analysis.mlflow_report import publish

    started = time.time()
    markdown = run_notebooks(spec_name, scale, tracking_uri, notebooks, output_dir, table)
    if parent_run_id is None:
        return markdown, ""
    stems = [report_name(resolve_notebook(n)) for n in notebooks]
    published = publish(tracking_uri, output_dir, stems, started, parent_run_id, chosen)
    return markdown, published.line()


def _check_store(tracking_uri: str, experiment: str, source: str = "--tracking-uri") -> None:
    """Refuse before starting a kernel: a missing SQLite file or experiment is a typo, not an empty table."""
    from harness.config import ConfigError
    from harness.store import bound_requests, open_store

    bound_requests()
    try:
        open_store(tracking_uri, source, write=False)  # waits while a launch sets the store up
    except ConfigError as err:
        raise ReportError(str(err)) from None
    from analysis.collect import experiment_exists  # MLflow: imported once the store is known to be there

    try:
        exists = experiment_exists(tracking_uri, experiment)
    except Exception as err:  # unreachable server, not a database, ...
        raise ReportError(
            f"--tracking-uri: cannot read the tracking store ({type(err).__name__}), got {tracking_uri!r}"
        ) from None
    if not exists:
        raise ReportError(f"name: no MLflow experiment of that name at {tracking_uri}, got {experiment!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("spec", help="experiment spec YAML (reads name, table, default_scale, notebooks)")
    parser.add_argument("--scale", help="tiny, paper or imagenet100 (default: the spec's default_scale, else tiny)")
    parser.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    parser.add_argument("--output-dir", help="where tables and figures go (default: reports/<spec>/<scale>/)")
    args = parser.parse_args(argv)
    return handle("analysis.report", lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    try:
        spec = read_report_spec(args.spec)
        scale = args.scale or spec.default_scale or "tiny"
        if spec.scales and scale not in spec.scales:
            raise ReportError(
                f"--scale: not a scale of {args.spec} (its scales: {', '.join(spec.scales)}), got {scale!r}"
            )
        notebooks = [str(resolve_notebook(n, args.spec)) for n in spec.notebooks]
        if spec.table is not None:
            from analysis.reference import resolve_table

            try:
                resolve_table(spec.table)
            except KeyError as err:
                raise ReportError(f"{args.spec}: {err.args[0]}") from None
        from harness.store import resolve_uri

        uri, source = resolve_uri(args.tracking_uri)
        _check_store(uri, spec.name, source)
    except ReportError as err:
        print(err, file=sys.stderr)
        return EXIT_INVALID
    output_dir = args.output_dir or f"reports/{spec.name}/{scale}"
    from papermill.exceptions import PapermillExecutionError

    from analysis.mlflow_report import NoParentRun, find_parent

    parent, chosen = None, ""
    try:
        parent, chosen = find_parent(uri, spec.name, scale)
    except NoParentRun as err:  # runs trained by hand, say: the report stays on disk
        print(f"{args.spec}: not put on MLflow: {err}; the report stays in {output_dir}/", file=sys.stderr)
    try:
        markdown, where = make_report(spec.name, scale, uri, notebooks, output_dir, spec.table, parent, chosen)
    except PapermillExecutionError as err:
        print(
            f"{args.spec}: notebook failed at cell {err.exec_count}: {err.ename}: {err.evalue} "
            f"(see the executed notebook in {output_dir})",
            file=sys.stderr,
        )
        return EXIT_FAILED
    print(markdown, end="")
    if where:
        print(where)
    return 0


if __name__ == "__main__":
    sys.exit(main())
