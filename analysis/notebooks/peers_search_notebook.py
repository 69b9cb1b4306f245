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
# # Each method's accuracy/GFLOPs front (a per-method search)
#
# `experiments/search_peers.yaml` searches DynamicViT, EViT, Top-K and ToMe in one Optuna study:
# each trial draws a method, then that method's own knob (keep ratio, or ToMe's r). Here: every
# complete trial coloured by method, each method's Pareto front (higher top-1 at lower GFLOPs)
# and the overall one; the matched rows of `experiments/peers.yaml` (MLflow experiment `peers`,
# same scale, if present) as stars.
#
# This is the jupytext source of `peers_search_notebook.ipynb` (edit either, then `jupytext --sync`).
# Headless: `python -m harness.search experiments/search_peers.yaml --report`.

# %% tags=["parameters"]
storage = ""  # "" = the latest search logged in MLflow under `experiment`
study_name = ""
tracking_uri = "sqlite:///mlflow.db"
experiment = "search_peers"
scale = "tiny"
output_dir = ""  # default: reports/<experiment>/<scale>/
table = ""
peers_experiment = "peers"  # MLflow experiment of the fixed, matched runs (absent is fine)

# %%
from pathlib import Path

import optuna
from IPython.display import Image, Markdown, display

from analysis import peers_lib
from harness.search import find_search, open_study

optuna.logging.set_verbosity(optuna.logging.WARNING)
out = Path(output_dir or f"reports/{experiment}/{scale or 'all'}")
out.mkdir(parents=True, exist_ok=True)
if not storage:
    storage, study_name = find_search(tracking_uri, experiment, scale or None)
study = open_study(storage, study_name or None)
trials = peers_lib.search_trials(study)
print(f"study {study.study_name!r}: {len(trials)} finished trials; per method:",
      trials["method"].value_counts().to_dict())

# %%
fronts = peers_lib.method_fronts(trials)
runs = peers_lib.peer_runs(tracking_uri, peers_experiment, scale or None)
matched = peers_lib.points_frame(runs)
matched = matched[matched["group"] == "matched"] if len(matched) else matched
md = peers_lib.fronts_markdown(fronts)
(out / "peers_search.md").write_text(f"**{study.study_name}: each method's accuracy/GFLOPs front**\n\n" + md)
fronts.to_csv(out / "peers_search_trials.csv", index=False)
display(Markdown(md))
path = peers_lib.fronts_figure(fronts, out / "peers_search_fronts.png", matched, title=f"{study.study_name}")
display(Image(filename=str(path)))
