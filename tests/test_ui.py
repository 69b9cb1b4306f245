"""The MLflow UI and optuna-dashboard as a user sees them, in a real browser.

Headless Chromium (Debian's package, installed by scripts/browser-local.sh; Playwright's Python client drives
it through `executable_path`, with a fresh profile per launch) against `mlflow server` on the store of a tiny
local launch (tests/test_launch.py's two-stage MINI spec, kept-token figures on) and `optuna-dashboard` on the
study of a real 3-trial search (tests/test_search.py's spec). The pages are React apps: every check waits for
an element by its text or role (Playwright's auto-waiting `expect`), never for a fixed time.

Screenshots: <pytest basetemp>/ui-screenshots/<test>-<step>.png (by default
/tmp/pytest-of-$USER/pytest-<N>/ui-screenshots/, or under --basetemp); `<test>-last.png` is the page where
the test ended, passed or failed.
"""

from __future__ import annotations

import copy
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from mlflow.entities import Run
from PIL import Image
from playwright.sync_api import Browser, Page, expect, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

from harness import search as search_cli
from harness.tracking import compare_url
from tests.servers import free_port, mlflow_server
from tests.test_launch import MINI, launch
from tests.test_launch import write_spec as write_launch_spec
from tests.test_search import run_search, spec_with
from tests.test_search import write_spec as write_search_spec

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
# What works on a machine with a closed network (without the background-networking flags Chromium keeps
# trying to reach Google's hosts); Playwright adds --headless and a fresh --user-data-dir itself.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
UI_DEFAULT = "http://127.0.0.1:5000"  # where the launch says `mlflow ui` serves a SQLite store
TIMEOUT_MS = 60_000  # a first render on 2 busy cores can take seconds; a missing element fails after this

pytestmark = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK),
    reason=f"no Chromium at {CHROMIUM}: run `bash scripts/browser-local.sh install` (CI does)",
)


# ------------------------------------------------------------------------------ browser
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def shot_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.getbasetemp() / "ui-screenshots"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture
def page(browser: Browser, shot_dir: Path, request: pytest.FixtureRequest) -> Iterator[Page]:
    """A fresh tab; its last state is saved as <test>-last.png even when a check fails."""
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    tab = context.new_page()
    tab.set_default_timeout(TIMEOUT_MS)
    expect.set_options(timeout=TIMEOUT_MS)
    yield tab
    tab.screenshot(path=shot_dir / f"{request.node.name}-last.png")
    context.close()


@pytest.fixture
def shot(page: Page, shot_dir: Path, request: pytest.FixtureRequest) -> Callable[[str], None]:
    """shot("step") saves the page as <test>-step.png."""
    return lambda step: page.screenshot(path=shot_dir / f"{request.node.name}-{step}.png")


# ------------------------------------------------------------------------------ stores
@dataclass(frozen=True)
class Launched:
    uri: str  # the mlflow server on the launch's store
    client: MlflowClient
    experiment_id: str
    runs: list[Run]  # every run of the experiment: the launch's parent run and its train runs
    stdout: str

    def named(self, name: str) -> Run:
        (run,) = [r for r in self.runs if r.info.run_name == name]
        return run

    def printed_url(self, label: str) -> str:
        """The UI address the launch printed after `label: `, moved to this test's server."""
        (url,) = [line.split(": ", 1)[1] for line in self.stdout.splitlines() if line.startswith(f"{label}: ")]
        assert url.startswith(UI_DEFAULT + "/#/"), url
        return self.uri + url[len(UI_DEFAULT) :]


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launched]:
    """MINI (a teacher, then two students, one epoch each: ~30 s) launched here with --wait, so that it also
    reports (Table 3's notebook, ~30 s) onto its parent run; its store served by mlflow."""
    root = tmp_path_factory.mktemp("ui-launch")
    spec = copy.deepcopy(MINI)
    spec["base"]["tracking"]["visualize_images"] = 2  # the kept-token figure of each pruned run
    spec["notebooks"] = ["analysis/notebooks/table3_notebook.ipynb"]
    result = launch(root, write_launch_spec(root, spec), "--executor", "local", "--wait")
    assert result.returncode == 0, result.stderr[-4000:]
    with mlflow_server(root) as server:  # the same root/mlflow.db the launch wrote
        client = MlflowClient(server.uri)
        experiment = client.get_experiment_by_name("mini")
        runs = client.search_runs([experiment.experiment_id])
        yield Launched(server.uri, client, experiment.experiment_id, runs, result.stdout)


