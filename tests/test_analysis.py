"""analysis/: the paper's numbers, collecting runs from MLflow, tables, figures, notebooks, report CLI.

The MLflow store is a real SQLite file in a temporary folder (no mocks). Two kinds of runs:
- FIXTURES standing in for training results: made directly with MlflowClient, with the tags,
  params and metrics the launcher and engine set (see `_fixture_run`). Their accuracies are
  invented; they exercise averaging over seeds, missing rows, failed/duplicate/launch runs.
- One REAL run: `python -m harness.train` for 1 epoch of the tiny static variant, tagged as
  the a/static row, so that the kept-token heat maps and the static keep map are drawn from a
  real `model.pth` and `config.yaml`.
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jupytext
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from analysis import collect, figures, report, tables
from analysis.reference import load_reference

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "table3"
TABLE_NAME = "sparsification-strategies"

# the row ids the experiment specs tag their runs with (the brief's contract)
PAPER_ROWS = {
    "table3": [
        "a/structural",
        "a/static",
        "a/dynamic",
        "b/random",
        "b/attention",
        "b/predictor",
        "c/1-stage",
        "c/2-stage",
        "c/3-stage",
    ],
    "table1": [
        "deit-s/1.0",
        "deit-s/0.9",
        "deit-s/0.8",
        "deit-s/0.7",
        "lvvit-s/1.0",
        "lvvit-s/0.9",
        "lvvit-s/0.8",
        "lvvit-s/0.7",
        "lvvit-m/1.0",
        "lvvit-m/0.9",
        "lvvit-m/0.8",
        "lvvit-m/0.7",
        "deit-256/0.7",
        "deit-b/1.0",
        "deit-b/0.7",
    ],
    "losses": [
        "full",
        "no-token",
        "no-kl",
        "no-both",
        "lvvit-s/full",
        "lvvit-s/no-token",
        "lvvit-s/no-kl",
        "lvvit-s/no-both",
    ],
}

TINY_RUN = {
    "model": {"name": "dynamicvit_tiny_patch8_64", "variant": "static", "keep_ratio": 0.7},
    "data": {"name": "cluttered_mnist", "train_digits": 256, "val_digits": 64, "val_placements": 1},
    "aug": {"mixup": 0.0, "cutmix": 0.0, "label_smoothing": 0.0},
    "optim": {
        "lr": 1e-3,
        "warmup_epochs": 0,
        "backbone_lr_scale": 1.0,
        "backbone_freeze_epochs": 0,
        "freeze": [],
        "lr_base_batch": 64,
    },
    "losses": {"kl": 0, "token": 0},  # no teacher needed
    "train": {"epochs": 1, "batch_size": 32},
}


# ----------------------------------------------------------------------------- the store
def _fixture_run(
    client: MlflowClient,
    experiment_id: str,
    parent: str,
    *,
    row: str | None,
    seed: int,
    acc1: list[float],
    variant: str = "dynamic",
    scale: str = "tiny",
    kind: str | None = "train",
    status: str = "FINISHED",
    run_key: str | None = None,
    end_time: int | None = None,
    gflops: float = 0.0396,
    log_best: bool = False,
) -> str:
    """A FIXTURE standing in for one training run: tags, params and metrics as the launcher logs them.

    `log_best`: also the running best (`val/acc1_best`, `val/acc1_best_epoch`) per epoch, as the
    engine logs it today; without it the run looks like one logged before the engine did."""
    run_id = client.create_run(experiment_id).info.run_id
    tags = {
        "mlflow.parentRunId": parent,
        "spec": EXPERIMENT,
        "table": TABLE_NAME,
        "variant": variant,
        "scale": scale,
        "stage": "students",
        "run_key": run_key or f"key-{run_id[:8]}",
    }
    if kind is not None:
        tags["kind"] = kind
    if row is not None:
        tags["row"] = row
    params = {
        "model.name": "dynamicvit_tiny_patch8_64",
        "model.variant": variant,
        "model.keep_ratio": "0.7",
        "train.seed": str(seed),
        "train.epochs": str(len(acc1)),
        "losses.kl.enabled": "True",
    }
    now = int(time.time() * 1000)
    metrics = [Metric("val/acc1", value, now, step) for step, value in enumerate(acc1)]
    if log_best:
        metrics += [Metric("val/acc1_best", max(acc1[: step + 1]), now, step) for step in range(len(acc1))]
    metrics += [
        Metric(key, value, now, len(acc1) - 1)
        for key, value in {
            "val/acc5": min(100.0, acc1[-1] + 30),
            "val/loss": 1.0,
            "train/loss": 1.2,
            "train/keep_stage1": 0.8,
            "train/keep_stage2": 0.6,
            "train/keep_stage3": 0.45,
            "val/keep_stage1": 0.6875,
            "val/keep_stage2": 0.484375,
            "val/keep_stage3": 0.328125,
        }.items()
    ]
    metrics += [
        Metric(key, value, now, len(acc1))
        for key, value in {"gflops": gflops, "params_m": 0.91, "throughput_img_s": 2500.0 + seed}.items()
    ]
    client.log_batch(
        run_id,
        metrics=metrics,
        params=[Param(k, v) for k, v in params.items()],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )
    client.set_terminated(run_id, status, end_time=end_time)
    return run_id


def _train_real_run(tmp: Path, uri: str) -> None:
    """The one REAL training run (1 epoch, tiny static variant), logged as the a/static row."""
    cfg = json.loads(json.dumps(TINY_RUN))
    cfg["output_dir"] = str(tmp / "a_static")
    cfg["tracking"] = {
        "uri": uri,
        "experiment": EXPERIMENT,
        "visualize_images": 2,
        "tags": {
            "spec": EXPERIMENT,
            "table": TABLE_NAME,
            "row": "a/static",
            "scale": "tiny",
            "kind": "train",
            "stage": "students",
        },
    }
    path = tmp / "a_static.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = subprocess.run(
        [sys.executable, "-m", "harness.train", str(path)], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The table3 experiment: one real run plus fixture runs; `expected` = run ids per row that count."""
    tmp = tmp_path_factory.mktemp("analysis")
    uri = f"sqlite:///{tmp}/mlflow.db"
    _train_real_run(tmp, uri)
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    parent = client.create_run(experiment_id, tags={"kind": "launch", "spec": EXPERIMENT, "scale": "tiny"}).info.run_id
    client.set_terminated(parent)
    run = lambda **kw: _fixture_run(client, experiment_id, parent, **kw)  # noqa: E731
    expected: dict[str, list[str]] = {}
    expected["a/dynamic"] = [
        run(row="a/dynamic", seed=s, acc1=[30.0, 50.0, acc]) for s, acc in enumerate([61.5, 62.5, 60.25])
    ]
    expected["b/random"] = [run(row="b/random", seed=0, acc1=[40.0, 44.2], variant="random")]
    # made before the launcher set `kind`: no kind tag, but a row tag -> counts
    expected["a/structural"] = [run(row="a/structural", seed=0, acc1=[38.1], variant="structural", kind=None)]
    # a re-launch of the same config (same run_key): only the newer one counts
    run(row="b/attention", seed=0, acc1=[47.0], variant="attention", run_key="same", end_time=1)
    expected["b/attention"] = [run(row="b/attention", seed=0, acc1=[49.2], variant="attention", run_key="same")]
    # never counted: failed, another scale, the launch run itself
    run(row="c/1-stage", seed=0, acc1=[10.0], status="FAILED")
    run(row="a/dynamic", seed=0, acc1=[79.0], scale="paper", gflops=2.9)
    real = client.search_runs([experiment_id], "tags.row = 'a/static'")
    expected["a/static"] = [real[0].info.run_id]
    return {
        "uri": uri,
        "tmp": tmp,
        "client": client,
        "expected": expected,
        "parent": parent,
        "experiment_id": experiment_id,
    }


