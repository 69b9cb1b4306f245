# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Search: keep ratio and Gumbel temperature schedule
#
# One Optuna study of `python -m harness.search experiments/search_rho_tau.yaml`: its history,
# the accuracy/cost Pareto front beside Table 1's fixed-ratio runs and the paper's points, the
# temperature schedules it found against the official constant tau = 1, and which parameters
# mattered. Reads the study from its Optuna storage and the fixed-ratio runs from MLflow.
#
# This is the jupytext source of `search_notebook.ipynb` (edit either, then `jupytext --sync`).
# Headless: `python -m harness.search experiments/search_rho_tau.yaml --report` (a search whose
# budget is met only reports), or papermill with the parameters below. The same storage opens
# in `optuna-dashboard STORAGE`.

# %% tags=["parameters"]
storage = ""  # sqlite:///FILE, postgresql://..., or a journal file; "" = the latest search logged in MLflow
study_name = ""  # "" = the study of that search (or the only study in the storage)
tracking_uri = "sqlite:///mlflow.db"
experiment = "search_rho_tau"  # the search spec's name: its MLflow experiment
scale = "tiny"
output_dir = ""  # default: reports/<experiment>/<scale>/
table = "table1"  # the paper table whose points are drawn beside the search
fixed_experiment = "table1"  # MLflow experiment of the fixed-ratio runs (absent is fine)

# %%
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
from IPython.display import Image, Markdown, display  # noqa: E402

from analysis import collect  # noqa: E402
from analysis.figures import _paper_points, _save  # noqa: E402
from analysis.reference import load_reference, table_info  # noqa: E402
from harness.config import GumbelConfig  # noqa: E402
from harness.optim import gumbel_tau  # noqa: E402
from harness.search import find_search, open_study  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)
out = Path(output_dir or f"reports/{experiment}/{scale or 'all'}")
out.mkdir(parents=True, exist_ok=True)
if not storage:
    storage, study_name = find_search(tracking_uri, experiment, scale or None)
study = open_study(storage, study_name or None)
names = study.metric_names or (["val/acc1"] if len(study.directions) == 1 else ["val/acc1", "gflops"])
print(f"study {study.study_name!r} at {storage}: {len(study.trials)} trials, objectives "
      + ", ".join(f"{n} ({d.name.lower()})" for n, d in zip(names, study.directions)))

# %% [markdown]
# ## The trials
# One row per trial; `acc1` is the final val/acc1 (a pruned trial's last reported epoch),
# `gflops` the trial's measured cost. Trials that only lost a budget race (`surplus`) are left out.

# %%
S = optuna.trial.TrialState


def final_acc(t: optuna.trial.FrozenTrial) -> float:
    if "val/acc1" in t.user_attrs:
        return t.user_attrs["val/acc1"]
    return t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else np.nan


trials = [t for t in study.trials if not t.user_attrs.get("surplus")]
complete = [t for t in trials if t.state == S.COMPLETE]
best = (study.best_trials if len(study.directions) > 1 else [study.best_trial]) if complete else []
best_numbers = {t.number for t in best}
frame = pd.DataFrame([{"trial": t.number, "state": t.state.name, "acc1": final_acc(t),
                       "gflops": t.user_attrs.get("gflops", np.nan), "best": t.number in best_numbers, **t.params}
                      for t in trials])
counts = frame["state"].value_counts().to_dict() if not frame.empty else {}
print(", ".join(f"{n} {s.lower()}" for s, n in counts.items()) or "no trials")
frame

# %% [markdown]
# ## Optimisation history
# val/acc1 per trial in the order they were created, with the best so far among complete trials.

# %%
fig, ax = plt.subplots(figsize=(7, 4))
styles = {S.COMPLETE.name: ("o", "C0"), S.PRUNED.name: ("x", "C3"), S.FAIL.name: ("v", "0.5"), S.RUNNING.name: ("s", "C2")}
for state, part in frame.groupby("state") if not frame.empty else []:
    marker, color = styles.get(state, ("o", "0.5"))
    ys = part["acc1"].fillna(0.0) if state == "FAIL" else part["acc1"]
    ax.scatter(part["trial"], ys, marker=marker, color=color, label=state.lower())
done = frame[frame["state"] == "COMPLETE"].sort_values("trial") if not frame.empty else frame
if not done.empty:
    ax.step(done["trial"], done["acc1"].cummax(), where="post", color="C1", label="best so far")
else:
    ax.text(0.5, 0.5, "no complete trials yet", ha="center", transform=ax.transAxes, color="0.4")
ax.set(xlabel="trial", ylabel="val top-1 (%)", title=f"{study.study_name}: optimisation history")
ax.legend(fontsize=8)
history_png = _save(fig, out / "search_history.png")
display(Image(filename=str(history_png)))

# %% [markdown]
# ## Accuracy against cost: the Pareto front
# Left: every complete trial, the non-dominated ones (higher val/acc1 at lower GFLOPs) joined,
# and Table 1's fixed-ratio runs of the same scale from MLflow. Right, in its own panel because
# its dataset and model differ unless this is the paper scale: the paper's Table 1.

# %%
def pareto(points: pd.DataFrame) -> pd.DataFrame:
    """Non-dominated rows: no other row has acc1 >= and gflops <= with one strict."""
    pts = points.dropna(subset=["acc1", "gflops"]).sort_values(["gflops", "acc1"], ascending=[True, False])
    keep, best_acc = [], -np.inf
    for row in pts.itertuples():
        if row.acc1 > best_acc:
            keep.append(row.Index)
            best_acc = row.acc1
    return pts.loc[keep]


