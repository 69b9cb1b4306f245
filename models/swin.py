"""DynamicSwin: dynamic spatial sparsification (T-PAMI DynamicViT) on timm's Swin Transformer.

A small, named change to `timm.models.swin_transformer.SwinTransformer` (the scheme is in
models/spatial.py). Modifications:
  1. `layers.2.score_predictor`: one `PredictorLG` (models/predictor.py) per pruning location,
     before third-stage blocks `pruning_loc` ([1, 2, 3] for Swin-T, [2, 4, 6] for Swin-S/B).
  2. `DynamicSwinBlock` replaces timm's block from the first location to the end of the third
     stage (as the official `AdaSwinTransformerBlock`): it adds `fastmlp` (LayerNorm + Linear
     C -> C) and two forward paths. Window attention always runs on the whole map.
       - training (`forward_streams`): the official two-stream step. The stage carries a "kept"
         and a "fast" stream; a block reads `kept * m + fast * (1 - m)` under the current mask m,
         adds attention, then kept <- x + MLP(norm2(x * m + kept * (1 - m))) and
         fast <- x + fastmlp(x * (1 - m) + fast * m). Where m stays the same this is
         x + MLP or x + fastmlp of the real state; where a new location flips a position's
         decision, the block reads the other stream's (stale) value there, exactly as the
         official code does (dyswin.py AdaSwinTransformerBlock.forward), so that training under
         the same Gumbel noise gives the official numbers.
       - inference (`forward_split`): MLP on the kept positions, fast path on the rest, gathered
         and scattered back, so the map keeps its shape.
  3. Decisions: hard Gumbel-softmax over all 196 positions at each location (not nested), or
     exact top-k in deterministic mode; inference keeps the top `int(196 * ratio_s)`.
  4. `forward` returns a `SpatialOutput` in training (logits, the whole normalised final map
     (B, 49, C), decisions) and logits in eval. Unlike the official code, inference works at
     every batch size (the official `len(x) == 2` test takes a batch of 2 for its [x1, x2] pair
     and crashes, DynamicViT issue #25).
  5. `no_weight_decay` is empty: the official optimiser decays `relative_position_bias_table`.

Parameter names are timm's (so timm's Swin weights load with only the predictors and fast paths
missing) plus the official names of the added modules (`layers.2.score_predictor.N`,
`layers.2.blocks.N.fastmlp.fc1.{0,1}`). An official checkpoint (DynamicSwin or Microsoft's
Swin) loads with `load_state_dict(strict=True)`: a load hook maps it with timm's own
`checkpoint_filter_fn` (downsample moved to the next stage, `head` -> `head.fc`, the
`relative_position_index` and `attn_mask` buffers dropped: timm recomputes them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from timm.layers import trunc_normal_
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock
from timm.models.swin_transformer import checkpoint_filter_fn as timm_swin_filter
from torch import Tensor, nn

from models.predictor import PredictorLG
from models.spatial import (
    SpatialSparsification,
    check_input,
    official_layout_hook,
    register_family,
    split_apply,
)

SPARSE_STAGE = 2  # the third stage (14 x 14 at 224 px)


class FastMlp(nn.Module):
    """The fast path of a dropped position: LayerNorm + Linear C -> C (official `fastMlp`)."""

    def __init__(self, dim: int, drop: float = 0.0) -> None:
        """
        Args:
            dim: channels of the positions (the block's width C).
            drop: dropout probability after the Linear (the block MLP's).
        """
        super().__init__()
        self.fc1 = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))
        self.drop = nn.Dropout(drop)
        linear = cast(nn.Linear, self.fc1[1])
        trunc_normal_(linear.weight, std=0.02)  # the official init (dyswin.py _init_weights)
        nn.init.zeros_(linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc1(x))


class DynamicSwinBlock(SwinTransformerBlock):
    """timm's Swin block plus a fast path and the two sparsified forward paths (see module doc)."""

    fastmlp: FastMlp

    @classmethod
    def convert(cls, block: SwinTransformerBlock) -> DynamicSwinBlock:
        """Turn a built timm block into this class in place (as ToMe patches timm blocks).

        Args:
            block: a third-stage block of timm's Swin; it gains a `FastMlp` of its width, with its
                MLP's dropout.
        """
        block.__class__ = cls
        block.fastmlp = FastMlp(block.dim, drop=block.mlp.drop1.p)
        return block  # type: ignore[return-value]

    def forward_streams(self, kept: Tensor, fast: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Training step on NHWC streams under the 0/1 mask (B, H, W, 1)."""
        x = kept * mask + fast * (1 - mask)
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        kept_in = x * mask + kept * (1 - mask)
        fast_in = x * (1 - mask) + fast * mask
        kept = x + self.drop_path2(self.mlp(self.norm2(kept_in)))
        fast = x + self.drop_path2(self.fastmlp(fast_in))
        return kept, fast

    def forward_split(self, x: Tensor, kept: Tensor, rest: Tensor) -> Tensor:
        """Inference: attention on the whole map, MLP on the `kept` positions, fast path on `rest`."""
        batch, height, width, dim = x.shape
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        flat = x.reshape(batch, height * width, dim)
        update = split_apply(
            flat,
            kept,
            rest,
            lambda t: self.drop_path2(self.mlp(self.norm2(t))),
            lambda t: self.drop_path2(self.fastmlp(t)),
        )
        return (flat + update).reshape(batch, height, width, dim)


class DynamicSwinTransformer(SpatialSparsification, SwinTransformer):
    """timm's SwinTransformer with dynamic spatial sparsification of its third stage."""

    def __init__(
        self,
        *,
        variant: str = "dynamic",
        keep_ratio: float = 0.7,
        pruning_loc: Sequence[int] | None = (1, 2, 3),
        stage_ratios: Sequence[float] | None = None,
        gumbel_tau: float = 1.0,
        deterministic: bool = False,
        **swin_kwargs: Any,
    ) -> None:
        """Build timm's Swin, then sparsify its third stage; a bad argument is a one-line ValueError.

        Args:
            variant: `dynamic` (a `PredictorLG` per location, the T-PAMI scheme) or `dense` (the
                plain backbone, no location).
            keep_ratio: rho in (0, 1]: the locations keep [rho, rho - 0.2, rho - 0.4, ...] of the
                third stage's positions (floored at 0, truncated as the official code does), unless
                `stage_ratios` is given.
            pruning_loc: zero-based, strictly increasing indices of the third stage's blocks before
                which a location decides (`dynamic`: at least one; ignored by `dense`).
            stage_ratios: the kept fraction of the third stage's positions per location, one per
                entry of `pruning_loc`, each in [0, 1]; None: the official schedule above.
            gumbel_tau: temperature (> 0) of the hard Gumbel-softmax that samples training
                decisions; `set_gumbel_tau` changes it during training.
            deterministic: train with exact top-k decisions (a straight-through gradient to the keep
                probability) instead of Gumbel samples.
            **swin_kwargs: timm's `SwinTransformer` arguments (`img_size`, `patch_size`,
                `window_size`, `embed_dim`, `depths`, `num_heads`, `num_classes`, `drop_path_rate`,
                ...); the third stage's grid follows from them (14 x 14 at 224 px, patch 4).
        """
        super().__init__(**swin_kwargs)
        stage = self._sparse_stage()
        self._plan_sparsity(
            variant=variant,
            keep_ratio=keep_ratio,
            pruning_loc=pruning_loc,
            stage_ratios=stage_ratios,
            gumbel_tau=gumbel_tau,
            deterministic=deterministic,
            stage_depth=len(stage.blocks),
            grid=stage.output_resolution,
        )
        patch_embed: Any = self.patch_embed  # timm's PatchEmbed (its attributes: Tensor | Module to nn.Module)
        self.input_shape = (self.in_chans, *patch_embed.img_size)
        if self.pruning_loc:
            dim = stage.blocks[0].dim
            stage.score_predictor = nn.ModuleList(PredictorLG(dim) for _ in self.pruning_loc)
            for block in stage.blocks[self.pruning_loc[0] :]:
                DynamicSwinBlock.convert(block)
        self.register_load_state_dict_pre_hook(official_layout_hook)

    def checkpoint_filter_fn(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """An official (DynamicSwin / Microsoft Swin) or timm state dict in this model's layout."""
        return timm_swin_filter(dict(state), self)

    # ----------------------------------------------------------------------------- paths
    def _before(self, x: Tensor) -> Tensor:
        """Patch embedding, the first two stages and the third stage's downsampling (NHWC)."""
        check_input(x, self.input_shape)
        x = self.patch_embed(x)
        for stage in self.layers[:SPARSE_STAGE]:
            x = stage(x)
        return self._sparse_stage().downsample(x)

    def _after(self, x: Tensor) -> Tensor:
        """The last stage and the final norm: the normalised map (B, h, w, C)."""
        for stage in self.layers[SPARSE_STAGE + 1 :]:
            x = stage(x)
        return self.norm(x)

    def _log_probs(self, stage: int, x: Tensor) -> Tensor:
        batch, height, width, dim = x.shape
        return self._sparse_stage().score_predictor[stage](x.reshape(batch, height * width, dim))

    def _sparse_stage(self) -> Any:
        """The third stage (timm's SwinTransformerStage: Any, as nn.Module types its attributes Tensor | Module)."""
        return self.layers[SPARSE_STAGE]

    def _sparse_blocks(self) -> nn.Sequential:
        return self._sparse_stage().blocks

    def _stream_mask(self, decision: Tensor, like: Tensor) -> Tensor:
        return decision.reshape(*like.shape[:3], 1)  # NHWC

    def _logits_and_map(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.forward_head(x), x.flatten(1, 2)  # `_after` already normalised the map


# ------------------------------------------------------------------------------ registry
register_family("swin", DynamicSwinTransformer, __name__)
