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
# # Loss ablation: what the distillation losses add
#
# DynamicViT (NeurIPS 2021), Table 3 of the camera-ready: rho = 0.7 trained with the full loss,
# without token distillation, without KL, without both (DeiT-S and LV-ViT-S columns; the LV-ViT-S
# rows are `lvvit-s/full`, ..., at the tiny scale the tiny LV-ViT). The paper's numbers come from
# `analysis/reference.yaml`; the reproduction from the finished training runs of the spec's
# MLflow experiment. The paper's differences are 0.1 points on DeiT-S: expect seeds to matter.
#
# This is the jupytext source of `losses_notebook.ipynb` (edit either, then `jupytext --sync`).
# Headless: `python -m analysis.report experiments/losses.yaml [--scale tiny]`.

# %% tags=["parameters"]
tracking_uri = "sqlite:///mlflow.db"
experiment = "losses"  # the spec name: one MLflow experiment per spec
scale = "tiny"  # "tiny" or "paper"; "" for every scale (fails if runs mix scales)
output_dir = ""  # default: reports/<experiment>/<scale>/
table = "losses"

# %%
from pathlib import Path

from IPython.display import Image, Markdown, display

from analysis import collect, figures, tables

out = Path(output_dir or f"reports/{experiment}/{scale or 'all'}")
out.mkdir(parents=True, exist_ok=True)
runs = collect.collect_runs(tracking_uri, experiment, scale or None)
print(f"{len(runs)} finished training runs in experiment {experiment!r} (scale {scale or 'any'}) at {tracking_uri}")

# %% [markdown]
# ## Paper vs reproduction
# Rows without a finished run read "missing". At the tiny scale the absolute numbers are the
# CPU proxy's (cluttered MNIST): compare the gaps to the full-loss row, with their spread over seeds.

# %%
table_df = tables.build_table(runs, table)
written = tables.write_tables(table_df, out, "losses")
display(Markdown(tables.to_markdown(table_df)))

# %% [markdown]
# ## The runs behind it
# Training-time kept fractions (`train_keep_stage*`) far from the targets mean the ratio loss
# has not converged; inference keeps exactly `int(N * rho_s)` tokens either way.

# %%
shown = ["row", "variant", "seed", "keep_ratio", "acc1", "acc5", "val_loss", "train_keep_stage1",
         "train_keep_stage2", "train_keep_stage3", "run_id"]
runs[shown].sort_values(["row", "seed"])

# %% [markdown]
# ## Figures

# %%
paths = [
    figures.gaps_to_anchor(table_df, out / "losses_gaps.png"),
    figures.accuracy_vs_gflops(runs, table, out / "losses_acc_vs_gflops.png"),
]
token_rows = {"full": ["kept_tokens"], "no-both": ["kept_tokens"]}
paths += figures.token_figures(tracking_uri, runs, token_rows, out, "losses")
for path in paths:
    display(Image(filename=str(path)))
print("written:", *[str(p) for p in [*written.values(), *paths]], sep="\n  ")
