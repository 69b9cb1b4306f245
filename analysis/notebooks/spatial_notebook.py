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
# # Dynamic spatial sparsification: Swin and ConvNeXt
#
# The T-PAMI extension of DynamicViT (HEAD code): DynamicSwin-T/S/B and DynamicCNN (ConvNeXt)-T/S/B
# at keep ratios rho 0.9 / 0.7 beside their dense backbones. Only the third stage is sparsified:
# at each location the top `int(N x ratio)` positions take the block's MLP, the others a cheap
# fast path, with ratios [rho, rho - 0.2, rho - 0.4]. The reference numbers (`analysis/reference.yaml`,
# table `spatial`) are the official model zoo's (dynamic rows) and the backbones' papers (dense rows).
# At the tiny scale the proxy Swin and ConvNeXt (cluttered MNIST) stand in for the -T rows.
#
# This is the jupytext source of `spatial_notebook.ipynb` (edit either, then `jupytext --sync`).
# Headless: `python -m analysis.report experiments/spatial.yaml [--scale tiny]`.

# %% tags=["parameters"]
tracking_uri = "sqlite:///mlflow.db"
experiment = "spatial"  # the spec name: one MLflow experiment per spec
scale = "tiny"  # "tiny" or "paper"; "" for every scale (fails if runs mix scales)
output_dir = ""  # default: reports/<experiment>/<scale>/
table = "spatial"

# %%
from pathlib import Path

from IPython.display import Image, Markdown, display

from analysis import collect, figures, tables

out = Path(output_dir or f"reports/{experiment}/{scale or 'all'}")
out.mkdir(parents=True, exist_ok=True)
runs = collect.collect_runs(tracking_uri, experiment, scale or None)
print(f"{len(runs)} finished training runs in experiment {experiment!r} (scale {scale or 'any'}) at {tracking_uri}")

# %% [markdown]
# ## Zoo / papers vs reproduction
# Rows without a finished run read "missing"; the zoo has no Swin at rho 0.9 (no reference top-1).
# At the tiny scale the absolute numbers are the CPU proxy's: compare the gaps to each
# backbone's dense row. GFLOPs (reproduced) are `harness.measure`'s (matmuls and convolutions);
# the zoo's are fvcore's, which also counts normalisation layers (about 1% more).

# %%
table_df = tables.build_table(runs, table)
written = tables.write_tables(table_df, out, "spatial")
display(Markdown(tables.to_markdown(table_df)))

# %% [markdown]
# ## The runs behind it
# `train_keep_stage*`: the fraction of positions each location's Gumbel decision sent through the
# MLP during training, against the targets rho, rho - 0.2, rho - 0.4 (the ratio loss, weight 10);
# inference keeps exactly `int(N x ratio)` positions per location either way.

# %%
shown = ["row", "variant", "seed", "keep_ratio", "acc1", "acc5", "gflops", "throughput_img_s",
         "train_keep_stage1", "train_keep_stage2", "train_keep_stage3", "run_id"]
runs.reindex(columns=shown).sort_values(["row", "seed"])

# %% [markdown]
# ## Figures
# Kept positions: which third-stage positions take the MLP at each location (not nested: every
# location scores every position again), and how many locations kept each position.

# %%
paths = [
    figures.accuracy_vs_keep_ratio(runs, out / "spatial_acc_vs_keep_ratio.png", table=table),
    figures.gaps_to_anchor(table_df, out / "spatial_gaps.png"),
    figures.accuracy_vs_gflops(runs, table, out / "spatial_acc_vs_gflops.png"),
]
token_rows = {"swin-t/0.7": ["kept_tokens"], "convnext-t/0.7": ["kept_tokens"]}
paths += figures.token_figures(tracking_uri, runs, token_rows, out, "spatial")
for path in paths:
    display(Image(filename=str(path)))
print("written:", *[str(p) for p in [*written.values(), *paths]], sep="\n  ")
