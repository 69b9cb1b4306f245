"""Where a spec's runs stand: `python -m harness.status experiments/table3.yaml [--scale tiny]`.

One row per run of the spec: state in MLflow (or 'not launched'), its epoch (the one being
trained, or the epochs done) and optimiser step of the total, the ETA of a running run (as
`launch --wait` shows them: harness/progress.py), best val/acc1, job id and MLflow run id.
Reads MLflow only; submits nothing, creates nothing (but an SQLite store's lock file beside it, if
no launch made one): a tracking store that does not exist (a mistyped `--tracking-uri`) or does not
answer is said in one line. A store that a launch or search is setting up is read once that is done
(it says that it waits); one whose set-up died half-way is said in one line.
Exit codes: 0 shown, 1 the tracking server did not answer or the store is not set up, 2 invalid spec or arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.errors import handle
from harness.progress import run_progress
from harness.spec import load_and_expand
from harness.store import bound_requests, open_store, resolve_uri


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m harness.status", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("spec", help="experiment spec YAML, e.g. experiments/table3.yaml")
    parser.add_argument("overrides", nargs="*", help="the launch's overrides (they change the run keys)")
    parser.add_argument("--scale", help="which of the spec's scales (default: the spec's default_scale)")
    parser.add_argument("--output-root", default="runs")
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"
    )
    args = parser.parse_intermixed_args(argv)
    return handle("harness.status", lambda: show(args))


def show(args: argparse.Namespace) -> int:
    expanded = load_and_expand(
        args.spec, args.overrides, args.scale, str(Path(args.output_root).resolve()), check_files=False
    )  # reads MLflow only: the runs' input files do not matter
    uri, source = resolve_uri(args.tracking_uri)
    bound_requests()
    client = open_store(uri, source, write=False)  # waits while a launch sets the store up

    from mlflow.entities import Run

    from harness.tracking import find_runs

    runs = find_runs(uri, expanded.spec.name, f"tags.kind = 'train' and tags.scale = '{expanded.scale}'")
    latest: dict[str, Run] = {}
    for found in sorted(runs, key=lambda r: r.info.start_time or 0):
        latest[found.data.tags.get("run_key", "")] = found
    header = ["stage", "name", "state", "epoch", "step", "ETA", "best val/acc1", "job id", "mlflow run id"]
    rows = []
    for plan in expanded.runs:
        run = latest.get(plan.key)
        if run is None:
            rows.append([plan.stage, plan.name, "not launched", "-", "-", "-", "-", "-", "-"])
            continue
        history = client.get_metric_history(run.info.run_id, "val/acc1")
        best = f"{max(m.value for m in history):.2f}" if history else "-"
        # every epoch logs its time (epoch), train/loss_step every optim.log_every steps (step)
        epoch, step, eta = run_progress(run, plan.stage, plan.name, plan.config.train.epochs).columns()
        tags = run.data.tags
        rows.append(
            [
                plan.stage,
                plan.name,
                run.info.status,
                epoch,
                step,
                eta,
                best,
                tags.get("slurm_job_id") or tags.get("job_id", "-"),
                run.info.run_id,
            ]
        )
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    for line in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
