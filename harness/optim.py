"""Optimiser, learning-rate schedule and Gumbel temperature schedule of the official recipe.

AdamW with four parameter groups (predictor/backbone x decay/no-decay); the backbone trains at
`backbone_lr_scale` of the learning rate and not at all (lr 0) for its first
`backbone_freeze_epochs`; cls_token and pos_embed stay frozen. timm's cosine schedule with
warm-up is stepped per update and honours each group's `lr_scale`.
"""
from __future__ import annotations

import math

import torch
from timm.scheduler import CosineLRScheduler
from torch import nn

from harness.config import GumbelConfig, OptimConfig

PREDICTOR_PREFIX = "score_predictor."


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The recipe's linear scaling rule: lr x global batch / 1024."""
    return cfg.lr * global_batch / cfg.lr_base_batch


def build_optimizer(model: nn.Module, cfg: OptimConfig, global_batch: int) -> torch.optim.AdamW:
    """AdamW over predictor and backbone groups; 1-D params, biases and tokens get no decay."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if any(name == f or name.startswith(f + ".") for f in cfg.freeze):
            param.requires_grad_(False)
        if not param.requires_grad:
            continue
        is_predictor = name.startswith(PREDICTOR_PREFIX)
        decay = param.ndim > 1 and name not in skip and not name.endswith(".bias")
        groups.setdefault((is_predictor, decay), []).append(param)
    lr = scaled_lr(cfg, global_batch)
    param_groups = [
        {
            "params": params,
            "weight_decay": cfg.weight_decay if decay else 0.0,
            "lr": lr,
            "lr_scale": 1.0 if is_predictor else cfg.backbone_lr_scale,
            "is_predictor": is_predictor,
        }
        for (is_predictor, decay), params in sorted(groups.items())
    ]
    return torch.optim.AdamW(param_groups, lr=lr, weight_decay=cfg.weight_decay)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, epochs: int, steps_per_epoch: int
) -> CosineLRScheduler:
    """Cosine to min_lr with linear warm-up, in optimiser updates (so warm-up is smooth)."""
    base = optimizer.param_groups[0]["lr"]
    return CosineLRScheduler(
        optimizer,
        t_initial=max(1, epochs * steps_per_epoch),
        lr_min=min(cfg.min_lr, base),
        warmup_t=cfg.warmup_epochs * steps_per_epoch,
        warmup_lr_init=min(cfg.warmup_lr, base),
        warmup_prefix=True,
        t_in_epochs=False,
    )


def set_backbone_trainable(optimizer: torch.optim.Optimizer, cfg: OptimConfig, epoch: int) -> None:
    """Backbone groups: lr_scale 0 during the first `backbone_freeze_epochs`, then the recipe's."""
    frozen = epoch < cfg.backbone_freeze_epochs
    for group in optimizer.param_groups:
        if not group["is_predictor"]:
            group["lr_scale"] = 0.0 if frozen else cfg.backbone_lr_scale


def current_lrs(optimizer: torch.optim.Optimizer) -> tuple[float, float]:
    """(predictor lr, backbone lr) as set by the schedule; NaN where a group is absent."""
    lrs = {True: math.nan, False: math.nan}
    for group in optimizer.param_groups:
        lrs[group["is_predictor"]] = group["lr"]
    return lrs[True], lrs[False]


def gumbel_tau(cfg: GumbelConfig, progress: float) -> float:
    """Temperature at `progress` in [0, 1] of training: constant, or tau -> tau1 annealed."""
    if cfg.schedule == "constant" or cfg.tau1 is None:
        return cfg.tau
    t = min(max(progress, 0.0), 1.0)
    if cfg.schedule == "linear":
        return cfg.tau + (cfg.tau1 - cfg.tau) * t
    if cfg.schedule == "cosine":
        return cfg.tau1 + 0.5 * (cfg.tau - cfg.tau1) * (1 + math.cos(math.pi * t))
    return cfg.tau * (cfg.tau1 / cfg.tau) ** t  # exponential
