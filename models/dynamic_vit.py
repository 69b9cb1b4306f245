"""DynamicViT: dynamic token sparsification on timm's VisionTransformer.

A small, explicit change to a stock timm ViT (the DeiT definition), in the spirit of ToMe.
Modifications to `timm.models.vision_transformer.VisionTransformer`:
  1. `MaskedAttention` (models/masked_attention.py) replaces `Attention`: with a keep policy it
     computes the attention weights by hand and masks them so that a dropped token is attended
     by nobody but itself (the official, differentiable formulation); without one it is timm's
     fused attention.
  2. `DynamicBlock` replaces `Block`: it passes the policy to the attention and can return the
     CLS row of its attention map (for the `attention` variant).
  3. `score_predictor`: one token selector per pruning stage (before the blocks in
     `pruning_loc`); `PredictorLG` for `dynamic` (official parameter names), a learned score per
     token position for `static` (both models/predictor.py), none for `random` / `attention` /
     `structural` / `dense`.
  4. Two forward paths. Training (`forward_masked`): all tokens stay in memory and a keep
     decision per token (Gumbel-softmax, or exact top-k in deterministic mode:
     models/token_selection.py) masks attention.
     Inference (`forward_pruned`): per stage the top `int(N * ratio_s)` patch tokens are gathered
     and the rest are gone, CLS always kept, so the cost per image is fixed and exact.
     `random` and `attention` learn nothing about which tokens to keep, so they also train on
     the gathered tokens (`forward_gathered_train`: the masked path's result at the pruned cost).
  5. `structural`: 2x2 average pooling of the patch-token grid before block `pool_after_block`
     (CLS untouched) instead of any token selection.

Parameter names are the official checkpoint's (`blocks.*`, `score_predictor.{s}.in_conv.*`,
`score_predictor.{s}.out_conv.*`), so official and DeiT weights load with strict key matching.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from harness.catalog import PEER_VARIANTS, VARIANTS
from models.masked_attention import MaskedAttention
from models.predictor import PredictorLG, StaticPredictor
from models.token_selection import keep_decision, topk_mask
from models.validation import check as _check

SELECTING_VARIANTS = ("dynamic", "static", "random", "attention")
STAGED_PEERS = ("evit", "topk")  # peers (models/peers.py) that reduce at `pruning_loc` with per-stage counts
UNLEARNED_SELECTION = ("random", "attention")  # nothing learned chooses their tokens: train gathered


class DynamicViTOutput(NamedTuple):
    """What the training losses need from one masked forward pass."""

    logits: Tensor  # (B, num_classes)
    tokens: Tensor  # final normalised patch tokens (B, N, C); pooled grid for `structural`
    decision: Tensor | None  # final keep decision over the N patch tokens (B, N), or None
    keep_fractions: Tensor  # (B, S): kept fraction of the original patch tokens per stage


class DynamicBlock(Block):
    """timm's Block whose attention takes a keep policy and can report its CLS attention row.

    Its two residual halves are separate methods so that peer methods (models/peers.py) can
    reduce the tokens between the attention and the MLP of one block.
    """

    attn: MaskedAttention  # DynamicVisionTransformer builds its blocks with attn_layer=MaskedAttention

    def attention_residual(
        self, x: Tensor, policy: Tensor | None = None, return_cls_attn: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        attn_out, cls_attn = self.attn(self.norm1(x), policy=policy, return_cls_attn=return_cls_attn)
        return x + self.drop_path1(self.ls1(attn_out)), cls_attn

    def mlp_residual(self, x: Tensor) -> Tensor:
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def forward(  # type: ignore[override]
        self, x: Tensor, policy: Tensor | None = None, return_cls_attn: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        x, cls_attn = self.attention_residual(x, policy=policy, return_cls_attn=return_cls_attn)
        return self.mlp_residual(x), cls_attn


class DynamicVisionTransformer(VisionTransformer):
    """A timm ViT (DeiT) with DynamicViT token sparsification; see the module docstring."""

    # the variants this class computes; peer methods are subclasses (models/peers.py)
    own_variants: tuple[str, ...] = tuple(v for v in VARIANTS if v not in PEER_VARIANTS)

    def __init__(
        self,
        *,
        variant: str = "dynamic",
        keep_ratio: float = 0.7,
        pruning_loc: Sequence[int] | None = (3, 6, 9),
        stage_ratios: Sequence[float] | None = None,
        pool_after_block: int | None = None,
        gumbel_tau: float = 1.0,
        deterministic: bool = False,
        **vit_kwargs: Any,
    ) -> None:
        """Build the ViT and plan its pruning stages; a bad argument is a one-line ValueError.

        Args:
            variant: what chooses the tokens: `dense` (none: the plain DeiT), `dynamic` (a
                `PredictorLG` per stage, DynamicViT), `static` (a learned score per token position),
                `random`, `attention` (the CLS attention row of the block before the stage) or
                `structural` (2x2 pooling of the token grid instead of selection). The peer methods
                (`evit`, `topk`, `tome`) are subclasses (models/peers.py), refused here.
            keep_ratio: rho in (0, 1]: stage s (zero-based) keeps `int(N * rho ** (s + 1))` of the N
                original patch tokens, unless `stage_ratios` is given.
            pruning_loc: zero-based, strictly increasing indices of the blocks before which a stage
                prunes (one stage each); at least one for the selecting variants, ignored by `dense`
                and `structural`; >= 1 for `attention` (it ranks by the block before).
            stage_ratios: the kept fraction of the original patch tokens per stage, one per entry of
                `pruning_loc`, each in (0, 1] and not increasing; None: `keep_ratio ** (s + 1)`.
            pool_after_block: `structural` only: the number of blocks that run on the full grid
                before the 2x2 average pooling, in [1, depth - 1]; None: depth // 2. Needs an even
                token grid.
            gumbel_tau: temperature (> 0) of the hard Gumbel-softmax that samples training
                decisions; `set_gumbel_tau` changes it during training.
            deterministic: train with exact top-k decisions (a straight-through gradient to the keep
                probability) instead of Gumbel samples; `forward_masked` can override it per call.
            **vit_kwargs: timm's `VisionTransformer` arguments (`img_size`, a multiple of
                `patch_size`; `patch_size`, `in_chans`, `num_classes`, `embed_dim`, `depth`,
                `num_heads`, `mlp_ratio`, `qkv_bias`, `drop_path_rate`, ...); this class sets
                `block_fn` and `attn_layer`.
        """
        _check(variant in VARIANTS, f"variant: must be one of {', '.join(VARIANTS)}, got {variant!r}")
        _check(
            variant in self.own_variants,
            f"variant: {variant!r} is a peer method, built by timm.create_model "
            f"(models/peers.py), not by {type(self).__name__}, got {variant!r}",
        )
        _check(
            isinstance(keep_ratio, (int, float)) and 0.0 < keep_ratio <= 1.0,
            f"keep_ratio: must be in (0, 1], got {keep_ratio!r}",
        )
        _check(gumbel_tau > 0, f"gumbel_tau: must be > 0, got {gumbel_tau!r}")
        img_size = vit_kwargs.get("img_size", 224)
        patch_size = vit_kwargs.get("patch_size", 16)
        for side in img_size if isinstance(img_size, (tuple, list)) else (img_size, img_size):
            _check(
                side % patch_size == 0,
                f"img_size: must be a multiple of patch_size {patch_size}, got {img_size}",
            )
        super().__init__(block_fn=DynamicBlock, attn_layer=MaskedAttention, **vit_kwargs)
        depth = len(self.blocks)
        grid_h, grid_w = self.patch_embed.grid_size
        self.num_patches = grid_h * grid_w
        self.variant = variant
        self.keep_ratio = float(keep_ratio)
        self.gumbel_tau = float(gumbel_tau)
        self.deterministic = deterministic

        if variant in SELECTING_VARIANTS + STAGED_PEERS:
            locs = list(pruning_loc) if pruning_loc is not None else []
            _check(len(locs) > 0, "pruning_loc: must list at least one block index, got none")
            _check(
                all(isinstance(loc, int) and 0 <= loc < depth for loc in locs),
                f"pruning_loc: each location must be a block index in [0, {depth - 1}], got {locs}",
            )
            _check(locs == sorted(set(locs)), f"pruning_loc: must be strictly increasing, got {locs}")
            if variant == "attention":
                _check(
                    locs[0] >= 1,
                    f"pruning_loc: the attention variant needs a block before each stage (>= 1), got {locs}",
                )
            ratios = (
                list(stage_ratios) if stage_ratios is not None else [keep_ratio ** (i + 1) for i in range(len(locs))]
            )
            _check(
                len(ratios) == len(locs),
                f"stage_ratios: need one ratio per pruning location ({len(locs)}), got {len(ratios)}",
            )
            _check(all(0.0 < r <= 1.0 for r in ratios), f"stage_ratios: each must be in (0, 1], got {ratios}")
            _check(ratios == sorted(ratios, reverse=True), f"stage_ratios: must not increase, got {ratios}")
        else:
            locs, ratios = [], []
        self.pruning_loc: list[int] = locs
        self.stage_ratios: list[float] = [float(r) for r in ratios]
        self.num_keep: list[int] = [int(self.num_patches * r) for r in self.stage_ratios]
        self._stage_at = {loc: stage for stage, loc in enumerate(locs)}

        self.pool_after_block: int | None = None
        if variant == "structural":
            pool_at = depth // 2 if pool_after_block is None else pool_after_block
            _check(
                isinstance(pool_at, int) and 1 <= pool_at < depth,
                f"pool_after_block: must be a block count in [1, {depth - 1}], got {pool_after_block!r}",
            )
            _check(
                grid_h % 2 == 0 and grid_w % 2 == 0,
                f"img_size: structural pooling needs an even token grid, got {grid_h}x{grid_w}",
            )
            self.pool_after_block = pool_at

        if variant == "dynamic":
            self.score_predictor = nn.ModuleList(PredictorLG(self.embed_dim) for _ in locs)
        elif variant == "static":
            self.score_predictor = nn.ModuleList(StaticPredictor(self.num_patches) for _ in locs)

    # ----------------------------------------------------------------------------------- utils
    def set_gumbel_tau(self, tau: float) -> None:
        """Set the Gumbel-softmax temperature (a schedule calls this per step)."""
        _check(tau > 0, f"gumbel_tau: must be > 0, got {tau!r}")
        self.gumbel_tau = float(tau)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def backbone_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Every parameter except the token selectors (which train at the full learning rate)."""
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("score_predictor.")]

    def _embed(self, x: Tensor) -> Tensor:
        expected = tuple(self.patch_embed.img_size)
        if tuple(x.shape[-2:]) != expected:
            raise ValueError(f"input: expected images of size {expected}, got {tuple(x.shape[-2:])}")
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        return self.norm_pre(x)

    def _pool_grid(self, x: Tensor) -> Tensor:
        """2x2 average pooling of the patch-token grid; CLS untouched."""
        cls, patches = x[:, :1], x[:, 1:]
        batch, _, dim = patches.shape
        grid_h, grid_w = self.patch_embed.grid_size
        grid = patches.transpose(1, 2).reshape(batch, dim, grid_h, grid_w)
        pooled = F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)
        return torch.cat([cls, pooled], dim=1)

    def align_teacher_tokens(self, teacher_tokens: Tensor) -> Tensor:
        """Bring a dense teacher's final patch tokens to this model's token layout."""
        if self.variant != "structural":
            return teacher_tokens
        cls = teacher_tokens.new_zeros(teacher_tokens.shape[0], 1, teacher_tokens.shape[-1])
        return self._pool_grid(torch.cat([cls, teacher_tokens], dim=1))[:, 1:]

    def _needs_cls_attn(self, block_index: int) -> bool:
        return self.variant == "attention" and (block_index + 1) in self._stage_at

    # -------------------------------------------------------------------------- training path
    def _masked_decision(
        self, stage: int, x: Tensor, keep: Tensor, cls_attn: Tensor | None, deterministic: bool
    ) -> Tensor:
        """The keep decision (B, N) of one stage over the original patch tokens."""
        k = self.num_keep[stage]
        if self.variant == "random":
            return topk_mask(torch.rand_like(keep), keep, k)
        if self.variant == "attention":
            assert cls_attn is not None
            return topk_mask(cls_attn, keep, k)
        if self.variant == "dynamic":
            log_probs = self.score_predictor[stage](x[:, 1:], keep)
        else:  # static
            positions = torch.arange(self.num_patches, device=x.device).expand(x.shape[0], -1)
            log_probs = self.score_predictor[stage](positions)
        return keep_decision(log_probs, k, self.gumbel_tau, deterministic, keep)

    def forward_masked(self, x: Tensor, deterministic: bool | None = None) -> DynamicViTOutput:
        """Training path: every token stays in memory, dropped tokens are masked out of attention."""
        deterministic = self.deterministic if deterministic is None else deterministic
        x = self._embed(x)
        batch = x.shape[0]
        keep = x.new_ones(batch, self.num_patches)
        policy: Tensor | None = None
        fractions: list[Tensor] = []
        cls_attn: Tensor | None = None
        for index, block in enumerate(self.blocks):
            if index == self.pool_after_block:
                x = self._pool_grid(x)
            stage = self._stage_at.get(index)
            if stage is not None:
                keep = self._masked_decision(stage, x, keep, cls_attn, deterministic)
                fractions.append(keep.mean(dim=1))
                policy = torch.cat([keep.new_ones(batch, 1), keep], dim=1)
            x, cls_attn = block(x, policy=policy, return_cls_attn=self._needs_cls_attn(index))
        x = self.norm(x)
        logits = self.forward_head(x)
        keep_fractions = torch.stack(fractions, dim=1) if fractions else x.new_zeros(batch, 0)
        return DynamicViTOutput(logits, x[:, 1:], keep if fractions else None, keep_fractions)

    # ------------------------------------------------------------------------- gathered path
    def _keep_scores(self, stage: int, patches: Tensor, positions: Tensor | None, cls_attn: Tensor | None) -> Tensor:
        """Ranking scores (B, n) of the patch tokens still present."""
        if self.variant == "dynamic":
            return self.score_predictor[stage](patches)[..., 0]
        if self.variant == "static":
            return self.score_predictor[stage](positions)[..., 0]
        if self.variant == "attention":
            assert cls_attn is not None
            return cls_attn
        # random: one draw per original position, as the masked path draws, then the present ones
        assert positions is not None
        return torch.rand(positions.shape[0], self.num_patches, device=patches.device).gather(1, positions)

    def _forward_gathered(self, x: Tensor, track: bool) -> tuple[Tensor, list[Tensor]]:
        """Blocks with per-stage top-`int(N * ratio_s)` gathers, CLS first; final normalised tokens.

        With `track`, also the kept positions (B, k_s) in the original patch grid per stage.
        """
        x = self._embed(x)
        batch, _, dim = x.shape
        track = track or self.variant in ("static", "random")
        positions = torch.arange(self.num_patches, device=x.device).expand(batch, -1) if track else None
        kept: list[Tensor] = []
        cls_attn: Tensor | None = None
        for index, block in enumerate(self.blocks):
            if index == self.pool_after_block:
                x = self._pool_grid(x)
            stage = self._stage_at.get(index)
            if stage is not None and self.num_keep[stage] < x.shape[1] - 1:  # else nothing to drop
                scores = self._keep_scores(stage, x[:, 1:], positions, cls_attn)
                order = scores.topk(self.num_keep[stage], dim=1, sorted=False).indices
                # one gather of CLS (row 0) and the kept patch tokens (rows order + 1): no cat copy
                rows = torch.cat([order.new_zeros(batch, 1), order + 1], dim=1)
                x = x.gather(1, rows.unsqueeze(-1).expand(-1, -1, dim))
                if positions is not None:
                    positions = positions.gather(1, order)
            if stage is not None and positions is not None:
                kept.append(positions)
            x, cls_attn = block(x, return_cls_attn=self._needs_cls_attn(index))
        return self.norm(x), kept

    def forward_pruned(self, x: Tensor, return_positions: bool = False) -> Any:
        """Inference path: per stage gather the top `int(N * ratio_s)` patch tokens, CLS first.

        With `return_positions`, also returns for each stage the kept positions (B, k_s) in the
        original patch grid (for visualisations and kept-token counts).
        """
        x, kept = self._forward_gathered(x, track=return_positions)
        logits = self.forward_head(x)
        return (logits, kept) if return_positions else logits

    def forward_gathered_train(self, x: Tensor) -> DynamicViTOutput:
        """Training path of `random` and `attention`: the inference gathers, the masked path's output.

        Nothing they choose by is learned, so no gradient has to reach the dropped tokens, and a
        masked token reaches no kept token (up to the masked softmax's 1e-6 epsilon): training on
        the gathered tokens gives `forward_masked`'s logits, kept tokens and decisions (tested)
        at the pruned cost. Dropped positions of `tokens` are zeros; the token loss skips them.
        """
        x, kept = self._forward_gathered(x, track=True)
        logits = self.forward_head(x)
        batch, _, dim = x.shape
        final = kept[-1]  # random and attention have at least one stage
        tokens = x.new_zeros(batch, self.num_patches, dim).scatter(1, final.unsqueeze(-1).expand(-1, -1, dim), x[:, 1:])
        decision = x.new_zeros(batch, self.num_patches).scatter_(1, final, 1.0)
        fractions = torch.tensor([p.shape[1] / self.num_patches for p in kept], dtype=x.dtype, device=x.device)
        return DynamicViTOutput(logits, tokens, decision, fractions.expand(batch, -1))

    def forward(self, x: Tensor) -> Any:  # type: ignore[override]
        """Training mode: the masked path (a DynamicViTOutput; gathered for random/attention);
        eval mode: pruned logits."""
        if not self.training:
            return self.forward_pruned(x)
        if self.variant in UNLEARNED_SELECTION:
            return self.forward_gathered_train(x)
        return self.forward_masked(x)
