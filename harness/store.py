"""Which MLflow store a command talks to, and whether it can, asked in seconds before anything else.

MLflow retries an unreachable server for minutes and an unwritable SQLite file for ~100 s
before it raises; a mistyped SQLite path silently becomes a new, empty store. Every command
therefore checks its store first, within a few seconds, and says which store it could not use:
`--tracking-uri: cannot reach the MLflow tracking server (Connection refused), got http://...`.
Standard library only: no MLflow import on this path.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlparse

from harness.config import ConfigError
from harness.errors import EnvironmentProblem

PROBE_TIMEOUT_S = 5.0
SQLITE_HEADER = b"SQLite format 3\x00"
# A command (not a training job) gives up on an unanswering server after about a minute, not ten
CLI_REQUEST_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
_SET_BY_US = "DVIT_BOUNDED_MLFLOW_ENV"  # which of CLI_REQUEST_LIMITS this process set (jobs undo them)


def resolve_uri(cli_value: Optional[str]) -> tuple[str, str]:
    """(uri, where it came from): the option, else $MLFLOW_TRACKING_URI, else ./mlflow.db (absolute)."""
    if cli_value:
        return cli_value, "--tracking-uri"
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env, "$MLFLOW_TRACKING_URI"
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}", "tracking store (default ./mlflow.db)"


def sqlite_path(uri: str) -> Optional[Path]:
    """The file of a `sqlite:///` URI (None for another kind of store, or an in-memory one)."""
    if not uri.startswith("sqlite:///"):
        return None
    rest = unquote(uri[len("sqlite:///"):].split("?", 1)[0])
    return Path(rest) if rest and rest != ":memory:" else None


def quiet_store_setup() -> None:
    """Keep MLflow's INFO lines about setting up a store ("Creating initial MLflow database
    tables", each alembic migration) off the commands' output; its warnings and errors still show.

    Levels on these loggers (not on `mlflow`, which MLflow configures when imported) survive that
    configuration, whichever comes first.
    """
    for name in ("mlflow.store", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def check_store(uri: str, source: str, *, must_exist: bool, write: bool,
                timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Raise ConfigError (the URI names something unusable) or EnvironmentProblem (a server that
    does not answer) within about `timeout_s`; return when the store looks usable.

    `must_exist`: a read-only command (status, report) refuses a store that does not exist yet,
    instead of creating an empty one and reporting that nothing was launched.
    """
    quiet_store_setup()
    db = sqlite_path(uri)
    if db is not None:
        _check_sqlite(db, uri, source, must_exist=must_exist, write=write, timeout_s=timeout_s)
    elif urlparse(uri).scheme in ("http", "https"):
        _check_server(uri, source, timeout_s)


def _check_sqlite(db: Path, uri: str, source: str, *, must_exist: bool, write: bool, timeout_s: float) -> None:
    if db.is_dir():
        raise ConfigError([f"{source}: a folder, not an SQLite file, got {uri!r}"])
    if not db.exists():
        if must_exist:
            hint = " (nothing was launched from this folder?)" if "default" in source else ""
            raise ConfigError([f"{source}: no such SQLite file{hint}, got {uri!r}"])
        folder = db.parent if str(db.parent) else Path(".")
        if not folder.is_dir():
            raise ConfigError([f"{source}: the folder of the SQLite file does not exist, got {uri!r}"])
        if write and not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError([f"{source}: cannot create the SQLite file (folder not writable), got {uri!r}"])
        return
    try:
        with db.open("rb") as handle:
            header = handle.read(len(SQLITE_HEADER))
    except OSError as err:
        raise ConfigError([f"{source}: cannot read the SQLite file ({err.strerror}), got {uri!r}"]) from None
    if header and header != SQLITE_HEADER:
        raise ConfigError([f"{source}: not an SQLite database, got {uri!r}"])
    if header:
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=timeout_s) as con:
                con.execute("select count(*) from sqlite_master").fetchone()
        except sqlite3.OperationalError as err:
            if "locked" not in str(err):
                raise ConfigError([f"{source}: cannot open the SQLite database ({err}), got {uri!r}"]) from None
        except sqlite3.DatabaseError as err:  # "file is not a database", "database disk image is malformed"
            raise ConfigError([f"{source}: a damaged SQLite database ({err}), got {uri!r}"]) from None
    if write and not (os.access(db, os.W_OK) and os.access(db.parent, os.W_OK | os.X_OK)):
        raise ConfigError([f"{source}: the SQLite file (or its folder, for the journal) is not writable, got {uri!r}"])


def _check_server(uri: str, source: str, timeout_s: float) -> None:
    """Any HTTP answer means a server is there (MLflow's /health, or a proxy's error page)."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s):
            return
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        raise EnvironmentProblem(f"{source}: cannot reach the MLflow tracking server within {timeout_s:.0f} s "
                                 f"({reason}), got {uri!r}") from None


def bound_requests() -> None:
    """Make this command's MLflow HTTP calls give up within about a minute (unless the user chose)."""
    ours = [key for key in CLI_REQUEST_LIMITS if key not in os.environ]
    for key in ours:
        os.environ[key] = CLI_REQUEST_LIMITS[key]
    if ours:
        os.environ[_SET_BY_US] = ",".join(ours)


def unbound_requests() -> None:
    """In a training job started by a command: MLflow's own patient defaults again (outages pass)."""
    for key in os.environ.pop(_SET_BY_US, "").split(","):
        if key:
            os.environ.pop(key, None)
