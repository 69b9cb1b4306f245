"""MLflow logging overhead: what one `RunTracker.log_metrics` call costs a training step.

Times N calls of 10 metrics each against a local SQLite store and against an `mlflow server`
(started here with SQLite behind it, with 1 and with 4 workers, unless --server-uri is given),
synchronous and through the background thread (`async_logging=True`, where the step only pays for queueing and
`finish()` waits for the rest: "end-to-end" includes that wait).

    python benchmarks/tracking_overhead.py [--calls 200] [--metrics 10] [--server-uri URI]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.servers is not part of the installed package

from harness.config import TrackingConfig  # noqa: E402
from harness.tracking import RunTracker  # noqa: E402
from tests.servers import mlflow_server  # noqa: E402


def measure(uri: str, calls: int, n_metrics: int, async_logging: bool) -> dict[str, float]:
    """Per-call times of log_metrics (after a short warm-up), plus the end-to-end time per call."""
    cfg = TrackingConfig(uri=uri, experiment="tracking-overhead", run_name=f"async={async_logging}")
    tracker = RunTracker.start(cfg, params={"calls": calls}, async_logging=async_logging)
    for step in range(5):
        tracker.log_metrics({f"warmup/m{i}": float(i) for i in range(n_metrics)}, step=step)
    tracker.flush()
    times = []
    start = time.perf_counter()
    for step in range(calls):
        metrics = {f"train/m{i}": 1.0 / (step + i + 1) for i in range(n_metrics)}
        t0 = time.perf_counter()
        tracker.log_metrics(metrics, step=step)
        times.append(time.perf_counter() - t0)
    tracker.flush()
    total = time.perf_counter() - start
    tracker.finish()
    times.sort()
    return {
        "mean_ms": 1000 * statistics.fmean(times),
        "p50_ms": 1000 * times[len(times) // 2],
        "p95_ms": 1000 * times[int(len(times) * 0.95)],
        "calls_s": calls / sum(times),
        "e2e_ms": 1000 * total / calls,
    }


@contextlib.contextmanager
def server(uri: str | None, root: Path, workers: int) -> Iterator[str]:
    if uri:
        yield uri
    else:
        with mlflow_server(root / f"server{workers}", workers=workers) as running:
            yield running.uri


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200, help="timed log_metrics calls per case")
    parser.add_argument("--metrics", type=int, default=10, help="metrics per call")
    parser.add_argument("--server-uri", help="use this server instead of starting one")
    parser.add_argument(
        "--server-workers", type=int, nargs="+", default=[1, 4], help="`mlflow server --workers` (4: MLflow's default)"
    )
    parser.add_argument("--no-server", action="store_true", help="SQLite only")
    args = parser.parse_args()

    cpu = platform.processor() or platform.machine()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"machine: {cpu}, {os.cpu_count()} CPUs, load average {load}; mlflow {mlflow.__version__}")
    print(f"{args.calls} calls x {args.metrics} metrics\n")
    print("| store | mode | mean ms/call | p50 ms | p95 ms | calls/s | end-to-end ms/call |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        stores = [("SQLite (local file)", contextlib.nullcontext(f"sqlite:///{Path(tmp) / 'mlflow.db'}"))]
        if args.server_uri:
            stores.append(("mlflow server (HTTP)", server(args.server_uri, Path(tmp), 0)))
        elif not args.no_server:
            for w in args.server_workers:
                stores.append((f"mlflow server, {w} worker(s)", server(None, Path(tmp), w)))
        for name, store in stores:
            with store as uri:
                for async_logging in (False, True):
                    r = measure(uri, args.calls, args.metrics, async_logging)
                    mode = "async" if async_logging else "sync"
                    print(
                        f"| {name} | {mode} | {r['mean_ms']:.2f} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} "
                        f"| {r['calls_s']:.0f} | {r['e2e_ms']:.2f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
