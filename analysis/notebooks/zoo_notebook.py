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
# # The model zoo, evaluated
#
# Every published DynamicViT checkpoint this harness can build (`experiments/zoo.yaml`),
# downloaded once into the checkpoint cache (sha256 recorded, then checked at every use) and
# evaluated as it is on ImageNet val: acc@1, acc@5 and GFLOPs beside the numbers of the
# official model-zoo table (`analysis/reference.yaml`, table `zoo`). At the tiny scale the
# checkpoints are the project's own (`checkpoints/README.md`) and the reference numbers are the
# ones recorded when they were made: a fixed file evaluated on fixed images must give them again.
#
# This is the jupytext source of `zoo_notebook.ipynb` (edit either, then `jupytext --sync`). The table
# builder is `analysis/zoo_table.py`. Headless: `python -m analysis.report experiments/zoo.yaml
# [--scale tiny|paper]`, or `python -m harness.launch experiments/zoo.yaml --wait`.

# %% tags=["parameters"]
tracking_uri = "sqlite:///mlflow.db"
experiment = "zoo"  # the spec name: one MLflow experiment per spec
scale = "tiny"  # "tiny" (the project's checkpoints) or "paper" (the official zoo)
output_dir = ""  # default: reports/<experiment>/<scale>/
table = "model-zoo"

# %%
from pathlib import Path

from IPython.display import Markdown, display

from analysis import collect, zoo_table

out = Path(output_dir or f"reports/{experiment}/{scale}")
out.mkdir(parents=True, exist_ok=True)
runs = collect.collect_runs(tracking_uri, experiment, scale)
print(f"{len(runs)} finished runs in experiment {experiment!r} (scale {scale}) at {tracking_uri}")

# %% [markdown]
# ## The zoo's numbers beside ours
# `delta` is our evaluation minus the zoo's; one image of ImageNet's 50,000 is 0.002 points, one
# of the tiny scale's 2,000 is 0.05. Rows without a finished run read "missing"; a row whose
# backbone this harness did not build would read "not available" (none does today).

# %%
zoo = zoo_table.build_zoo_table(runs, scale)
written = zoo_table.write_tables(zoo, out, "zoo")
display(Markdown(zoo_table.to_markdown(zoo)))

# %% [markdown]
# ## The runs behind it
# Which checkpoint each run loaded (`model.pretrained`, a URL or a file) is a parameter of its
# MLflow run; throughput is whatever machine ran the job.

# %%
shown = ["row", "model", "keep_ratio", "acc1", "acc5", "gflops", "params_m", "throughput_img_s", "run_id"]
runs[shown].sort_values("row")

# %%
print("written:", *[str(p) for p in written.values()], sep="\n  ")
