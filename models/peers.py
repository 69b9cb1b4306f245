"""Peer token-reduction methods on the same DeiT backbone: EViT, Top-K and ToMe.

Each is a small explicit change to `DynamicVisionTransformer` (itself timm's ViT), written from
the papers' algorithms (Liang et al., ICLR 2022; Haurum et al., ICCVW 2023; Bolya et al., ICLR
2023); no code of theirs. None adds a parameter: the state dict is timm's deit_* one, so DeiT
weights and this project's dense checkpoints load as they are (`load_weights`, nothing missing).

Common to the three:
  - Training and inference run the same reduced forward pass (a token chosen or merged by a
    fixed rule needs no masked relaxation), so training costs what inference costs. In training
    mode the output is a `DynamicViTOutput` for the shared losses: `tokens` are the final
    normalised tokens put back at the original patch positions they stand for (see each class),
    `keep_fractions` has no stage columns (no ratio loss: nothing learns the counts).
  - `tokens_after_block()` gives the token count (CLS included) leaving every block, exactly what
    the forward pass runs (tested), and `harness.measure.count_gflops` counts the pass itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from models.dynamic_vit import DynamicBlock, DynamicVisionTransformer, DynamicViTOutput
from models.masked_attention import MaskedAttention
from models.validation import check as _check


def _no_stages(x: Tensor) -> Tensor:
    return x.new_zeros(x.shape[0], 0)


class EViTVisionTransformer(DynamicVisionTransformer):
    """`evit`: attentive token selection with inattentive token fusion (EViT).

    Modifications to `DynamicVisionTransformer` (variant `evit`):
      1. In each block of `pruning_loc` (default 3, 6, 9 for DeiT, zero-based) the tokens are
         reduced between the attention and the MLP: the attention runs on every current token,
         then the patch tokens are ranked by that block's CLS attention row (softmax, averaged over
         heads) and the top `ceil(keep_ratio * (N - 1))` are kept, N - 1 being the current non-CLS
         tokens (a fused token from an earlier stage counts as one and can be dropped again).
         The MLP runs on the kept tokens only. DeiT-S at 0.7 keeps 138 / 98 / 70.
      2. `fuse_token=True` (EViT's main setting): the dropped tokens are summed, each weighted by
         its CLS attention (a weighted sum, not a mean, as EViT computes it), into one extra token
         appended after the kept ones. `fuse_token=False` drops them.
      3. With `stage_ratios` given, each stage keeps `int(num_patches * ratio_s)` patch tokens
         instead (TokenReduction's EViT, whose keep rate rho keeps rho**s of the original tokens).
    Training: the same pass; the fused token's weights carry a gradient into the attention.
    `tokens`/`decision` of the training output cover the kept patch tokens (a fused token stands
    for no single position and is left out of the token loss).
    """

    own_variants = ("evit",)
    default_fuse = True

    def __init__(
        self, *, fuse_token: bool | None = None, stage_ratios: Sequence[float] | None = None, **kwargs: Any
    ) -> None:
        """
        Args:
            fuse_token: sum the dropped tokens, weighted by their CLS attention, into one extra
                token per stage; None: the class default (True for EViT).
            stage_ratios: None: EViT's own rule, each stage keeps `ceil(keep_ratio * current)` of
                the current non-CLS tokens; else stage s keeps `int(num_patches * stage_ratios[s])`
                patch tokens (TokenReduction's EViT), one ratio per entry of `pruning_loc`.
            **kwargs: `DynamicVisionTransformer`'s arguments: `variant` ("evit"), `keep_ratio`
                (EViT's rho in (0, 1]), `pruning_loc` (the zero-based blocks that reduce between
                their attention and MLP), and timm's ViT arguments.
        """
        super().__init__(stage_ratios=stage_ratios, **kwargs)
        self.fuse_token = self.default_fuse if fuse_token is None else bool(fuse_token)
        self.of_current = stage_ratios is None and self.variant == "evit"  # EViT's own rule: ceil(rho * current)
        self.num_keep = self._kept_per_stage()

    # ------------------------------------------------------------------------------ counts
    def _count(self, stage: int, current: int) -> int:
        """Patch tokens kept at `stage` from `current` non-CLS tokens (no reduction if >= current)."""
        if self.of_current:
            return math.ceil(self.keep_ratio * current) if self.keep_ratio < 1 else current
        return int(self.num_patches * self.stage_ratios[stage])

    def _plan(self) -> tuple[list[int], list[int]]:
        """(tokens leaving each block, CLS and a fused token included; patch tokens kept per stage)."""
        tokens, after, kept = self.num_patches + 1, [], []
        for index in range(len(self.blocks)):
            stage = self._stage_at.get(index)
            if stage is not None:
                keep = min(self._count(stage, tokens - 1), tokens - 1)
                kept.append(keep)
                if keep < tokens - 1:
                    tokens = 1 + keep + int(self.fuse_token)
            after.append(tokens)
        return after, kept

    def tokens_after_block(self) -> list[int]:
        """Tokens (CLS, patches and a fused token) leaving each block, as the forward pass runs them."""
        return self._plan()[0]

    def _kept_per_stage(self) -> list[int]:
        """Patch tokens kept per stage by rank (a token fused at that stage not counted): `num_keep`."""
        return self._plan()[1]

    # ------------------------------------------------------------------------------ forward
    def _select(self, x: Tensor, cls_attn: Tensor, positions: Tensor, keep: int) -> tuple[Tensor, Tensor]:
        """Keep the `keep` patch tokens of highest CLS attention (CLS first), fuse the rest if asked."""
        dim = x.shape[-1]
        patches = x[:, 1:]
        order = cls_attn.topk(keep, dim=1).indices  # most attended first
        parts = [x[:, :1], patches.gather(1, order.unsqueeze(-1).expand(-1, -1, dim))]
        positions = positions.gather(1, order)
        if self.fuse_token:
            dropped_weight = cls_attn.scatter(1, order, 0.0)  # CLS attention of the dropped tokens, 0 if kept
            parts.append((dropped_weight.unsqueeze(-1) * patches).sum(dim=1, keepdim=True))
            positions = torch.cat([positions, positions.new_full((positions.shape[0], 1), -1)], dim=1)
        return torch.cat(parts, dim=1), positions

    def _reduced(self, x: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """The blocks with reduction; final normalised tokens, final positions and positions per stage.

        Positions: the original patch index of every non-CLS token, -1 for a fused token.
        """
        x = self._embed(x)
        positions = torch.arange(self.num_patches, device=x.device).expand(x.shape[0], -1)
        per_stage: list[Tensor] = []
        for index, block in enumerate(cast("Sequence[DynamicBlock]", self.blocks)):
            stage = self._stage_at.get(index)
            if stage is None:
                x, _ = block(x)
                continue
            x, cls_attn = block.attention_residual(x, return_cls_attn=True)
            assert cls_attn is not None  # asked for
            keep = self._count(stage, x.shape[1] - 1)
            if keep < x.shape[1] - 1:
                x, positions = self._select(x, cls_attn, positions, keep)
            per_stage.append(positions)
            x = block.mlp_residual(x)
        return self.norm(x), positions, per_stage

    def forward_pruned(self, x: Tensor, return_positions: bool = False) -> Any:
        """Eval path: logits; with `return_positions`, the kept original positions per stage (B, k_s).

        A fused token kept at a later stage stands for no single patch: in the returned positions
        it repeats another kept position of its row, so the tensors stay rectangular (pictures).
        """
        tokens, _, per_stage = self._reduced(x)
        logits = self.forward_head(tokens)
        if not return_positions:
            return logits
        shown = [torch.where(p >= 0, p, p.amax(dim=1, keepdim=True).clamp_min(0)) for p in per_stage]
        return logits, [p[:, :keep] for p, keep in zip(shown, self.num_keep, strict=True)]

    def forward_train(self, x: Tensor) -> DynamicViTOutput:
        """Training path: the same reduced pass; kept tokens scattered back to their positions."""
        tokens, positions, _ = self._reduced(x)
        logits = self.forward_head(tokens)
        batch, _, dim = tokens.shape
        slot = torch.where(positions >= 0, positions, self.num_patches)  # a fused token goes to a spare slot
        placed = tokens.new_zeros(batch, self.num_patches + 1, dim)
        placed = placed.scatter(1, slot.unsqueeze(-1).expand(-1, -1, dim), tokens[:, 1:])[:, :-1]
        decision = tokens.new_zeros(batch, self.num_patches + 1).scatter_(1, slot, 1.0)[:, :-1]
        return DynamicViTOutput(logits, placed, decision, _no_stages(tokens))

    def forward_masked(self, x: Tensor, deterministic: bool | None = None) -> DynamicViTOutput:
        """No masked formulation here: the training path is the reduced pass itself."""
        return self.forward_train(x)

    def forward(self, x: Tensor) -> Any:  # type: ignore[override]
        return self.forward_train(x) if self.training else self.forward_pruned(x)


class TopKVisionTransformer(EViTVisionTransformer):
    """`topk`: keep the top-K tokens by CLS attention, no fusion (TokenReduction's Top-K baseline).

    Modifications to `EViTVisionTransformer`:
      1. No fusion: the dropped tokens are gone.
      2. Counts of the original tokens: stage s keeps `int(num_patches * keep_ratio**s)` patch
         tokens (or `int(num_patches * stage_ratios[s])`), DeiT-S at 0.7: 137 / 96 / 67, the
         counts DynamicViT keeps at the same rho.
    How it differs from the `attention` variant of `DynamicVisionTransformer` (DynamicViT's
    Table 3 "keep by CLS attention" row), which keeps the same counts by the same score: there
    the tokens are dropped *before* block 3 / 6 / 9, ranked by the CLS attention of the block
    before (2 / 5 / 8), so that block's attention already runs on the kept tokens; here block
    3 / 6 / 9's own attention runs on every current token and ranks them, and only its MLP runs on
    the kept ones (EViT's placement, more cost: DeiT-S/0.7 2.98 against 2.88
    GFLOPs). Both train on the kept tokens.
    """

    own_variants = ("topk",)
    default_fuse = False

    def __init__(self, *, fuse_token: bool | None = None, **kwargs: Any) -> None:
        """
        Args:
            fuse_token: None or False only: Top-K never fuses (`evit` does).
            **kwargs: `EViTVisionTransformer`'s other arguments: `variant` ("topk"), `keep_ratio`
                (stage s keeps `int(num_patches * keep_ratio ** (s + 1))` patch tokens),
                `stage_ratios` (per-stage fractions of the original tokens instead), `pruning_loc`,
                and timm's ViT arguments.
        """
        _check(not fuse_token, f"fuse_token: the topk variant never fuses (use variant evit), got {fuse_token!r}")
        super().__init__(fuse_token=False, **kwargs)


# ------------------------------------------------------------------------------ ToMe
def proportional_attention(attn: MaskedAttention, x: Tensor, size: Tensor | None) -> tuple[Tensor, Tensor]:
    """timm's attention with log(token size) added to every key's logit; also the keys' head mean.

    `size` (B, T, 1) counts the original tokens each current token stands for (None: all 1, the
    plain attention). Returns the attention output (before the residual) and the matching metric.
    """
    batch, tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = None if size is None else size.log().to(q.dtype).view(batch, 1, 1, tokens)
    if attn.fused_attn:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.0
        )
    else:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        out = attn.attn_drop(logits.softmax(dim=-1)) @ v
    out = out.transpose(1, 2).reshape(batch, tokens, attn.attn_dim)
    return attn.proj_drop(attn.proj(attn.norm(out))), k.mean(dim=1)


@torch.no_grad()
def bipartite_destinations(metric: Tensor, r: int) -> Tensor:
    """ToMe's bipartite soft matching as a map: the new index (B, T) of every current token.

    Tokens alternate between set A (even indices, CLS at 0) and set B (odd). Each A token's most
    cosine-similar B token is its match; the r A tokens with the best matches merge into them.
    New order: the A tokens that stay (in their order, CLS first), then every B token.
    """
    metric = metric / metric.norm(dim=-1, keepdim=True)
    set_a, set_b = metric[:, ::2], metric[:, 1::2]
    scores = set_a @ set_b.transpose(1, 2)
    scores[:, 0] = -math.inf  # CLS never merges
    best, match = scores.max(dim=-1)
    ranked = best.argsort(dim=-1, descending=True)
    merged, stay = ranked[:, :r], ranked[:, r:].sort(dim=-1).values
    batch, n_stay = stay.shape
    dest_a = torch.empty_like(match)
    dest_a.scatter_(1, stay, torch.arange(n_stay, device=metric.device).expand(batch, -1))
    dest_a.scatter_(1, merged, n_stay + match.gather(1, merged))
    dest = torch.empty(batch, metric.shape[1], dtype=torch.long, device=metric.device)
    dest[:, ::2] = dest_a
    dest[:, 1::2] = n_stay + torch.arange(set_b.shape[1], device=metric.device)
    return dest


def merge_by_size(x: Tensor, size: Tensor | None, dest: Tensor, new_tokens: int) -> tuple[Tensor, Tensor]:
    """Tokens sharing a destination become their size-weighted mean; sizes add up."""
    if size is None:
        size = x.new_ones(x.shape[0], x.shape[1], 1)
    index = dest.unsqueeze(-1)
    new_size = size.new_zeros(x.shape[0], new_tokens, 1).scatter_add(1, index, size)
    summed = x.new_zeros(x.shape[0], new_tokens, x.shape[2]).scatter_add(1, index.expand(-1, -1, x.shape[2]), x * size)
    return summed / new_size, new_size


RSchedule = int | Sequence[int]


class ToMeVisionTransformer(DynamicVisionTransformer):
    """`tome`: token merging by bipartite soft matching (ToMe), usable off the shelf and trained.

    Modifications to `DynamicVisionTransformer` (variant `tome`):
      1. Every block's attention is proportional attention: log(size) of each key token is added
         to its logits, size = how many original tokens it stands for (no effect before a merge).
      2. Between the attention and the MLP of block i, `tome_r[i]` tokens are merged away by
         bipartite soft matching on the keys (averaged over heads), CLS protected, at most half
         of the non-CLS tokens per block ((T - 1) // 2), the merged token being the size-weighted
         mean of its members; sizes add up and follow the tokens.
      3. `tome_r`: one int for every block or a per-block list (missing blocks merge 0).
    `tokens` of the training output put each original patch position the token it was merged
    into (ToMe's source tracking), so the token loss covers every position; no parameter is added.
    """

    own_variants = ("tome",)

    def __init__(self, *, tome_r: RSchedule = 0, **kwargs: Any) -> None:
        """
        Args:
            tome_r: tokens merged away per block: one int >= 0 for every block, or a list of at
                most `depth` ints (block i merges `tome_r[i]`, the missing blocks 0); each block
                merges at most half its non-CLS tokens.
            **kwargs: `DynamicVisionTransformer`'s arguments: `variant` ("tome") and timm's ViT
                arguments (`keep_ratio` and `pruning_loc` plan no stage for ToMe).
        """
        super().__init__(**kwargs)
        depth = len(self.blocks)
        schedule = [tome_r] * depth if isinstance(tome_r, int) else list(tome_r)
        _check(
            all(isinstance(r, int) and r >= 0 for r in schedule) and len(schedule) <= depth,
            f"tome_r: must be an int >= 0 or at most {depth} of them (one per block), got {tome_r!r}",
        )
        self.tome_r: list[int] = schedule + [0] * (depth - len(schedule))

    def tokens_after_block(self) -> list[int]:
        """Tokens (CLS included) leaving each block: r[i] fewer, capped at half the non-CLS ones."""
        tokens, counts = self.num_patches + 1, []
        for r in self.tome_r:
            tokens -= min(r, (tokens - 1) // 2)
            counts.append(tokens)
        return counts

    def _merged(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The blocks with merging; final normalised tokens and, per original token (CLS first), its current index."""
        x = self._embed(x)
        group = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        size: Tensor | None = None
        for block, r in zip(cast("Sequence[DynamicBlock]", self.blocks), self.tome_r, strict=True):  # r: one per block
            out, metric = proportional_attention(block.attn, block.norm1(x), size)
            x = x + block.drop_path1(block.ls1(out))
            r = min(r, (x.shape[1] - 1) // 2)
            if r > 0:
                dest = bipartite_destinations(metric, r)
                x, size = merge_by_size(x, size, dest, x.shape[1] - r)
                group = dest.gather(1, group)
            x = block.mlp_residual(x)
        return self.norm(x), group

    def forward_pruned(self, x: Tensor, return_positions: bool = False) -> Any:
        """Eval path: logits (merging keeps no subset of positions, so there are none to return)."""
        logits = self.forward_head(self._merged(x)[0])
        return (logits, []) if return_positions else logits

    def forward_train(self, x: Tensor) -> DynamicViTOutput:
        tokens, group = self._merged(x)
        logits = self.forward_head(tokens)
        patches = group[:, 1:].unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
        return DynamicViTOutput(logits, tokens.gather(1, patches), None, _no_stages(tokens))

    def forward_masked(self, x: Tensor, deterministic: bool | None = None) -> DynamicViTOutput:
        """No masked formulation here: the training path is the merged pass itself."""
        return self.forward_train(x)

    def forward(self, x: Tensor) -> Any:  # type: ignore[override]
        return self.forward_train(x) if self.training else self.forward_pruned(x)


PEER_CLASSES: dict[str, type[DynamicVisionTransformer]] = {
    "evit": EViTVisionTransformer,
    "topk": TopKVisionTransformer,
    "tome": ToMeVisionTransformer,
}
