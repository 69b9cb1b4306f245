"""`python -m harness.launch`: the arguments and the launch's flow (check, dry run or submit, wait, report).

The help text is the package's docstring (harness/launch/__init__.py) up to its module list.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

from harness.cluster import choose_executor
from harness.config import ConfigError
from harness.errors import EXIT_FAILED, handle
from harness.launch.plan import check_output_root, check_report_inputs, check_run_folders, render_table
from harness.launch.report import print_urls, report
from harness.launch.submit import Launch
from harness.launch.wait import interrupts_deferred, wait_for
from harness.lifecycle import RunState
from harness.spec import MAX_RUNS, load_and_expand
from harness.store import StoreLock, bound_requests, check_store, resolve_uri


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    overview = (sys.modules["harness.launch"].__doc__ or "").split("\nModules:")[0]
    parser = argparse.ArgumentParser(
        prog="python -m harness.launch", description=overview, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("spec", help="experiment spec YAML, e.g. experiments/table3.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted spec overrides, e.g. base.train.epochs=2")
    parser.add_argument("--scale", help="which of the spec's scales (default: the spec's default_scale)")
    parser.add_argument(
        "--executor",
        choices=["auto", "slurm", "local", "debug"],
        default="auto",
        help="auto: SLURM when its controller answers (sinfo), else local processes",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the expanded runs, submit nothing")
    parser.add_argument("--rerun", action="store_true", help="run again even runs that already finished")
    parser.add_argument("--wait", action="store_true", help="follow the runs to the end, then report")
    parser.add_argument("--output-root", default="runs", help="runs/<spec>/<scale>/<stage>/<run>/ (default: runs)")
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"
    )
    parser.add_argument(
        "--max-runs",
        type=int,
        default=MAX_RUNS,
        metavar="N",
        help=f"refuse a spec that expands to more than N runs (default: {MAX_RUNS})",
    )
    return parser.parse_intermixed_args(argv)


class _Terminated(KeyboardInterrupt):
    """SIGTERM (scancel of a launcher job, `kill`, harness.cancel): stop like Ctrl-C."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return handle("harness.launch", lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    output_root = Path(args.output_root).resolve()
    if args.max_runs < 1:
        raise ConfigError([f"--max-runs: must be at least 1, got {args.max_runs}"])
    expanded = load_and_expand(args.spec, args.overrides, args.scale, str(output_root), max_runs=args.max_runs)
    check_report_inputs(expanded)
    for note in expanded.notes:  # an override that some runs' own layers undo: which ones, and why
        print(note, file=sys.stderr)
    if args.dry_run:
        print(render_table(expanded))
        return 0
    uri, source = resolve_uri(args.tracking_uri)
    check_store(uri, source, must_exist=False, write=True)
    check_output_root(output_root)
    check_run_folders(expanded, output_root)
    bound_requests()
    cluster = choose_executor(args.executor)
    launch = Launch(expanded, uri, cluster, args.rerun, output_root, StoreLock(uri, source))
    progress = sys.stderr.isatty()
    status = RunState.KILLED  # unless the launch gets to the end
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        ok = launch.submit_all(progress)
        if ok and args.wait and cluster == "slurm":
            ok = wait_for([j for jobs in launch.jobs.values() for j in jobs], progress, watch=launch.watch)
        status = RunState.FINISHED if ok else RunState.FAILED
    except KeyboardInterrupt as stop:  # Ctrl-C, or TERM (_Terminated): runs not submitted, local jobs end KILLED
        with interrupts_deferred():  # a second Ctrl-C (the jobs take up to a minute to stop) waits for the clean-up
            launch.stop("SIGTERM to the launch" if isinstance(stop, _Terminated) else "Ctrl-C (SIGINT) to the launch")
        raise
    except Exception:
        status = RunState.FAILED
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        launch.finish(status)
    submitted = sum(len(j) for j in launch.jobs.values())
    print(
        f"{expanded.spec.name} ({expanded.scale}): {submitted} submitted, {len(launch.skipped)} skipped "
        f"({', '.join(sorted(set(launch.skipped.values()))) or 'none'}); MLflow experiment "
        f"{expanded.spec.name!r} at {uri}, parent run {launch._parent_id or 'none (nothing submitted)'}"
    )
    if ok and args.wait:
        report(expanded, uri, launch._parent_id)
    print_urls(launch, uri, finished=cluster == "local" or args.wait)
    return 0 if ok else EXIT_FAILED
