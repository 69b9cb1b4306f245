"""Which Optuna storage a study lives in, as plain data every process opens the same way.

SQLite for one worker; a JournalStorage file for several workers on one machine; an RDB URL
(PostgreSQL) for workers on several nodes. RDB storages (SQLite included) get Optuna's
heartbeat, so that a trial whose process died is failed by `fail_stale_trials` (and retried
once); Optuna 5's JournalStorage has no heartbeat (it does not implement BaseHeartbeat), so for
journal files the driver fails the trials of workers it sees end (harness/search/driver.py).
"""

import dataclasses
import os
import shlex
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from harness.cluster import partition_nodes
from harness.config import ConfigError
from harness.errors import EnvironmentProblem
from harness.search.spec import SearchPlan

if TYPE_CHECKING:
    import optuna


@dataclass(frozen=True)
class StorageChoice:
    """Where the study lives; plain data, so that every worker opens the same storage."""

    kind: Literal["sqlite", "journal", "rdb"]
    location: str  # a URL (sqlite, rdb) or a journal file path: what optuna-dashboard accepts too
    heartbeat_interval: int = 30
    grace_period: int | None = None
    written: str = ""  # the URL as the spec wrote it, when it names environment variables (`${OPTUNA_STORAGE}`)
    given: bool = True  # named by the user (a damaged file is then bad input, exit 2), not chosen by `auto`

    @classmethod
    def parse(cls, text: str, heartbeat_interval: int = 30, grace_period: int | None = None) -> "StorageChoice":
        """`sqlite:///F` (relative F made absolute), `dialect://...` (RDB), anything else a journal file."""
        if text.startswith("sqlite:///"):
            file = Path(text[len("sqlite:///") :]).expanduser().resolve()
            return cls("sqlite", f"sqlite:///{file}", heartbeat_interval, grace_period)
        if "://" in text:
            return cls("rdb", text, heartbeat_interval, grace_period)
        return cls("journal", str(Path(text).expanduser().resolve()), heartbeat_interval, grace_period)

    @property
    def heartbeat(self) -> bool:
        """RDB storages (SQLite included) record heartbeats; Optuna 5's JournalStorage does not."""
        return self.kind != "journal"

    def open(self) -> "optuna.storages.BaseStorage":
        import optuna
        from optuna.storages import RetryHeartbeatStaleTrialCallback
        from optuna.storages.journal import JournalFileBackend

        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        if self.kind == "journal":
            Path(self.location).parent.mkdir(parents=True, exist_ok=True)
            try:  # replays the whole journal: a damaged record raises JSONDecodeError, UnicodeDecodeError...
                return optuna.storages.JournalStorage(JournalFileBackend(self.location))
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                line = (
                    f"{self.location}: {_damaged_record(Path(self.location), err)}; move the file aside to start "
                    f"the study afresh, got a damaged Optuna journal"
                )
                raise (ConfigError([line]) if self.given else EnvironmentProblem(line)) from None
        if self.kind == "sqlite":
            Path(self.location[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
            engine: dict[str, Any] = {"connect_args": {"timeout": 60}}  # a reader must wait, not fail
        else:
            engine = {"pool_pre_ping": True}
        # a trial failed by its stopped heartbeat (a lost node, a frozen job) is tried once more, as a
        # new WAITING trial with the same parameters that the next free worker takes
        return optuna.storages.RDBStorage(
            self.location,
            engine_kwargs=engine,
            heartbeat_interval=self.heartbeat_interval,
            grace_period=self.grace_period,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
        )

    @property
    def recorded(self) -> str:
        """What MLflow records: `${OPTUNA_STORAGE}` as written (no password in the tag), else the location."""
        return self.written or self.location

    @property
    def has_password(self) -> bool:
        """An RDB URL with a password in it (which `shown` masks)."""
        return self.kind == "rdb" and _has_password(self.location)

    @property
    def shown(self) -> str:
        """The location without its password (for printing)."""
        return _hide_password(self.location) if self.kind == "rdb" else self.location

    def dashboard(self) -> str:
        if self.written:  # the shell expands it: no password on the screen
            return f'optuna-dashboard "{self.written}"'
        return f"optuna-dashboard {shlex.quote(self.shown)}"  # a password typed into the spec shows as ***


def _damaged_record(path: Path, err: Exception | None = None) -> str:
    """`line N: not an Optuna journal record (why)` for the first line that is not JSON (a last,
    half-written line is one Optuna skips); else, given Optuna's error, that error; else ''."""
    import json

    try:
        with path.open("rb") as handle:
            lines = handle.read().split(b"\n")
    except OSError as read_err:
        return f"cannot be read ({read_err.strerror})"
    for number, raw in enumerate(lines[:-1], start=1):
        try:
            json.loads(raw)
        except ValueError as bad:
            return f"line {number}: not an Optuna journal record ({str(bad).splitlines()[0][:80]})"
    if err is None:
        return ""
    return f"a record Optuna cannot replay ({type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else ''})"


def choose_storage(plan: SearchPlan, cluster: str, given_as: str | None = None) -> StorageChoice:
    """SQLite for one worker; a journal file for several on one machine; an RDB URL across nodes.

    given_as: the option that set the URL (`--storage`), for messages; else the spec's field."""
    spec = plan.section.storage
    workers = plan.section.workers
    where = given_as or f"{plan.path}: search.storage.url"
    one_machine = cluster != "slurm" or partition_nodes(plan.slurm.partition) == 1
    if spec.url == "auto":
        if workers == 1:
            choice = StorageChoice.parse(
                f"sqlite:///{plan.study_dir / 'study.db'}", spec.heartbeat_interval, spec.grace_period
            )
            check_storage(choice, f"{where} (auto, under --output-root)")
            return choice
        if one_machine:
            choice = dataclasses.replace(StorageChoice.parse(str(plan.study_dir / "study.journal")), given=False)
            check_storage(choice, f"{where} (auto, under --output-root)")
            return choice
        raise ConfigError(
            [
                f"{where}: {workers} workers may run on different SLURM nodes: give an RDB URL "
                f"(postgresql://USER@HOST/DB), got 'auto'"
            ]
        )
    url = os.path.expandvars(spec.url)  # `url: ${OPTUNA_STORAGE}`: what scripts/tracking-server.sh status prints
    if "$" in url:
        raise ConfigError(
            [
                f"{where}: an environment variable in it is not set (scripts/tracking-server.sh status "
                f"prints OPTUNA_STORAGE), got {spec.url!r}"
            ]
        )
    choice = StorageChoice.parse(url, spec.heartbeat_interval, spec.grace_period)
    if url != spec.url:
        choice = dataclasses.replace(choice, written=spec.url)
    check_storage(choice, where)
    if choice.kind == "rdb" and not choice.written and _has_password(url):
        print(
            f"warning: {where}: the password is written out; it stays in the submitit folder's job files and in "
            "MLflow's `storage` tag: write url: ${OPTUNA_STORAGE} and export it (scripts/tracking-server.sh "
            "status prints it) to keep it out of both",
            file=sys.stderr,
        )
    if choice.kind == "sqlite" and workers > 1:
        raise ConfigError(
            [
                f"{where}: SQLite is for one process; {workers} workers need a journal file (one "
                f"machine) or an RDB URL (several nodes), got {spec.url!r}"
            ]
        )
    if choice.kind == "journal" and workers > 1 and not one_machine:
        raise ConfigError(
            [
                f"{where}: a journal file is for workers on one machine; SLURM may spread {workers} "
                f"workers over nodes: give an RDB URL (postgresql://USER@HOST/DB), got {spec.url!r}"
            ]
        )
    return choice


def check_storage(choice: StorageChoice, where: str) -> None:
    """Refuse, before anything is submitted, a storage no worker could open.

    A file (SQLite, journal) must be creatable: bad input (exit 2) when the path is a folder or
    lies under a file or a read-only place. An RDB URL must name a dialect SQLAlchemy knows (exit 2)
    whose driver is installed here (else exit 1: the environment lacks it). No connection is made.
    """
    if choice.kind == "rdb":
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError, NoSuchModuleError

        try:
            dialect = make_url(choice.location).get_dialect()
        except (ArgumentError, NoSuchModuleError, ValueError) as err:
            raise ConfigError(
                [
                    f"{where}: not a database URL SQLAlchemy knows ({str(err).splitlines()[0]}), "
                    f"got {_hide_password(choice.location)!r}"
                ]
            ) from None
        try:
            dialect.import_dbapi()
        except ImportError as err:
            hint = " (pip install -e '.[postgres]')" if dialect.name == "postgresql" else ""
            raise EnvironmentProblem(
                f"{where}: the {dialect.name}+{dialect.driver} driver is not installed "
                f"({err}){hint}, got {_hide_password(choice.location)!r}"
            ) from None
        return
    file = Path(choice.location[len("sqlite:///") :] if choice.kind == "sqlite" else choice.location)
    if file.is_dir():
        raise ConfigError([f"{where}: a folder, not a storage file, got {str(file)!r}"])
    existing = next(p for p in [file, *file.parents] if p.exists())
    if existing != file and not existing.is_dir():
        raise ConfigError([f"{where}: {existing} is a file, not a folder, got {str(file)!r}"])
    if not os.access(existing, os.W_OK):
        raise ConfigError([f"{where}: {existing} cannot be written (read-only or no permission), got {str(file)!r}"])
    if choice.kind == "journal" and file.is_file():  # a damaged record stops every worker: refuse it first
        problem = _damaged_record(file)
        if problem:
            line = (
                f"{where}: {file}: {problem}; move the file aside to start the study afresh, "
                "got a damaged Optuna journal"
            )
            raise ConfigError([line]) if choice.given else EnvironmentProblem(line)


def _has_password(url: str) -> bool:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).password is not None
    except Exception:  # check_storage has accepted it; a URL it cannot read has no password to hide
        return False


def _hide_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def open_study(location: str, study: str | None = None) -> "optuna.Study":
    """A study from a storage URL or journal file (what the notebook and the tests use)."""
    import optuna

    storage = StorageChoice.parse(os.path.expandvars(location)).open()  # a recorded `${OPTUNA_STORAGE}` too
    if study is None:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
        if len(names) != 1:
            raise ValueError(f"storage {location}: name the study, one of {names}")
        study = names[0]
    return optuna.load_study(study_name=study, storage=storage)


def find_search(tracking_uri: str, experiment: str, scale: str | None = None) -> tuple[str, str]:
    """(storage, study) of the latest search logged in an MLflow experiment (its parent run's tags)."""
    from harness.tracking import find_runs

    filters = "tags.kind = 'search'" + (f" and tags.scale = '{scale}'" if scale else "")
    runs = sorted(find_runs(tracking_uri, experiment, filters), key=lambda r: r.info.start_time or 0)
    if not runs:
        raise LookupError(f"no search in MLflow experiment {experiment!r} (scale {scale or 'any'}) at {tracking_uri}")
    return runs[-1].data.tags["storage"], runs[-1].data.tags["study"]
