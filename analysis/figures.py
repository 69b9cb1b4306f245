"""Figures for the reports: accuracy vs keep ratio / GFLOPs, kept-token maps from real runs.

Every function saves one PNG and returns its path. The proxy's accuracies (tiny scale) live
on another scale than the paper's ImageNet numbers, so paper accuracies are drawn in their
own, labelled panel, never on the reproduction's axis; only gaps between rows (percentage
points, `gaps_to_anchor`) share one axis. Token maps rebuild the run's model
from its MLflow artifacts (`config.yaml`, `model.pth`), so they show what was trained.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from analysis.reference import load_reference, table_info
from analysis.tables import one_configuration
from harness.files import PathLike

_STYLE = "whitegrid"


def _save(fig: Any, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _repro_label(runs: pd.DataFrame) -> str:
    scales = sorted(runs["scale"].dropna().unique()) if "scale" in runs else []
    scale = scales[0] if len(scales) == 1 else "mixed" if scales else "?"
    where = {
        "tiny": "tiny CPU proxy: cluttered MNIST",
        "paper": "ImageNet-1k",
        "imagenet100": "ImageNet-100, 1000-way",
    }.get(scale, scale)
    return f"reproduced ({where})"


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _row_labels(rows: Any, models: Any) -> list[str]:
    """Row ids, with the model added where the table mixes models (Table 1, the loss ablation)."""
    rows, models = list(rows), list(models)
    if len({m for m in models if isinstance(m, str)}) <= 1:
        return [str(r) for r in rows]
    return [f"{r} ({m})" if isinstance(m, str) else str(r) for r, m in zip(rows, models, strict=True)]


def _label_points(ax: Any, xs: Any, ys: Any, labels: list[str]) -> None:
    """Annotate points, pushing labels apart vertically so that equal-cost rows stay readable."""
    from matplotlib.transforms import offset_copy

    low, high = ax.get_ylim()
    step = 0.05 * (high - low)
    shifted = offset_copy(ax.transData, fig=ax.figure, x=8, y=0, units="points")
    placed: dict[float, float] = {}  # x -> the highest label placed at that x so far
    for x, y, label in sorted(zip(xs, ys, labels, strict=True), key=lambda p: (p[1], p[0])):
        key = round(float(x), 6)
        label_y = max(float(y), placed.get(key, -np.inf) + step)
        placed[key] = label_y
        ax.annotate(
            label,
            xy=(x, y),
            xytext=(x, label_y),
            textcoords=shifted,
            fontsize=7,
            va="center",
            arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.5} if label_y != y else None,
        )
    if placed:
        ax.set_ylim(low, max(high, max(placed.values()) + step))


def _paper_points(ax: Any, ref: pd.DataFrame) -> None:
    """The paper's rows: a line per model where it has a trade-off curve (labelled by rho),
    single points labelled by row; crosses for models not implemented here."""
    labels_x: list[float] = []
    labels_y: list[float] = []
    labels: list[str] = []
    for model, part in ref.groupby("model", sort=False):
        available = bool(part["available"].iloc[0])
        marker, style = ("o", "-") if available else ("x", ":")
        suffix = "" if available else " (not available here)"
        if part["gflops"].nunique() > 1:
            part = part.sort_values("gflops")
            ax.plot(part["gflops"], part["top1"], marker=marker, linestyle=style, label=f"{model}{suffix}")
            for item in part.itertuples():
                ax.annotate(
                    f"{item.keep_ratio:g}",
                    (item.gflops, item.top1),
                    xytext=(0, 5),
                    textcoords="offset points",
                    fontsize=6,
                    ha="center",
                    color="0.35",
                )
        else:
            ax.scatter(part["gflops"], part["top1"], marker=marker, label=f"{model}{suffix}")
            labels_x += list(part["gflops"])
            labels_y += list(part["top1"])
            labels += list(part["row"])
    _label_points(ax, labels_x, labels_y, labels)
    ax.legend(fontsize=7, loc="lower right")


# ------------------------------------------------------------------ accuracy vs cost/ratio
def accuracy_vs_keep_ratio(runs: pd.DataFrame, path: PathLike, table: str | None = None) -> Path:
    """Val top-1 vs keep ratio per variant (mean and sd over runs; of a table row, those the table
    averages: `tables.one_configuration`); the paper's beside it if `table`."""
    panels = 2 if table else 1
    with sns.axes_style(_STYLE):
        fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
        ax = axes[0][0]
        data = one_configuration(runs)[0].dropna(subset=["keep_ratio", "acc1"])
        if data.empty:
            _empty(ax, "no finished runs with a keep ratio")
        else:
            sns.lineplot(
                data=data,
                x="keep_ratio",
                y="acc1",
                hue="variant",
                style="variant",
                markers=True,
                dashes=False,
                errorbar="sd",
                err_style="bars",
                ax=ax,
            )
            sns.scatterplot(data=data, x="keep_ratio", y="acc1", color="0.3", s=12, alpha=0.5, ax=ax, legend=False)
        ax.set(xlabel="keep ratio rho", ylabel="val top-1 (%)", title=_repro_label(runs))
        if table:
            ref = load_reference(table).dropna(subset=["keep_ratio"])
            ref = ref.assign(implemented=np.where(ref["available"], "implemented here", "not available here"))
            ax = axes[0][1]
            sns.lineplot(
                data=ref, x="keep_ratio", y="top1", hue="model", style="implemented", markers=True, dashes=False, ax=ax
            )
            ax.set(xlabel="keep ratio rho", ylabel="ImageNet-1k top-1 (%)", title="paper (ImageNet-1k)")
        fig.tight_layout()
        return _save(fig, path)


