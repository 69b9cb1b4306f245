"""Dynamic spatial sparsification: the parts DynamicSwin (models/swin.py) and DynamicCNN
(models/convnext.py) share, as the T-PAMI extension of DynamicViT defines them.

The scheme (different from the DeiT family's token pruning):
  - only the third stage is sparsified (14 x 14 = 196 positions at 224 px);
  - before each pruning location a `PredictorLG` (models/dynamic_vit.py, reused) scores every
    position of the stage's map again, from the current features, its global feature being the
    plain mean over all positions; decisions are not nested;
  - the keep ratios are [rho, rho - 0.2, rho - 0.4] of all positions, computed in floating point
    and truncated as the official code does: int(196 * (0.7 - 0.2)) = int(97.99999999999999) = 97,
    so rho 0.7 keeps 137 / 97 / 58 positions;
  - nothing leaves the map: window attention (Swin) or the depth-wise convolution (ConvNeXt) sees
    every position; only the MLP is split: kept positions go through the block's MLP, the others
    through a cheap fast path (LayerNorm + one Linear C -> C); the map keeps its shape.

Training mixes the two paths with the hard Gumbel-softmax mask (each family keeps the official
two-stream bookkeeping, see its module); inference gathers the kept positions, runs the MLP on
them, the fast path on the rest, and scatters both back.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from timm.models import register_model
from torch import Tensor, nn

from harness.catalog import SPATIAL_MODELS, SPATIAL_VARIANTS
from models.dynamic_vit import topk_mask

RATIO_STEP = 0.2  # the official schedule: rho, rho - 0.2, rho - 0.4 (main.py:276)


class SpatialOutput(NamedTuple):
    """What the training losses need from one training-mode forward pass."""

    logits: Tensor  # (B, num_classes)
    tokens: Tensor  # the whole final normalised feature map, (B, H*W, C) (Swin) or (B, H, W, C) (ConvNeXt)
    decision: Optional[Tensor]  # the last location's keep decision (B, N), or None (dense)
    keep_fractions: Tensor  # (B, S): kept fraction of the N positions at each location
    decisions: tuple[Tensor, ...] = ()  # every location's keep decision (B, N)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def official_ratios(keep_ratio: float, locations: int) -> list[float]:
    """[rho, rho - 0.2, rho - 0.4, ...] in the official float arithmetic, floored at 0.

    Below rho = 0.4 the official schedule turns negative (and its `idx[:, :int(N * r)]` then
    keeps nearly everything); here a negative ratio keeps no position (all take the fast path).
    """
    return [max(0.0, keep_ratio - RATIO_STEP * i) if i else keep_ratio for i in range(locations)]


class SpatialSparsification:
    """Mixin for a timm backbone whose third stage is sparsified; the backbone builds the rest.

    Provides the plan (locations, ratios, keep counts), the decisions of both paths, the shared
    attributes the harness reads (`num_keep`, `num_patches`, `stage_ratios`, `selection_grid`)
    and the forward dispatch: training -> `forward_masked`, eval -> `forward_pruned`.
    """

    distills_feature_map = True  # harness.losses.loss_for: the whole final map is distilled
    variant: str
    keep_ratio: float
    gumbel_tau: float
    deterministic: bool
    pruning_loc: list[int]
    stage_ratios: list[float]
    num_keep: list[int]
    num_patches: int
    selection_grid: tuple[int, int]
    input_shape: tuple[int, int, int]

    def _plan_sparsity(
        self,
        *,
        variant: str,
        keep_ratio: float,
        pruning_loc: Optional[Sequence[int]],
        stage_ratios: Optional[Sequence[float]],
        gumbel_tau: float,
        deterministic: bool,
        stage_depth: int,
        grid: tuple[int, int],
    ) -> None:
        """Validate the sparsification arguments and set the plan's attributes."""
        _check(variant in SPATIAL_VARIANTS, f"variant: must be one of {', '.join(SPATIAL_VARIANTS)} for this "
                                            f"family (dynamic spatial sparsification), got {variant!r}")
        _check(isinstance(keep_ratio, (int, float)) and 0.0 < keep_ratio <= 1.0,
               f"keep_ratio: must be in (0, 1], got {keep_ratio!r}")
        _check(gumbel_tau > 0, f"gumbel_tau: must be > 0, got {gumbel_tau!r}")
        locs: list[int] = []
        ratios: list[float] = []
        if variant == "dynamic":
            locs = list(pruning_loc) if pruning_loc is not None else []
            _check(len(locs) > 0, "pruning_loc: must list at least one block index of the third stage, got none")
            _check(all(isinstance(loc, int) and 0 <= loc < stage_depth for loc in locs),
                   f"pruning_loc: each location must be a third-stage block index in [0, {stage_depth - 1}], got {locs}")
            _check(locs == sorted(set(locs)), f"pruning_loc: must be strictly increasing, got {locs}")
            ratios = list(stage_ratios) if stage_ratios is not None else official_ratios(keep_ratio, len(locs))
            _check(len(ratios) == len(locs),
                   f"stage_ratios: need one ratio per pruning location ({len(locs)}), got {len(ratios)}")
            _check(all(0.0 <= r <= 1.0 for r in ratios), f"stage_ratios: each must be in [0, 1], got {ratios}")
        self.variant = variant
        self.keep_ratio = float(keep_ratio)
        self.gumbel_tau = float(gumbel_tau)
        self.deterministic = deterministic
        self.pruning_loc = locs
        self.stage_ratios = [float(r) for r in ratios]
        self.selection_grid = (int(grid[0]), int(grid[1]))
        self.num_patches = self.selection_grid[0] * self.selection_grid[1]
        self.num_keep = [int(self.num_patches * r) for r in self.stage_ratios]  # official truncation
        self._stage_at = {loc: stage for stage, loc in enumerate(locs)}

    # ----------------------------------------------------------------------------- utils
    def set_gumbel_tau(self, tau: float) -> None:
        """Set the Gumbel-softmax temperature (a schedule calls this per step)."""
        _check(tau > 0, f"gumbel_tau: must be > 0, got {tau!r}")
        self.gumbel_tau = float(tau)

    def align_teacher_tokens(self, teacher_tokens: Tensor) -> Tensor:
        """The teacher's final map already has the student's layout (nothing is dropped)."""
        return teacher_tokens

    @staticmethod
    def is_added_key(key: str) -> bool:
        """State-dict keys a dense backbone's checkpoint lacks: predictors and fast paths."""
        return any(part in ("score_predictor", "fastmlp", "fast_path", "fast_path_gamma") for part in key.split("."))

    def no_weight_decay(self) -> set[str]:
        """None: the official optimiser decays every matrix (optim_factory.py:142-143 finds no
        `no_weight_decay` on AdaConvNeXt; AdaSwinTransformer's names only `absolute_pos_embed`,
        which Swin without `ape` does not have)."""
        return set()

    def _decision(self, log_probs: Tensor, stage: int, deterministic: bool) -> Tensor:
        """Training keep decision (B, N), value exactly 0/1, differentiable in the scores."""
        if deterministic:  # exact top-k, straight-through gradient to the keep probability
            soft = log_probs[..., 0].exp()
            hard = topk_mask(log_probs[..., 0], torch.ones_like(soft), self.num_keep[stage])
            return hard + (soft - soft.detach())
        return F.gumbel_softmax(log_probs, tau=self.gumbel_tau, hard=True)[..., 0]

    def _masked_output(self, logits: Tensor, tokens: Tensor, decisions: list[Tensor]) -> SpatialOutput:
        batch = logits.shape[0]
        if not decisions:
            return SpatialOutput(logits, tokens, None, logits.new_zeros(batch, 0), ())
        fractions = torch.stack([d.mean(dim=1) for d in decisions], dim=1)
        return SpatialOutput(logits, tokens, decisions[-1], fractions, tuple(decisions))

    def forward(self, x: Tensor) -> Any:  # type: ignore[override]
        """Training mode: the masked path (a SpatialOutput); eval mode: pruned logits."""
        if not self.training:  # type: ignore[attr-defined]
            return self.forward_pruned(x)
        return self.forward_masked(x)

    def forward_masked(self, x: Tensor, deterministic: Optional[bool] = None) -> SpatialOutput:
        raise NotImplementedError

    def forward_pruned(self, x: Tensor, return_positions: bool = False) -> Any:
        raise NotImplementedError


