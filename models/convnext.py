"""DynamicCNN: dynamic spatial sparsification (T-PAMI DynamicViT) on timm's ConvNeXt.

A small, named change to `timm.models.convnext.ConvNeXt` (the scheme is in models/spatial.py).
Modifications:
  1. `score_predictor`: one `PredictorLG` (models/predictor.py) per pruning location, before
     third-stage blocks `pruning_loc` ([1, 2, 3] for ConvNeXt-T, [3, 6, 9] for -S/-B), with the
     official LayerNorm eps 1e-6. The official predictor is written with 1 x 1 convolutions on
     the NCHW map; on the flattened positions it is the same Linear layers (weights (out, in, 1, 1)
     in an official file, reshaped to (out, in) when loaded).
  2. `DynamicConvNeXtBlock` replaces timm's block from the first location to the end of the third
     stage (as the official `AdaBlock`): it adds `fast_path` (LayerNorm + Linear C -> C) and its
     layer scale `fast_path_gamma`, and two forward paths. The 7 x 7 depth-wise convolution always
     runs on the whole map.
       - training (`forward_streams`): the official two-stream step. The stage carries a "kept"
         and a "fast" stream; a block convolves `kept * m + fast * (1 - m)` to y, then
         kept <- kept + gamma MLP(y * m + kept * (1 - m)) and
         fast <- fast + fast_path_gamma fast_path(y * (1 - m) + fast * m). Where m stays the same
         this is the real block on the real state; where a new location flips a position's
         decision, the streams carry the other path's (stale) values there, exactly as the
         official code does (dyconvnext.py AdaBlock.forward), so that training under the same
         Gumbel noise gives the official numbers.
       - inference (`forward_split`): MLP on the kept positions, fast path on the rest, gathered
         and scattered back, so the map keeps its shape.
  3. Decisions: hard Gumbel-softmax over all 196 positions at each location (not nested), or
     exact top-k in deterministic mode; inference keeps the top `int(196 * ratio_s)`.
  4. `forward` returns a `SpatialOutput` in training (logits, the whole final map normalised by
     the head's LayerNorm, (B, 7, 7, C), decisions) and logits in eval.
  5. `img_size` is an argument (timm's ConvNeXt takes any size): with the stem's and the
     downsamplings' strides it fixes the third-stage grid.

Parameter names are timm's (so timm's ConvNeXt weights load with only the predictors and fast
paths missing) plus the official names of the added modules (`score_predictor.N`,
`stages.2.blocks.N.fast_path.{0,1}`, `stages.2.blocks.N.fast_path_gamma`). An official checkpoint
(DynamicCNN or Meta's ConvNeXt) loads with `load_state_dict(strict=True)`: a load hook maps the
backbone with timm's own `checkpoint_filter_fn` and the added modules by name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, cast

from timm.layers import to_2tuple, trunc_normal_
from timm.models.convnext import ConvNeXt, ConvNeXtBlock
from timm.models.convnext import checkpoint_filter_fn as timm_convnext_filter
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
NORM_EPS = 1e-6  # ConvNeXt's LayerNorm eps, also in the official predictor and fast path


class DynamicConvNeXtBlock(ConvNeXtBlock):
    """timm's ConvNeXt block plus a fast path and the two sparsified forward paths (see module doc)."""

    fast_path: nn.Sequential
    fast_path_gamma: nn.Parameter | None

    @classmethod
    def convert(cls, block: ConvNeXtBlock, ls_init_value: float | None) -> DynamicConvNeXtBlock:
        """Turn a built timm block into this class in place (as ToMe patches timm blocks).

        Args:
            block: a third-stage block of timm's ConvNeXt; it gains a fast path of its width.
            ls_init_value: the initial value of the fast path's layer scale `fast_path_gamma`
                (the backbone's `ls_init_value`); no layer scale where the block has none.
        """
        dim = block.conv_dw.out_channels
        block.__class__ = cls
        dynamic = cast(DynamicConvNeXtBlock, block)  # the same object, now of this class
        dynamic.fast_path = nn.Sequential(nn.LayerNorm(dim, eps=NORM_EPS), nn.Linear(dim, dim))
        linear = cast(nn.Linear, dynamic.fast_path[1])
        trunc_normal_(linear.weight, std=0.02)  # the official init (dyconvnext.py _init_weights)
        nn.init.zeros_(linear.bias)
        gamma = None
        if block.gamma is not None:
            assert ls_init_value is not None  # timm built the block's layer scale from this value
            gamma = nn.Parameter(ls_init_value * block.gamma.new_ones(dim))
        dynamic.fast_path_gamma = gamma
        return dynamic

    def _mlp(self, x: Tensor) -> Tensor:
        """The block's MLP branch on channels-last positions (norm, MLP, layer scale)."""
        x = self.mlp(self.norm(x))
        return x * self.gamma if self.gamma is not None else x

    def _fast(self, x: Tensor) -> Tensor:
        """The fast path on channels-last positions."""
        x = self.fast_path(x)
        return x * self.fast_path_gamma if self.fast_path_gamma is not None else x

    def forward_streams(self, kept: Tensor, fast: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Training step on NCHW streams under the 0/1 mask (B, 1, H, W)."""
        y = self.conv_dw(kept * mask + fast * (1 - mask))
        kept_in = (y * mask + kept * (1 - mask)).permute(0, 2, 3, 1)
        fast_in = (y * (1 - mask) + fast * mask).permute(0, 2, 3, 1)
        kept = kept + self.drop_path(self._mlp(kept_in).permute(0, 3, 1, 2))
        fast = fast + self.drop_path(self._fast(fast_in).permute(0, 3, 1, 2))
        return kept, fast

    def forward_split(self, x: Tensor, kept: Tensor, rest: Tensor) -> Tensor:
        """Inference: convolution on the whole map, MLP on the `kept` positions, fast path on `rest`."""
        batch, dim, height, width = x.shape
        y = self.conv_dw(x).permute(0, 2, 3, 1).reshape(batch, height * width, dim)
        update = split_apply(y, kept, rest, self._mlp, self._fast)
        return x + self.drop_path(update.reshape(batch, height, width, dim).permute(0, 3, 1, 2))


class DynamicConvNeXt(SpatialSparsification, ConvNeXt):
    """timm's ConvNeXt with dynamic spatial sparsification of its third stage."""

    def __init__(
        self,
        *,
        variant: str = "dynamic",
        keep_ratio: float = 0.7,
        pruning_loc: Sequence[int] | None = (1, 2, 3),
        stage_ratios: Sequence[float] | None = None,
        gumbel_tau: float = 1.0,
        deterministic: bool = False,
        img_size: int | tuple[int, int] = 224,
        **convnext_kwargs: Any,
    ) -> None:
        """Build timm's ConvNeXt, then sparsify its third stage; a bad argument is a one-line ValueError.

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
            img_size: input image size in pixels, an int (square) or (height, width); with the
                strides of the stem and the downsamplings it fixes the third stage's grid (14 x 14 at
                224 px). timm's ConvNeXt takes any size, so it is this class's argument.
            **convnext_kwargs: timm's `ConvNeXt` arguments (`depths`, `dims`, `patch_size`,
                `stem_type`, `ls_init_value`, `num_classes`, `drop_path_rate`, ...).
        """
        super().__init__(**convnext_kwargs)
        height, width = to_2tuple(img_size)
        # Any: timm's ConvNeXtStage attributes, which nn.Module's type gives as Tensor | Module
        stages: list[Any] = list(self.stages)
        stage = stages[SPARSE_STAGE]
        convs = [*self.stem.modules()] + [m for s in stages[: SPARSE_STAGE + 1] for m in s.downsample.modules()]
        stride = math.prod(m.stride[0] for m in convs if isinstance(m, nn.Conv2d))  # stem and downsamplings
        self._plan_sparsity(
            variant=variant,
            keep_ratio=keep_ratio,
            pruning_loc=pruning_loc,
            stage_ratios=stage_ratios,
            gumbel_tau=gumbel_tau,
            deterministic=deterministic,
            stage_depth=len(stage.blocks),
            grid=(height // stride, width // stride),
        )
        self.input_shape = (self.in_chans, height, width)
        if self.pruning_loc:
            dim = stage.blocks[0].conv_dw.out_channels
            self.score_predictor = nn.ModuleList(_predictor(dim) for _ in self.pruning_loc)
            ls_init_value = convnext_kwargs.get("ls_init_value", 1e-6)
            for block in stage.blocks[self.pruning_loc[0] :]:
                DynamicConvNeXtBlock.convert(block, ls_init_value)
        self.register_load_state_dict_pre_hook(official_layout_hook)

    def checkpoint_filter_fn(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """An official (DynamicCNN / Meta ConvNeXt) or timm state dict in this model's layout.

        The added modules are split off first (timm's filter looks every 2-D key up in the model
        and fails on keys it does not have), renamed like the backbone and, for the predictors'
        1 x 1 convolutions, reshaped to Linear weights.
        """
        state = dict(state.get("model", state))
        added = {key: state.pop(key) for key in list(state) if self.is_added_key(key)}
        out = dict(timm_convnext_filter(state, self))
        for key, value in added.items():
            key = re.sub(r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", key)
            if key.startswith("score_predictor.") and value.ndim == 4:
                value = value.reshape(value.shape[:2])
            out[key] = value
        return out

    # ----------------------------------------------------------------------------- paths
    def _before(self, x: Tensor) -> Tensor:
        """Stem, the first two stages and the third stage's downsampling (NCHW)."""
        check_input(x, self.input_shape)
        x = self.stem(x)
        for stage in self.stages[:SPARSE_STAGE]:
            x = stage(x)
        return self._sparse_stage().downsample(x)

    def _after(self, x: Tensor) -> Tensor:
        """The last stage (NCHW, before the head's pooling and LayerNorm)."""
        for stage in self.stages[SPARSE_STAGE + 1 :]:
            x = stage(x)
        return self.norm_pre(x)

    def _log_probs(self, stage: int, x: Tensor) -> Tensor:
        return self.score_predictor[stage](x.flatten(2).transpose(1, 2))

    def _sparse_stage(self) -> Any:
        """The third stage (timm's ConvNeXtStage: Any, as nn.Module types its attributes Tensor | Module)."""
        return self.stages[SPARSE_STAGE]

    def _sparse_blocks(self) -> nn.Sequential:
        return self._sparse_stage().blocks

    def _stream_mask(self, decision: Tensor, like: Tensor) -> Tensor:
        batch, _, height, width = like.shape  # NCHW
        return decision.reshape(batch, 1, height, width)

    def _logits_and_map(self, x: Tensor) -> tuple[Tensor, Tensor]:
        head: Any = self.head  # timm's NormMlpClassifierHead (its `norm`, to nn.Module's type, is Tensor | Module)
        tokens = head.norm(x).permute(0, 2, 3, 1)  # the official featmap: every position normalised
        return self.forward_head(x), tokens


def _predictor(dim: int) -> PredictorLG:
    """The shared predictor with the official ConvNeXt predictor's LayerNorm eps."""
    predictor = PredictorLG(dim)
    cast(nn.LayerNorm, predictor.in_conv[0]).eps = NORM_EPS
    return predictor


register_family("convnext", DynamicConvNeXt, __name__)
