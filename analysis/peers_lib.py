"""The peers comparison (experiments/peers.yaml) from MLflow: runs with their knobs, the
TokenReduction keep-rate group, Pareto fronts, interleaved throughput and the two figures.

Used by analysis/notebooks/peers_notebook.ipynb. A TokenReduction point is found by its
configuration (the knobs `analysis.peers_match.tr_knobs` gives for that rate), not by its stage,
so that DynamicViT/0.7 and (at the paper scale) Top-K/0.7 count in both groups from the one run
each. Every number here averages what the matched table (`tables.build_table`) averages: per row,
the seeds of its most recent run's configuration (`tables.one_configuration`), so that a smoke
launch before the real one is not counted as more seeds.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from analysis import collect, tables
from harness.files import PathLike

KNOBS = ("name", "variant", "keep_ratio", "fuse_token", "tome_r", "stage_ratios", "pool_after_block", "pruning_loc")
MATCHED_ROWS = ("dense", "dynamicvit", "evit", "evit-unfused", "topk", "tome", "tome-off-shelf", "structural")
TR_METHODS = ("dynamicvit", "topk", "evit", "tome")


def _param(value: Any) -> Any:
    """An MLflow param (a string) back to its value: numbers, lists, booleans, None."""
    if value is None or value == "None" or (isinstance(value, float) and math.isnan(value)):
        return None  # MLflow logs None as the text "None"
    try:
        return yaml.safe_load(value) if isinstance(value, str) else value
    except yaml.YAMLError:
        return value


def peer_runs(tracking_uri: str, experiment: str, scale: str | None = None) -> pd.DataFrame:
    """`collect.collect_runs` plus each run's model knobs (columns `knob_<name>`, parsed), read in its query."""
    runs = collect.collect_runs(tracking_uri, experiment, scale, params=[f"model.{knob}" for knob in KNOBS])
    for knob in KNOBS:
        runs[f"knob_{knob}"] = pd.Series(
            [_param(v) for v in runs.pop(f"params.model.{knob}")], index=runs.index, dtype=object
        )
    return runs


def model_kwargs(run: pd.Series) -> dict[str, Any]:
    """The keyword arguments of `timm.create_model` that rebuild a run's architecture."""
    kwargs = {knob: run[f"knob_{knob}"] for knob in KNOBS[1:] if run.get(f"knob_{knob}") is not None}
    return kwargs


def knob_label(run: pd.Series) -> str:
    """A run's own knob in words (`keep 0.65, fused`, `r 11`, `pool after 4`): what our row ran."""
    variant = run.get("knob_variant") or run.get("variant")
    keep, ratios = run.get("knob_keep_ratio"), run.get("knob_stage_ratios")
    if variant == "dense":
        return "dense"
    if variant == "tome":
        return f"r {run.get('knob_tome_r')}"
    if variant == "structural":
        return f"pool after {run.get('knob_pool_after_block')}"
    text = f"ratios {ratios}" if ratios is not None else f"keep {keep}"
    if variant == "evit":
        text += ", unfused" if run.get("knob_fuse_token") is False else ", fused"
    return text


# ----------------------------------------------------------------------- TokenReduction
def tr_rate(run: pd.Series) -> tuple[float, str] | None:
    """(rate, method) if the run is one of TokenReduction's keep-rate points, else None."""
    from analysis.peers_match import TR_RATES, knob_equal, tr_knobs
    from harness.catalog import MODEL_DEFAULTS

    name = run.get("knob_name")
    if name not in MODEL_DEFAULTS:
        return None
    depth = MODEL_DEFAULTS[name]["depth"]
    variant = run.get("knob_variant") or run.get("variant")
    for rate in TR_RATES:
        for method, knob in tr_knobs(name, rate).items():
            if knob["variant"] != variant:
                continue
            if variant == "evit" and run.get("knob_fuse_token") is False:
                continue
            if run.get("knob_pruning_loc") is not None:  # TokenReduction's blocks are the defaults
                continue
            if variant in ("dynamic", "topk") and run.get("knob_stage_ratios") is not None:
                continue
            if all(knob_equal(run.get(f"knob_{k}"), v, depth) for k, v in knob.items() if k != "variant"):
                return rate, method
    return None