def split_by_score(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(kept, rest) positions (B, k), (B, N - k): the k best scores, descending, and the others."""
    order = scores.argsort(dim=1, descending=True)
    return order[:, :k], order[:, k:]


def split_apply(
    flat: Tensor, kept: Tensor, rest: Tensor, kept_fn: Callable[[Tensor], Tensor], rest_fn: Callable[[Tensor], Tensor]
) -> Tensor:
    """A (B, N, C) map holding kept_fn of the kept positions and rest_fn of the others.

    Each function runs only on its gathered positions (the inference cost); both results are
    scattered back to their places, so the map keeps its shape.
    """
    dim = flat.shape[-1]

    def gather(index: Tensor) -> Tensor:
        return flat.gather(1, index.unsqueeze(-1).expand(-1, -1, dim))

    out = torch.zeros_like(flat)
    if kept.shape[1]:
        out.scatter_(1, kept.unsqueeze(-1).expand(-1, -1, dim), kept_fn(gather(kept)).to(out.dtype))
    if rest.shape[1]:
        out.scatter_(1, rest.unsqueeze(-1).expand(-1, -1, dim), rest_fn(gather(rest)).to(out.dtype))
    return out


def check_input(x: Tensor, expected: tuple[int, int, int]) -> None:
    """One-line error for images of the wrong size (timm's own check is an assert)."""
    if tuple(x.shape[-3:]) != tuple(expected):
        raise ValueError(f"input: expected images of shape {tuple(expected)}, got {tuple(x.shape[-3:])}")


def official_layout_hook(module: nn.Module, state: dict[str, Tensor], prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook: map the module's keys from an official layout to its own, in place.

    So that `model.load_state_dict(official_state_dict, strict=True)` works as it is.
    """
    own = {key[len(prefix):]: state.pop(key) for key in list(state) if key.startswith(prefix)}
    state.update({prefix + key: value for key, value in module.checkpoint_filter_fn(own).items()})


# ------------------------------------------------------------------------------ registry
_FACTORY_KEYS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def create(spec: dict[str, Any], model_class: type, pretrained: bool, checkpoint: Optional[str] = None,
           **kwargs: Any) -> nn.Module:
    """Build a spatial model from its catalog spec and the caller's overrides; load weights if asked.

    `checkpoint`: a file or URL in the official, timm or project layout; `pretrained=True` loads the
    dense backbone the official code starts from (its README's links; predictors stay initialised).
    """
    for key in _FACTORY_KEYS:
        kwargs.pop(key, None)
    defaults = {k: v for k, v in spec.items() if not k.startswith("_")}
    model = model_class(**{**defaults, **kwargs})
    source = checkpoint or (spec.get("_url") if pretrained else None)
    if pretrained and source is None:
        raise ValueError("pretrained: this model has no published weights; pass checkpoint=PATH_OR_URL")
    if source is not None:
        from models.checkpoint import load_weights

        load_weights(model, source)
    return model


def register_family(family: str, model_class: type, module_name: str) -> None:
    """Register every catalog name of `family` with timm, one entry point per name."""

    def entrypoint_for(name: str, spec: dict[str, Any]) -> Callable[..., nn.Module]:
        def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
            return create(spec, model_class, pretrained, **kwargs)

        entrypoint.__name__ = entrypoint.__qualname__ = name
        entrypoint.__doc__ = f"`{name}`: {spec}"
        entrypoint.__module__ = module_name
        return entrypoint

    for name, spec in SPATIAL_MODELS.items():
        if spec["_family"] == family:
            register_model(entrypoint_for(name, spec))