def accuracy_vs_gflops(runs: pd.DataFrame, table: str, path: PathLike) -> Path:
    """Top-1 vs GFLOPs per table row: the reproduction (mean, sd over the runs the table averages:
    `tables.one_configuration`) and, in its own panel, the paper."""
    info = table_info(table)
    with sns.axes_style(_STYLE):
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
        data = one_configuration(runs)[0].dropna(subset=["row", "gflops", "acc1"])
        if data.empty:
            _empty(left, "no finished runs")
        else:
            stats = (
                data.groupby("row", sort=False)
                .agg(gflops=("gflops", "mean"), acc1=("acc1", "mean"), sd=("acc1", "std"), n=("acc1", "size"))
                .reset_index()
            )
            left.errorbar(stats["gflops"], stats["acc1"], yerr=stats["sd"].fillna(0), fmt="o", capsize=3)
            _label_points(
                left,
                stats["gflops"],
                stats["acc1"],
                [f"{r} (n={n})" for r, n in zip(stats["row"], stats["n"], strict=True)],
            )
        left.set(xlabel="GFLOPs (measured, per image)", ylabel="val top-1 (%)", title=_repro_label(runs))
        _paper_points(right, load_reference(table))
        right.set(xlabel="GFLOPs (paper)", ylabel="ImageNet-1k top-1 (%)", title="paper (ImageNet-1k)")
        fig.suptitle(
            f"{info['title']}. Different datasets and models: compare the shape (gaps between rows), not the values",
            fontsize=9,
        )
        fig.tight_layout()
        return _save(fig, path)


def gaps_to_anchor(table_df: pd.DataFrame, path: PathLike) -> Path:
    """Each row's top-1 gap to its anchor row, paper vs reproduced, in percentage points.

    Gaps, unlike absolute accuracies, share a unit across datasets: this is the one chart that
    puts the paper and the proxy on the same axis.
    """
    from analysis.tables import GAP_PAPER, GAP_REPRO, MODEL, NOT_AVAILABLE, ROW, STATUS

    rows = table_df[table_df[STATUS] != NOT_AVAILABLE]
    label = _row_labels(rows[ROW], rows[MODEL])
    long = pd.concat(
        [
            pd.DataFrame({"row": label, "gap": rows[GAP_PAPER].to_numpy(dtype=float), "source": "paper (ImageNet-1k)"}),
            pd.DataFrame(
                {
                    "row": label,
                    "gap": rows[GAP_REPRO].to_numpy(dtype=float),
                    "source": f"reproduced (scale {table_df.attrs.get('scale') or '?'})",
                }
            ),
        ],
        ignore_index=True,
    )
    with sns.axes_style(_STYLE):
        fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows) + 2), 4))
        sns.barplot(data=long, x="row", y="gap", hue="source", ax=ax)
        ax.axhline(0, color="0.3", lw=0.8)
        missing = [lab for lab, gap in zip(label, rows[GAP_REPRO], strict=True) if gap != gap]
        if missing:
            ax.text(
                0.01, 0.02, "no reproduced gap: " + ", ".join(missing), transform=ax.transAxes, fontsize=7, color="0.4"
            )
        ax.set(
            xlabel="",
            ylabel="top-1 gap to anchor row (points)",
            title=f"{table_df.attrs.get('title', '')}: gaps to the anchor row",
        )
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        fig.tight_layout()
        return _save(fig, path)


