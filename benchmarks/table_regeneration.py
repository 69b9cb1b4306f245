"""How long regenerating a paper table takes when an experiment holds many runs.

Writes N synthetic training runs (default 1,000) into one experiment of a fresh SQLite store,
each like a real run: the resolved RunConfig as ~70 dotted params, the launcher's tags, and
per-epoch plus final metrics, all with `log_batch`. Then times what a report does before any
figure: `collect_runs`, `build_table` and `to_markdown`, side by side in one process, passes
interleaved (the order rotates), with two baselines over the same store:
  - `mlflow.search_runs` alone (the same filter and order, pandas output): what any table path
    built on it pays before doing anything;
  - the table path as it was before the direct database read: `collect_runs` through
    `mlflow.search_runs` (what it still does for an MLflow server or a file store).
The machine, its CPU count and the load average (before and after) are printed with the table.

    python benchmarks/table_regeneration.py [--runs 1000] [--epochs 6] [--repeat 5] [--db PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis import collect  # noqa: E402
from analysis.collect import collect_runs  # noqa: E402
from analysis.reference import load_reference  # noqa: E402
from analysis.tables import build_table, to_markdown  # noqa: E402
from harness.config import RunConfig, flatten  # noqa: E402

EXPERIMENT = "table3"


def populate(uri: str, n_runs: int, epochs: int) -> float:
    """N finished child runs of one launch run, cycling through Table 3's rows; returns seconds."""
    client = MlflowClient(uri)
    experiment_id = client.create_experiment(EXPERIMENT)
    parent = client.create_run(experiment_id, tags={"kind": "launch", "spec": EXPERIMENT}).info.run_id
    rows = load_reference("table3")[["row", "variant"]].to_records(index=False)
    base = {k: str(v) for k, v in flatten(RunConfig().model_dump()).items()}
    start = time.perf_counter()
    for i in range(n_runs):
        row, variant = rows[i % len(rows)]
        seed = i // len(rows)
        params = {**base, "model.variant": variant, "train.seed": str(seed), "train.epochs": str(epochs)}
        tags = {
            "mlflow.parentRunId": parent,
            "kind": "train",
            "spec": EXPERIMENT,
            "table": "sparsification-strategies",
            "row": row,
            "variant": variant,
            "scale": "tiny",
            "stage": "students",
            "run_key": f"{i:012x}",
        }
        now = int(time.time() * 1000)
        metrics = [
            Metric(key, 50.0 + (i % 97) / 10 + epoch, now, epoch)
            for epoch in range(epochs)
            for key in ("val/acc1", "val/acc5", "val/loss", "train/loss")
        ]
        metrics += [
            Metric(key, value, now, epochs)
            for key, value in {"gflops": 0.0396, "params_m": 0.91, "throughput_img_s": 2500.0 + i % 50}.items()
        ]
        run_id = client.create_run(experiment_id).info.run_id
        client.log_batch(
            run_id,
            metrics=metrics,
            params=[Param(k, v) for k, v in params.items()],
            tags=[RunTag(k, v) for k, v in tags.items()],
        )
        client.set_terminated(run_id, "FINISHED")
    return time.perf_counter() - start


def regenerate(uri: str) -> dict[str, float]:
    """Seconds for each step of one table regeneration."""
    t0 = time.perf_counter()
    runs = collect_runs(uri, EXPERIMENT, scale="tiny")
    t1 = time.perf_counter()
    table = build_table(runs, "table3")
    t2 = time.perf_counter()
    markdown = to_markdown(table)
    t3 = time.perf_counter()
    assert len(markdown) > 0 and int(table["runs"].max()) > 0
    return {
        "runs": float(len(runs)),
        "collect_s": t1 - t0,
        "build_s": t2 - t1,
        "markdown_s": t3 - t2,
        "total_s": t3 - t0,
    }


@contextlib.contextmanager
def through_search_runs():
    """The previous table path: `collect_runs` reads every store with `mlflow.search_runs`."""
    direct = collect.is_database
    collect.is_database = lambda uri: False
    try:
        yield
    finally:
        collect.is_database = direct


def previous(uri: str) -> dict[str, float]:
    with through_search_runs():
        return regenerate(uri)


def search_runs_alone(uri: str) -> dict[str, float]:
    """The bare `mlflow.search_runs` call of the previous path (its filter and order), nothing after it."""
    mlflow.set_tracking_uri(uri)
    start = time.perf_counter()
    raw = mlflow.search_runs(
        experiment_names=[EXPERIMENT],
        output_format="pandas",
        filter_string="attributes.status = 'FINISHED' and tags.scale = 'tiny'",
        order_by=["attributes.end_time DESC"],
    )
    seconds = time.perf_counter() - start
    assert isinstance(raw, pd.DataFrame)
    return {
        "runs": float(len(raw)),
        "collect_s": seconds,
        "build_s": float("nan"),
        "markdown_s": float("nan"),
        "total_s": seconds,
    }


CANDIDATES = {
    "table path (direct database read)": regenerate,
    "baseline: mlflow.search_runs alone": search_runs_alone,
    "baseline: table path through mlflow.search_runs (before)": previous,
}


def median_of(passes: list[dict[str, float]], key: str) -> float:
    return statistics.median(p[key] for p in passes)


def loadavg() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            cpu,
        )
    return (
        f"{cpu} ({platform.machine()}), {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"mlflow {mlflow.__version__}, pandas {pd.__version__}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--db", help="SQLite file to create (default: a temporary folder)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="table-regeneration-"))
    db = Path(args.db) if args.db else folder / "mlflow.db"
    if db.exists():
        parser.error(f"--db: file exists, pick a new one, got {db}")
    uri = f"sqlite:///{db.resolve()}"
    print(f"machine: {machine()}")
    written = populate(uri, args.runs, args.epochs)
    print(
        f"wrote {args.runs} runs ({args.epochs} epochs, 4 metrics per epoch + 3 finals, "
        f"{len(flatten(RunConfig().model_dump()))} params, 10 tags) in {written:.1f} s"
    )
    cold = {name: candidate(uri)["total_s"] for name, candidate in CANDIDATES.items()}  # imports, engines
    load_before = loadavg()
    results: dict[str, list[dict[str, float]]] = {name: [] for name in CANDIDATES}
    names = list(CANDIDATES)
    for index in range(args.repeat):
        for name in names[index % len(names) :] + names[: index % len(names)]:  # the order rotates
            results[name].append(CANDIDATES[name](uri))
    print(
        f"load average (1 / 5 / 15 min): before {load_before}, after {loadavg()}; "
        f"{args.repeat} interleaved passes each after a first (cold) pass of each, in this order"
    )
    print(
        "| candidate | runs | collect s (median) | build_table s | to_markdown s | total s (median) | min-max s "
        "| first (cold) pass s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, passes in results.items():
        med = functools.partial(median_of, passes)
        totals = [p["total_s"] for p in passes]
        steps = "| - | - |" if name.endswith("alone") else f"| {med('build_s'):.3f} | {med('markdown_s'):.3f} |"
        print(
            f"| {name} | {passes[0]['runs']:.0f} | {med('collect_s'):.3f} {steps} {med('total_s'):.3f} "
            f"| {min(totals):.3f}-{max(totals):.3f} | {cold[name]:.3f} |"
        )
    new, base = (statistics.median(p["total_s"] for p in results[n]) for n in (names[0], names[2]))
    print(
        f"table from {args.runs} runs: {new:.2f} s (target < 2 s), {base / new:.1f}x faster than before ({base:.2f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
