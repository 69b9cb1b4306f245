"""Token selection: turning predictor scores into hard keep decisions, shared by every family.

Training needs a 0/1 decision that gradients can pass: the hard Gumbel-softmax (the official
choice), or, in deterministic mode, exact top-k with a straight-through gradient to the keep
probability. Decisions are nested by passing the previous `keep` (DeiT, LV-ViT) or not
(Swin, ConvNeXt, which score every position again at each location).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def topk_mask(scores: Tensor, keep: Tensor, k: int) -> Tensor:
    """Hard 0/1 mask of the k highest scores among the tokens still kept."""
    scores = scores.masked_fill(keep <= 0, float("-inf"))
    index = scores.topk(k, dim=1, sorted=False).indices
    return torch.zeros_like(keep).scatter_(1, index, 1.0) * (keep > 0)


def keep_decision(log_probs: Tensor, k: int, tau: float, deterministic: bool, keep: Tensor | None = None) -> Tensor:
    """Training keep decision (B, N) from log-probabilities (B, N, 2) (channel 0 = keep).

    The value is exactly 0/1 and differentiable in the scores. `keep` (B, N): the tokens still
    kept from earlier stages (a dropped token stays dropped); None: every position may be kept.
    `k` is used in deterministic mode only: the top-k of the keep log-probability.
    """
    if deterministic:  # exact top-k, straight-through gradient to the keep probability
        soft = log_probs[..., 0].exp()
        hard = topk_mask(log_probs[..., 0], torch.ones_like(soft) if keep is None else keep, k)
        decision = hard + (soft - soft.detach())
    else:
        decision = F.gumbel_softmax(log_probs, tau=tau, hard=True)[..., 0]
    return decision if keep is None else decision * keep