# ------------------------------------------------------------------------- token maps
@dataclass
class RunModel:
    """A trained model rebuilt from a run's artifacts, with the data it was validated on."""

    model: Any  # models.DynamicVisionTransformer in eval mode
    config: Any  # harness.config.RunConfig
    data: Any  # harness.data.DataBundle


def load_run_model(tracking_uri: str, run_id: str, download_dir: PathLike | None = None) -> RunModel:
    """Download `config.yaml` + `model.pth` of a run and rebuild its model (strict weight loading)."""
    import mlflow
    import yaml
    from mlflow.exceptions import MlflowException

    from harness.config import RunConfig
    from harness.data import build_data
    from harness.engine import build_model
    from models import read_state_dict

    target = Path(download_dir or tempfile.mkdtemp(prefix=f"dvit-{run_id[:8]}-"))
    target.mkdir(parents=True, exist_ok=True)
    files = {}
    quiet = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # no tqdm bars in notebook output
    try:
        for name in ("config.yaml", "model.pth"):
            files[name] = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=name, dst_path=str(target), tracking_uri=tracking_uri
            )
    except MlflowException as err:
        raise FileNotFoundError(f"run {run_id}: cannot download {name}: {err.message}") from None
    finally:
        if quiet is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = quiet
    cfg = RunConfig.model_validate(yaml.safe_load(Path(files["config.yaml"]).read_text()))
    # the weights come from model.pth: do not fetch the pretrained/initial checkpoints again
    cfg = cfg.model_copy(
        update={
            "model": cfg.model.model_copy(update={"pretrained": None}),
            "train": cfg.train.model_copy(update={"init_from": None}),
        }
    )
    data = build_data(cfg.data, cfg.aug)
    model = build_model(cfg, data)
    model.load_state_dict(read_state_dict(files["model.pth"]), strict=True)
    return RunModel(model.eval(), cfg, data)


def _display_image(image: Any, mean: Any, std: Any) -> np.ndarray:
    """A normalised (C, H, W) tensor back to an RGB array in [0, 1]."""
    import torch

    img = (image.cpu() * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)).clamp(0, 1)
    img_np = img.permute(1, 2, 0).numpy()
    return np.repeat(img_np, 3, axis=2) if img_np.shape[2] == 1 else img_np


