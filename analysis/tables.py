"""Paper table vs reproduction: join collected runs with `reference.yaml` by row id, render.

Every paper row appears, in the paper's order. A row with no finished run stays NaN and is
rendered "missing" (never 0, which would read as a result); a row whose model this harness
does not implement (`available: false` in reference.yaml) is rendered "not available". Runs whose
row is not in the paper are appended ("not in paper"), so that a typo in a spec's row id shows instead of vanishing.
The renderers are our own (no `tabulate`, which is not a declared dependency).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.reference import load_reference, table_info
from harness.files import PathLike

# column names of the built table (its public schema)
ROW, MODEL, KEEP = "row", "model", "keep ratio"
GFLOPS_PAPER, GFLOPS_REPRO = "GFLOPs (paper)", "GFLOPs (reproduced)"
TOP1_PAPER, TOP1_REPRO, STD, DELTA = "top-1 (paper)", "top-1 (reproduced)", "std", "delta"
GAP_PAPER, GAP_REPRO = "gap to anchor (paper)", "gap to anchor (reproduced)"
SPEED_PAPER, SPEED_REPRO = "img/s (paper)", "img/s (reproduced)"
RUNS, RUNS_FROM, STATUS = "runs", "runs from", "status"
SEEDS, CI95 = "seeds", "95% CI"
KEEP_TRAINED, KEEP_TESTED = "keep trained", "keep tested"
KEEP_TOLERANCE = 0.03  # docs/tiny-scale.md: a learned selector has converged when it trains on what it is tested on

REPRODUCED, MISSING, NOT_AVAILABLE, NOT_IN_PAPER = "reproduced", "missing", "not available", "not in paper"
DASH = "—"
PROXY_NOTE = (
    "Reproduced numbers are the tiny CPU proxy (cluttered MNIST, a small ViT; docs/tiny-scale.md), not "
    "ImageNet: compare each row's gap to the anchor row, not absolute top-1 (no `delta` column: it would "
    "compare MNIST top-1 with ImageNet top-1)."
)
SUBSET_NOTE = (
    "Reproduced numbers are ImageNet-100 (the 100 CMC classes, 1000-way top-1 on their 5,000 val "
    "images, one GPU); the paper's are ImageNet-1k: compare each row's gap to the anchor row, not "
    "absolute top-1; `delta` is across datasets."
)
SCALE_NOTES = {"tiny": PROXY_NOTE, "imagenet100": SUBSET_NOTE}  # scales whose numbers are not ImageNet-1k's
DATASET_SCALES = {"tiny"}  # scales on another dataset than the paper's: no `delta` column
LEARNED_VARIANTS = {"dynamic", "static"}  # selectors trained by the ratio loss (Gumbel decisions in training)
_REPRODUCED_COLUMNS = (GFLOPS_REPRO, TOP1_REPRO, STD, CI95, DELTA, GAP_REPRO, SPEED_REPRO, KEEP_TRAINED, KEEP_TESTED)
_STAGES = (1, 2, 3)


def t_interval(std: float, n: int) -> float:
    """Half-width of the 95% t-interval of a mean over `n` seeds (NaN below 2: no spread to report)."""
    if n < 2 or std != std:
        return math.nan
    from scipy.stats import t  # scipy comes with scikit-learn (mlflow's dependency)

    return float(t.ppf(0.975, n - 1) * std / math.sqrt(n))


def _fractions(group: pd.DataFrame, prefix: str) -> str:
    """Mean kept fraction per stage over a row's runs, "0.69/0.48/0.33"; "" when none were logged."""
    means = [group[f"{prefix}_keep_stage{s}"].mean() for s in _STAGES if f"{prefix}_keep_stage{s}" in group]
    return "/".join(f"{m:.2f}" for m in means if m == m)