def tr_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Top-1 (mean, sd, runs) and GFLOPs per TokenReduction rate and method.

    Over the runs `tables.one_configuration` keeps; its note on the rows that hold a keep-rate
    point ("" when nothing was left out) is in `attrs["notes"]`, which `tr_markdown` prints.
    """
    found = [tr_rate(run) for _, run in runs.iterrows()]
    rows = runs.assign(rate=[f[0] if f else np.nan for f in found], method=[f[1] if f else None for f in found])
    points = rows["method"].notna()
    if "row" in rows:  # the whole of each row with a point: its latest run decides its configuration
        points |= rows["row"].isin(set(rows.loc[points, "row"].dropna()))
    rows, note = tables.one_configuration(rows[points])
    rows = rows[rows["method"].notna()]
    notes = [note] if note else []
    if rows.empty:
        empty = pd.DataFrame(columns=["rate", "method", "acc1", "std", "gflops", "runs"])
        empty.attrs["notes"] = notes
        return empty
    grouped = rows.groupby(["rate", "method"], sort=True)
    out = pd.DataFrame(
        {
            "acc1": grouped["acc1"].mean(),
            "std": grouped["acc1"].std(ddof=1),
            "gflops": grouped["gflops"].mean(),
            "runs": grouped["run_id"].count(),
        }
    ).reset_index()
    out["method"] = pd.Categorical(out["method"], TR_METHODS, ordered=True)
    out = out.sort_values(["rate", "method"]).reset_index(drop=True)
    out.attrs["notes"] = notes
    return out


def tr_markdown(table: pd.DataFrame) -> str:
    """Rates as rows, methods as columns: `top-1 ± sd (GFLOPs)`; `tr_table`'s notes below, as `tables.to_markdown`."""
    head = "| keep rate | " + " | ".join(TR_METHODS) + " |"
    lines = [head, "|---:|" + "---:|" * len(TR_METHODS)]
    for rate, part in table.groupby("rate"):
        cells = []
        for method in TR_METHODS:
            hit = part[part["method"] == method]
            if hit.empty:
                cells.append("missing")
                continue
            row = hit.iloc[0]
            sd = f" ± {row['std']:.2f}" if row["runs"] > 1 else ""
            cells.append(f"{row['acc1']:.2f}{sd} ({row['gflops']:.3g} G)")
        lines.append(f"| {rate:g} | " + " | ".join(cells) + " |")
    notes = table.attrs.get("notes", [])
    lines += [""] + [f"- {note}" for note in notes] if notes else []
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- Pareto
def pareto_front(frame: pd.DataFrame, cost: str, cost_lower_is_better: bool, value: str = "acc1") -> pd.Series:
    """Whether each point is on the front: no other point is at least as good on both axes and better on one."""
    costs = frame[cost].to_numpy(dtype=float) * (1.0 if cost_lower_is_better else -1.0)
    values = frame[value].to_numpy(dtype=float)
    on = []
    for i in range(len(frame)):
        dominated = any(
            costs[j] <= costs[i] and values[j] >= values[i] and (costs[j] < costs[i] or values[j] > values[i])
            for j in range(len(frame))
            if j != i
        )
        on.append(not dominated and not (np.isnan(costs[i]) or np.isnan(values[i])))
    return pd.Series(on, index=frame.index)