fixed = collect.collect_runs(tracking_uri, fixed_experiment, scale or None)
fixed = fixed.dropna(subset=["gflops", "acc1"])
fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
if not done.empty:
    left.scatter(done["gflops"], done["acc1"], color="0.6", label="search trials")
    front = pareto(done)
    left.plot(front["gflops"], front["acc1"], "o-", color="C0", label="Pareto front")
    for row in front.itertuples():
        left.annotate(f"#{row.trial}", (row.gflops, row.acc1), xytext=(3, 3), textcoords="offset points", fontsize=7)
else:
    front = done
if not fixed.empty:
    left.scatter(fixed["gflops"], fixed["acc1"], marker="s", color="C3", label=f"{fixed_experiment}: fixed rho")
    for row in fixed.itertuples():
        left.annotate(f"rho {row.keep_ratio:g}", (row.gflops, row.acc1), xytext=(3, -10), textcoords="offset points",
                      fontsize=7, color="C3")
    fixed_note = f"{len(fixed)} fixed-ratio runs from MLflow experiment {fixed_experiment!r}"
else:
    fixed_note = f"no finished runs in MLflow experiment {fixed_experiment!r} (scale {scale}): none drawn"
    left.text(0.02, 0.02, fixed_note, transform=left.transAxes, fontsize=7, color="0.4")
where = "tiny CPU proxy: cluttered MNIST" if scale == "tiny" else "ImageNet-1k" if scale == "paper" else scale
left.set(xlabel="GFLOPs (measured, per image)", ylabel="val top-1 (%)", title=f"search ({where})")
left.legend(fontsize=8, loc="lower right")
_paper_points(right, load_reference(table))
right.set(xlabel="GFLOPs (paper)", ylabel="ImageNet-1k top-1 (%)", title=f"paper: {table_info(table)['title']}")
fig.tight_layout()
pareto_png = _save(fig, out / "search_pareto.png")
print(fixed_note)
display(Image(filename=str(pareto_png)))

# %% [markdown]
# ## The temperature schedules found
# tau over training (0 = first step, 1 = last) for the best trial(s), against the official
# constant tau = 1. Low tau makes the Gumbel-softmax keep decisions nearly hard.

# %%
fig, ax = plt.subplots(figsize=(7, 4))
progress = np.linspace(0.0, 1.0, 101)
ax.plot(progress, np.ones_like(progress), "k--", label="official: constant tau = 1")
for t in sorted(best, key=lambda t: -final_acc(t))[:5]:
    gumbel = GumbelConfig.model_validate(t.user_attrs.get("gumbel", {}))
    ax.plot(progress, [gumbel_tau(gumbel, p) for p in progress],
            label=f"#{t.number}: {gumbel.schedule} {gumbel.tau:.2g} -> {gumbel.tau1 or gumbel.tau:.2g} "
                  f"(acc1 {final_acc(t):.1f})")
if not best:
    ax.text(0.5, 0.5, "no complete trials yet", ha="center", transform=ax.transAxes, color="0.4")
ax.set(yscale="log", xlabel="training progress", ylabel="Gumbel-softmax tau", title="temperature schedules")
ax.legend(fontsize=7)
tau_png = _save(fig, out / "search_tau.png")
display(Image(filename=str(tau_png)))

# %% [markdown]
# ## Which parameters mattered
# fANOVA importances (optuna.importance) per objective, over complete trials. With few trials
# they are noise, so they are only computed from `min_trials` complete trials on.

# %%
min_trials = 5
importances: dict[str, dict[str, float]] = {}


def objective_value(index: int) -> Callable[[optuna.trial.FrozenTrial], float]:
    """The `index`-th objective of a trial: what fANOVA ranks the parameters by."""
    return lambda trial: trial.values[index]


if len(complete) >= min_trials:
    for index, name in enumerate(names):
        try:
            importances[name] = optuna.importance.get_param_importances(study, target=objective_value(index))
        except (RuntimeError, ValueError) as err:  # e.g. a parameter that never varied
            print(f"{name}: no importances ({err})")
fig, axes = plt.subplots(1, max(len(importances), 1), figsize=(5 * max(len(importances), 1), 3), squeeze=False)
for ax, (name, values) in zip(axes[0], importances.items()):
    ax.barh(list(values)[::-1], list(values.values())[::-1], color="C0")
    ax.set(xlabel="importance", title=name)
if not importances:
    axes[0][0].text(0.5, 0.5, f"{len(complete)} complete trials: importances need at least {min_trials}",
                    ha="center", va="center", transform=axes[0][0].transAxes, color="0.4")
    axes[0][0].set_axis_off()
fig.tight_layout()
importance_png = _save(fig, out / "search_importance.png")
display(Image(filename=str(importance_png)))

# %% [markdown]
# ## Summary
# The best trial(s): the Pareto set for two objectives, the single best for one.

# %%
shown = ["trial", "acc1", "gflops", *[c for c in frame.columns if "." in c]]
best_rows = frame[frame["best"]][shown].sort_values("gflops") if not frame.empty else frame
states = ", ".join(f"{n} {s.lower()}" for s, n in counts.items()) or "none"
lines = [f"# Search {study.study_name}", "", f"Storage `{storage}`; {len(trials)} trials ({states}); {fixed_note}.", "",
         best_rows.to_markdown(index=False, floatfmt=".4g") if not best_rows.empty else "no complete trials"]
text = "\n".join(lines)
(out / "search.md").write_text(text + "\n")
display(Markdown(text))
print("written:", *[str(p) for p in (history_png, pareto_png, tau_png, importance_png, out / "search.md")], sep="\n  ")