@dataclass(frozen=True)
class Dashboard:
    uri: str
    study: optuna.Study


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    """A finished 3-trial search (one local worker, ~20 s), then the dashboard command the search printed."""
    tmp = tmp_path_factory.mktemp("ui-search")
    result = run_search(tmp, write_search_spec(tmp, spec_with(trials=3, workers=1)), "--executor", "local")
    assert result.returncode == 0, result.stderr[-4000:]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("dashboard: optuna-dashboard ")]
    storage = line.split(" ", 2)[2]
    port = free_port()
    log = tmp / "dashboard.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("optuna-dashboard")),
                storage,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"optuna-dashboard exited:\n{log.read_text()}"
            try:
                with urllib.request.urlopen(f"{uri}/api/studies", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, f"optuna-dashboard not up after 60 s:\n{log.read_text()}"
                time.sleep(0.25)
        yield Dashboard(uri, search_cli.open_study(storage, "mini_search-tiny"))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # gunicorn: the master and its worker
        proc.wait(timeout=30)


# ------------------------------------------------------------------------------ MLflow UI
def test_runs_table_lists_the_launch_with_its_child_runs(
    launched: Launched, page: Page, shot: Callable[[str], None]
) -> None:
    (parent,) = [r for r in launched.runs if r.data.tags.get("kind") == "launch"]
    children = sorted(
        r.info.run_name for r in launched.runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    )
    assert children == ["students/dynamic", "students/static", "teacher/teacher"]
    # The page the launch printed (for a SQLite store, on `mlflow ui`'s default address: here, our server's).
    page.goto(launched.printed_url("runs table"))
    # the UI's model-training mode ("Runs"), not its GenAI mode, where the same table is "Training runs"
    expect(page.get_by_role("heading", name="Runs", exact=True)).to_be_visible()
    parent_row = page.get_by_role("row").filter(has=page.get_by_role("link", name=parent.info.run_name, exact=True))
    expect(parent_row).to_be_visible()
    child_links = [page.get_by_role("link", name=name, exact=True) for name in children]
    for link in child_links:  # nested under the parent: hidden until it is expanded
        expect(link).to_have_count(0)
    shot("collapsed")
    parent_row.get_by_role("button").first.click()  # the expander left of the parent's name
    for link in child_links:
        expect(link).to_be_visible()
    shot("expanded")


def metric_cells(page: Page, metric: str) -> list[str]:
    """The compare view's values of `metric`, one per run, left to right.

    The view draws metric names and values as two virtualized grids that scroll separately (and, scrolled
    by a wheel, out of step by a row): a row is found by its offset, the same in both grids.
    """
    expect(page.get_by_role("grid")).to_have_count(2)
    names, values = page.get_by_role("grid").all()
    link = names.get_by_role("link", name=metric, exact=True)
    values.hover()
    page.mouse.wheel(0, -100_000)
    for _ in range(100):  # the names grid draws only the rows near its scroll position, and follows a wheel
        try:
            link.wait_for(state="attached", timeout=1_000)
            break
        except PlaywrightTimeoutError:
            values.hover()
            page.mouse.wheel(0, 135)
    expect(link).to_have_count(1)
    top = link.evaluate("a => a.parentElement.offsetTop")
    values.evaluate("(grid, top) => { grid.scrollTop = top; }", top)
    cells_js = (
        "([grid, top]) => [...grid.querySelectorAll('[role=rowgroup] > *')]"
        ".filter(c => c.offsetTop === top).sort((a, b) => a.offsetLeft - b.offsetLeft).map(c => c.innerText)"
    )
    page.wait_for_function(f"args => ({cells_js})(args).length > 0", arg=[values.element_handle(), top])
    return values.evaluate(f"(grid, top) => ({cells_js})([grid, top])", top)


def test_compare_view_of_a_stage_shows_val_acc1_and_the_params_that_differ(
    launched: Launched, page: Page, shot: Callable[[str], None]
) -> None:
    students = sorted(
        (r for r in launched.runs if r.data.tags.get("stage") == "students"), key=lambda r: r.info.run_name
    )
    assert [r.info.run_name for r in students] == ["students/dynamic", "students/static"]
    # The launch's own compare link: every run it ran.
    page.goto(launched.printed_url("compare the runs of this launch"))
    expect(page.get_by_role("heading", name="Comparing 3 Runs from 1 Experiment")).to_be_visible()
    names = page.get_by_role("row").filter(has=page.get_by_text("Run Name:", exact=True))
    for name in ("teacher/teacher", "students/dynamic", "students/static"):
        expect(names.get_by_role("cell", name=name, exact=True)).to_be_visible()
    # One stage: the two students.
    page.goto(compare_url(launched.uri, launched.experiment_id, [r.info.run_id for r in students]))
    expect(page.get_by_role("heading", name="Comparing 2 Runs from 1 Experiment")).to_be_visible()

    # The parallel-coordinates plot: the params that differ (MLflow's default axes) and val/acc1, picked by hand.
    page.get_by_text("Metrics:", exact=True).locator("xpath=following-sibling::*[1]").click()
    page.keyboard.type("val/acc1")
    page.get_by_title("val/acc1", exact=True).click()
    page.keyboard.press("Escape")
    plot = page.locator(".js-plotly-plot")
    expect(plot.locator("text", has_text=re.compile(r"^val/acc1$"))).to_be_visible()
    expect(plot.locator("text", has_text=re.compile(r"^model\.variant$"))).to_be_visible()
    shot("plot")

    # The parameter table with "Show diff only": exactly the params whose values differ, with both values.
    params = [r.data.params for r in students]
    differ = sorted(k for k in set(params[0]) | set(params[1]) if params[0].get(k) != params[1].get(k))
    assert "model.variant" in differ and "data.name" not in differ
    page.get_by_role("switch", name="Parameters - Show diff only").click()
    table = page.get_by_role("table").filter(has=page.get_by_role("rowheader", name="model.variant", exact=True))
    expect(table.get_by_role("rowheader")).to_have_count(len(differ))
    assert sorted(table.get_by_role("rowheader").all_inner_texts()) == differ
    variant = table.get_by_role("row").filter(has=page.get_by_role("rowheader", name="model.variant", exact=True))
    expect(variant.get_by_role("cell")).to_have_text(["dynamic", "static"])
    table.scroll_into_view_if_needed()
    shot("params")

    # The metric table: val/acc1 with each run's value, in run order.
    # params_m differs between the students (the static predictor is smaller): the columns' order shows.
    for metric in ("val/acc1", "params_m"):
        shown = [float(text) for text in metric_cells(page, metric)]  # the UI rounds to 3 decimals or 4 digits
        assert shown == pytest.approx([r.data.metrics[metric] for r in students], rel=1e-3, abs=5e-4), metric


def test_run_page_shows_the_kept_token_figure(launched: Launched, page: Page, shot: Callable[[str], None]) -> None:
    run = launched.named("students/dynamic")
    assert "kept_tokens.png" in [a.path for a in launched.client.list_artifacts(run.info.run_id)]
    local = launched.client.download_artifacts(run.info.run_id, "kept_tokens.png")
    width, height = Image.open(local).size
    page.goto(f"{launched.uri}/#/experiments/{launched.experiment_id}/runs/{run.info.run_id}")
    expect(page.get_by_role("heading", name="students/dynamic")).to_be_visible()
    page.get_by_role("tab", name="Artifacts").click()
    page.get_by_text("kept_tokens.png", exact=True).first.click()
    figure = page.get_by_role("img", name="kept_tokens.png")
    expect(figure).to_be_visible()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=figure.element_handle())
    assert figure.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [width, height]
    shot("figure")


