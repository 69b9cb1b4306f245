"""The paper's numbers (`reference.yaml`) as a DataFrame, one row per paper table row.

Kept as data rather than code so that a reader can check every number against the paper
in one file, and so that tables, figures and tests all compare against the same values.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

REFERENCE_FILE = Path(__file__).with_name("reference.yaml")
COLUMNS = [
    "table",
    "table_name",
    "row",
    "model",
    "variant",
    "keep_ratio",
    "top1",
    "gflops",
    "throughput",
    "available",
    "anchor",
    "same_as",
    "source",
    "note",
    "top5",
    "scale",
]


@lru_cache(maxsize=4)
def _read(path: str) -> dict[str, Any]:
    with open(path) as handle:
        return yaml.safe_load(handle)["tables"]


def table_ids(path: Path = REFERENCE_FILE) -> list[str]:
    """The spec-style ids of every table (table3, table1, losses)."""
    return list(_read(str(path)))


def resolve_table(table: str, path: Path = REFERENCE_FILE) -> str:
    """A table id from either its id (`table3`) or its name / run tag (`sparsification-strategies`)."""
    tables = _read(str(path))
    if table in tables:
        return table
    for table_id, spec in tables.items():
        if spec["name"] == table:
            return table_id
    known = ", ".join(f"{k} ({v['name']})" for k, v in tables.items())
    raise KeyError(f"table: unknown table, got {table!r}; known: {known}")


def table_info(table: str, path: Path = REFERENCE_FILE) -> dict[str, Any]:
    """Title, name and gap note of one table (everything but its rows)."""
    table_id = resolve_table(table, path)
    spec = _read(str(path))[table_id]
    return {"table": table_id, **{k: v for k, v in spec.items() if k not in ("rows", "defaults")}}


def load_reference(table: str | None = None, path: Path = REFERENCE_FILE) -> pd.DataFrame:
    """The paper's rows, in the paper's order; `table` is an id or name, None for every table.

    Numbers stay NaN where the paper gives none (e.g. LV-ViT throughput at rho 0.9), never 0.
    """
    tables = _read(str(path))
    wanted = [resolve_table(table, path)] if table is not None else list(tables)
    records = []
    for table_id in wanted:
        spec = tables[table_id]
        for row in spec["rows"]:
            records.append({"table": table_id, "table_name": spec["name"], **spec.get("defaults", {}), **row})
    frame = pd.DataFrame.from_records(records).reindex(columns=COLUMNS)
    for column in ("keep_ratio", "top1", "top5", "gflops", "throughput"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
    frame["available"] = frame["available"].fillna(True).astype(bool)
    return frame
