"""The tiny scale in the paper's regime (docs/tiny-scale.md, issue 21).

- The printed table (analysis/tables.py, what `launch --wait` and `analysis.report` print): per row
  the number of seeds, the 95% t-interval, the trained and tested keep fractions of learned
  selectors, the note on the paper's orderings, no cross-dataset `delta` at the tiny scale. Built
  from labelled FIXTURE runs in a real SQLite MLflow store (invented accuracies, chosen so that
  every verdict is known), read back by analysis.collect as the notebooks read them.
- The shipped checkpoints are the files checkpoints/README.md names, with the hashes it records.
- A learned selector trained at the tiny scale's registered settings ends training on the token
  fractions it is tested on (the design criterion).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from analysis import collect, tables

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT, TABLE = "table3", "sparsification-strategies"
TESTED = (0.6875, 0.484375, 0.328125)  # 44 / 31 / 21 of 64 tokens: what top-k keeps at rho 0.7


def _run(
    client: MlflowClient,
    experiment_id: str,
    *,
    row: str,
    variant: str,
    seed: int,
    acc1: float,
    trained: tuple[float, ...] | None = None,
    scale: str = "tiny",
) -> str:
    """A FIXTURE training run as the launcher and engine log it (tags, params, final metrics)."""
    run_id = client.create_run(experiment_id).info.run_id
    tags = {
        "spec": EXPERIMENT,
        "table": TABLE,
        "row": row,
        "variant": variant,
        "scale": scale,
        "kind": "train",
        "stage": "students",
        "run_key": f"{row}-{seed}-{scale}",
    }
    params = {"model.variant": variant, "model.keep_ratio": "0.7", "train.seed": str(seed)}
    now = int(time.time() * 1000)
    values = {"val/acc1": acc1, "val/acc1_best": acc1, "gflops": 0.0414, "throughput_img_s": 2500.0}
    if trained is not None:  # a selecting variant: the engine logs both, per stage
        values.update({f"train/keep_stage{s + 1}": f for s, f in enumerate(trained)})
        values.update({f"val/keep_stage{s + 1}": f for s, f in enumerate(TESTED[: len(trained)])})
    client.log_batch(
        run_id,
        metrics=[Metric(k, v, now, 2) for k, v in values.items()],
        params=[Param(k, v) for k, v in params.items()],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )
    client.set_terminated(run_id, "FINISHED")
    return run_id


@pytest.fixture(scope="module")
def proxy_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, MlflowClient]:
    uri = f"sqlite:///{tmp_path_factory.mktemp('proxy')}/mlflow.db"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment(EXPERIMENT)
    add = lambda **kw: _run(client, experiment_id, **kw)  # noqa: E731
    for seed, acc in enumerate([70.0, 71.0, 72.0]):  # mean 71, sd 1: the 95% interval is 4.303 / sqrt(3)
        add(row="a/dynamic", variant="dynamic", seed=seed, acc1=acc, trained=(0.70, 0.49, 0.34))
    for seed, acc in enumerate([60.0, 60.5, 61.0]):  # one seed trained off its target: 0.62 against 0.6875
        add(row="a/static", variant="static", seed=seed, acc1=acc, trained=(0.62 if seed == 1 else 0.69, 0.48, 0.33))
    for seed, acc in enumerate([65.0, 65.0, 65.0]):
        add(row="a/structural", variant="structural", seed=seed, acc1=acc)
    add(row="b/attention", variant="attention", seed=0, acc1=72.5, trained=(0.6875, 0.484375, 0.328125))
    add(row="b/random", variant="random", seed=0, acc1=50.0, trained=(0.6875, 0.484375, 0.328125))
    add(row="a/dynamic", variant="dynamic", seed=0, acc1=79.0, trained=(0.7, 0.49, 0.34), scale="paper")
    return uri, client


def test_the_tiny_table_gives_seeds_intervals_keep_fractions_and_orderings(
    proxy_runs: tuple[str, MlflowClient],
) -> None:
    uri, _ = proxy_runs
    table = tables.build_table(collect.collect_runs(uri, EXPERIMENT, scale="tiny"), TABLE)
    by_row = table.set_index("row")
    assert tables.DELTA not in table  # MNIST top-1 minus ImageNet top-1: not shown at the tiny scale
    assert by_row.loc["a/dynamic", tables.SEEDS] == 3 and by_row.loc["b/random", tables.SEEDS] == 1
    assert by_row.loc["a/dynamic", tables.CI95] == pytest.approx(4.302652729749464 / math.sqrt(3))  # t(0.975, 2)
    assert by_row.loc["a/structural", tables.CI95] == 0.0 and math.isnan(by_row.loc["b/random", tables.CI95])
    assert by_row.loc["a/dynamic", tables.KEEP_TRAINED] == "0.70/0.49/0.34"
    assert by_row.loc["a/dynamic", tables.KEEP_TESTED] == "0.69/0.48/0.33"
    assert by_row.loc["a/static", tables.KEEP_TRAINED] == "0.67/0.48/0.33"  # mean over seeds
    assert by_row.loc["b/random", tables.KEEP_TRAINED] == ""  # a fixed rule, not a learned selector
    assert by_row.loc["c/1-stage", tables.SEEDS] == 0 and by_row.loc["c/1-stage", tables.STATUS] == tables.MISSING

    markdown = tables.to_markdown(table)
    header = next(text for text in markdown.splitlines() if text.startswith("| row |"))
    assert "delta" not in header and "| seeds | keep trained | keep tested |" in header and "95% CI" in header
    lines = {text.split(" | ")[0].lstrip("| "): text for text in markdown.splitlines() if text.startswith("| ")}
    assert "±2.48" in lines["a/dynamic"] and "0.70/0.49/0.34 | 0.69/0.48/0.33" in lines["a/dynamic"]
    assert "| 1 | — | — |" in lines["b/random"]  # one seed: no interval; no selector to report
    notes = table.attrs["notes"]
    keep = next(n for n in notes if n.startswith("keep trained / tested"))
    assert "a/static (0.07)" in keep and "a/dynamic" not in keep.split("within 0.03")[1]
    orderings = next(n for n in notes if "paper's orderings" in n)
    # (a): paper dynamic 79.3 > structural 78.2 > static 73.4; fixtures 71 > 65 > 60.5, intervals apart
    assert "(a): 3 of 3 held (a/dynamic > a/structural; a/dynamic > a/static; a/structural > a/static)" in orderings
    # (b): paper predictor (= a/dynamic) 79.3 > attention 78.1 > random 77.5; attention has one seed
    assert "(b): 2 of 3 held" in orderings and "b/attention >= b/predictor (within noise)" in orderings
    assert "(c)" not in orderings  # no row of (c) has a run of its own ((c)/3-stage alone orders nothing)


def test_the_paper_scale_table_keeps_its_delta_column(proxy_runs: tuple[str, MlflowClient]) -> None:
    uri, _ = proxy_runs
    table = tables.build_table(collect.collect_runs(uri, EXPERIMENT, scale="paper"), TABLE).set_index("row")
    assert table.loc["a/dynamic", tables.DELTA] == pytest.approx(79.0 - 79.3)
    assert table.loc["a/dynamic", tables.SEEDS] == 1


def test_shipped_checkpoints_are_the_files_the_readme_records() -> None:
    """Every file in checkpoints/ is listed in its README with its sha256 (full, or first…last digits)."""
    readme = (REPO / "checkpoints" / "README.md").read_text()
    recorded = dict(re.findall(r"^\| `([\w.]+\.pth)` \|.*\| `([0-9a-f…]+)` \|$", readme, flags=re.M))
    shipped = sorted(p.name for p in (REPO / "checkpoints").glob("*.pth"))
    assert sorted(recorded) == shipped
    for name, digest in recorded.items():
        actual = hashlib.sha256((REPO / "checkpoints" / name).read_bytes()).hexdigest()
        head, _, tail = digest.partition("…")
        assert actual.startswith(head) and actual.endswith(tail) and len(head) >= 8, (name, digest, actual)


# ------------------------------------------------------------------- the design criterion, trained
def _train_tiny(tmp: Path, run: str) -> dict[str, float]:
    """table3.yaml's tiny run named `run` (seed 0) as the launcher expands it (its recipe, batch, lr,
    schedule, updates, and the shipped teacher as its start and its distillation teacher), validated on
    100 digits instead of 2,000 (top-k keeps the same fractions whatever the images), trained by
    `python -m harness.train`; its final metrics."""
    import yaml

    from harness.spec import load_and_expand

    plan = next(
        r
        for r in load_and_expand(str(REPO / "experiments" / "table3.yaml"), scale="tiny").runs
        if r.name == f"{run}-seed0"
    )
    teacher = load_and_expand(str(REPO / "experiments" / "table3.yaml"), scale="tiny").runs[0]
    assert teacher.stage == "teacher"
    weights = str(REPO / teacher.config.model.pretrained)
    cfg = plan.config.model_dump(mode="json")
    cfg["train"]["init_from"] = weights
    cfg["teacher"] = {"checkpoint": weights, "run_dir": None, "model": None}
    cfg["data"].update(val_digits=100, val_placements=1)
    cfg["output_dir"] = str(tmp / run)
    cfg["tracking"] = {
        "uri": f"sqlite:///{tmp}/mlflow.db",
        "experiment": "proxy",
        "visualize_images": 0,
        "log_checkpoint": False,
    }
    path = tmp / f"{run}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = subprocess.run(
        [sys.executable, "-m", "harness.train", str(path)], cwd=REPO, capture_output=True, text=True
    )  # bounded by pytest's own timeout
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads((tmp / run / "result.json").read_text())["metrics"]


def _gaps(metrics: dict[str, float]) -> list[float]:
    stages = sorted(k.removeprefix("val/keep_stage") for k in metrics if k.startswith("val/keep_stage"))
    assert stages, metrics  # a learned selector logs its keep fractions, trained and tested
    return [abs(metrics[f"train/keep_stage{s}"] - metrics[f"val/keep_stage{s}"]) for s in stages]


def test_a_learned_selector_trains_on_the_fractions_it_is_tested_on(tmp_path: Path) -> None:
    """Point 1 of issue 21 for one learned selector at the tiny scale's registered settings, uncut
    (1,250 updates at batch 16, the converged teacher): table 3's one-stage run, seed 0, ends training
    within 0.03 of the 52% top-k keeps at test time (0.010 off in the design probe). The regime does
    not meet the criterion in every run (docs/tiny-scale.md lists the runs that miss it); this one
    does, and a change to the losses, the predictor, the Gumbel or the schedule that moves it shows here.
    About 2 minutes on 2 CPU cores."""
    metrics = _train_tiny(tmp_path, "one-stage")
    assert max(_gaps(metrics)) <= tables.KEEP_TOLERANCE, metrics
