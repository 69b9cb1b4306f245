"""DynamicViT on LV-ViT (Jiang et al. 2021, "All Tokens Matter: Token Labeling").

LV-ViT is a ViT with a convolutional stem, scaled residual branches and a token-labeling head,
so the DynamicViT LV-ViT is the DeiT family's `DynamicVisionTransformer` (models/dynamic_vit.py:
timm's VisionTransformer with the predictors, masked attention and token gathering, all reused
as they are; the shared mechanisms live in models/predictor.py, token_selection.py and
masked_attention.py) with these modifications:
  1. `ConvStem` replaces timm's `PatchEmbed`: three convolutions with BatchNorm and ReLU (7x7
     stride 2, then two 3x3; `stem_chs` channels, 64 in LV-ViT-S/M) and a `patch_size / 2`
     projection, the official "4_2" patch embedding.
  2. Residual branches are divided by a constant `skip_lam` (2 in LV-ViT-S/M): each block's
     LayerScale slots `ls1` / `ls2` hold `SkipScale`, which has no parameters, so nothing is
     trained, decayed or saved for it.
  3. `aux_head`: a Linear classifier applied to every final patch token (token labeling). The
     prediction is `head(CLS) + aux_weight * max over tokens of aux_head(token)`, aux_weight 0.5;
     at inference the max runs over the tokens that were kept.
  4. Training output (`LVViTOutput`): the CLS-head logits, the aux-head logits of every patch
     token (the token distillation compares them with the teacher's on the kept tokens: a KL,
     `harness.losses.LVViTLoss`), the final decision, the keep fractions, and the combined
     prediction over all tokens (what the official model returns when it trains without a
     teacher). Every variant trains on the masked path, so the combined prediction always sees
     every token, as the official one does.
  5. The official hyper-parameters are the registered defaults (harness/catalog.py):
     `qkv_bias=False`, `mlp_ratio=3`, LayerNorm eps 1e-5 (PyTorch's, not timm's 1e-6), pruning
     before blocks [4, 8, 12] (S, depth 16) or [5, 10, 15] (M, depth 20); `cls_token` and the
     new heads start as the official init (trunc normal, std 0.02).

Parameter names are the official ones (`patch_embed.{conv1,bn1,conv2,bn2,conv3,bn3,proj}`,
`blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`, `head`, `aux_head`,
`score_predictor.N`): an official DynamicViT-LVViT checkpoint loads with `strict=True` and
TokenLabeling's dense LV-ViT weights load with only the predictors missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, NamedTuple

from torch import Tensor, nn

from harness.catalog import MODEL_DEFAULTS
from models.dynamic_vit import DynamicVisionTransformer
from models.registry import register_family
from models.validation import check as _check


class LVViTOutput(NamedTuple):
    """What the training losses need from one masked forward pass of an LV-ViT."""

    logits: Tensor  # head(CLS) (B, K): the CE and KL terms' logits when a teacher distils
    tokens: Tensor  # aux-head logits of every patch token (B, N, K): what the token term compares
    decision: Tensor | None  # final keep decision over the N patch tokens (B, N), or None
    keep_fractions: Tensor  # (B, S): kept fraction of the original patch tokens per stage
    combined: Tensor  # head(CLS) + aux_weight * max over all tokens of the aux logits (B, K)


class ConvStem(nn.Module):
    """LV-ViT's patch embedding: 3 convolutions (BatchNorm, ReLU) at half resolution, then a
    `patch_size / 2` projection; returns (B, N, C) tokens like timm's PatchEmbed."""

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        stem_chs: int = 64,
        dynamic_img_pad: bool = False,
        device: Any = None,
        dtype: Any = None,
        **_timm_kwargs: Any,  # `bias`: timm passes it to every embed_layer; the official proj has one
    ) -> None:
        """
        Args:
            img_size: input image size in pixels, an int (square) or (height, width).
            patch_size: pixels per token side, even (the stem halves the resolution, the projection
                covers the other `patch_size / 2`).
            in_chans: input image channels.
            embed_dim: token width, the projection's output channels.
            stem_chs: channels of the three stem convolutions (64 in LV-ViT-S/M).
            dynamic_img_pad: must be False: the stem takes fixed-size images (timm passes it).
            device: where the parameters are created (timm passes it; None: the default device).
            dtype: the parameters' dtype (timm passes it; None: the default dtype).
            **_timm_kwargs: the other arguments timm passes to every `embed_layer` (`bias`),
                ignored: the official projection always has a bias.
        """
        super().__init__()
        _check(patch_size % 2 == 0, f"patch_size: the LV-ViT stem needs an even patch size, got {patch_size}")
        _check(not dynamic_img_pad, "dynamic_img_pad: the LV-ViT stem takes fixed-size images, got True")
        dd = {"device": device, "dtype": dtype}
        self.img_size = tuple(img_size) if isinstance(img_size, (tuple, list)) else (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        half = patch_size // 2
        self.conv1 = nn.Conv2d(in_chans, stem_chs, kernel_size=7, stride=2, padding=3, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(stem_chs, **dd)
        self.conv2 = nn.Conv2d(stem_chs, stem_chs, kernel_size=3, stride=1, padding=1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(stem_chs, **dd)
        self.conv3 = nn.Conv2d(stem_chs, stem_chs, kernel_size=3, stride=1, padding=1, bias=False, **dd)
        self.bn3 = nn.BatchNorm2d(stem_chs, **dd)
        self.relu = nn.ReLU(inplace=True)
        self.proj = nn.Conv2d(stem_chs, embed_dim, kernel_size=half, stride=half, **dd)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))
        return self.proj(x).flatten(2).transpose(1, 2)


class SkipScale(nn.Module):
    """A residual branch divided by the constant `skip_lam` (LayerScale with a fixed 1 / skip_lam)."""

    def __init__(self, skip_lam: float) -> None:
        """
        Args:
            skip_lam: the divisor (> 0) of the residual branch (2 in LV-ViT-S/M).
        """
        super().__init__()
        _check(skip_lam > 0, f"skip_lam: must be > 0, got {skip_lam!r}")
        self.skip_lam = float(skip_lam)

    def forward(self, x: Tensor) -> Tensor:
        return x / self.skip_lam

    def extra_repr(self) -> str:
        return f"skip_lam={self.skip_lam}"


class DynamicLVViT(DynamicVisionTransformer):
    """LV-ViT with DynamicViT token sparsification; see the module docstring."""

    token_distillation = "kl"  # harness.losses.loss_for: the token term is a KL of aux-head logits

    def __init__(
        self,
        *,
        skip_lam: float = 2.0,
        stem_chs: int = 64,
        aux_weight: float = 0.5,
        **kwargs: Any,
    ) -> None:
        """Build the LV-ViT (stem, scaled residuals, aux head) on the DeiT family's DynamicViT.

        Args:
            skip_lam: every residual branch is divided by it (> 0; 2 in LV-ViT-S/M).
            stem_chs: channels of the convolutional stem (`ConvStem`; 64 in LV-ViT-S/M).
            aux_weight: weight of the aux head's max over the patch tokens in the prediction
                `head(CLS) + aux_weight * max aux_head(token)`.
            **kwargs: `DynamicVisionTransformer`'s arguments (`variant`, `keep_ratio`, `pruning_loc`,
                ..., and timm's ViT arguments); `norm_layer` defaults to LayerNorm with eps 1e-5,
                `embed_layer` is set by this class.
        """
        kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=1e-5))
        super().__init__(embed_layer=partial(ConvStem, stem_chs=stem_chs), **kwargs)
        for block in self.blocks:
            block.ls1, block.ls2 = SkipScale(skip_lam), SkipScale(skip_lam)
        self.skip_lam = float(skip_lam)
        self.aux_weight = float(aux_weight)
        self.aux_head = nn.Linear(self.embed_dim, self.num_classes) if self.num_classes > 0 else nn.Identity()
        assert self.cls_token is not None  # timm's class_token=True, LV-ViT's too
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if isinstance(self.aux_head, nn.Linear):
            nn.init.trunc_normal_(self.aux_head.weight, std=0.02)
            nn.init.zeros_(self.aux_head.bias)

    def predict(self, tokens: Tensor) -> Tensor:
        """The LV-ViT prediction from final normalised tokens (CLS first): head + weighted max of aux.

        With no patch token left (keep ratios near 0 keep `int(N * ratio) = 0`), the CLS head alone.
        """
        logits = self.forward_head(tokens)
        if tokens.shape[1] > 1:
            logits = logits + self.aux_weight * self.aux_head(tokens[:, 1:]).amax(dim=1)
        return logits

    def forward_masked(self, x: Tensor, deterministic: bool | None = None) -> LVViTOutput:  # type: ignore[override]
        """Training path: the DeiT family's masked path, with the aux head on every patch token."""
        out = super().forward_masked(x, deterministic)
        aux = self.aux_head(out.tokens)
        combined = out.logits + self.aux_weight * aux.amax(dim=1)
        return LVViTOutput(out.logits, aux, out.decision, out.keep_fractions, combined)

    def forward_pruned(self, x: Tensor, return_positions: bool = False) -> Any:
        """Inference path: the DeiT family's gathers; the aux max runs over the kept tokens only."""
        tokens, kept = self._forward_gathered(x, track=return_positions)
        logits = self.predict(tokens)
        return (logits, kept) if return_positions else logits

    def forward(self, x: Tensor) -> Any:  # type: ignore[override]
        """Training mode: `LVViTOutput` from the masked path (every variant); eval mode: pruned logits."""
        return self.forward_masked(x) if self.training else self.forward_pruned(x)


# ------------------------------------------------------------------------------ registry
# `pretrained` loads TokenLabeling's dense LV-ViT (the catalog's `_url`); the entry points stay
# attributes of this module, as timm's own model modules have them
globals().update(register_family(MODEL_DEFAULTS, "lvvit", DynamicLVViT, __name__, "DynamicViT-LVViT"))