def keep_mismatch(runs: pd.DataFrame) -> pd.Series:
    """Per run: the largest |trained - tested| kept fraction over its stages (NaN without both)."""
    diffs = [
        (runs[f"train_keep_stage{s}"] - runs[f"val_keep_stage{s}"]).abs()
        for s in _STAGES
        if f"train_keep_stage{s}" in runs and f"val_keep_stage{s}" in runs
    ]
    if not diffs:
        return pd.Series(math.nan, index=runs.index)
    return pd.concat(diffs, axis=1).max(axis=1, skipna=True)


def one_configuration(runs: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Per row, the runs its numbers may average: the seeds of one configuration, its latest run's.

    A row can hold runs of several configurations (a smoke launch with `train.epochs=1`, then the
    real one): they are not seeds of one experiment, and the most recent launch is the one a report
    is about. So a row counts the runs whose configuration (`collect.configuration`: every param
    but the seed) is that of its most recent run, and of those one per seed, the newest. Returns
    those runs and the runs of no row, in their order, and one note line naming per row what was
    left out ("" if nothing). Runs without a `config` column (not collect_runs output) are taken as
    one configuration.
    """
    if "config" not in runs or "row" not in runs or runs["row"].isna().all():
        return runs, ""
    newest = runs[runs["row"].notna()]
    if "end_time" in runs:
        newest = newest.sort_values("end_time", ascending=False, na_position="last", kind="stable")
    config = newest["config"].fillna("")
    latest = config.groupby(newest["row"], sort=False).transform("first")
    same = config == latest
    repeated = pd.Series(False, index=newest.index)
    if "seed" in newest:  # the same configuration and seed under two run keys (e.g. a moved teacher folder)
        repeated = same & newest["seed"].notna() & newest.duplicated(["row", "config", "seed"])
    parts = []
    for row, group in newest.groupby("row", sort=True):
        other, again = group[~same[group.index]], group[repeated[group.index]]
        said = []
        if len(other):
            configs = other.drop_duplicates("config")
            what = "another configuration" if len(configs) == 1 else f"{len(configs)} other configurations"
            chosen = group["config_params"].iloc[0] if "config_params" in group else None
            diffs = "; ".join(
                _differences(chosen, c)
                for c in configs.get("config_params", [])
                if isinstance(chosen, Mapping) and isinstance(c, Mapping)
            )
            said.append(f"{_runs(len(other))} of {what}" + (f" ({diffs})" if diffs else ""))
        if len(again):
            seeds = ", ".join(str(seed) for seed in sorted(again["seed"].unique()))
            said.append(f"{_runs(len(again), 'older run')} of a seed already counted (seed {seeds})")
        if said:
            parts.append(f"{row}: {' and '.join(said)} left out")
    kept = newest.index[same & ~repeated].union(runs.index[runs["row"].isna()])
    note = (
        "a row's numbers are over the seeds of one configuration, its most recent run's (one run per seed): "
        + "; ".join(parts)
        if parts
        else ""
    )
    return runs[runs.index.isin(kept)], note


def _runs(n: int, noun: str = "run") -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _differences(chosen: Mapping[str, Any], other: Mapping[str, Any], limit: int = 3) -> str:
    """What another configuration sets otherwise, "train.epochs=1 instead of 3" (at most `limit` keys)."""
    keys = sorted(k for k in chosen.keys() | other.keys() if chosen.get(k) != other.get(k))
    shown = [f"{k}={other.get(k, 'unset')} instead of {chosen.get(k, 'unset')}" for k in keys[:limit]]
    return ", ".join(shown) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _aggregate(runs: pd.DataFrame) -> pd.DataFrame:
    """Per row: mean/std/95% interval of top-1 over its runs (spread needs >= 2), mean cost, run and
    seed counts, and for learned selectors the kept fractions trained on (the last epoch's
    mean `train/keep_stage*`) and tested on (`val/keep_stage*`), averaged over the runs."""
    runs = runs[runs["row"].notna()] if "row" in runs else runs.iloc[0:0]
    columns = ["acc1", "std", "ci95", "gflops", "speed", "runs", "seeds", "keep_trained", "keep_tested", "mismatch"]
    if runs.empty:
        return pd.DataFrame(columns=columns, dtype=float)
    grouped = runs.groupby("row", sort=False)
    std = grouped["acc1"].std(ddof=1)  # NaN for a single run: no spread to report
    count = grouped["run_id"].count()
    seeds = grouped["seed"].nunique() if "seed" in runs else count
    learned = {row: "variant" in g and g["variant"].isin(LEARNED_VARIANTS).any() for row, g in grouped}
    mismatch = keep_mismatch(runs).groupby(runs["row"], sort=False).max()
    return pd.DataFrame(
        {
            "acc1": grouped["acc1"].mean(),
            "std": std,
            "ci95": [t_interval(std[row], int(count[row])) for row in std.index],
            "gflops": grouped["gflops"].mean(),
            "speed": grouped["throughput_img_s"].mean(),
            "runs": count,
            "seeds": seeds.where(seeds > 0, count),
            "keep_trained": [_fractions(g, "train") if learned[row] else "" for row, g in grouped],
            "keep_tested": [_fractions(g, "val") if learned[row] else "" for row, g in grouped],
            "mismatch": [mismatch.get(row, math.nan) if learned[row] else math.nan for row in std.index],
        },
        index=std.index,
    )


def _single_scale(runs: pd.DataFrame) -> str | None:
    scales = sorted(runs["scale"].dropna().unique()) if "scale" in runs else []
    if len(scales) > 1:
        raise ValueError(f"runs: mix scales {scales}; collect one scale (collect_runs(..., scale=...))")
    return str(scales[0]) if scales else None


def _gaps(out: pd.DataFrame, anchors: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 minus the anchor row's of the same model, paper and reproduced (NaN without one)."""
    index = {(row, model): i for i, (row, model) in enumerate(zip(out[ROW], out[MODEL], strict=True))}
    at = [
        index.get((anchor, model)) if isinstance(anchor, str) else None
        for anchor, model in zip(anchors, out[MODEL], strict=True)
    ]

    def gap(column: str) -> np.ndarray:
        values = out[column].to_numpy(dtype=float)
        return values - np.array([values[i] if i is not None else np.nan for i in at])

    return gap(TOP1_PAPER), gap(TOP1_REPRO)


def _runs_source(ref: pd.DataFrame, agg: pd.DataFrame) -> list[str | None]:
    """Whose runs fill each paper row: its own, else its `same_as` row's, else none (missing)."""
    sources: list[str | None] = []
    for row, same, available in zip(ref["row"], ref["same_as"], ref["available"], strict=True):
        if available and row in agg.index:
            sources.append(row)
        elif available and isinstance(same, str) and same in agg.index:
            sources.append(same)
        else:
            sources.append(None)
    return sources


def build_table(runs: pd.DataFrame, table: str) -> pd.DataFrame:
    """The paper's `table` (id like `table3` or name like `sparsification-strategies`) beside the runs.

    `runs` is `collect_runs(...)` output of one scale. The result keeps numbers numeric (NaN where
    there is nothing) with a `status` column; `df.attrs` carries title, scale and notes
    for the renderers.
    """
    ref = load_reference(table)
    info = table_info(table)
    scale = _single_scale(runs)
    runs, left_out = one_configuration(runs)
    agg = _aggregate(runs)
    shared = _runs_source(ref, agg)
    picked = agg.reindex(pd.Index(shared, dtype=object))  # None -> an all-NaN row
    out = pd.DataFrame(
        {
            ROW: ref["row"].to_numpy(),
            MODEL: ref["model"].to_numpy(),
            KEEP: ref["keep_ratio"].to_numpy(),
            GFLOPS_PAPER: ref["gflops"].to_numpy(),
            GFLOPS_REPRO: picked["gflops"].to_numpy(dtype=float),
            TOP1_PAPER: ref["top1"].to_numpy(),
            TOP1_REPRO: picked["acc1"].to_numpy(dtype=float),
            STD: picked["std"].to_numpy(dtype=float),
            SPEED_PAPER: ref["throughput"].to_numpy(),
            SPEED_REPRO: picked["speed"].to_numpy(dtype=float),
            RUNS: picked["runs"].fillna(0).to_numpy(dtype=int),
            SEEDS: picked["seeds"].fillna(0).to_numpy(dtype=int),
            CI95: picked["ci95"].to_numpy(dtype=float),
            KEEP_TRAINED: picked["keep_trained"].fillna("").to_numpy(dtype=object),
            KEEP_TESTED: picked["keep_tested"].fillna("").to_numpy(dtype=object),
            RUNS_FROM: shared,
            STATUS: [
                NOT_AVAILABLE if not available else (REPRODUCED if s is not None else MISSING)
                for s, available in zip(shared, ref["available"], strict=True)
            ],
        }
    )
    extra = agg[~agg.index.isin(ref["row"])]
    if not extra.empty:
        out = pd.concat(
            [
                out,
                pd.DataFrame(
                    {
                        ROW: extra.index,
                        GFLOPS_REPRO: extra["gflops"].to_numpy(dtype=float),
                        TOP1_REPRO: extra["acc1"].to_numpy(dtype=float),
                        STD: extra["std"].to_numpy(dtype=float),
                        SPEED_REPRO: extra["speed"].to_numpy(dtype=float),
                        RUNS: extra["runs"].to_numpy(dtype=int),
                        SEEDS: extra["seeds"].to_numpy(dtype=int),
                        CI95: extra["ci95"].to_numpy(dtype=float),
                        KEEP_TRAINED: extra["keep_trained"].to_numpy(dtype=object),
                        KEEP_TESTED: extra["keep_tested"].to_numpy(dtype=object),
                        RUNS_FROM: extra.index,
                        STATUS: NOT_IN_PAPER,
                    }
                ),
            ],
            ignore_index=True,
        )
    out[DELTA] = out[TOP1_REPRO] - out[TOP1_PAPER]
    out[GAP_PAPER], out[GAP_REPRO] = _gaps(out, list(ref["anchor"]) + [None] * len(extra))
    columns = [
        ROW,
        MODEL,
        KEEP,
        GFLOPS_PAPER,
        GFLOPS_REPRO,
        TOP1_PAPER,
        TOP1_REPRO,
        STD,
        CI95,
        DELTA,
        GAP_PAPER,
        GAP_REPRO,
        SPEED_PAPER,
        SPEED_REPRO,
        SEEDS,
        KEEP_TRAINED,
        KEEP_TESTED,
        RUNS,
        RUNS_FROM,
        STATUS,
    ]
    if ref["throughput"].isna().all():  # only Table 1 reports speed
        columns = [c for c in columns if c not in (SPEED_PAPER, SPEED_REPRO)]
    if scale in DATASET_SCALES:  # MNIST top-1 minus ImageNet top-1 means nothing
        columns.remove(DELTA)
    out = out[columns]
    notes = [
        f"{info['gap_note']}; std: sample standard deviation over a row's runs (seeds); 95% CI: "
        "half-width of the 95% t-interval of the mean over seeds (t with seeds - 1 degrees of freedom).",
        "top-1 (reproduced): the best epoch's val top-1 of the (non-EMA) model, the number the "
        "official code reports (max_accuracy); with validation after the last epoch only, the final model's.",
    ]
    if left_out:
        notes.append(left_out)
    if out[KEEP_TRAINED].astype(bool).any():
        notes.append(_keep_note(out, agg))
    orderings = ordering_note(out)
    if orderings:
        notes.append(orderings)
    if scale in SCALE_NOTES:
        notes.insert(0, SCALE_NOTES[scale])
    out.attrs = {"table": info["table"], "title": info["title"], "name": info["name"], "scale": scale, "notes": notes}
    return out


def _keep_note(out: pd.DataFrame, agg: pd.DataFrame) -> str:
    """Which learned selectors train on the token fractions they are tested on (every stage, every run)."""
    rows = [r for r, trained in zip(out[ROW], out[KEEP_TRAINED], strict=True) if trained and r in agg.index]
    off = [f"{r} ({agg.at[r, 'mismatch']:.2f})" for r in rows if not agg.at[r, "mismatch"] <= KEEP_TOLERANCE]
    verdict = (
        f"every learned selector is within {KEEP_TOLERANCE} at every stage in every run"
        if not off
        else f"not within {KEEP_TOLERANCE} (largest |trained - tested| over stages and runs): {', '.join(off)}"
    )
    return (
        "keep trained / tested: per stage, the last epoch's mean kept fraction in training (Gumbel "
        f"decisions, `train/keep_stage*`) and the fraction top-k keeps at test time, mean over runs; {verdict}."
    )


def _group(row: str, model: Any) -> str:
    """The rows whose order the paper reports together: Table 3's parts (a/, b/, c/), else one model's rows."""
    head = row.split("/")[0] if "/" in row else ""
    return f"({head})" if len(head) == 1 else str(model)


def ordering_note(out: pd.DataFrame) -> str:
    """Which of the paper's orderings (strict, within one group of rows) the reproduced means keep.

    A pair is "held" when the reproduced means are in the paper's order, "reversed" otherwise;
    either is marked "within noise" when the two rows' 95% intervals overlap (or a row has one seed)."""
    rows = out[out[TOP1_PAPER].notna() & out[TOP1_REPRO].notna() & (out[STATUS] == REPRODUCED)]
    if len(rows) < 2:
        return ""
    parts = []
    for group, members in rows.groupby([_group(r, m) for r, m in zip(rows[ROW], rows[MODEL], strict=True)], sort=False):
        members = members.drop_duplicates(RUNS_FROM)  # b/predictor is a/dynamic's runs: one entry
        ranked = members.sort_values(TOP1_PAPER, ascending=False, kind="stable").to_dict("records")
        held, reversed_ = [], []
        for i, a in enumerate(ranked):
            for b in ranked[i + 1 :]:
                if a[TOP1_PAPER] <= b[TOP1_PAPER]:
                    continue  # a tie in the paper orders nothing
                diff = a[TOP1_REPRO] - b[TOP1_REPRO]
                noise = a[SEEDS] < 2 or b[SEEDS] < 2 or abs(diff) <= a[CI95] + b[CI95]
                mark = " (within noise)" if noise else ""
                if diff > 0:
                    held.append(f"{a[ROW]} > {b[ROW]}{mark}")
                else:
                    reversed_.append(f"{b[ROW]} >= {a[ROW]}{mark}")
        pairs = held + reversed_
        if not pairs:
            continue
        text = f"{group}: {len(held)} of {len(pairs)} held"
        text += f" ({'; '.join(held)})" if held else ""
        text += f", reversed: {'; '.join(reversed_)}" if reversed_ else ""
        parts.append(text)
    if not parts:
        return ""
    return (
        "the paper's orderings (each strict pair of its top-1s within a group) in the reproduced means: "
        + " | ".join(parts)
        + "; within noise: the two rows' 95% intervals overlap, or a row has one seed."
    )


# ------------------------------------------------------------------------------ rendering
def _paper(value: Any) -> str:
    """A paper number as the paper prints it (4.0, 76.53, 1337.7): Python's shortest repr."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DASH
    return repr(round(float(value), 4))


def _number(fmt: str) -> Callable[[Any], str]:
    def render(value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return DASH
        return format(value, fmt)

    return render


_FORMATS: dict[str, Callable[[Any], str]] = {
    KEEP: _paper,
    GFLOPS_PAPER: _paper,
    GFLOPS_REPRO: _number(".3g"),
    TOP1_PAPER: _paper,
    TOP1_REPRO: _number(".2f"),
    STD: _number(".2f"),
    DELTA: _number("+.2f"),
    GAP_PAPER: _number("+.2f"),
    GAP_REPRO: _number("+.2f"),
    SPEED_PAPER: _paper,
    SPEED_REPRO: _number(".0f"),
    RUNS: _number("d"),
    SEEDS: _number("d"),
    CI95: lambda v: DASH if v is None or v != v else f"±{v:.2f}",
    KEEP_TRAINED: lambda v: v if isinstance(v, str) and v else DASH,
    KEEP_TESTED: lambda v: v if isinstance(v, str) and v else DASH,
}
_HIDDEN = (RUNS_FROM, STATUS, RUNS)  # shown through the cells they explain; `seeds` counts the runs shown


def display_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Every cell as the text the renderers print: "missing" / "not available" / "—", never 0."""
    shown = pd.DataFrame(index=df.index)
    for column in df.columns:
        if column in _HIDDEN:
            continue
        render = _FORMATS.get(column, lambda v: DASH if v is None or v != v else str(v))
        shown[column] = [render(v) for v in df[column]]
    for i in df.index:
        status, source = df.at[i, STATUS], df.at[i, RUNS_FROM]
        if status in (MISSING, NOT_AVAILABLE):
            for column in _REPRODUCED_COLUMNS:
                if column in shown:
                    shown.at[i, column] = DASH
            shown.at[i, TOP1_REPRO] = status
        if isinstance(source, str) and source != df.at[i, ROW]:
            shown.at[i, ROW] = f"{df.at[i, ROW]} (= {source})"
        if status == NOT_IN_PAPER:
            shown.at[i, ROW] = f"{df.at[i, ROW]} (not in paper)"
    return shown


def _caption(df: pd.DataFrame) -> str:
    attrs = df.attrs
    if not attrs.get("title"):
        return ""
    scale = f", scale {attrs['scale']}" if attrs.get("scale") else ""
    return f"{attrs['title']} ({attrs['table']}: {attrs['name']}{scale})"


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub Markdown table, with the table's title above and its notes below."""
    shown = display_frame(df)

    def escape(text: Any) -> str:
        return str(text).replace("|", "\\|")

    numeric = [c not in (ROW, MODEL) for c in shown.columns]
    lines = [
        "| " + " | ".join(escape(c) for c in shown.columns) + " |",
        "|" + "|".join("---:" if right else "---" for right in numeric) + "|",
    ]
    lines += ["| " + " | ".join(escape(v) for v in row) + " |" for row in shown.itertuples(index=False)]
    caption = _caption(df)
    head = [f"**{caption}**", ""] if caption else []
    tail = [""] + [f"- {note}" for note in df.attrs.get("notes", [])] if df.attrs.get("notes") else []
    return "\n".join(head + lines + tail) + "\n"


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "—": "---",
}