def test_launch_run_shows_the_reproduced_table_its_figures_and_metrics(
    launched: Launched, page: Page, shot: Callable[[str], None]
) -> None:
    (parent,) = [r for r in launched.runs if r.data.tags.get("kind") == "launch"]
    rows = [k.split("/", 1)[1].rsplit("/", 1)[0] for k in parent.data.metrics if k.endswith("/top1")]
    assert {"a/dynamic", "a/static"} <= set(rows), sorted(parent.data.metrics)
    # The page the launch printed after its report (moved to this test's server).
    (line,) = [line for line in launched.stdout.splitlines() if line.startswith("MLflow: the report ")]
    url = line.rsplit(" ", 1)[1]
    assert url.startswith(f"{UI_DEFAULT}/#/experiments/{launched.experiment_id}/runs/{parent.info.run_id}?"), line
    page.goto(launched.uri + url[len(UI_DEFAULT) :])
    expect(page.get_by_role("heading", name=parent.info.run_name)).to_be_visible()
    for row in ("a/dynamic", "a/static"):  # the overview's metrics list the table's rows
        expect(page.get_by_text(f"table/{row}/top1", exact=True).first).to_be_visible()
    shot("metrics")
    page.get_by_role("tab", name="Artifacts").click()
    page.get_by_text("report", exact=True).first.click()
    page.get_by_text("table3.html", exact=True).first.click()
    table = page.frame_locator("iframe").first.get_by_role("table")  # MLflow shows an HTML artifact in a frame
    expect(table.get_by_role("cell", name="a/dynamic", exact=True)).to_be_visible()
    shot("table")
    page.get_by_text("figures", exact=True).first.click()
    page.get_by_text("table3_gaps.png", exact=True).first.click()
    figure = page.get_by_role("img", name="table3_gaps.png")
    expect(figure).to_be_visible()
    page.wait_for_function("img => img.complete && img.naturalWidth > 100", arg=figure.element_handle())
    shot("figure")


