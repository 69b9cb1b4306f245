"""Training runs of one experiment (= one spec) from MLflow, one DataFrame row per run.

A database store (sqlite, postgresql, mysql, mssql URIs) is read with one query per table
(runs, tags, params, latest metrics) through MLflow's own table models, selecting only the tags
and metrics below and the params (every one: a run's configuration, `configuration`):
`mlflow.search_runs` would load every param and tag of every run as ORM objects (2 s for
1,000 runs of 83 params, benchmarks/table_regeneration.py). Any other store (an MLflow server,
a file store) goes through one `mlflow.search_runs` call. Column-wise pandas either way;
nothing here loads a model or an artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import cache
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from analysis.tables import one_configuration
from harness.lifecycle import RunState, status_filter

# output column -> (search_runs column, kind); numbers become float, seeds nullable ints
_SOURCES: dict[str, tuple[str, str]] = {
    "row": ("tags.row", "str"),
    "variant": ("tags.variant", "str"),
    "scale": ("tags.scale", "str"),
    "stage": ("tags.stage", "str"),
    "spec": ("tags.spec", "str"),
    "table": ("tags.table", "str"),
    "run_key": ("tags.run_key", "str"),
    "model": ("params.model.name", "str"),
    "seed": ("params.train.seed", "int"),
    "epochs": ("params.train.epochs", "int"),
    "keep_ratio": ("params.model.keep_ratio", "float"),
    "gflops": ("metrics.gflops", "float"),
    "params_m": ("metrics.params_m", "float"),
    "throughput_img_s": ("metrics.throughput_img_s", "float"),
    "acc1": ("metrics.val/acc1_best", "float"),  # what the official code reports; see collect_runs
    "acc1_final": ("metrics.val/acc1", "float"),
    "acc1_ema_best": ("metrics.val_ema/acc1_best", "float"),
    "acc5": ("metrics.val/acc5", "float"),
    "val_loss": ("metrics.val/loss", "float"),
    **{f"train_keep_stage{s}": (f"metrics.train/keep_stage{s}", "float") for s in (1, 2, 3)},
    **{f"val_keep_stage{s}": (f"metrics.val/keep_stage{s}", "float") for s in (1, 2, 3)},
}
COLUMNS = [
    "row",
    "variant",
    "scale",
    "seed",
    "keep_ratio",
    "gflops",
    "params_m",
    "throughput_img_s",
    "acc1",
    "acc5",
    "run_id",
    "status",
    "stage",
]
EXTRA_COLUMNS = [c for c in _SOURCES if c not in COLUMNS] + ["end_time", "config", "config_params"]
# every tag and metric column of search_runs that collect_runs reads (and every param: `configuration`)
_WANTED = sorted({source for source, _ in _SOURCES.values()} | {"tags.kind", "params.model.variant"})
# another run's folder, by the param that names that run's key (as RunConfig.run_key counts it)
_RUN_REFERENCES = {
    "teacher.run_dir": "tracking.tags.teacher_run_key",
    "train.init_from": "tracking.tags.init_from_run_key",
}
_DATABASES = ("sqlite", "postgresql", "mysql", "mssql")  # the SQL stores MLflow supports


@contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """`mlflow.search_runs` only reads the global tracking URI: set it, then put back what was there."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)  # type: ignore[arg-type]  # None unsets it again
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env


def _quote(value: str) -> str:
    return "'" + value.replace("'", "\\'") + "'"


def empty_runs() -> pd.DataFrame:
    """The frame `collect_runs` returns when there is nothing to collect (same columns)."""
    return _typed(pd.DataFrame({c: pd.Series(dtype=object) for c in COLUMNS + EXTRA_COLUMNS}))


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    for column, (_, kind) in _SOURCES.items():
        if kind == "float":
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
        elif kind == "int":
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("Int64")
    return frame


def configuration(params: Mapping[str, str]) -> dict[str, str]:
    """A run's configuration but its seed, from its params (the resolved RunConfig, dotted keys).

    What `RunConfig.run_key` hashes less `train.seed`: not where the run is written or how it is
    tracked (`output_dir`, `tracking.*`), and another run's folder (the teacher, `init_from`) by that
    run's key where the launcher tagged it, not by its path. Two runs of one row with the same
    configuration are seeds of one experiment; the tables average nothing else (tables.one_configuration).
    """
    config = {
        key: value
        for key, value in params.items()
        if key not in ("train.seed", "output_dir") and not key.startswith("tracking.")
    }
    for path, key in _RUN_REFERENCES.items():
        if path in config and params.get(key):
            config[path] = f"run {params[key]}"
    return config


