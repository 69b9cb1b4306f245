"""Kept-token pictures: which patches survive each pruning stage (the paper's Figure style)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch


def kept_token_figure(
    images: torch.Tensor,
    kept: Sequence[torch.Tensor],
    grid: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    path: Path,
) -> Path:
    """Save one row per image: the input, then the image with dropped patches greyed per stage."""
    n_images, n_stages = images.shape[0], len(kept)
    fig, axes = plt.subplots(n_images, n_stages + 1, figsize=(2 * (n_stages + 1), 2 * n_images), squeeze=False)
    mean_t = torch.tensor(mean).view(-1, 1, 1)
    std_t = torch.tensor(std).view(-1, 1, 1)
    grid_h, grid_w = grid
    for row in range(n_images):
        img = (images[row].cpu() * std_t + mean_t).clamp(0, 1)
        img_np = img.permute(1, 2, 0).numpy()
        if img_np.shape[2] == 1:
            img_np = np.repeat(img_np, 3, axis=2)
        patch_h, patch_w = img_np.shape[0] // grid_h, img_np.shape[1] // grid_w
        axes[row][0].imshow(img_np)
        axes[row][0].set_title("input" if row == 0 else "")
        for stage in range(n_stages):
            mask = np.zeros(grid_h * grid_w, dtype=bool)
            mask[kept[stage][row].cpu().numpy()] = True
            pixel_mask = np.kron(mask.reshape(grid_h, grid_w), np.ones((patch_h, patch_w), dtype=bool))
            shown = img_np.copy()
            shown[~pixel_mask] = shown[~pixel_mask] * 0.25 + 0.75
            axes[row][stage + 1].imshow(shown)
            if row == 0:
                axes[row][stage + 1].set_title(f"stage {stage + 1}: {mask.sum()} kept")
        for ax in axes[row]:
            ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
