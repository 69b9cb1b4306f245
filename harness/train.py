"""Train one run from a config file: `python -m harness.train RUN.yaml [key=value ...]`.

What every launched job calls, and what a researcher calls to debug one run. Re-running the
same command resumes from `<output_dir>/checkpoint.pth` into the same MLflow run.
Exit codes: 0 done, 1 the run failed (e.g. a NaN loss), 2 invalid input, 143 preempted
(checkpoint written; run the same command to resume).
"""
from __future__ import annotations

import argparse
import json
import sys

from harness.config import ConfigError, load_run_config

EXIT_INVALID, EXIT_FAILED, EXIT_PREEMPTED = 2, 1, 143


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m harness.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", help="run configuration YAML (see harness/config.py for every field)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=2 model.keep_ratio=0.5")
    args = parser.parse_args(argv)
    try:
        cfg = load_run_config(args.config, args.overrides)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return EXIT_INVALID

    from harness.engine import NonFiniteLoss, Preempted, run  # torch is imported only from here

    try:
        metrics = run(cfg)
    except (ValueError, FileNotFoundError) as err:
        print(f"{args.config}: {err}", file=sys.stderr)
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


if __name__ == "__main__":
    sys.exit(main())