def _configurations(raw: pd.DataFrame) -> tuple[list[str], list[dict[str, str]]]:
    """Per run of a search_runs frame: a short hash of its `configuration` and the configuration."""
    columns = [column for column in raw.columns if column.startswith("params.")]
    names = [column.removeprefix("params.") for column in columns]
    configs = [
        configuration({name: v for name, v in zip(names, values, strict=True) if isinstance(v, str)})
        for values in raw[columns].to_numpy(dtype=object)
    ]
    digests = [hashlib.sha1(json.dumps(c, sort_keys=True).encode()).hexdigest()[:12] for c in configs]
    return digests, configs


def experiment_exists(tracking_uri: str, experiment: str) -> bool:
    """Whether the store has an active experiment of that name (the report CLI checks first)."""
    found = mlflow.MlflowClient(tracking_uri).get_experiment_by_name(experiment)
    return found is not None and found.lifecycle_stage == "active"


def collect_runs(
    tracking_uri: str, experiment: str, scale: str | None = None, params: Sequence[str] = ()
) -> pd.DataFrame:
    """Finished training runs of `experiment`, optionally of one `scale` (tag), newest first.

    `params`: more run params to read in the same query, as columns `params.<key>` (MLflow's
    strings; None where a run has none), e.g. the peers table's model knobs.

    Training runs are those tagged `kind=train`, or untagged `kind` but carrying a `row` tag
    (runs made before the launcher set `kind`); launch (parent) runs are left out. Metrics are
    each run's latest value, i.e. the final epoch, except `acc1`: the best epoch's top-1
    (`val/acc1_best`), the number both official scripts report (`max_accuracy`), or the final
    epoch's for runs logged before the harness recorded the best (`acc1_final` is always the final
    epoch's; with EMA on, `acc1_ema_best` is the EMA model's best); `keep_ratio` is 1.0 for the dense variant
    (its `model.keep_ratio` param is unused). A run repeated with the same `run_key`
    (same config and seed) counts once, the newest, so that a re-launch never looks like an
    extra seed. `config` (a hash) and `config_params` (a dict) are the run's `configuration`, all
    but its seed: runs of one row alike there are seeds of one experiment. An experiment that does
    not exist yields an empty frame.
    """
    extra = [f"params.{key}" for key in params]
    filters = [status_filter(RunState.FINISHED)]
    if scale is not None:
        filters.append(f"tags.scale = {_quote(scale)}")
    with _tracking_uri(tracking_uri):
        found = mlflow.get_experiment_by_name(experiment)
        if found is None:
            return empty_runs().assign(**{column: pd.Series(dtype=object) for column in extra})
        if is_database(tracking_uri):
            raw = _search_database(tracking_uri, found.experiment_id, scale)
        else:
            raw = mlflow.search_runs(
                experiment_ids=[found.experiment_id],
                filter_string=" and ".join(filters),
                order_by=["attributes.end_time DESC"],
                output_format="pandas",
            )
    assert isinstance(raw, pd.DataFrame)
    if raw.empty:
        return empty_runs().assign(**{column: pd.Series(dtype=object) for column in extra})

    nothing = pd.Series(None, index=raw.index, dtype=object)
    kind, row = raw.get("tags.kind", nothing), raw.get("tags.row", nothing)
    raw = raw[(kind == "train") | (kind.isna() & row.notna())]

    def column(name: str) -> pd.Series:
        return raw[name] if name in raw else pd.Series(None, index=raw.index, dtype=object)

    frame = pd.DataFrame({name: column(source) for name, (source, _) in _SOURCES.items()})
    frame["run_id"] = raw["run_id"]
    frame["status"] = raw["status"]
    frame["end_time"] = raw["end_time"]
    frame["config"], frame["config_params"] = _configurations(raw)
    for name in extra:
        frame[name] = column(name).astype(object).where(column(name).notna(), None)
    frame["variant"] = frame["variant"].where(frame["variant"].notna(), column("params.model.variant"))
    frame = _typed(frame)
    frame["acc1"] = frame["acc1"].fillna(frame["acc1_final"])  # runs from before val/acc1_best existed
    frame.loc[frame["variant"] == "dense", "keep_ratio"] = 1.0  # a dense model keeps every token
    keyed = frame["run_key"].notna()
    frame = pd.concat([frame[keyed].drop_duplicates("run_key", keep="first"), frame[~keyed]])
    return frame.reindex(columns=COLUMNS + EXTRA_COLUMNS + extra).reset_index(drop=True)


