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
# # Peer methods under one protocol: EViT, Top-K, ToMe beside DynamicViT
#
# `experiments/peers.yaml`: (1) every method at DynamicViT-S/0.7's cost (knobs matched within 2%
# by `python -m analysis.peers_match`), the published number of each method beside ours
# (`analysis/reference.yaml`, table `peers`, each with its source; published at the authors' own
# knob and recipe, which the notes name); (2) TokenReduction's keep rates 0.5 / 0.7 / 0.9 (the
# same token counts at the same blocks). Throughput is measured here, in this one process, at one
# batch size, the models interleaved round by round (the runs' own `throughput_img_s` came from
# whatever machine ran each job and is not compared). Figures: top-1 against GFLOPs and against
# measured images/s, the Pareto front dashed and circled.
#
# This is the jupytext source of `peers_notebook.ipynb` (edit either, then `jupytext --sync`).
# Headless: `python -m analysis.report experiments/peers.yaml [--scale tiny]`.

# %% tags=["parameters"]
tracking_uri = "sqlite:///mlflow.db"
experiment = "peers"  # the spec name: one MLflow experiment per spec
scale = "tiny"  # "tiny" or "paper"
output_dir = ""  # default: reports/<experiment>/<scale>/
table = "peer-methods"
throughput_batch = 32  # DynamicViT's Table 1 batch
throughput_rounds = 7
throughput_iters = 10  # timed batches per model per round
throughput_device = ""  # default: cuda if available, else cpu

# %%
from pathlib import Path

from IPython.display import Image, Markdown, display

from analysis import peers_lib, tables

out = Path(output_dir or f"reports/{experiment}/{scale or 'all'}")
out.mkdir(parents=True, exist_ok=True)
runs = peers_lib.peer_runs(tracking_uri, experiment, scale or None)
print(f"{len(runs)} finished training runs in experiment {experiment!r} (scale {scale or 'any'}) at {tracking_uri}")

# %% [markdown]
# ## Throughput, interleaved
# One architecture per point, rebuilt from its run's knobs (random weights: every method here has
# fixed token counts per block, so its speed does not depend on the values), timed in a shuffled
# order each round; the median over the rounds.

# %%
speeds = peers_lib.interleaved_throughput(peers_lib.speed_models(runs), throughput_batch, throughput_rounds,
                                          iters=throughput_iters, device=throughput_device)
speeds.to_csv(out / "peers_throughput.csv", index=False)
speeds

# %% [markdown]
# ## At DynamicViT-S/0.7's cost: published vs this harness
# Rows without a finished run read "missing"; a published top-1 shown "—" is not known for DeiT-S
# (see the row's source in reference.yaml). At the tiny scale compare gaps to the dynamicvit row.

# %%
matched = runs[runs["row"].isin(peers_lib.MATCHED_ROWS)]
table_df = tables.build_table(matched, table)
knobs = {row: peers_lib.knob_label(part.iloc[0]) for row, part in matched.groupby("row")}
table_df.insert(3, "knob (ours)", [knobs.get(r, tables.DASH) for r in table_df[tables.ROW]])
table_df.attrs["notes"].append("keep ratio, GFLOPs and top-1 (paper): as each method was published, at its own "
                               "knob; knob (ours): what our row ran, matched to DynamicViT/0.7's GFLOPs.")
by_label = dict(zip(speeds["label"], speeds["images_per_s"])) if len(speeds) else {}
table_df["img/s (interleaved)"] = [f"{by_label[r]:.0f}" if r in by_label else tables.DASH for r in table_df[tables.ROW]]
if len(speeds):
    table_df.attrs["notes"].append(
        f"img/s (interleaved): measured in one process on {speeds['device'].iloc[0]}, batch {throughput_batch}, "
        f"median of {throughput_rounds} shuffled rounds of {throughput_iters} batches each (the rounds' max - min "
        f"is `spread` in peers_throughput.csv).")
written = tables.write_tables(table_df, out, "peers")
display(Markdown(tables.to_markdown(table_df)))

# %% [markdown]
# ## TokenReduction's keep rates
# The same token counts at the same blocks (rate rho keeps int(N * rho**s) at stage s; EViT adds
# its fused token, ToMe merges down to the counts). DynamicViT/0.7 is the matched table's run.

# %%
keep_rates = peers_lib.tr_table(runs)
keep_rates.to_csv(out / "peers_keep_rates.csv", index=False)
tr_md = peers_lib.tr_markdown(keep_rates)
with open(written["md"], "a") as handle:
    handle.write("\n**TokenReduction's keep rates** (top-1, GFLOPs)\n\n" + tr_md)
display(Markdown(tr_md))

# %% [markdown]
# ## Figures

# %%
points = peers_lib.points_frame(runs, speeds)
points.to_csv(out / "peers_points.csv", index=False)
published = peers_lib.published_points() if scale == "paper" else None
paths = [
    peers_lib.accuracy_figure(points, "gflops", "GFLOPs (harness.measure, multiply-adds)",
                              out / "peers_acc_vs_gflops.png", lower_is_better=True, published=published,
                              title=f"{experiment}, scale {scale}"),
    peers_lib.accuracy_figure(points, "images_per_s", f"images/s (interleaved, batch {throughput_batch})",
                              out / "peers_acc_vs_throughput.png", lower_is_better=False,
                              title=f"{experiment}, scale {scale}"),
]
for path in paths:
    display(Image(filename=str(path)))
print("written:", *[str(p) for p in [*written.values(), *paths]], sep="\n  ")
