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
# # Table 3: token sparsification strategies at equal cost
#
# DynamicViT (NeurIPS 2021): DeiT-S at 2.9 GFLOPs, (a) structural / static / dynamic,
# (b) random / CLS-attention / learned predictor, (c) one, two or three pruning stages.
# "Table 3" of the arXiv preprint, Table 4 of the camera-ready. The paper's numbers come from
# `analysis/reference.yaml`; the reproduction from the finished training runs of the spec's
# MLflow experiment.
#
# This is the jupytext source of `table3_notebook.ipynb` (edit either, then `jupytext --sync`).
# Headless: `python -m analysis.report experiments/table3.yaml [--scale tiny]`.

# %% tags=["parameters"]
tracking_uri = "sqlite:///mlflow.db"
experiment = "table3"  # the spec name: one MLflow experiment per spec
scale = "tiny"  # "tiny" or "paper"; "" for every scale (fails if runs mix scales)
output_dir = ""  # default: reports/<experiment>/<scale>/
table = "table3"

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
# CPU proxy's (cluttered MNIST): compare the gaps to the dynamic row, not top-1 itself.

# %%
table_df = tables.build_table(runs, table)
written = tables.write_tables(table_df, out, "table3")
display(Markdown(tables.to_markdown(table_df)))

# %% [markdown]
# ## The runs behind it
# Training-time kept fractions (`train_keep_stage*`) far from the targets mean the ratio loss
# has not converged; inference keeps exactly `int(N * rho_s)` tokens either way.

# %%
shown = ["row", "variant", "seed", "keep_ratio", "acc1", "acc5", "gflops", "train_keep_stage1",
         "train_keep_stage2", "train_keep_stage3", "run_id"]
runs[shown].sort_values(["row", "seed"])

# %% [markdown]
# ## Figures

# %%
paths = [
    figures.gaps_to_anchor(table_df, out / "table3_gaps.png"),
    figures.accuracy_vs_gflops(runs, table, out / "table3_acc_vs_gflops.png"),
]
token_rows = {"a/dynamic": ["kept_tokens"], "a/static": ["kept_tokens", "static_map"]}
paths += figures.token_figures(tracking_uri, runs, token_rows, out, "table3")
for path in paths:
    display(Image(filename=str(path)))
print("written:", *[str(p) for p in [*written.values(), *paths]], sep="\n  ")
