"""A report's results on the launch's MLflow parent run, where people browsing MLflow look.

After the notebooks of a report have run (`analysis.report.run_notebooks`), `publish` puts on the
parent run of the launch (or search) the report was made for, under the artifact folder `report/`:

    report/<stem>.md, .html, .tex, .csv      each notebook's table (the HTML rendered from the Markdown)
    report/figures/*.png                    the figures this report wrote
    report/notebook/<stem>.ipynb, .html     each executed notebook, and its HTML (nbconvert)

and the table's headline numbers as metrics: `table/<row>/top1` (reproduced top-1), `table/<row>/gap`
(gap to the anchor row) and `table/<row>/std` where the row has several seeds. The folder is deleted
before it is logged again, so that a re-run of the report replaces it instead of piling up copies;
the metrics are logged again at step 0 (MLflow shows the latest). Which parent run: the one the
caller names (a launch or search just made), else the most recent `kind=launch` or `kind=search`
run of the experiment at that scale.
"""

from __future__ import annotations

import html
import math
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric

from analysis import tables
from harness.files import PathLike

FOLDER = "report"
_METRIC_UNSAFE = re.compile(r"[^\w\-. /:]")  # what MLflow refuses in a metric name
_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body {{ font-family: sans-serif; margin: 1.5em; }} table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; }} td {{ text-align: right; }}
td:first-child, td:nth-child(2) {{ text-align: left; }} th {{ background: #f3f3f3; }}</style>
</head><body>
{body}
</body></html>
"""


class NoParentRun(ValueError):
    """The experiment has no launch or search run at that scale to put the report on."""


@dataclass
class Published:
    """What `publish` logged, and where (the printed line names the run's page)."""

    run_id: str
    run_name: str
    url: str
    artifacts: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    chosen: str = ""  # how the run was chosen, when the caller did not name it

    def line(self) -> str:
        how = f" ({self.chosen})" if self.chosen else ""
        return (
            f"MLflow: the report (table, {sum(a.startswith(FOLDER + '/figures/') for a in self.artifacts)} "
            f"figures, notebook, {len(self.metrics)} metrics) is on parent run {self.run_name}{how}: {self.url}"
        )


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The UI page of one run, in the UI's model-training mode (as the launch's runs-table link)."""
    from harness.tracking import _TRAINING_MODE, ui_base

    return f"{ui_base(tracking_uri)}/#/experiments/{experiment_id}/runs/{run_id}?{_TRAINING_MODE}"


def find_parent(tracking_uri: str, experiment: str, scale: str) -> tuple[str, str]:
    """The most recent launch or search run of `experiment` at `scale`; (run id, how it was chosen)."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise NoParentRun(f"name: no MLflow experiment of that name, got {experiment!r}")
    parents = [
        run
        for kind in ("launch", "search")
        for run in client.search_runs(
            [found.experiment_id],
            f"tags.kind = '{kind}' and tags.scale = '{scale}'",
            order_by=["attributes.start_time DESC"],
            max_results=1000,
        )
    ]
    if not parents:
        raise NoParentRun(
            f"no launch or search run of experiment {experiment!r} at scale {scale!r} to put the report on"
        )
    newest = max(parents, key=lambda run: run.info.start_time)
    note = (
        f"the most recent of {len(parents)} launch/search runs of {experiment} at scale {scale}"
        if len(parents) > 1
        else f"the one launch/search run of {experiment} at scale {scale}"
    )
    return newest.info.run_id, note


def table_html(markdown: str, title: str) -> str:
    """A stand-alone HTML page of a Markdown table (mistune, which nbconvert brings, with its table plugin)."""
    import mistune

    render = mistune.create_markdown(plugins=["table"])
    return _PAGE.format(title=html.escape(title), body=render(markdown))


def notebook_html(path: Path) -> str:
    """The executed notebook as one HTML page (its figures embedded), as Jupyter exports it."""
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_filename(str(path))
    return body


def headline_metrics(csv: Path) -> dict[str, float]:
    """`table/<row>/top1`, `/gap` and `/std` (only where a row has several seeds) of a table's CSV;
    rows without a reproduced number are left out. Empty for a CSV that is not a paper table."""
    frame = pd.read_csv(csv)
    if not {tables.ROW, tables.TOP1_REPRO}.issubset(frame.columns):
        return {}
    metrics: dict[str, float] = {}
    for _, row in frame.iterrows():
        name = _METRIC_UNSAFE.sub("_", str(row[tables.ROW]))
        for suffix, column in (("top1", tables.TOP1_REPRO), ("gap", tables.GAP_REPRO), ("std", tables.STD)):
            value = row.get(column)
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                metrics[f"table/{name}/{suffix}"] = float(value)
    return metrics


def stage(output_dir: Path, stems: list[str], since: float, into: Path) -> dict[str, float]:
    """Lay the report's files out under `into` as they go to MLflow; returns the headline metrics."""
    metrics: dict[str, float] = {}
    (into / "figures").mkdir(parents=True)
    (into / "notebook").mkdir()
    for stem in stems:
        markdown = output_dir / f"{stem}.md"
        for suffix in (".md", ".tex", ".csv"):
            if (output_dir / f"{stem}{suffix}").is_file():
                shutil.copy2(output_dir / f"{stem}{suffix}", into / f"{stem}{suffix}")
        (into / f"{stem}.html").write_text(table_html(markdown.read_text(), stem))
        if (output_dir / f"{stem}.csv").is_file():
            metrics.update(headline_metrics(output_dir / f"{stem}.csv"))
        executed = output_dir / f"{stem}.ipynb"
        if executed.is_file():
            shutil.copy2(executed, into / "notebook" / executed.name)
            (into / "notebook" / f"{stem}.html").write_text(notebook_html(executed))
    for png in sorted(output_dir.glob("*.png")):
        if png.stat().st_mtime >= since - 1:  # this report's figures, not an older report's left in the folder
            shutil.copy2(png, into / "figures" / png.name)
    return metrics


def publish(
    tracking_uri: str, output_dir: PathLike, stems: list[str], since: float, run_id: str, chosen: str = ""
) -> Published:
    """Replace the run's `report/` artifacts and log the headline metrics (see the module doc).

    `stems`: the notebooks' report names (`analysis.report.report_name`: each wrote `<stem>.md` and was
    kept executed as `<stem>.ipynb` in `output_dir`); `since`: when the report
    started (figures older than that are not this report's); `chosen`: how the run was chosen, for the line.
    """
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    with tempfile.TemporaryDirectory(prefix="report-") as tmp:
        staged = Path(tmp) / FOLDER
        metrics = stage(Path(output_dir), stems, since, staged)
        get_artifact_repository(run.info.artifact_uri, tracking_uri=tracking_uri).delete_artifacts(FOLDER)
        client.log_artifacts(run_id, str(staged), FOLDER)
        artifacts = sorted(p.relative_to(tmp).as_posix() for p in staged.rglob("*") if p.is_file())
    now = int(time.time() * 1000)
    items = [Metric(key, value, now, 0) for key, value in metrics.items()]
    for start in range(0, len(items), 1000):  # MLflow's limit per log_batch
        client.log_batch(run_id, metrics=items[start : start + 1000])
    return Published(
        run_id,
        run.info.run_name or run_id,
        run_url(tracking_uri, run.info.experiment_id, run_id),
        artifacts,
        metrics,
        chosen,
    )