# ------------------------------------------------------------------------------ speed
def interleaved_throughput(
    models: dict[str, tuple[str, dict[str, Any]]],
    batch_size: int = 32,
    rounds: int = 5,
    iters: int = 3,
    device: str = "",
    seed: int = 0,
) -> pd.DataFrame:
    """Eval images/s of each model, measured in this one process at one batch size, interleaved.

    Each round times every model once (`iters` batches after one warm-up batch) in a shuffled
    order, so that a machine's drift (clocks, other jobs) spreads over all models instead of
    favouring whichever ran first; the result is each model's median over the rounds (labels of
    the same architecture share one measurement, `spread` is max - min over the rounds). The
    models are built with random weights: every method here costs the same whatever the values
    (fixed token counts per block), so the weights do not change the speed.
    """
    import timm
    import torch

    import models as _registry  # noqa: F401  (registers the family)
    from harness.measure import measure_throughput

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    same = {label: repr((name, sorted(kwargs.items()))) for label, (name, kwargs) in models.items()}
    unique = {key: models[label] for label, key in reversed(list(same.items()))}  # one build per architecture
    built = {key: timm.create_model(name, **kwargs).to(device).eval() for key, (name, kwargs) in unique.items()}
    rates: dict[str, list[float]] = {key: [] for key in built}
    order = list(built)
    shuffle = random.Random(seed)
    from tqdm.auto import tqdm

    for _ in tqdm(range(rounds), desc="throughput rounds", leave=False):
        shuffle.shuffle(order)
        for label in order:
            speed = measure_throughput(built[label], batch_size, device=device, warmup=1, iters=iters)
            rates[label].append(speed.images_per_s)
    return pd.DataFrame(
        {
            "label": list(same),
            "images_per_s": [float(np.median(rates[key])) for key in same.values()],
            "spread": [float(np.max(rates[key]) - np.min(rates[key])) for key in same.values()],
            "batch_size": batch_size,
            "rounds": rounds,
            "device": device,
        }
    )


# ------------------------------------------------------------------------------ figures
def _front_line(ax: Any, points: pd.DataFrame, x: str, lower_is_better: bool) -> None:
    front = points[pareto_front(points, x, lower_is_better)].sort_values(x)
    if front.empty:
        return
    ax.step(front[x], front["acc1"], where="post" if lower_is_better else "pre", color="black", lw=1, ls="--", zorder=1)
    ax.scatter(front[x], front["acc1"], s=160, facecolors="none", edgecolors="black", zorder=3)


