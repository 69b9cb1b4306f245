"""Fetch checkpoints ahead of the jobs: download into the cache once and verify their sha256.

    python -m harness.fetch URL_OR_FILE ...                       # URL#sha256=HEX pins a hash
    python -m harness.fetch --spec experiments/zoo.yaml --scale paper [--set KEY=VALUE ...]

For clusters whose compute nodes are offline: run it on a machine that is online and shares the
cache (`$DVIT_CACHE`, default ~/.cache/dvit-harness); the jobs then find every file cached and
verify it against the hash recorded here. Prints `sha256  path  source` per checkpoint.
A file is cached under a name keyed by its whole URL, and only once it is a whole torch
checkpoint that holds nothing but tensors, plain containers and admitted types
(harness/unpickle.py); a cache of verified files is only read (it may be read-only).
A local file is checked the same way (it is not copied). Exit codes: 0 all fetched, 1 one failed
(one line each on stderr: offline, truncated, a cache that cannot be written), 2 invalid spec, a
file refused for what it would unpickle, or a local file that is missing or not a checkpoint,
130 Ctrl-C (no partial file is left).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from harness import unpickle
from harness.errors import EXIT_FAILED, EXIT_INVALID, handle
from models.checkpoint import CheckpointError, cache_dir, fetch, is_url, read_record, sha256_of


def spec_sources(spec_path: str, scale: str | None, overrides: Sequence[str] = ()) -> list[str]:
    """Every checkpoint URL the runs of a spec at `scale` load (model, teacher, init), in order."""
    from harness.spec import load_and_expand

    sources: list[str] = []
    for plan in load_and_expand(spec_path, list(overrides), scale).runs:
        for value in (plan.config.model.pretrained, plan.config.teacher.checkpoint, plan.config.train.init_from):
            if value and is_url(value) and value not in sources:
                sources.append(value)
    return sources


def local_problem(path: Path) -> str | None:
    """Why a local file given to fetch is no good, as a download would be refused (nothing is unpickled)."""
    if not path.is_file():
        return "no such file" if not path.exists() else "not a file"
    problem = unpickle.refusal(path, crc=True)
    if problem is None or problem.startswith("refused"):  # refused: it would run code or build unknown objects
        return problem
    return f"the file is {problem}"


def main(argv: list[str] | None = None) -> int:
    return handle("harness.fetch", lambda: _main(argv))


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m harness.fetch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sources", nargs="*", help="checkpoint URLs (URL#sha256=HEX pins a hash) or files")
    parser.add_argument("--spec", help="also every checkpoint URL of this experiment spec's runs")
    parser.add_argument("--scale", help="the spec's scale (default: its default_scale)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a dotted spec override, as for the launcher (scales.paper.data.root=/data/imagenet)",
    )
    args = parser.parse_args(argv)
    sources = list(args.sources)
    if args.spec:
        from harness.config import ConfigError

        try:
            sources += [s for s in spec_sources(args.spec, args.scale, args.set) if s not in sources]
        except ConfigError as err:
            print(err, file=sys.stderr)
            return EXIT_INVALID
    if not sources:
        parser.error("give checkpoint URLs or files, or --spec SPEC")
    failed = refused = 0
    for source in sources:
        if not is_url(source):  # the user's own file: any problem is bad input (exit 2)
            local = Path(source).expanduser()
            problem = local_problem(local)
            if problem is not None:
                print(f"checkpoint: {local}: {problem}", file=sys.stderr)
                refused += 1
            else:
                print(f"{sha256_of(local)}  {local}  {source}")
            continue
        try:
            path = fetch(source)
        except (CheckpointError, FileNotFoundError) as err:
            print(err, file=sys.stderr)
            failed += 1
            continue
        except ValueError as err:  # UnsafeCheckpoint: the URL's file would unpickle a type not admitted
            print(err, file=sys.stderr)
            refused += 1
            continue
        record = read_record(path)  # fetch just verified it
        print(f"{record['sha256'] if record else sha256_of(path)}  {path}  {source}")
    print(
        f"checkpoints in {cache_dir()}: {len(sources) - failed - refused} ok, {failed + refused} failed",
        file=sys.stderr,
    )
    return EXIT_FAILED if failed else EXIT_INVALID if refused else 0


if __name__ == "__main__":
    sys.exit(main())
