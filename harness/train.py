"""Train one run from a config file: `python -m harness.train RUN.yaml [key=value ...]`.

One run by hand, to debug it. Launched jobs do not come through here: they call
`harness.job.TrainJob` (the submitit callable), which calls `harness.engine.run`, the same engine
this command runs. Re-running the same command resumes from `<output_dir>/checkpoint.pth` into the
same MLflow run.

Without `output_dir` in the file or the overrides, the run writes to `runs/debug/<run key>/`:
the same configuration resumes its own folder, a changed one (another override) gets a new
folder and never resumes or returns another configuration's state. A folder that holds another
run key's state is refused (harness/runstate.py).

Exit codes: 0 done, 1 the run failed (e.g. a NaN loss) or the environment stopped it (tracking
server unreachable, disk full), 2 invalid input (one line naming the file and field), 143
preempted (checkpoint written; run the same command to resume).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from harness.config import ConfigError, RunConfig, load_run_config
from harness.errors import EXIT_FAILED, EXIT_INVALID, EXIT_PREEMPTED, handle
from harness.inputs import check_run_inputs
from harness.store import check_store, resolve_uri

DEBUG_ROOT = Path("runs/debug")


def prepare(config: str, overrides: list[str]) -> RunConfig:
    """The validated config, its output folder chosen and writable, its files and store checked."""
    cfg = load_run_config(config, overrides)
    chosen_dir = "output_dir" not in cfg.model_fields_set
    if chosen_dir:
        cfg.output_dir = str(DEBUG_ROOT / cfg.run_key())
    problems = check_run_inputs(cfg, config, lambda field: field)
    if problems:
        raise ConfigError(problems)
    uri, source = resolve_uri(cfg.tracking.uri, f"{config}: tracking.uri")
    check_store(uri, source, must_exist=False, write=True)
    out = Path(cfg.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(
            [f"{config}: output_dir: cannot create the folder ({err.strerror}), got {str(out)!r}"]
        ) from None
    if not out.is_dir() or not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError([f"{config}: output_dir: not a writable folder, got {str(out)!r}"])
    if chosen_dir:
        print(
            f"output_dir: {cfg.output_dir} (this configuration's own folder; set output_dir=... to choose)",
            file=sys.stderr,
        )
    return cfg


def train(args: argparse.Namespace, chosen: dict[str, RunConfig]) -> int:
    cfg = chosen["cfg"] = prepare(args.config, args.overrides)

    from harness.engine import NonFiniteLoss, Preempted, run  # torch is imported only from here

    try:
        metrics = run(cfg)
    except ConfigError:
        raise
    except (ValueError, FileNotFoundError) as err:  # e.g. weights that do not fit the model
        print(
            f"{args.config}: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}",
            file=sys.stderr,
        )
        return EXIT_INVALID
    except NonFiniteLoss as err:
        print(f"{args.config}: run failed: {err}", file=sys.stderr)
        return EXIT_FAILED
    except Preempted as err:
        print(f"{args.config}: preempted: {err}", file=sys.stderr)
        return EXIT_PREEMPTED
    if metrics:  # rank 0 only
        print(json.dumps(metrics, indent=2, sort_keys=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m harness.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", help="run configuration YAML (see harness/config.py for every field)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=2 model.keep_ratio=0.5")
    args = parser.parse_args(argv)
    chosen: dict[str, RunConfig] = {}

    def log_dir() -> Path | None:  # a traceback goes beside the run's own files when it has a folder
        return Path(chosen["cfg"].output_dir) if "cfg" in chosen else None

    return handle("harness.train", lambda: train(args, chosen), log_dir)


if __name__ == "__main__":
    sys.exit(main())