def kept_token_heatmaps(
    tracking_uri: str,
    run_id: str,
    path: PathLike,
    n_images: int = 4,
    stats_images: int = 256,
    loaded: RunModel | None = None,
) -> Path:
    """Per validation image: the input, the kept patches per stage, and how many stages each patch
    survived; bottom row: how often each position is kept per stage over `stats_images` images."""
    import torch

    run = loaded or load_run_model(tracking_uri, run_id)
    model, data = run.model, run.data
    if not model.num_keep:
        raise ValueError(f"run {run_id}: variant {model.variant!r} keeps every token; nothing to show")
    grid_h, grid_w = getattr(model, "selection_grid", None) or model.patch_embed.grid_size  # Swin/ConvNeXt: stage 3
    stages = len(model.num_keep)
    count = min(max(n_images, stats_images), len(data.val))
    images = torch.stack([data.val[i][0] for i in range(count)])
    with torch.no_grad():
        _, kept = model.forward_pruned(images, return_positions=True)
    masks = np.zeros((stages, count, grid_h * grid_w))
    for stage, positions in enumerate(kept):
        np.put_along_axis(masks[stage], positions.cpu().numpy(), 1.0, axis=1)
    shown = min(n_images, count)
    with sns.axes_style("white"):
        fig, axes = plt.subplots(shown + 1, stages + 2, figsize=(2.2 * (stages + 2), 2.2 * (shown + 1)), squeeze=False)
        for row in range(shown):
            img = _display_image(images[row], data.mean, data.std)
            patch = (img.shape[0] // grid_h, img.shape[1] // grid_w)
            axes[row][0].imshow(img)
            for stage in range(stages):
                pixel = np.kron(masks[stage, row].reshape(grid_h, grid_w), np.ones(patch)) > 0
                faded = img.copy()
                faded[~pixel] = faded[~pixel] * 0.25 + 0.75
                axes[row][stage + 1].imshow(faded)
            survived = masks[:, row].sum(axis=0).reshape(grid_h, grid_w)
            axes[row][-1].imshow(img, alpha=0.6)
            axes[row][-1].imshow(np.kron(survived, np.ones(patch)), cmap="magma", alpha=0.55, vmin=0, vmax=stages)
        titles = ["input"] + [f"stage {s + 1}: {model.num_keep[s]} kept" for s in range(stages)] + ["stages survived"]
        for col, title in enumerate(titles):
            axes[0][col].set_title(title, fontsize=9)
        freq_ax = axes[shown]
        freq_ax[0].text(
            0.5,
            0.5,
            f"keep frequency\nover {count}\nval images",
            ha="center",
            va="center",
            transform=freq_ax[0].transAxes,
        )
        for stage in range(stages):
            im = freq_ax[stage + 1].imshow(
                masks[stage].mean(axis=0).reshape(grid_h, grid_w), cmap="viridis", vmin=0, vmax=1
            )
        freq_ax[-1].set_visible(False)
        fig.colorbar(im, ax=list(freq_ax[1 : stages + 1]), fraction=0.02, label="fraction kept")
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle(f"kept tokens, {run.config.model.variant} (run {run_id[:8]})", fontsize=10)
        return _save(fig, path)


def static_keep_map(tracking_uri: str, run_id: str, path: PathLike, loaded: RunModel | None = None) -> Path:
    """The static variant's learned keep probability per token position and stage; dots mark the
    positions it keeps at inference (the same for every image)."""
    import torch

    run = loaded or load_run_model(tracking_uri, run_id)
    model = run.model
    if model.variant != "static":
        raise ValueError(f"run {run_id}: static_keep_map needs the static variant, got {model.variant!r}")
    grid_h, grid_w = model.patch_embed.grid_size
    with torch.no_grad():
        scores = [
            p.logits.log_softmax(dim=-1)[:, 0].exp().reshape(grid_h, grid_w).numpy() for p in model.score_predictor
        ]
        probe = torch.zeros(1, run.data.in_chans, run.data.img_size, run.data.img_size)
        _, kept = model.forward_pruned(probe, return_positions=True)
    low, high = min(s.min() for s in scores), max(s.max() for s in scores)
    with sns.axes_style("white"):
        fig, axes = plt.subplots(1, len(scores), figsize=(3.4 * len(scores), 3.4), squeeze=False)
        for stage, (score, ax) in enumerate(zip(scores, axes[0], strict=True)):
            im = ax.imshow(score, cmap="viridis", vmin=low, vmax=high)
            rows, cols = np.divmod(kept[stage][0].numpy(), grid_w) if stage < len(kept) else ([], [])
            ax.scatter(cols, rows, s=8, c="white", edgecolors="black", linewidths=0.4)
            ax.set_title(f"stage {stage + 1}: {model.num_keep[stage]} kept", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.colorbar(im, ax=list(axes[0]), fraction=0.03, label="keep probability (softmax channel 0)")
        fig.suptitle(f"static variant: learned keep score per position (run {run_id[:8]}); dots = kept", fontsize=10)
        return _save(fig, path)


def token_figures(
    tracking_uri: str, runs: pd.DataFrame, rows: dict[str, list[str]], output_dir: PathLike, stem: str
) -> list[Path]:
    """For each table row: its illustrating run's kept-token heat maps and/or static keep map.

    `rows` maps a row id to the figures wanted ("kept_tokens", "static_map"). A row without a
    finished run, or a run without `model.pth`, is reported on stdout and skipped: a report
    with a gap beats no report.
    """
    from analysis.collect import pick_run

    made: list[Path] = []
    for row, kinds in rows.items():
        run_id = pick_run(runs, row)
        if run_id is None:
            print(f"{row}: no finished run, no token figures")
            continue
        try:
            loaded = load_run_model(tracking_uri, run_id)
        except (OSError, ValueError) as err:
            print(f"{row}: no token figures: {err}")
            continue
        base = Path(output_dir) / f"{stem}_{row.replace('/', '_')}"
        if "kept_tokens" in kinds and loaded.model.num_keep:
            made.append(kept_token_heatmaps(tracking_uri, run_id, f"{base}_kept_tokens.png", loaded=loaded))
        if "static_map" in kinds and loaded.model.variant == "static":
            made.append(static_keep_map(tracking_uri, run_id, f"{base}_static_map.png", loaded=loaded))
    return made
