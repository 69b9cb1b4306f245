"""Dynamic spatial sparsification: the parts DynamicSwin (models/swin.py) and DynamicCNN
(models/convnext.py) share, as the T-PAMI extension of DynamicViT defines them.

The scheme (different from the DeiT family's token pruning):
  - only the third stage is sparsified (14 x 14 = 196 positions at 224 px);
  - before each pruning location a `PredictorLG` (models/predictor.py, shared) scores every
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

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from harness.catalog import SPATIAL_MODELS, SPATIAL_VARIANTS
from models.registry import register_family as _register_family
from models.token_selection import keep_decision
from models.validation import check as _check

RATIO_STEP = 0.2  # the official schedule: rho, rho - 0.2, rho - 0.4 (main.py:276)


class SpatialOutput(NamedTuple):
    """What the training losses need from one training-mode forward pass."""

    logits: Tensor  # (B, num_classes)
    tokens: Tensor  # the whole final normalised feature map, (B, H*W, C) (Swin) or (B, H, W, C) (ConvNeXt)
    decision: Tensor | None  # the last location's keep decision (B, N), or None (dense)
    keep_fractions: Tensor  # (B, S): kept fraction of the N positions at each location
    decisions: tuple[Tensor, ...] = ()  # every location's keep decision (B, N)


def official_ratios(keep_ratio: float, locations: int) -> list[float]:
    """[rho, rho - 0.2, rho - 0.4, ...] in the official float arithmetic, floored at 0.

    Below rho = 0.4 the official schedule turns negative (and its `idx[:, :int(N * r)]` then
    keeps nearly everything); here a negative ratio keeps no position (all take the fast path).
    """
    return [max(0.0, keep_ratio - RATIO_STEP * i) if i else keep_ratio for i in range(locations)]


class SpatialSparsification:
    """Mixin for a timm backbone whose third stage is sparsified; the backbone builds the rest.

    Provides the plan (locations, ratios, keep counts), the decisions and both forward paths
    (training -> `forward_masked`, eval -> `forward_pruned`), and the shared attributes the
    harness reads (`num_keep`, `num_patches`, `stage_ratios`, `selection_grid`). A backbone
    supplies its layout: `_before` / `_after` (the map before and after the third stage's
    blocks), `_sparse_blocks`, `_log_probs`, `_stream_mask` and `_logits_and_map`.
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
        pruning_loc: Sequence[int] | None,
        stage_ratios: Sequence[float] | None,
        gumbel_tau: float,
        deterministic: bool,
        stage_depth: int,
        grid: tuple[int, int],
    ) -> None:
        """Validate the sparsification arguments and set the plan's attributes.

        Args:
            variant, keep_ratio, pruning_loc, stage_ratios, gumbel_tau, deterministic: the
                backbone constructor's own (see `DynamicSwinTransformer.__init__`).
            stage_depth: the number of blocks in the third stage (bounds `pruning_loc`).
            grid: the third stage's map (height, width) in positions.
        """
        _check(
            variant in SPATIAL_VARIANTS,
            f"variant: must be one of {', '.join(SPATIAL_VARIANTS)} for this "
            f"family (dynamic spatial sparsification), got {variant!r}",
        )
        _check(
            isinstance(keep_ratio, (int, float)) and 0.0 < keep_ratio <= 1.0,
            f"keep_ratio: must be in (0, 1], got {keep_ratio!r}",
        )
        _check(gumbel_tau > 0, f"gumbel_tau: must be > 0, got {gumbel_tau!r}")
        locs: list[int] = []
        ratios: list[float] = []
        if variant == "dynamic":
            locs = list(pruning_loc) if pruning_loc is not None else []
            _check(len(locs) > 0, "pruning_loc: must list at least one block index of the third stage, got none")
            _check(
                all(isinstance(loc, int) and 0 <= loc < stage_depth for loc in locs),
                f"pruning_loc: each location must be a third-stage block index in [0, {stage_depth - 1}], got {locs}",
            )
            _check(locs == sorted(set(locs)), f"pruning_loc: must be strictly increasing, got {locs}")
            ratios = list(stage_ratios) if stage_ratios is not None else official_ratios(keep_ratio, len(locs))
            _check(
                len(ratios) == len(locs),
                f"stage_ratios: need one ratio per pruning location ({len(locs)}), got {len(ratios)}",
            )
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

    def _masked_output(self, logits: Tensor, tokens: Tensor, decisions: list[Tensor]) -> SpatialOutput:
        batch = logits.shape[0]
        if not decisions:
            return SpatialOutput(logits, tokens, None, logits.new_zeros(batch, 0), ())
        fractions = torch.stack([d.mean(dim=1) for d in decisions], dim=1)
        return SpatialOutput(logits, tokens, decisions[-1], fractions, tuple(decisions))

    def forward(self, x: Tensor) -> Any:
        """Training mode: the masked path (a SpatialOutput); eval mode: pruned logits."""
        if not self.training:  # type: ignore[attr-defined]
            return self.forward_pruned(x)
        return self.forward_masked(x)

    # ------------------------------------------------------------- the backbone's layout
    def _before(self, x: Tensor) -> Tensor:
        """Images -> the map entering the third stage's blocks (the backbone's layout)."""
        raise NotImplementedError

    def _after(self, x: Tensor) -> Tensor:
        """The map leaving the third stage -> what the backbone's head takes."""
        raise NotImplementedError

    def _sparse_blocks(self) -> nn.Sequential:
        """The third stage's blocks (dynamic from the first location on)."""
        raise NotImplementedError

    def _log_probs(self, stage: int, x: Tensor) -> Tensor:
        """Location `stage`'s predictor on the map: (B, N, 2) log-probabilities, channel 0 = keep."""
        raise NotImplementedError

    def _stream_mask(self, decision: Tensor, like: Tensor) -> Tensor:
        """The decision (B, N) shaped to broadcast over the map `like`."""
        raise NotImplementedError

    def _logits_and_map(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """From `_after`'s output: the logits and the whole normalised final map (distilled)."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------- paths
    def forward_masked(self, x: Tensor, deterministic: bool | None = None) -> SpatialOutput:
        """Training path: both streams computed everywhere, mixed by the hard decisions."""
        deterministic = self.deterministic if deterministic is None else deterministic
        x = self._before(x)
        kept = fast = x
        mask: Tensor | None = None
        decisions: list[Tensor] = []
        block: Any  # a converted block: its forward_streams is not in nn.Module's type
        for index, block in enumerate(self._sparse_blocks()):
            stage = self._stage_at.get(index)
            if stage is not None:
                if mask is None:
                    kept = fast = x
                current = x if mask is None else kept * mask + fast * (1 - mask)
                log_probs = self._log_probs(stage, current)
                decision = keep_decision(log_probs, self.num_keep[stage], self.gumbel_tau, deterministic)
                decisions.append(decision)
                mask = self._stream_mask(decision, current)
            if mask is None:
                x = block(x)
            else:
                kept, fast = block.forward_streams(kept, fast, mask)
        if mask is not None:
            x = kept * mask + fast * (1 - mask)
        logits, tokens = self._logits_and_map(self._after(x))
        return self._masked_output(logits, tokens, decisions)

    def forward_pruned(self, x: Tensor, return_positions: bool = False) -> Any:
        """Inference path: per location the top `int(N * ratio_s)` positions take the MLP.

        With `return_positions`, also the kept positions (B, k_s) in the third-stage grid.
        """
        x = self._before(x)
        kept_positions: list[Tensor] = []
        split: tuple[Tensor, Tensor] | None = None
        block: Any  # a converted block: its forward_split is not in nn.Module's type
        for index, block in enumerate(self._sparse_blocks()):
            stage = self._stage_at.get(index)
            if stage is not None:
                split = split_by_score(self._log_probs(stage, x)[..., 0], self.num_keep[stage])
                kept_positions.append(split[0])
            x = block(x) if split is None else block.forward_split(x, *split)
        logits = self.forward_head(self._after(x))  # type: ignore[attr-defined]
        return (logits, kept_positions) if return_positions else logits


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
    own = {key[len(prefix) :]: state.pop(key) for key in list(state) if key.startswith(prefix)}
    model: Any = module  # one of the spatial models: checkpoint_filter_fn is not in nn.Module's type
    state.update({prefix + key: value for key, value in model.checkpoint_filter_fn(own).items()})


# ------------------------------------------------------------------------------ registry
def register_family(family: str, model_class: type, module_name: str) -> None:
    """Register every catalog name of `family` with timm (models/registry.py).

    Args:
        family: the catalog's `_family` of the names to register ("swin" or "convnext").
        model_class: the class every entry point builds.
        module_name: the module the entry points belong to (timm files them under it).
    """
    _register_family(SPATIAL_MODELS, family, model_class, module_name, "Dynamic spatial sparsification")