def accuracy_figure(
    points: pd.DataFrame,
    x: str,
    xlabel: str,
    path: PathLike,
    lower_is_better: bool,
    published: pd.DataFrame | None = None,
    title: str = "",
) -> Path:
    """Top-1 (mean ± sd over seeds) against a cost axis; the Pareto front of the points dashed and circled.

    `points`: one row per point with `label`, `group` (matched / keep rate), `method` (its colour),
    `acc1`, `std` and `x`; a method's keep-rate points are joined by a line and labelled by rate.
    `published` (paper scale): the methods' published points in a second panel (not comparable
    with a proxy scale's accuracies, so never on the same axes).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    panels = 2 if published is not None and not published.empty else 1
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 5), squeeze=False)
    ax = axes[0][0]
    methods = list(dict.fromkeys(points["method"]))
    colour = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    shapes = {"matched": ("o", 8), "keep rate": ("s", 5)}
    for method in methods:
        mine = points[points["method"] == method]
        for group, (marker, size) in shapes.items():
            part = mine[mine["group"] == group].sort_values(x)
            if not part.empty:
                ax.errorbar(
                    part[x],
                    part["acc1"],
                    yerr=part["std"].fillna(0),
                    fmt=marker,
                    ms=size,
                    capsize=3,
                    color=colour[method],
                    zorder=2,
                )
        rates = mine[mine["group"] == "keep rate"].sort_values(x)
        ax.plot(rates[x], rates["acc1"], lw=1, alpha=0.6, color=colour[method], zorder=1)
        for _, point in rates.iterrows():
            ax.annotate(
                point["label"].split()[-1],
                (point[x], point["acc1"]),
                fontsize=6,
                xytext=(3, -8),
                textcoords="offset points",
                color=colour[method],
            )
    _front_line(ax, points.dropna(subset=[x, "acc1"]), x, lower_is_better)
    handles = [Line2D([], [], color=colour[m], marker="o", ls="", label=m) for m in methods]
    handles += [
        Line2D(
            [],
            [],
            color="black",
            mfc="none",
            marker=shapes[g][0],
            ls="",
            label=g if g != "keep rate" else "TokenReduction keep rate (labelled)",
        )
        for g in shapes
    ]
    handles.append(Line2D([], [], color="black", ls="--", marker="o", mfc="none", label="Pareto front"))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("val top-1 (%), mean ± sd over seeds")
    ax.set_title(title or "this harness")
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=7, loc="best")
    if published is not None and panels == 2:
        pub = axes[0][1]
        for method, part in published.groupby("method", sort=False):
            part = part.sort_values("gflops")
            pub.plot(part["gflops"], part["top1"], marker="o", label=method)
        _front_line(pub, published.rename(columns={"top1": "acc1"}), "gflops", True)
        pub.set_xlabel("GFLOPs (as published)")
        pub.set_ylabel("ImageNet-1k top-1 (%)")
        pub.set_title("published (each at its own knob and recipe)")
        pub.grid(alpha=0.3)
        pub.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def points_frame(runs: pd.DataFrame, speeds: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per matched row and per keep-rate point: mean/sd top-1, mean GFLOPs, interleaved images/s
    (over the runs `tables.one_configuration` keeps, as the tables)."""
    runs = tables.one_configuration(runs)[0]
    records: list[dict[str, Any]] = []
    matched = runs[runs["row"].isin(MATCHED_ROWS)]
    for row, part in matched.groupby("row", sort=False):
        records.append(
            {
                "label": row,
                "group": "matched",
                "method": row,
                "acc1": part["acc1"].mean(),
                "std": part["acc1"].std(ddof=1),
                "gflops": part["gflops"].mean(),
                "runs": len(part),
            }
        )
    table = tr_table(runs)
    for _, row in table.iterrows():
        records.append(
            {
                "label": f"{row['method']} {row['rate']:g}",
                "group": "keep rate",
                "method": row["method"],
                "acc1": row["acc1"],
                "std": row["std"],
                "gflops": row["gflops"],
                "runs": row["runs"],
            }
        )
    points = pd.DataFrame.from_records(records, columns=["label", "group", "method", "acc1", "std", "gflops", "runs"])
    if speeds is not None and not speeds.empty:
        points = points.merge(speeds[["label", "images_per_s"]], on="label", how="left")
    else:
        points["images_per_s"] = np.nan
    return points


def speed_models(runs: pd.DataFrame) -> dict[str, tuple[str, dict[str, Any]]]:
    """One architecture per point of `points_frame` (labels alike), rebuilt from a run's knobs (a run it averages)."""
    runs = tables.one_configuration(runs)[0]
    chosen: dict[str, tuple[str, dict[str, Any]]] = {}
    for row, part in runs[runs["row"].isin(MATCHED_ROWS)].groupby("row", sort=False):
        run = part.iloc[0]
        chosen[row] = (run["knob_name"], model_kwargs(run))
    for _, run in runs.iterrows():
        found = tr_rate(run)
        if found:
            chosen.setdefault(f"{found[1]} {found[0]:g}", (run["knob_name"], model_kwargs(run)))
    return chosen


def published_points() -> pd.DataFrame:
    """reference.yaml's `peers_published` rows with a `method` column (dynamicvit, evit, ...)."""
    from analysis.reference import load_reference

    ref = load_reference("peers_published")
    ref["method"] = ref["row"].str.split("/").str[0]
    return ref


