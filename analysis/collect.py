"""Training runs of one experiment (= one spec) from MLflow, one DataFrame row per run.

One `mlflow.search_runs` call and column-wise pandas, so that regenerating a table over a
thousand runs takes about a second; nothing here loads a model or an artifact.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Optional

import mlflow
import numpy as np
import pandas as pd

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
COLUMNS = ["row", "variant", "scale", "seed", "keep_ratio", "gflops", "params_m", "throughput_img_s",
           "acc1", "acc5", "run_id", "status", "stage"]
EXTRA_COLUMNS = [c for c in _SOURCES if c not in COLUMNS] + ["end_time"]


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


def experiment_exists(tracking_uri: str, experiment: str) -> bool:
    """Whether the store has an active experiment of that name (the report CLI checks first)."""
    found = mlflow.MlflowClient(tracking_uri).get_experiment_by_name(experiment)
    return found is not None and found.lifecycle_stage == "active"


def collect_runs(tracking_uri: str, experiment: str, scale: Optional[str] = None) -> pd.DataFrame:
    """Finished training runs of `experiment`, optionally of one `scale` (tag), newest first.

    Training runs are those tagged `kind=train`, or untagged `kind` but carrying a `row` tag
    (runs made before the launcher set `kind`); launch (parent) runs are left out. Metrics are
    each run's latest value, i.e. the final epoch, except `acc1`: the best epoch's top-1
    (`val/acc1_best`), the number both official scripts report (`max_accuracy`), or the final
    epoch's for runs logged before the harness recorded the best (`acc1_final` is always the final
    epoch's; with EMA on, `acc1_ema_best` is the EMA model's best); `keep_ratio` is 1.0 for the dense variant
    (its `model.keep_ratio` param is unused). A run repeated with the same `run_key`
    (same config and seed) counts once, the newest, so that a re-launch never looks like an
    extra seed. An experiment that does not exist yields an empty frame.
    """
    filters = ["attributes.status = 'FINISHED'"]
    if scale is not None:
        filters.append(f"tags.scale = {_quote(scale)}")
    with _tracking_uri(tracking_uri):
        if mlflow.get_experiment_by_name(experiment) is None:
            return empty_runs()
        raw = mlflow.search_runs(
            experiment_names=[experiment], filter_string=" and ".join(filters),
            order_by=["attributes.end_time DESC"], output_format="pandas",
        )
    assert isinstance(raw, pd.DataFrame)
    if raw.empty:
        return empty_runs()

    nothing = pd.Series(None, index=raw.index, dtype=object)
    kind, row = raw.get("tags.kind", nothing), raw.get("tags.row", nothing)
    raw = raw[(kind == "train") | (kind.isna() & row.notna())]

    def column(name: str) -> pd.Series:
        return raw[name] if name in raw else pd.Series(None, index=raw.index, dtype=object)

    frame = pd.DataFrame({name: column(source) for name, (source, _) in _SOURCES.items()})
    frame["run_id"] = raw["run_id"]
    frame["status"] = raw["status"]
    frame["end_time"] = raw["end_time"]
    frame["variant"] = frame["variant"].where(frame["variant"].notna(), column("params.model.variant"))
    frame = _typed(frame)
    frame["acc1"] = frame["acc1"].fillna(frame["acc1_final"])  # runs from before val/acc1_best existed
    frame.loc[frame["variant"] == "dense", "keep_ratio"] = 1.0  # a dense model keeps every token
    keyed = frame["run_key"].notna()
    frame = pd.concat([frame[keyed].drop_duplicates("run_key", keep="first"), frame[~keyed]])
    return frame.reindex(columns=COLUMNS + EXTRA_COLUMNS).reset_index(drop=True)


def pick_run(runs: pd.DataFrame, row: str) -> Optional[str]:
    """The run id to illustrate a table row with (lowest seed, then newest); None if it has no run."""
    chosen = runs[runs["row"] == row]
    if chosen.empty:
        return None
    seeds = chosen["seed"].astype(float).fillna(np.inf)
    return str(chosen.assign(_seed=seeds).sort_values(["_seed", "end_time"], ascending=[True, False])
               ["run_id"].iloc[0])