def _latex_escape(text: Any) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def to_latex(df: pd.DataFrame) -> str:
    """A booktabs `table` environment (needs \\usepackage{booktabs}); notes as a footnote-size line."""
    shown = display_frame(df)
    align = "".join("l" if c in (ROW, MODEL) else "r" for c in shown.columns)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        rf"\begin{{tabular}}{{{align}}}",
        r"\toprule",
        " & ".join(_latex_escape(c) for c in shown.columns) + r" \\",
        r"\midrule",
    ]
    lines += [" & ".join(_latex_escape(v) for v in row) + r" \\" for row in shown.itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}"]
    caption = _caption(df)
    if caption:
        lines.append(rf"\caption{{{_latex_escape(caption)}}}")
    for note in df.attrs.get("notes", []):
        lines.append(rf"\par\footnotesize {_latex_escape(note.replace('`', ''))}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def to_csv(df: pd.DataFrame, path: PathLike) -> Path:
    """The numbers as numbers (empty cell where there is none) plus the `status` column."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)
    return path


def write_tables(df: pd.DataFrame, output_dir: PathLike, stem: str) -> dict[str, Path]:
    """`<stem>.md`, `<stem>.tex` and `<stem>.csv` in `output_dir`; what the notebooks call."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(to_markdown(df))
    (out / f"{stem}.tex").write_text(to_latex(df))
    return {"md": out / f"{stem}.md", "tex": out / f"{stem}.tex", "csv": to_csv(df, out / f"{stem}.csv")}