def _final(client: MlflowClient, run_ids: list[str], key: str) -> list[float]:
    return [client.get_run(run_id).data.metrics[key] for run_id in run_ids]


def _is_png(path: Path) -> bool:
    head = path.read_bytes()[:24]
    width, height = struct.unpack(">II", head[16:24])
    return head[:8] == b"\x89PNG\r\n\x1a\n" and width > 100 and height > 100 and path.stat().st_size > 5000


# ---------------------------------------------------------------------------- reference
def test_reference_has_every_paper_row() -> None:
    ref = load_reference()
    for table, rows in PAPER_ROWS.items():
        part = ref[ref["table"] == table]
        assert set(rows) == set(part["row"]), table
        assert part["top1"].notna().all() and part["gflops"].notna().all() and part["source"].notna().all()
    assert not ref.duplicated(["table", "row", "model"]).any()
    lvvit = ref["model"].str.startswith("LV-ViT")
    assert ref["available"].all()  # every row's model is built here, the zoo's LV-ViT ones too (models/lvvit.py)
    assert len(ref[(ref["table"] == "losses") & lvvit]) == 4  # the LV-ViT-S column
    by_row = load_reference("keep-ratio").set_index("row")  # by name as well as by id
    assert by_row.loc["deit-s/0.7", ["top1", "gflops", "throughput"]].tolist() == [79.3, 2.9, 2062.1]
    assert by_row.loc["deit-256/0.7", "top1"] == 76.53 and by_row.loc["deit-b/0.7", "gflops"] == 11.2
    assert math.isnan(by_row.loc["lvvit-s/0.9", "throughput"])  # not given by the paper: NaN, never 0
    table3 = load_reference("table3").set_index("row")
    assert table3.loc["a/static", "top1"] == 73.4 and (table3["gflops"] == 2.9).all()
    assert "Table 4" in table3.loc["a/static", "source"]


