"""Which MLflow store a command talks to, and whether it can, asked in seconds before anything else.

MLflow retries an unreachable server for minutes and an unwritable SQLite file for ~100 s
before it raises; a mistyped SQLite path silently becomes a new, empty store. Every command
therefore checks its store first, within a few seconds, and says which store it could not use:
`--tracking-uri: cannot reach the MLflow tracking server (Connection refused), got http://...`.
Standard library only: no MLflow import on this path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import re
import sqlite3
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from harness.config import ConfigError
from harness.errors import EnvironmentProblem

if TYPE_CHECKING:
    from mlflow import MlflowClient

PROBE_TIMEOUT_S = 5.0
LOCK_WAIT_S = 10.0  # another process's write transaction on an SQLite store: waited out this long, then one line
SQLITE_HEADER = b"SQLite format 3\x00"
# A command (not a training job) gives up on an unanswering server after about a minute, not ten
CLI_REQUEST_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
_SET_BY_US = "DVIT_BOUNDED_MLFLOW_ENV"  # which of CLI_REQUEST_LIMITS this process set (jobs undo them)


def resolve_uri(cli_value: str | None, where: str = "--tracking-uri") -> tuple[str, str]:
    """(uri, where it came from): the option (or the file field `where` names), else $MLFLOW_TRACKING_URI,
    else ./mlflow.db (absolute).

    Credentials never travel in the URI (it is printed, tagged and written into job files): in
    $MLFLOW_TRACKING_URI they move to MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (what
    MLflow's client and every job read); on a command line (visible in `ps`) or in a file they are refused.
    """
    if cli_value:
        clean, user, password = _credentials(cli_value)
        if password is not None:
            why = "shows in `ps`" if where.startswith("--") else "would be printed, tagged in MLflow"
            raise ConfigError(
                [
                    f"{where}: a password in the URI {why} and would be written into job files; export "
                    f"MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD instead, got {masked(cli_value)!r}"
                ]
            )
        _export({"MLFLOW_TRACKING_USERNAME": user})
        return clean, where
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        clean, user, password = _credentials(env)
        _export({"MLFLOW_TRACKING_URI": clean, "MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password})
        return clean, "$MLFLOW_TRACKING_URI"
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}", "tracking store (default ./mlflow.db)"


def _credentials(uri: str) -> tuple[str, str | None, str | None]:
    """(the http(s) URI without `user:password@`, user, password); other URIs are returned as they are."""
    parts = urlparse(uri)
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return uri, None, None
    host = parts.netloc.rsplit("@", 1)[1]
    clean = parts._replace(netloc=host).geturl()
    user = unquote(parts.username) if parts.username is not None else None
    return clean, user, unquote(parts.password) if parts.password is not None else None


def _export(values: dict[str, str | None]) -> None:
    """Set the given variables (None: leave alone): what this process's MLflow client and its jobs read."""
    for key, value in values.items():
        if value is not None:
            os.environ[key] = value


def masked(uri: str) -> str:
    """The URI with its password (if any) shown as ***, for messages."""
    clean, user, password = _credentials(uri)
    if user is None and password is None:
        return uri
    parts = urlparse(clean)
    return parts._replace(netloc=f"{user or ''}{':***' if password is not None else ''}@{parts.netloc}").geturl()


def sqlite_path(uri: str) -> Path | None:
    """The file of a `sqlite:///` URI (None for another kind of store, or an in-memory one)."""
    if not uri.startswith("sqlite:///"):
        return None
    rest = unquote(uri[len("sqlite:///") :].split("?", 1)[0])
    return Path(rest) if rest and rest != ":memory:" else None


def quiet_store_setup() -> None:
    """Keep MLflow's INFO lines about setting up a store ("Creating initial MLflow database
    tables", each alembic migration) off the commands' output; its warnings and errors still show.

    Levels on these loggers (not on `mlflow`, which MLflow configures when imported) survive that
    configuration, whichever comes first.
    """
    for name in ("mlflow.store", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def check_store(uri: str, source: str, *, must_exist: bool, write: bool, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Raise ConfigError (the URI names something unusable) or EnvironmentProblem (a server that
    does not answer) within about `timeout_s`; return when the store looks usable.

    `must_exist`: a read-only command (status, report) refuses a store that does not exist yet,
    instead of creating an empty one and reporting that nothing was launched; likewise an SQLite
    file that is not a set-up MLflow store (an empty file): MLflow's client would write its tables
    into it. No command writes MLflow's tables into another application's SQLite database.
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
    tables = _tables(db, uri, source) if header else set()
    # MLflow creates `experiments` first, then runs its ~50 alembic migrations, each committed on its
    # own: `alembic_version` appears with the first (~0.1 s in), long before the store is set up, and a
    # migration that rebuilds a table leaves an `_alembic_tmp_<table>` until it commits (for good if it
    # died). A launch may go on where another is creating the store (some of its tables, or none yet);
    # a reading command only on a store that is not being set up (`open_store` waits for the launch
    # lock, under which launches and searches set stores up); nobody adds MLflow's tables to another database
    if (must_exist and not tables) or (tables and "experiments" not in tables):
        raise ConfigError([f"{source}: not an MLflow store (no MLflow tables{_holding(tables, header)}), got {uri!r}"])
    if must_exist and "alembic_version" not in tables:
        raise StoreSettingUp(
            f"{source}: an MLflow store still being set up (no alembic_version yet: another command is "
            f"creating it); try again once it has, got {uri!r}"
        )
    half_done = sorted(name for name in tables if name.startswith("_alembic_tmp_"))
    if must_exist and half_done:
        raise StoreSettingUp(
            f"{source}: an MLflow store in the middle of a schema migration (table {half_done[0]}: another "
            f"command is setting it up, or one died doing so; if this stays, the store has to be made "
            f"again), got {uri!r}"
        )
    if write and not (os.access(db, os.W_OK) and os.access(db.parent, os.W_OK | os.X_OK)):
        raise ConfigError([f"{source}: the SQLite file (or its folder, for the journal) is not writable, got {uri!r}"])
    if header and write:
        _check_write_lock(db, uri, source)


class StoreSettingUp(EnvironmentProblem):
    """An SQLite store that MLflow has not finished setting up (exit 1): perhaps another command is at it."""


def open_store(uri: str, source: str, *, write: bool) -> MlflowClient:
    """`check_store` for a command that reads an existing store (status, cancel, report), then its
    MLflow client, both under the store's `StoreLock`.

    Why: `MlflowClient` runs MLflow's whole set-up (tables, every migration) on a store that lacks
    any of its tables. A store that a launch or search is setting up looks usable well before that
    is done (see `_check_sqlite`); a second set-up beside it dies with a traceback and can leave the
    store broken for good. Launches and searches set stores up under the lock, so this waits for them
    (and says so). A server sets up its own database: no lock for http(s). A reader that cannot
    create the lock file (a read-only folder) goes on without it: it could not write the store either.
    """
    try:
        check_store(uri, source, must_exist=True, write=write)
    except StoreSettingUp:
        pass  # perhaps being set up right now: checked again once the lock is free
    from mlflow import MlflowClient  # once the store is known to be there (an import of seconds)

    if urlparse(uri).scheme in ("http", "https"):
        return MlflowClient(uri)
    with contextlib.ExitStack() as held:
        with contextlib.suppress(OSError):  # the lock file cannot be created (a read-only folder)
            held.enter_context(StoreLock(uri, source))
        check_store(uri, source, must_exist=True, write=write)
        return MlflowClient(uri)


def _holding(tables: set[str], header: bytes) -> str:
    """What a database that is not an MLflow store holds, for the message."""
    if not tables:
        return "; an empty file" if not header else "; an empty database"
    listed = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
    return f"; it holds {len(tables)} other table{'s' if len(tables) > 1 else ''}: {listed}"


def _tables(db: Path, uri: str, source: str) -> set[str]:
    """The names of the database's tables, read over a read-only connection (nothing written, not
    even a journal): whether it is an MLflow store is decided before MLflow's client opens it."""
    try:
        with contextlib.closing(
            sqlite3.connect(f"{db.absolute().as_uri()}?mode=ro", uri=True, timeout=LOCK_WAIT_S)
        ) as con:
            names = {row[0] for row in con.execute("select name from sqlite_master where type = 'table'")}
    except sqlite3.OperationalError as err:
        if "locked" in str(err):
            raise _locked(uri, source) from None
        raise ConfigError([f"{source}: cannot open the SQLite database ({err}), got {uri!r}"]) from None
    except sqlite3.DatabaseError as err:  # "file is not a database", "database disk image is malformed"
        raise ConfigError([f"{source}: a damaged SQLite database ({err}), got {uri!r}"]) from None
    return {name for name in names if not name.startswith("sqlite_")}  # not SQLite's own (sqlite_sequence)


def _locked(uri: str, source: str) -> EnvironmentProblem:
    return EnvironmentProblem(
        f"{source}: the SQLite store is locked by another process (a write transaction open "
        f"for over {LOCK_WAIT_S:.0f} s: another command, or a sqlite3 shell); try again once "
        f"it has ended, got {uri!r}"
    )


def _check_write_lock(db: Path, uri: str, source: str) -> None:
    """Whether this command could write: another process's write transaction (even one that lets
    readers through) would otherwise fail MLflow's first write after its own retries, with a traceback.

    `BEGIN IMMEDIATE` takes the write lock and `ROLLBACK` gives it back: nothing is written.
    """
    try:
        con = sqlite3.connect(str(db), timeout=LOCK_WAIT_S, isolation_level=None)
        try:
            con.execute("BEGIN IMMEDIATE")
            con.execute("ROLLBACK")
        finally:
            con.close()
    except sqlite3.OperationalError as err:
        if "locked" in str(err) or "busy" in str(err):
            raise _locked(uri, source) from None
        raise ConfigError([f"{source}: cannot open the SQLite database ({err}), got {uri!r}"]) from None


def _check_server(uri: str, source: str, timeout_s: float) -> None:
    """Any HTTP answer means a server is there (MLflow's /health, or a proxy's error page); one that
    refuses this command's credentials (basic auth, `tracking-server.sh start --auth`) is one line."""
    for path in ("/health", "/api/2.0/mlflow/experiments/search?max_results=1"):
        request = urllib.request.Request(uri.rstrip("/") + path, headers=_auth_header())
        try:
            with urllib.request.urlopen(request, timeout=timeout_s):
                continue
        except urllib.error.HTTPError as err:
            if err.code == 401:
                given = os.environ.get("MLFLOW_TRACKING_USERNAME") or os.environ.get("MLFLOW_TRACKING_TOKEN")
                why = (
                    "wrong MLFLOW_TRACKING_USERNAME or MLFLOW_TRACKING_PASSWORD"
                    if given
                    else "it needs MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, and none are set"
                )
                raise EnvironmentProblem(
                    f"{source}: the MLflow tracking server refused the credentials (401 "
                    f"Unauthorized: {why}), got {uri!r}"
                ) from None
            return  # a server answered; what it thinks of this request is for MLflow's client to say
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", None) or err
            raise EnvironmentProblem(
                f"{source}: cannot reach the MLflow tracking server within {timeout_s:.0f} s ({reason}), got {uri!r}"
            ) from None


def _auth_header() -> dict[str, str]:
    """The Authorization header MLflow's client would send (a token, else basic auth), if any."""
    import base64

    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    return {}


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


DEFAULT_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306, "mssql": 1433}
_CONNECT_PARAMS = ("host", "hostaddr", "port", "dbname", "database")  # a query that names another server or database


def lock_dir() -> Path:
    """Where the launch locks of server and PostgreSQL stores live: $DVIT_LOCK_DIR, else
    $DVIT_CACHE/locks, else ~/.cache/dvit-harness/locks.

    One folder for every launch of a user, whatever its output root or working folder: on a
    cluster the home folder is shared by the login nodes; a DVIT_LOCK_DIR must be shared the same way.
    """
    chosen = os.environ.get("DVIT_LOCK_DIR")
    if chosen:
        return Path(chosen).expanduser()
    cache = os.environ.get("DVIT_CACHE")
    return (Path(cache).expanduser() if cache else Path.home() / ".cache" / "dvit-harness") / "locks"


def store_key(uri: str) -> tuple[str, str, str]:
    """(scheme, host, the rest) of the store a URI names, spelled one way: scheme (less its driver)
    and host in lower case, the default port written out, the path normalised without its trailing
    `/`, no credentials; of the query only what picks another server or database. So
    `http://Head:80/` and `http://head` are one store.
    """
    from urllib.parse import parse_qsl, urlencode

    parts = urlparse(uri)
    scheme = parts.scheme.lower().split("+", 1)[0]  # postgresql+psycopg2 -> postgresql
    try:
        port = parts.port or DEFAULT_PORTS.get(scheme)
    except ValueError:  # not a number: the spelling stands for itself
        port = None
    path = posixpath.normpath(unquote(parts.path)).rstrip("/") if parts.path.strip("/") else ""
    query = sorted((k, v) for k, v in parse_qsl(parts.query) if k in _CONNECT_PARAMS)
    rest = f":{port or ''}{path}" + (f"?{urlencode(query)}" if query else "")
    return scheme, (parts.hostname or "").lower(), rest


class StoreLock:
    """Launches and searches on one store take turns at their MLflow bookkeeping and submissions.

    Why: two at once both find a run missing and both create and submit it (a second MLflow run and
    job for one run key), and on a new SQLite store both run MLflow's schema migration, one dying
    in it. A file lock makes the second wait; it says once what it waits for. For an SQLite store
    the lock lies beside the file (every process that reaches the file reaches it); for a server or
    a database server, in `lock_dir()`, named after the store's `store_key` (its scheme and host,
    and a hash of the rest: never credentials), so that launches with other output roots, working folders or
    spellings of the URI exclude each other too. Held for the bookkeeping and submission only, not
    while local runs train: a relaunch meanwhile sees them in flight.
    Re-entrant (nested `with` blocks of one StoreLock); released when the process dies.

    An SQLite store that another process locks after `check_store`'s probe (a sqlite3 shell, a backup
    taking its write lock just then) fails MLflow's next write under this lock after MLflow's own retries:
    that is `_locked`'s one line (exit 1, naming the store and `source`), not MLflow's traceback.
    """

    def __init__(self, uri: str, source: str = "the tracking store") -> None:
        import hashlib

        from filelock import FileLock

        db = sqlite_path(uri)
        if db is not None:
            self.path = db.with_name(db.name + ".launch.lock")
        else:
            scheme, host, rest = store_key(uri)
            digest = hashlib.sha256(f"{scheme}://{host}{rest}".encode()).hexdigest()[:16]
            self.path = lock_dir() / f"{re.sub(r'[^A-Za-z0-9.-]+', '_', f'{scheme}-{host}')}-{digest}.lock"
        self._lock = FileLock(str(self.path))
        self.waited = False
        self.uri, self.source = uri, source

    def __enter__(self) -> StoreLock:
        from filelock import Timeout

        if not self.path.parent.is_dir():
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise EnvironmentProblem(
                    f"cannot create the folder of the launch locks ({err.strerror}; set DVIT_LOCK_DIR to a "
                    f"folder every launch on this store can write), got {str(self.path.parent)!r}"
                ) from None
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            import sys

            if not self.waited:
                print(
                    f"waiting for another launch or search on this tracking store to finish submitting "
                    f"(it holds {self.path})",
                    file=sys.stderr,
                    flush=True,
                )
            self.waited = True
            self._lock.acquire()
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self._lock.release()
        if isinstance(exc, Exception) and sqlite_path(self.uri) is not None and _database_locked(exc):
            raise _locked(self.uri, self.source) from None


def _database_locked(err: BaseException) -> bool:
    """Whether SQLite's "database is locked" (or "busy") is `err` or its cause, however MLflow or
    SQLAlchemy wrapped it; not once it is `_locked`'s line already."""
    seen: BaseException | None = err
    for _ in range(10):  # a chain of wrappers, bounded
        if seen is None or isinstance(seen, EnvironmentProblem):
            return False
        if isinstance(seen, sqlite3.OperationalError) or "OperationalError" in type(seen).__name__:
            if "database is locked" in str(seen) or "database is busy" in str(seen):
                return True
        seen = seen.__cause__ or seen.__context__
    return False
