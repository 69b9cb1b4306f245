"""Optimiser, the official learning-rate rules and the Gumbel temperature schedule.

AdamW over named parameter groups (predictor / backbone, with and without weight decay), as the
official code builds them; `cls_token` and `pos_embed` stay frozen. `LRSchedule` gives every
group's learning rate at every optimiser step from the config alone (no state, so a resumed
run continues on the same curve). The two official rules (see harness/recipes.py for sources):

- `sched: step` (HEAD, utils.cosine_scheduler + engine.py): per step `it` of `T` steps with
  `W` warm-up steps, `s(it) = linspace(warmup_lr, peak, W)[it]` for it < W, else
  `min_lr + (peak - min_lr) (1 + cos(pi (it - W) / (T - W))) / 2`;
- `sched: epoch` (2021, adjust_learning_rate): once per epoch `e` of `E`,
  `s(e) = min_lr + (peak - min_lr) (1 + cos(pi e / E)) / 2`.

The predictors get `s`; the backbone gets `s x backbone_lr_scale` (`backbone_lr_rule: scale`) or
`min(peak x backbone_lr_scale, s)` (`min`), and 0 while `epoch < backbone_freeze_epochs`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from harness.config import GumbelConfig, OptimConfig

PREDICTOR_PREFIX = "score_predictor."
# Group names, as the official code names them (2021 main_dynamic_vit.py:194-196; HEAD optim_factory.py).
PREDICTOR_DECAY, PREDICTOR_NO_DECAY = "predictor", "predictor_no_decay"
BACKBONE_DECAY, BACKBONE_NO_DECAY = "base_decay", "base_no_decay"


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The peak lr: `lr x global batch / lr_base_batch`, or `lr` as given when lr_base_batch is None."""
    return cfg.lr if cfg.lr_base_batch is None else cfg.lr * global_batch / cfg.lr_base_batch


def is_predictor(name: str) -> bool:
    """A new (full-lr) parameter: the token selectors, and in Swin / ConvNeXt also the fast paths
    (`layers.2.score_predictor.*`, `fastmlp`, `fast_path*`: HEAD optim_factory.py:82 'fast' / 'predictor')."""
    return name.startswith(PREDICTOR_PREFIX) or ".score_predictor." in name or ".fast" in name


def group_of(name: str, param: nn.Parameter, cfg: OptimConfig, skip: set[str]) -> str:
    """Which optimiser group a trainable parameter belongs to (no decay: 1-D, biases, `skip`)."""
    plain = param.ndim <= 1 or name.endswith(".bias") or name in skip
    if is_predictor(name):
        return PREDICTOR_DECAY if cfg.predictor_decay == "all" or not plain else PREDICTOR_NO_DECAY
    return BACKBONE_NO_DECAY if plain else BACKBONE_DECAY


def build_optimizer(model: nn.Module, cfg: OptimConfig, global_batch: int) -> torch.optim.AdamW:
    """AdamW over the named groups; frozen parameters (`cfg.freeze`) get requires_grad False."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    groups: dict[str, list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if any(name == f or name.startswith(f + ".") for f in cfg.freeze):
            param.requires_grad_(False)
        if not param.requires_grad:
            continue
        groups.setdefault(group_of(name, param, cfg, skip), []).append(param)
    lr = scaled_lr(cfg, global_batch)
    order = (PREDICTOR_DECAY, PREDICTOR_NO_DECAY, BACKBONE_NO_DECAY, BACKBONE_DECAY)
    param_groups = [
        {
            "params": groups[name],
            "name": name,
            "weight_decay": cfg.weight_decay if name in (PREDICTOR_DECAY, BACKBONE_DECAY) else 0.0,
            "lr": lr,
            "is_predictor": name.startswith("predictor"),
        }
        for name in order
        if name in groups
    ]
    return torch.optim.AdamW(param_groups, lr=lr, weight_decay=cfg.weight_decay, eps=1e-8)


@dataclass(frozen=True)
class LRSchedule:
    """Every group's learning rate at every step, from the config (stateless)."""

    cfg: OptimConfig
    peak: float
    epochs: int
    steps_per_epoch: int

    def base(self, step: int) -> float:
        """The schedule's value (the predictors' lr) at optimiser step `step`."""
        cfg = self.cfg
        if cfg.sched == "epoch":
            epoch = step // self.steps_per_epoch
            return cfg.min_lr + (self.peak - cfg.min_lr) * (1 + math.cos(math.pi * epoch / max(self.epochs, 1))) / 2
        warmup = cfg.warmup_epochs * self.steps_per_epoch
        if step < warmup:  # numpy.linspace(warmup_lr, peak, warmup)[step]
            return cfg.warmup_lr + (self.peak - cfg.warmup_lr) * (step / (warmup - 1) if warmup > 1 else 1.0)
        cosine_steps = max(self.epochs * self.steps_per_epoch - warmup, 1)
        return cfg.min_lr + (self.peak - cfg.min_lr) * (1 + math.cos(math.pi * (step - warmup) / cosine_steps)) / 2

    def backbone(self, step: int) -> float:
        """The backbone's lr: 0 while frozen, else the recipe's rule."""
        cfg = self.cfg
        if step // self.steps_per_epoch < cfg.backbone_freeze_epochs:
            return 0.0
        if cfg.backbone_lr_rule == "min":
            return min(self.peak * cfg.backbone_lr_scale, self.base(step))
        return self.base(step) * cfg.backbone_lr_scale

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Set every group's lr for optimiser step `step` (0-based, counted over the whole run)."""
        predictor, backbone = self.base(step), self.backbone(step)
        for group in optimizer.param_groups:
            group["lr"] = predictor if group["is_predictor"] else backbone


def build_schedule(cfg: OptimConfig, global_batch: int, epochs: int, steps_per_epoch: int) -> LRSchedule:
    return LRSchedule(cfg, scaled_lr(cfg, global_batch), epochs, max(steps_per_epoch, 1))


def current_lrs(optimizer: torch.optim.Optimizer) -> tuple[float, float]:
    """(predictor lr, backbone lr) as last set; NaN where a group is absent."""
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