# ------------------------------------------------------------------------------ collect
def test_collect_runs_counts_finished_training_runs_only(store: dict[str, Any]) -> None:
    runs = collect.collect_runs(store["uri"], EXPERIMENT, scale="tiny")
    expected = store["expected"]
    assert sorted(runs["run_id"]) == sorted(r for ids in expected.values() for r in ids)
    assert set(collect.COLUMNS) <= set(runs.columns)
    for row, ids in expected.items():
        got = runs.set_index("run_id").loc[ids]
        assert (got["row"] == row).all()
        assert got["acc1"].tolist() == _final(store["client"], ids, "val/acc1")  # final epoch, not the best
        assert got["gflops"].tolist() == _final(store["client"], ids, "gflops")
    dynamic = runs[runs["row"] == "a/dynamic"]
    assert sorted(dynamic["seed"].tolist()) == [0, 1, 2] and (dynamic["keep_ratio"] == 0.7).all()
    assert runs.loc[runs["row"] == "a/static", "variant"].item() == "static"
    assert len(collect.collect_runs(store["uri"], EXPERIMENT)) == len(runs) + 1  # + the paper-scale run
    assert collect.collect_runs(store["uri"], "no-such-experiment").empty


def test_collect_reads_a_database_as_an_mlflow_server_answers(store: dict[str, Any]) -> None:
    """The direct read of a database store (one query per table, only the keys it needs) gives the
    frame `mlflow.search_runs` gives through a server on the same file: rows, order, values, dtypes."""
    from tests.servers import mlflow_server

    assert collect.is_database(store["uri"]) and not collect.is_database("http://127.0.0.1:5000")
    with mlflow_server(store["tmp"]) as server:  # serves store["tmp"]/mlflow.db, the fixture's store
        for scale in ("tiny", "paper", None):
            direct = collect.collect_runs(store["uri"], EXPERIMENT, scale)
            pd.testing.assert_frame_equal(direct, collect.collect_runs(server.uri, EXPERIMENT, scale))
        params = ["model.name", "losses.kl.enabled", "data.name", "no.such.param"]  # more params, same query
        direct = collect.collect_runs(store["uri"], EXPERIMENT, "tiny", params=params)
        pd.testing.assert_frame_equal(direct, collect.collect_runs(server.uri, EXPERIMENT, "tiny", params=params))
        assert set(direct["params.model.name"]) == {"dynamicvit_tiny_patch8_64"}
        assert direct["params.no.such.param"].isna().all() and direct["params.data.name"].notna().sum() == 1
        assert collect.collect_runs(server.uri, "no-such-experiment").empty