# ------------------------------------------------------------------------------ optuna-dashboard
def test_optuna_dashboard_lists_the_study_and_its_trials(
    dashboard: Dashboard, page: Page, shot: Callable[[str], None]
) -> None:
    trials = dashboard.study.trials
    assert len(trials) == 3 and all(t.state.name == "COMPLETE" for t in trials)
    page.goto(f"{dashboard.uri}/dashboard")
    study_link = page.get_by_role("link").filter(has_text="mini_search-tiny")
    expect(study_link).to_be_visible()
    shot("studies")
    study_link.click()
    expect(page.get_by_text("mini_search-tiny (id=")).to_be_visible()
    page.get_by_role("link", name="Trials (List)").click()  # an icon in the collapsed side bar
    expect(page.get_by_text("3 Trials", exact=True)).to_be_visible()
    pareto = {t.number for t in dashboard.study.best_trials}  # two objectives: the dashboard marks the front
    assert pareto
    for trial in trials:
        item = page.get_by_role("listitem").filter(has_text=re.compile(rf"^Trial {trial.number}(?!\d)"))
        best = r"\s*Best Trial" if trial.number in pareto else ""
        expect(item).to_have_text(re.compile(rf"^Trial {trial.number}\s*Complete{best}$"))
    shot("trials")
