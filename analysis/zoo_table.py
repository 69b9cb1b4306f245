"""The model-zoo table: each published checkpoint's acc@1, acc@5 and GFLOPs beside our evaluation.

The zoo's numbers are `reference.yaml`'s `zoo` table, the rows of one scale (`paper`: the
official checkpoints; `tiny`: this project's own, with the numbers recorded when they were made).
Ours are the finished runs of `experiments/zoo.yaml` in MLflow (`collect.collect_runs`). A
checkpoint is evaluated, not trained, so a row shows its newest run (no averaging over seeds).
Every zoo row appears: "missing" without a run, "not available" for a backbone this harness
does not build; a run whose row the zoo does not list is appended ("not in zoo").
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.reference import load_reference, table_info
from harness.files import PathLike

TABLE = "zoo"
ROW, MODEL, KEEP = "row", "model", "keep ratio"
ACC1_ZOO, ACC1_OURS, DELTA1 = "acc@1 (zoo)", "acc@1 (evaluated)", "delta acc@1"
ACC5_ZOO, ACC5_OURS, DELTA5 = "acc@5 (zoo)", "acc@5 (evaluated)", "delta acc@5"
GFLOPS_ZOO, GFLOPS_OURS = "GFLOPs (zoo)", "GFLOPs (evaluated)"
STATUS, RUN_ID = "status", "run_id"
EVALUATED, MISSING, NOT_AVAILABLE, NOT_IN_ZOO = "evaluated", "missing", "not available", "not in zoo"
DASH = "—"
GFLOPS_NOTE = (
    "GFLOPs: the zoo prints fvcore's count cut (not rounded) to one decimal; ours are "
    "exact multiply-adds, predictors included (docs/models.md): 2.97 is the zoo's 2.9."
)
TINY_NOTE = (
    "Tiny scale: the reference numbers are this project's own, measured when each tiny "
    "checkpoint was made (checkpoints/README.md); cluttered MNIST, not ImageNet."
)


def zoo_reference(scale: str) -> pd.DataFrame:
    """The zoo's rows at `scale` (paper or tiny), in the table's order."""
    ref = load_reference(TABLE)
    return ref[ref["scale"] == scale].reset_index(drop=True)


def build_zoo_table(runs: pd.DataFrame, scale: str) -> pd.DataFrame:
    """Zoo rows of `scale` joined with the newest finished run of each row (collect_runs output)."""
    ref = zoo_reference(scale)
    newest = runs[runs["row"].notna()].drop_duplicates("row", keep="first").set_index("row")  # newest first
    available = ref["available"].to_numpy(dtype=bool)
    picked = newest.reindex(
        pd.Index([r if a else None for r, a in zip(ref["row"], available, strict=True)], dtype=object)
    )
    out = pd.DataFrame(
        {
            ROW: ref["row"],
            MODEL: ref["model"],
            KEEP: ref["keep_ratio"],
            ACC1_ZOO: ref["top1"],
            ACC1_OURS: picked["acc1"].to_numpy(dtype=float),
            ACC5_ZOO: ref["top5"],
            ACC5_OURS: picked["acc5"].to_numpy(dtype=float),
            GFLOPS_ZOO: ref["gflops"],
            GFLOPS_OURS: picked["gflops"].to_numpy(dtype=float),
            RUN_ID: picked["run_id"].to_numpy(dtype=object),
        }
    )
    out[STATUS] = [
        NOT_AVAILABLE if not a else (MISSING if pd.isna(r) else EVALUATED)
        for a, r in zip(available, out[RUN_ID], strict=True)
    ]
    extra = newest[~newest.index.isin(ref["row"])]
    if not extra.empty:
        out = pd.concat(
            [
                out,
                pd.DataFrame(
                    {
                        ROW: extra.index,
                        MODEL: extra["model"],
                        KEEP: extra["keep_ratio"],
                        ACC1_OURS: extra["acc1"],
                        ACC5_OURS: extra["acc5"],
                        GFLOPS_OURS: extra["gflops"],
                        RUN_ID: extra["run_id"],
                        STATUS: NOT_IN_ZOO,
                    }
                ),
            ],
            ignore_index=True,
        )
    out[DELTA1] = out[ACC1_OURS] - out[ACC1_ZOO]
    out[DELTA5] = out[ACC5_OURS] - out[ACC5_ZOO]
    out = out[
        [
            ROW,
            MODEL,
            KEEP,
            ACC1_ZOO,
            ACC1_OURS,
            DELTA1,
            ACC5_ZOO,
            ACC5_OURS,
            DELTA5,
            GFLOPS_ZOO,
            GFLOPS_OURS,
            STATUS,
            RUN_ID,
        ]
    ]
    info = table_info(TABLE)
    notes = [f"{info['gap_note']}.", TINY_NOTE if scale == "tiny" else GFLOPS_NOTE]
    out.attrs = {"title": info["title"], "table": info["table"], "name": info["name"], "scale": scale, "notes": notes}
    return out


# ------------------------------------------------------------------------------ rendering
def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _as_given(value: Any) -> str:
    """A reference number as the zoo prints it (76.532, 2.9)."""
    return DASH if _missing(value) else repr(round(float(value), 4))


def _fmt(spec: str) -> Any:
    return lambda value: DASH if _missing(value) else format(value, spec)


_FORMATS = {
    KEEP: _as_given,
    ACC1_ZOO: _as_given,
    ACC5_ZOO: _as_given,
    GFLOPS_ZOO: _as_given,
    ACC1_OURS: _fmt(".3f"),
    ACC5_OURS: _fmt(".3f"),
    DELTA1: _fmt("+.3f"),
    DELTA5: _fmt("+.3f"),
    GFLOPS_OURS: _fmt(".3g"),
}


def display_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Every cell as printed: "missing" / "not available" instead of a number, never 0."""
    shown = pd.DataFrame(
        {
            c: [_FORMATS.get(c, lambda v: DASH if _missing(v) else str(v))(v) for v in df[c]]
            for c in df.columns
            if c not in (STATUS, RUN_ID)
        },
        index=df.index,
    )
    for i in df.index:
        status = df.at[i, STATUS]
        if status in (MISSING, NOT_AVAILABLE):
            shown.loc[i, [ACC1_OURS, ACC5_OURS, GFLOPS_OURS, DELTA1, DELTA5]] = DASH
            shown.at[i, ACC1_OURS] = status
        elif status == NOT_IN_ZOO:
            shown.at[i, ROW] = f"{df.at[i, ROW]} (not in zoo)"
    return shown


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub Markdown table with its title above and notes below."""
    shown = display_frame(df)
    lines = [
        "| " + " | ".join(shown.columns) + " |",
        "|" + "|".join("---" if c in (ROW, MODEL) else "---:" for c in shown.columns) + "|",
    ]
    lines += [
        "| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in shown.itertuples(index=False)
    ]
    attrs = df.attrs
    head = [f"**{attrs['title']} ({attrs['table']}: {attrs['name']}, scale {attrs['scale']})**", ""] if attrs else []
    tail = [""] + [f"- {note}" for note in attrs.get("notes", [])]
    return "\n".join(head + lines + tail) + "\n"


def write_tables(df: pd.DataFrame, output_dir: PathLike, stem: str = "zoo") -> dict[str, Path]:
    """`<stem>.md` (what `analysis.report` prints) and `<stem>.csv` (numbers as numbers, plus status)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(to_markdown(df))
    df.to_csv(out / f"{stem}.csv", index=False)
    return {"md": out / f"{stem}.md", "csv": out / f"{stem}.csv"}
