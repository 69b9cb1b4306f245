"""`python -m harness.search SPEC [--scale S] [--workers N] [--trials N] [--executor auto|slurm|local]`.

Exit codes: 0 budget reached, 1 the search stopped short (too many failures, workers lost),
2 invalid spec or arguments (nothing submitted).
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from harness.config import ConfigError
from harness.errors import EXIT_FAILED, EXIT_INVALID
from harness.lifecycle import Tag
from harness.search.spec import PrunerSpec, SearchPlan, load_search
from harness.search.storage import StorageChoice, choose_storage


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    overview = (sys.modules["harness.search"].__doc__ or "").split("\nModules:")[0]
    parser = argparse.ArgumentParser(
        prog="python -m harness.search",
        description=overview + "\n" + __doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("spec", help="search spec YAML, e.g. experiments/search_rho_tau.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted spec overrides, e.g. base.train.epochs=2 search.trials=8")
    parser.add_argument("--scale", help="which of the spec's scales (default: the spec's default_scale)")
    parser.add_argument("--workers", type=int, help="parallel worker jobs (default: the spec's search.workers)")
    parser.add_argument("--trials", type=int, help="global budget of complete + pruned trials (default: search.trials)")
    parser.add_argument(
        "--executor",
        choices=["auto", "slurm", "local"],
        default="auto",
        help="auto: SLURM when its controller answers (sinfo), else local processes",
    )
    parser.add_argument(
        "--storage",
        help="Optuna storage: sqlite:///FILE, postgresql://..., or a journal file "
        "(default: the spec's search.storage, auto)",
    )
    parser.add_argument("--output-root", default="runs", help="runs/<spec>/<scale>/<study>/ (default: runs)")
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the search plan, submit nothing")
    parser.add_argument(
        "--report", action="store_true", help="afterwards, execute the spec's notebooks into reports/<spec>/<scale>/"
    )
    return parser.parse_intermixed_args(argv)


def render_plan(plan: SearchPlan, storage: StorageChoice, cluster: str) -> str:
    section = plan.section
    base = plan.run.config.model_dump()
    lines = [
        f"{plan.name} ({plan.scale}): study {plan.study}, budget {section.trials} trials (complete + pruned), "
        f"{section.workers} worker(s) on {cluster}, storage {storage.kind} {storage.shown}",
        "objectives: "
        + ", ".join(f"{o.metric} ({o.direction})" for o in section.objectives)
        + f"; sampler {section.sampler.name}; pruner {(section.pruner or PrunerSpec(name='none')).name}",
        "space:",
    ]
    width = max([len(k) for k in section.space] + [len(k) for m in section.methods.values() for k in m.space] + [1])
    for key, dim in section.space.items():
        node: Any = base
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        lines.append(f"  {key.ljust(width)}  {dim.describe()}  (base {node!r})")
    for name, method in section.methods.items():  # a per-method search: each trial draws one
        fixed = ", ".join(f"{k}={v}" for k, v in method.set.items())
        lines.append(f"  method {name}" + (f" ({fixed})" if fixed else ""))
        lines += [f"    {key.ljust(width)}  {dim.describe()}" for key, dim in method.space.items()]
    if section.enqueue:
        lines.append(f"enqueued first: {len(section.enqueue)} point(s)")
    lines.append(f"each worker: {plan.slurm.describe()}; trials in {plan.study_dir}/trials/")
    return "\n".join(lines)


def failure_reasons(study: Any) -> list[str]:
    """One line per distinct reason the study's trials failed, with the trials it failed (a search whose
    trials all fail must say why, not only how many)."""
    from optuna.trial import TrialState

    reasons: dict[str, list[int]] = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        if trial.user_attrs.get("surplus"):
            continue
        why = trial.user_attrs.get(Tag.ERROR.value) or "no error recorded (its worker was lost or killed: see its log)"
        reasons.setdefault(why, []).append(trial.number)
    return [
        f"failed: trial{'s' if len(numbers) > 1 else ''} {', '.join(map(str, numbers[:10]))}"
        f"{' ...' if len(numbers) > 10 else ''}: {why}"
        for why, numbers in reasons.items()
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output_root = str(Path(args.output_root).resolve())
    from harness.cluster import choose_executor

    cluster = choose_executor(args.executor)
    try:
        typed = StorageChoice.parse(args.storage) if args.storage is not None else None
        if typed is not None and typed.has_password:  # refused as a password in --tracking-uri is
            raise ConfigError(
                [
                    "--storage: a password in the URL shows in `ps` and would be written into the job files; give "
                    "libpq the password in PGPASSWORD or ~/.pgpass instead (scripts/tracking-server.sh status "
                    f"exports it), got {typed.shown!r}"
                ]
            )
        plan = load_search(args.spec, args.overrides, args.scale, output_root, args.workers, args.trials, args.storage)
        storage = choose_storage(plan, cluster, "--storage" if args.storage is not None else None)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return EXIT_INVALID
    if args.dry_run:
        print(render_plan(plan, storage, cluster))
        return 0

    from harness.search.driver import Search
    from harness.store import StoreLock, check_store, resolve_uri

    uri, source = resolve_uri(args.tracking_uri)
    check_store(uri, source, must_exist=False, write=True)  # in seconds, one line; MLflow's set-up lines kept quiet
    try:
        with StoreLock(uri, source):  # two searches (or launches) at once: one sets up the store at a time
            search = Search(plan, storage, cluster, uri)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return EXIT_INVALID
    try:
        ok = search.watch(sys.stderr.isatty())
    except KeyboardInterrupt:  # Ctrl-C: the parent run ends KILLED, not RUNNING until a rerun
        search.interrupt("Ctrl-C (SIGINT) to the search")
        raise
    summary = search.finish(ok)
    print(
        f"{plan.name} ({plan.scale}): study {plan.study}: {summary['complete']} complete, {summary['pruned']} pruned, "
        f"{summary['fail']} failed of a budget of {plan.section.trials}; storage {storage.shown}"
    )
    for line in failure_reasons(search.study):
        print(f"  {line}")
    names = [o.metric for o in plan.section.objectives]
    for trial in summary["best"]:
        values = ", ".join(f"{n} {v:.4g}" for n, v in zip(names, trial.values, strict=True))
        print(f"  best trial {trial.number}: {values}  {json.dumps(trial.params)}")
    print(f"MLflow: experiment {plan.name!r} at {uri}, parent run {search.parent_id}")
    print(f"dashboard: {storage.dashboard()}")
    if args.report and plan.notebooks:  # the notebook finds this study through the parent run's tags
        from analysis.report import make_report

        out = Path("reports") / plan.name / plan.scale
        tables, where = make_report(plan.name, plan.scale, uri, plan.notebooks, str(out), plan.table, search.parent_id)
        print(tables, end="")
        print(f"report: {out}/")
        print(where)  # the tables, figures and notebooks on the search's parent run
    return 0 if ok else EXIT_FAILED