def test_collect_reads_the_best_epoch_as_the_official_code_reports(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment(EXPERIMENT)
    parent = client.create_run(experiment_id).info.run_id
    new = _fixture_run(client, experiment_id, parent, row="a/dynamic", seed=0, acc1=[50.0, 61.5, 58.0], log_best=True)
    old = _fixture_run(client, experiment_id, parent, row="a/dynamic", seed=1, acc1=[50.0, 61.5, 58.0])
    runs = collect.collect_runs(uri, EXPERIMENT).set_index("run_id")
    assert runs.loc[new, "acc1"] == 61.5 and runs.loc[new, "acc1_final"] == 58.0
    assert runs.loc[old, "acc1"] == 58.0  # logged before the best existed: the final epoch, as before
    notes = tables.build_table(runs.reset_index(), TABLE_NAME).attrs["notes"]
    assert any("best epoch" in note for note in notes)


# ------------------------------------------------------------------------------- tables
def test_table3_from_runs_mean_std_gaps_and_missing_rows(store: dict[str, Any]) -> None:
    runs = collect.collect_runs(store["uri"], EXPERIMENT, scale="tiny")
    table = tables.build_table(runs, "sparsification-strategies")
    assert table["row"].tolist() == PAPER_ROWS["table3"]
    by_row = table.set_index("row")
    assert by_row.loc["a/dynamic", tables.TOP1_REPRO] == pytest.approx((61.5 + 62.5 + 60.25) / 3)
    assert by_row.loc["a/dynamic", tables.STD] == pytest.approx(pd.Series([61.5, 62.5, 60.25]).std())
    assert by_row.loc["a/dynamic", tables.RUNS] == 3 and math.isnan(by_row.loc["b/random", tables.STD])
    assert by_row.loc["b/predictor", tables.RUNS_FROM] == "a/dynamic"  # the same model in the paper
    assert tables.DELTA not in table  # tiny scale: MNIST top-1 minus ImageNet top-1 is dropped
    assert by_row.loc["b/random", tables.GAP_REPRO] == pytest.approx(44.2 - (61.5 + 62.5 + 60.25) / 3)
    assert by_row.loc["a/static", tables.GAP_PAPER] == pytest.approx(73.4 - 79.3)
    for row in ("c/1-stage", "c/2-stage"):
        assert by_row.loc[row, tables.STATUS] == tables.MISSING and by_row.loc[row, tables.RUNS] == 0
        assert math.isnan(by_row.loc[row, tables.TOP1_REPRO])
    markdown = tables.to_markdown(table)
    line = next(text for text in markdown.splitlines() if text.startswith("| c/1-stage |"))
    assert "missing" in line and "0.00" not in line
    assert "not ImageNet" in markdown  # the tiny-scale caveat
    with pytest.raises(ValueError, match="mix scales"):
        tables.build_table(collect.collect_runs(store["uri"], EXPERIMENT), "table3")


def test_missing_and_unavailable_rows_render_as_gaps(tmp_path: Path) -> None:
    runs = pd.DataFrame(
        {
            "row": ["deit-s/1.0", "deit-s/0.7", "deit-s/0.7", "typo/0.7"],
            "scale": "tiny",
            "acc1": [64.0, 62.0, 61.0, 50.0],
            "gflops": [0.0634, 0.0396, 0.0396, 0.0396],
            "throughput_img_s": [2000.0, 2600.0, 2700.0, 2600.0],
            "run_id": list("abcd"),
        }
    )
    table = tables.build_table(runs, "table1")
    assert table["row"].tolist()[:15] == PAPER_ROWS["table1"] and table["row"].tolist()[15] == "typo/0.7"
    lines = {
        text.split(" | ")[0].lstrip("| "): text
        for text in tables.to_markdown(table).splitlines()
        if text.startswith("| ")
    }
    for row in PAPER_ROWS["table1"]:
        assert row in lines, row
    assert "missing" in lines["lvvit-m/0.8"] and "missing" in lines["lvvit-s/1.0"]
    assert "missing" in lines["deit-s/0.9"] and "missing" in lines["deit-b/0.7"]
    assert "61.50" in lines["deit-s/0.7"] and "0.71" in lines["deit-s/0.7"]  # mean, std of 2 seeds
    assert "typo/0.7 (not in paper)" in lines
    csv = pd.read_csv(tables.to_csv(table, tmp_path / "t.csv"))
    missing = csv[csv["row"] == "deit-s/0.9"].iloc[0]
    assert math.isnan(missing[tables.TOP1_REPRO]) and missing[tables.STATUS] == "missing"
    latex = tables.to_latex(table)
    assert r"\toprule" in latex and "missing" in latex and r"typo/0.7 (not in paper)" in latex
    losses = tables.to_markdown(tables.build_table(runs.iloc[0:0], "losses"))
    assert losses.count("not available") == 0 and losses.count("missing") == 8


# ------------------------------------------------------------------------------ figures
def test_figures_are_pngs_from_runs_and_a_real_model(store: dict[str, Any], tmp_path: Path) -> None:
    runs = collect.collect_runs(store["uri"], EXPERIMENT, scale="tiny")
    made = [
        figures.accuracy_vs_keep_ratio(runs, tmp_path / "keep.png", table="table1"),
        figures.accuracy_vs_gflops(runs, "table3", tmp_path / "gflops.png"),
        figures.gaps_to_anchor(tables.build_table(runs, "table3"), tmp_path / "gaps.png"),
        figures.accuracy_vs_gflops(runs.iloc[0:0], "table1", tmp_path / "empty.png"),
    ]
    static_run = store["expected"]["a/static"][0]
    loaded = figures.load_run_model(store["uri"], static_run, tmp_path / "artifacts")
    assert loaded.model.variant == "static" and loaded.model.num_keep == [44, 31, 21]
    made.append(figures.kept_token_heatmaps(store["uri"], static_run, tmp_path / "kept.png", loaded=loaded))
    made.append(figures.static_keep_map(store["uri"], static_run, tmp_path / "static.png", loaded=loaded))
    for path in made:
        assert _is_png(path), path
    fixture_run = store["expected"]["a/dynamic"][0]  # fixtures have no model.pth
    with pytest.raises(FileNotFoundError, match=r"config\.yaml"):
        figures.load_run_model(store["uri"], fixture_run, tmp_path / "none")


# ----------------------------------------------------------------------- notebooks, CLI
def test_notebooks_are_paired_and_parameterised() -> None:
    for name in ("table3", "table1", "losses"):
        notebook = jupytext.read(REPO / "analysis" / "notebooks" / f"{name}_notebook.ipynb")
        source = jupytext.read(REPO / "analysis" / "notebooks" / f"{name}_notebook.py")
        assert notebook.metadata["kernelspec"]["name"] == "python3", name
        assert [c.source for c in notebook.cells] == [c.source for c in source.cells], f"{name}: run jupytext --sync"
        (parameters,) = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
        for key in ("tracking_uri", "experiment", "scale", "output_dir"):
            assert f"{key} = " in parameters.source, (name, key)


def test_report_cli_runs_the_table3_notebook_headless(store: dict[str, Any]) -> None:
    tmp, client, parent = store["tmp"], store["client"], store["parent"]
    spec = REPO / "experiments" / "table3.yaml"  # the real spec: its name, table and notebook
    out = tmp / "report"
    # an older launch at the same scale and a newer one at another: the report goes to `parent`,
    # and replaces what an earlier report left there
    older = client.create_run(store["experiment_id"], start_time=1, tags={"kind": "launch", "scale": "tiny"})
    other = client.create_run(store["experiment_id"], tags={"kind": "launch", "scale": "paper"})
    client.log_text(parent, "an earlier report's file", "report/figures/stale.png")
    result = subprocess.run(
        [sys.executable, "-m", "analysis.report", str(spec), "--tracking-uri", store["uri"], "--output-dir", str(out)],
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "without encryption" not in result.stderr  # the kernel runs over IPC, not plain TCP
    markdown, where = result.stdout[:-1].rsplit("\n", 1)
    assert markdown + "\n" == (out / "table3.md").read_text()
    assert where.startswith("MLflow: the report (table, 4 figures, notebook, ")
    assert where.endswith(
        f"(the most recent of 2 launch/search runs of table3 at scale tiny): "
        f"http://127.0.0.1:5000/#/experiments/{store['experiment_id']}/runs/{parent}"
        f"?workflowType=machine_learning"
    )

    def listing(run_id: str, folder: str = "") -> list[str]:
        found = []
        for item in client.list_artifacts(run_id, folder):
            found += listing(run_id, item.path) if item.is_dir else [item.path]
        return sorted(found)

    figures_ = [
        "table3_a_static_kept_tokens.png",
        "table3_a_static_static_map.png",
        "table3_acc_vs_gflops.png",
        "table3_gaps.png",
    ]
    assert listing(parent) == sorted(
        [
            "report/table3.md",
            "report/table3.html",
            "report/table3.tex",
            "report/table3.csv",
            "report/notebook/table3.ipynb",
            "report/notebook/table3.html",
            *[f"report/figures/{f}" for f in figures_],
        ]
    )
    assert listing(older.info.run_id) == [] and listing(other.info.run_id) == []
    page = Path(client.download_artifacts(parent, "report/table3.html", str(tmp))).read_text()
    assert "<table>" in page and "<td>a/dynamic</td>" in page
    notebook_page = Path(client.download_artifacts(parent, "report/notebook/table3.html", str(tmp))).read_text()
    assert "data:image/png;base64," in notebook_page  # the figures, embedded
    metrics = client.get_run(parent).data.metrics
    dynamic = [61.5, 62.5, 60.25]
    assert metrics["table/a/dynamic/top1"] == pytest.approx(sum(dynamic) / 3)
    assert metrics["table/a/dynamic/std"] == pytest.approx(pd.Series(dynamic).std())
    assert metrics["table/b/random/gap"] == pytest.approx(44.2 - sum(dynamic) / 3)
    assert "table/b/random/std" not in metrics and "table/c/2-stage/top1" not in metrics  # one seed; no run
    shared = ["b/predictor", "c/3-stage"]  # the same model as a/dynamic in the paper: its runs
    assert set(metrics) == {f"table/{row}/{k}" for row in [*store["expected"], *shared] for k in ("top1", "gap")} | {
        f"table/{row}/std" for row in ["a/dynamic", *shared]
    }
    assert "| a/dynamic |" in result.stdout and "missing" in result.stdout
    table = pd.read_csv(out / "table3.csv").set_index("row")
    assert table.index.tolist() == PAPER_ROWS["table3"]
    for row, ids in store["expected"].items():  # the notebook's numbers are MLflow's, averaged
        acc = _final(client, ids, "val/acc1")
        assert table.loc[row, tables.TOP1_REPRO] == pytest.approx(sum(acc) / len(acc)), row
        assert table.loc[row, tables.GFLOPS_REPRO] == pytest.approx(_final(client, ids, "gflops")[0]), row
        assert table.loc[row, tables.RUNS] == len(ids), row
    assert math.isnan(table.loc["c/2-stage", tables.TOP1_REPRO])
    for name in (
        "table3.tex",
        "table3.ipynb",
        "table3_gaps.png",
        "table3_acc_vs_gflops.png",
        "table3_a_static_kept_tokens.png",
        "table3_a_static_static_map.png",
    ):
        assert (out / name).is_file(), name
    for png in out.glob("*.png"):
        assert _is_png(png), png


MINIMAL_SPEC = "scales: {tiny: {}}\nstages: {only: {}}\n"  # what every spec needs besides these lines


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        ("name: [unclosed", "YAML syntax error at line 1"),
        ("table: keep-ratio\n" + MINIMAL_SPEC, "name: Field required"),
        ("name: table3\nnotebooks: [analysis/nope.ipynb]\n" + MINIMAL_SPEC, "notebooks: no such notebook"),
        ("name: table3\ntable: table9\n" + MINIMAL_SPEC, "table: unknown table"),
        (
            "name: never-launched\nnotebooks: [analysis/notebooks/table3_notebook.ipynb]\n" + MINIMAL_SPEC,
            "no MLflow experiment of that name",
        ),
    ],
)
def test_report_cli_bad_input_is_one_line_exit_2(
    store: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, message: str
) -> None:
    spec = tmp_path / "spec.yaml"
    if content is not None:
        spec.write_text(content)
    code = report.main([str(spec), "--tracking-uri", store["uri"]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_report_cli_refuses_a_store_that_does_not_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: table3\n" + MINIMAL_SPEC)
    missing = f"sqlite:///{tmp_path}/nothing-here.db"
    assert report.main([str(spec), "--tracking-uri", missing]) == 2
    assert "no such SQLite file" in capsys.readouterr().err
    assert not (tmp_path / "nothing-here.db").exists()  # not created as a side effect


# ------------------------------------------------------------------ one configuration per row
def test_a_row_averages_the_seeds_of_its_latest_configuration_only(tmp_path: Path) -> None:
    """A 1-epoch smoke launch, then the real launch of the same rows: the table, and the metrics the
    report puts on the latest launch's parent run, are over the real launch's seeds only, and the
    note under the table names the runs left out (before: all averaged as if they were seeds)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment(EXPERIMENT)
    now = int(time.time() * 1000)
    launch = {"kind": "launch", "spec": EXPERIMENT, "scale": "tiny"}
    smoke = client.create_run(experiment_id, start_time=now - 7_200_000, tags=launch).info.run_id
    real = client.create_run(experiment_id, start_time=now - 3_600_000, tags=launch).info.run_id
    run = lambda parent, **kw: _fixture_run(client, experiment_id, parent, **kw)  # noqa: E731
    hour_ago = now - 3_600_000
    # the smoke launch (scales.tiny.train.epochs=1), then the real one (3 epochs), seeds 0 and 1
    run(smoke, row="a/dynamic", seed=0, acc1=[40.0], end_time=hour_ago)
    run(smoke, row="b/random", seed=0, acc1=[20.0], variant="random", end_time=hour_ago)
    dynamic = [run(real, row="a/dynamic", seed=s, acc1=[30.0, 50.0, acc]) for s, acc in enumerate([61.5, 62.5])]
    run(real, row="b/random", seed=0, acc1=[40.0, 42.0, 44.2], variant="random")
    # one configuration, one seed, two run keys (older first): the newest counts once
    run(real, row="a/structural", seed=0, acc1=[30.0, 35.0, 37.0], variant="structural", end_time=hour_ago)
    run(real, row="a/structural", seed=0, acc1=[30.0, 35.0, 38.1], variant="structural")
    # the latest run of a row is the shorter one: its configuration counts, the older seeds are left out
    for seed in (0, 1):
        run(real, row="c/1-stage", seed=seed, acc1=[50.0, 55.0, 60.0 + seed], end_time=hour_ago)
    run(real, row="c/1-stage", seed=0, acc1=[45.0], end_time=now + 1000)

    runs = collect.collect_runs(uri, EXPERIMENT, scale="tiny")
    configs = runs[runs["row"] == "a/dynamic"].set_index("run_id")["config"]
    assert configs[dynamic].nunique() == 1 and configs.nunique() == 2  # the seeds: one configuration; the smoke run
    table = tables.build_table(runs, TABLE_NAME).set_index("row")
    mean, std = (61.5 + 62.5) / 2, pd.Series([61.5, 62.5]).std()
    assert table.loc["a/dynamic", tables.TOP1_REPRO] == pytest.approx(mean)
    assert table.loc["a/dynamic", tables.STD] == pytest.approx(std)
    assert table.loc["a/dynamic", tables.CI95] == pytest.approx(12.706204736 * std / math.sqrt(2))  # t(0.975, 1)
    assert table.loc["a/dynamic", [tables.SEEDS, tables.RUNS]].tolist() == [2, 2]
    assert table.loc["b/random", tables.TOP1_REPRO] == 44.2 and table.loc["b/random", tables.RUNS] == 1
    assert table.loc["a/structural", tables.TOP1_REPRO] == 38.1 and table.loc["a/structural", tables.RUNS] == 1
    assert table.loc["c/1-stage", tables.TOP1_REPRO] == 45.0 and table.loc["c/1-stage", tables.SEEDS] == 1
    left_out = (
        "a row's numbers are over the seeds of one configuration, its most recent run's (one run per seed): "
        "a/dynamic: 1 run of another configuration (train.epochs=1 instead of 3) left out; "
        "a/structural: 1 older run of a seed already counted (seed 0) left out; "
        "b/random: 1 run of another configuration (train.epochs=1 instead of 3) left out; "
        "c/1-stage: 2 runs of another configuration (train.epochs=3 instead of 1) left out"
    )
    assert left_out in tables.build_table(runs, TABLE_NAME).attrs["notes"]

    out = tmp_path / "report"
    spec = REPO / "experiments" / "table3.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "analysis.report", str(spec), "--tracking-uri", uri, "--output-dir", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"- {left_out}" in (out / "table3.md").read_text().splitlines()
    metrics = client.get_run(real).data.metrics  # the report of the real launch: its own runs
    assert metrics["table/a/dynamic/top1"] == pytest.approx(mean)
    assert metrics["table/a/dynamic/std"] == pytest.approx(std)
    assert metrics["table/b/random/gap"] == pytest.approx(44.2 - mean)
    assert client.get_run(smoke).data.metrics == {}
