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
# # Table 1: the keep-ratio sweep
#
# DynamicViT (NeurIPS 2021), Table 1: top-1, GFLOPs and throughput of DeiT-S and LV-ViT-S/M
# (at the tiny scale: the tiny ViT and the tiny LV-ViT; LV-ViT-M is paper-scale only) at keep ratios
# rho = 1.0 / 0.9 / 0.8 / 0.7, plus DeiT-256 (model zoo) and DeiT-B. The paper's numbers come
# from `analysis/reference.yaml`; the reproduction from the finished training runs of the
# spec's MLflow experiment. The paper's throughput is an RTX 3090 at batch 32; ours is
# whatever machine ran the job, so compare ratios between rows, not images/s.
#
# This is the jupytext source of `table1_notebook.ipynb` (edit either, then `jupytext --sync`).
# Headless: `python -m analysis.report experiments/table1.yaml [--scale tiny]`.

# %% tags=["parameters"]
tracking_uri = "sqlite:///mlflow.db"
experiment = "table1"  # the spec name: one MLflow experiment per spec
scale = "tiny"  # "tiny" or "paper"; "" for every scale (fails if runs mix scales)
output_dir = ""  # default: reports/<experiment>/<scale>/
table = "table1"

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
# CPU proxy's (cluttered MNIST): compare the gaps to each model's rho 1.0 row.

# %%
table_df = tables.build_table(runs, table)
written = tables.write_tables(table_df, out, "table1")
display(Markdown(tables.to_markdown(table_df)))

# %% [markdown]
# ## The runs behind it
# Training-time kept fractions (`train_keep_stage*`) far from the targets mean the ratio loss
# has not converged; inference keeps exactly `int(N * rho_s)` tokens either way.

# %%
shown = ["row", "variant", "seed", "keep_ratio", "acc1", "acc5", "gflops", "throughput_img_s",
         "train_keep_stage1", "train_keep_stage2", "train_keep_stage3", "run_id"]
runs[shown].sort_values(["row", "seed"])

# %% [markdown]
# ## Figures

# %%
paths = [
    figures.accuracy_vs_keep_ratio(runs, out / "table1_acc_vs_keep_ratio.png", table=table),
    figures.gaps_to_anchor(table_df, out / "table1_gaps.png"),
    figures.accuracy_vs_gflops(runs, table, out / "table1_acc_vs_gflops.png"),
]
token_rows = {"deit-s/0.9": ["kept_tokens"], "deit-s/0.7": ["kept_tokens"]}
paths += figures.token_figures(tracking_uri, runs, token_rows, out, "table1")
for path in paths:
    display(Image(filename=str(path)))
print("written:", *[str(p) for p in [*written.values(), *paths]], sep="\n  ")