def is_database(tracking_uri: str) -> bool:
    """Whether the store is an SQL database MLflow writes directly (not a server, not files)."""
    return tracking_uri.split(":", 1)[0].split("+", 1)[0] in _DATABASES


@cache
def _engine(tracking_uri: str):  # type: ignore[no-untyped-def]
    """One SQLAlchemy engine per store for this process (MLflow's own factory: its pool and retries)."""
    from mlflow.store.db.utils import create_sqlalchemy_engine_with_retry

    return create_sqlalchemy_engine_with_retry(tracking_uri)


def _search_database(tracking_uri: str, experiment_id: str, scale: str | None) -> pd.DataFrame:
    """What `mlflow.search_runs` returns for the FINISHED active runs of an experiment (optionally
    tagged `scale`), ordered as it orders them (end time, start time newest first, then run id),
    but only the tags and metrics `collect_runs` reads (every param): one query each for runs, tags,
    params, latest metrics."""
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlParam, SqlRun, SqlTag
    from sqlalchemy import Select, select

    finished: Select[Any] = select(SqlRun.run_uuid).where(
        SqlRun.experiment_id == int(experiment_id),
        SqlRun.status == RunState.FINISHED.value,
        SqlRun.lifecycle_stage == "active",
    )
    keys = {kind: [w.split(".", 1)[1] for w in _WANTED if w.startswith(kind + ".")] for kind in ("tags", "metrics")}
    with _engine(tracking_uri).connect() as db:
        # rows as plain tuples: pandas probes a SQLAlchemy Row's attributes (~1 s for 80,000 params)
        runs = pd.DataFrame(
            map(
                tuple,
                db.execute(
                    select(SqlRun.run_uuid, SqlRun.status, SqlRun.start_time, SqlRun.end_time).where(
                        SqlRun.run_uuid.in_(finished)
                    )
                ),
            ),
            columns=["run_id", "status", "start_time", "end_time"],
        )
        wide = []
        for kind, table in (("tags", SqlTag), ("params", SqlParam), ("metrics", SqlLatestMetric)):
            nan = [table.is_nan] if kind == "metrics" else []
            named = [table.key.in_(keys[kind])] if kind in keys else []  # every param: the run's configuration
            found = pd.DataFrame(
                map(
                    tuple,
                    db.execute(
                        select(table.run_uuid, table.key, table.value, *nan).where(*named, table.run_uuid.in_(finished))
                    ),
                ),
                columns=["run_id", "key", "value", *(["is_nan"] if nan else [])],
            )
            if nan:
                found["value"] = found["value"].astype(float).where(~found["is_nan"].astype(bool))
            found["key"] = kind + "." + found["key"]
            wide.append(found.pivot(index="run_id", columns="key", values="value"))
    raw = runs.set_index("run_id").join(wide).rename_axis("run_id").reset_index()
    if scale is not None:
        raw = raw[raw.get("tags.scale", pd.Series(None, index=raw.index, dtype=object)) == scale]
    raw = raw.sort_values(
        ["end_time", "start_time", "run_id"], ascending=[False, False, True], na_position="last", kind="stable"
    )
    for column in ("start_time", "end_time"):
        raw[column] = pd.to_datetime(raw[column], unit="ms", utc=True)
    return raw.reset_index(drop=True)


def pick_run(runs: pd.DataFrame, row: str) -> str | None:
    """The run id to illustrate a table row with (lowest seed, then newest); None if it has no run.

    Only among the runs the row's numbers average (`tables.one_configuration`), not a smoke launch's.
    """
    runs = one_configuration(runs)[0]
    chosen = runs[runs["row"] == row]
    if chosen.empty:
        return None
    seeds = chosen["seed"].astype(float).fillna(np.inf)
    return str(chosen.assign(_seed=seeds).sort_values(["_seed", "end_time"], ascending=[True, False])["run_id"].iloc[0])