# ------------------------------------------------------------------ per-method search fronts
def search_trials(study: Any) -> pd.DataFrame:
    """One row per finished trial of a per-method search: method, its knob, top-1, GFLOPs, state."""
    rows = []
    for trial in study.trials:
        if trial.user_attrs.get("surplus") or trial.state.name not in ("COMPLETE", "PRUNED"):
            continue
        method = trial.params.get("method", "all")
        knob = {k.split(":", 1)[1]: v for k, v in trial.params.items() if k.startswith(f"{method}:")}
        rows.append(
            {
                "trial": trial.number,
                "state": trial.state.name,
                "method": method,
                "knob": ", ".join(
                    f"{k.split('.')[-1]} {v:g}" if isinstance(v, float) else f"{k.split('.')[-1]} {v}"
                    for k, v in knob.items()
                ),
                "acc1": trial.user_attrs.get("val/acc1", np.nan),
                "gflops": trial.user_attrs.get("gflops", np.nan),
            }
        )
    return pd.DataFrame(rows, columns=["trial", "state", "method", "knob", "acc1", "gflops"])


def method_fronts(trials: pd.DataFrame) -> pd.DataFrame:
    """Each method's accuracy/GFLOPs Pareto front over its complete trials (`front` column), and the overall one."""
    done = trials[trials["state"] == "COMPLETE"].dropna(subset=["acc1", "gflops"]).copy()
    done["front"] = False
    for _, part in done.groupby("method"):
        done.loc[part.index, "front"] = pareto_front(part, "gflops", True)
    done["overall_front"] = pareto_front(done, "gflops", True) if len(done) else []
    return done.sort_values(["method", "gflops"]).reset_index(drop=True)


def fronts_figure(fronts: pd.DataFrame, path: PathLike, matched: pd.DataFrame | None = None, title: str = "") -> Path:
    """Every complete trial, coloured by method, each method's front joined; the matched runs as stars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for i, (method, part) in enumerate(fronts.groupby("method", sort=True)):
        colour = plt.get_cmap("tab10")(i % 10)
        ax.scatter(part["gflops"], part["acc1"], color=colour, alpha=0.45, s=25)
        front = part[part["front"]].sort_values("gflops")
        ax.plot(front["gflops"], front["acc1"], "o-", color=colour, label=f"{method} front ({len(part)} trials)")
    overall = fronts[fronts["overall_front"]].sort_values("gflops") if len(fronts) else fronts
    if len(overall):
        ax.step(overall["gflops"], overall["acc1"], where="post", color="black", ls="--", lw=1, label="overall front")
    if matched is not None and not matched.empty:
        ax.scatter(
            matched["gflops"],
            matched["acc1"],
            marker="*",
            s=140,
            color="black",
            zorder=4,
            label="peers.yaml matched rows (mean)",
        )
        for _, row in matched.iterrows():
            ax.annotate(
                row["label"], (row["gflops"], row["acc1"]), fontsize=7, xytext=(4, 4), textcoords="offset points"
            )
    if fronts.empty:
        ax.text(0.5, 0.5, "no complete trials yet", ha="center", transform=ax.transAxes, color="0.4")
    ax.set(xlabel="GFLOPs (measured, per image)", ylabel="val top-1 (%)", title=title or "per-method fronts")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def fronts_markdown(fronts: pd.DataFrame) -> str:
    """The points on each method's front, by method and cost."""
    lines = ["| method | trial | knob | GFLOPs | top-1 | on the overall front |", "|---|---:|---|---:|---:|---|"]
    for _, row in fronts[fronts["front"]].iterrows():
        lines.append(
            f"| {row['method']} | {row['trial']} | {row['knob']} | {row['gflops']:.4g} | {row['acc1']:.2f} | "
            f"{'yes' if row['overall_front'] else ''} |"
        )
    if len(lines) == 2:
        lines.append("| (no complete trials yet) | | | | | |")
    return "\n".join(lines) + "\n"
