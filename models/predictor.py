"""Token-score predictors: what decides, per token (or position), whether to keep it.

`PredictorLG` is the official DynamicViT predictor, used by every family (DeiT and LV-ViT per
pruning stage, Swin and ConvNeXt per location of their third stage); `StaticPredictor` is the
DeiT family's `static` ablation.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

POOL_EPS = 1e-6  # guards the predictor's global mean when every token was dropped


class PredictorLG(nn.Module):
    """The official token-score predictor: local features + policy-weighted global mean.

    Returns log-probabilities (B, N, 2); channel 0 = keep. The first output Linear is applied
    to the local and global halves separately (equal to the official concat, cheaper: the
    global half is computed once per image instead of once per token).
    """

    def __init__(self, embed_dim: int) -> None:
        """
        Args:
            embed_dim: width of the scored tokens or positions (the backbone's width there); the
                first half of the hidden features is local, the rest is pooled into the global one.
        """
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, embed_dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(embed_dim, embed_dim // 2),
            nn.GELU(),
            nn.Linear(embed_dim // 2, embed_dim // 4),
            nn.GELU(),
            nn.Linear(embed_dim // 4, 2),
            nn.LogSoftmax(dim=-1),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official init (dyvit.py `_init_weights`): Linear weights trunc normal std 0.02, biases 0, norms 1/0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor, policy: Tensor | None = None) -> Tensor:
        x = self.in_conv(x)
        half = x.shape[-1] // 2
        local_x, global_x = x[..., :half], x[..., half:]
        if policy is None:  # every present token is kept (the gathered inference path)
            count = x.new_full((x.shape[0], 1, 1), float(x.shape[1]))
            global_x = global_x.sum(dim=1, keepdim=True)
        else:
            policy = policy.unsqueeze(-1)
            count = policy.sum(dim=1, keepdim=True)
            global_x = (global_x * policy).sum(dim=1, keepdim=True)
        global_x = global_x / count.clamp_min(POOL_EPS)  # all dropped: 0 / eps = 0, never NaN
        first = cast(nn.Linear, self.out_conv[0])
        hidden = F.linear(local_x, first.weight[:, :half], first.bias) + F.linear(global_x, first.weight[:, half:])
        return self.out_conv[1:](hidden)


class StaticPredictor(nn.Module):
    """`static` variant: one learned keep/drop score per token position, shared by all images."""

    def __init__(self, num_tokens: int) -> None:
        """
        Args:
            num_tokens: patch tokens of the original grid, one learned keep/drop score pair each.
        """
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_tokens, 2))
        nn.init.trunc_normal_(self.logits, std=0.02)

    def forward(self, positions: Tensor) -> Tensor:
        """Log-probabilities (B, n, 2) of the tokens at `positions` (B, n) of the original grid."""
        return self.logits.log_softmax(dim=-1)[positions]
