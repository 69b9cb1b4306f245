"""How long regenerating a paper table takes when an experiment holds many runs.

Writes N synthetic training runs (default 1,000) into one experiment of a fresh SQLite store,
each like a real run: the resolved RunConfig as ~70 dotted params, the launcher's tags, and
per-epoch plus final metrics, all with `log_batch`. Then times what a report does before any
figure: `collect_runs` (one `mlflow.search_runs`), `build_table` and `to_markdown`.

    python benchmarks/table_regeneration.py [--runs 1000] [--epochs 6] [--repeat 3] [--db PATH]
"""
from __future__ import annotations

import argparse
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
        tags = {"mlflow.parentRunId": parent, "kind": "train", "spec": EXPERIMENT, "table": "sparsification-strategies",
                "row": row, "variant": variant, "scale": "tiny", "stage": "students", "run_key": f"{i:012x}"}
        now = int(time.time() * 1000)
        metrics = [Metric(key, 50.0 + (i % 97) / 10 + epoch, now, epoch)
                   for epoch in range(epochs) for key in ("val/acc1", "val/acc5", "val/loss", "train/loss")]
        metrics += [Metric(key, value, now, epochs) for key, value in
                    {"gflops": 0.0396, "params_m": 0.91, "throughput_img_s": 2500.0 + i % 50}.items()]
        run_id = client.create_run(experiment_id).info.run_id
        client.log_batch(run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()],
                         tags=[RunTag(k, v) for k, v in tags.items()])
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
    return {"runs": float(len(runs)), "collect_s": t1 - t0, "build_s": t2 - t1, "markdown_s": t3 - t2,
            "total_s": t3 - t0}


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"mlflow {mlflow.__version__}, pandas {pd.__version__}, load average {load:.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--db", help="SQLite file to create (default: a temporary folder)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="table-regeneration-"))
    db = Path(args.db) if args.db else folder / "mlflow.db"
    if db.exists():
        parser.error(f"--db: file exists, pick a new one, got {db}")
    uri = f"sqlite:///{db.resolve()}"
    print(f"machine: {machine()}")
    written = populate(uri, args.runs, args.epochs)
    print(f"wrote {args.runs} runs ({args.epochs} epochs, 4 metrics per epoch + 3 finals, "
          f"{len(flatten(RunConfig().model_dump()))} params, 10 tags) in {written:.1f} s")
    results = [regenerate(uri) for _ in range(args.repeat)]
    print("| pass | runs | collect_runs s | build_table s | to_markdown s | total s |")
    print("|---|---|---|---|---|---|")
    for index, r in enumerate(results):
        label = "first (cold)" if index == 0 else str(index + 1)
        print(f"| {label} | {r['runs']:.0f} | {r['collect_s']:.2f} | {r['build_s']:.3f} | "
              f"{r['markdown_s']:.3f} | {r['total_s']:.2f} |")
    print(f"median total: {statistics.median(r['total_s'] for r in results):.2f} s (target < 10 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
