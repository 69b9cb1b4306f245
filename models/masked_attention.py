"""Masked attention: DynamicViT's differentiable token dropping inside attention.

Shared by every family that keeps all tokens in memory while training and masks the dropped
ones out of attention (DeiT, LV-ViT and the peers through models/dynamic_vit.py). A dropped
token is attended by nobody but itself (the official formulation), so the keep policy stays
differentiable and the predictor learns from it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import Tensor

MASK_EPS = 1e-6  # the official epsilon of the masked softmax


def masked_softmax(attn: Tensor, policy: Tensor) -> Tensor:
    """Softmax over keys where dropped tokens are attended only by themselves.

    The official formulation: subtract the row max, exp in fp32, multiply by
    (policy + identity for dropped rows), then (attn + eps/N) / (sum + eps). It stays
    differentiable in the policy, which is how the predictor learns. This is the reference;
    `masked_attention` computes `masked_softmax(q k^T * scale, policy) @ v` faster.
    """
    batch, _, tokens, _ = attn.shape
    keep = policy.reshape(batch, 1, 1, tokens).float()
    eye = torch.eye(tokens, dtype=torch.float32, device=attn.device).view(1, 1, tokens, tokens)
    attn_policy = keep + (1.0 - keep) * eye
    attn = attn - attn.amax(dim=-1, keepdim=True)
    attn = attn.float().exp() * attn_policy
    attn = (attn + MASK_EPS / tokens) / (attn.sum(dim=-1, keepdim=True) + MASK_EPS)
    return attn


class _MaskedAttentionFn(torch.autograd.Function):
    """`masked_softmax(q k^T * scale, policy) @ v` and its exact gradient, in fewer passes.

    Notation (per batch and head): a = (q * scale) k^T, m_i = max_j a_ij, x = exp(a - m),
    P_ij = policy_j + (1 - policy_j) [i == j], e = x P, S_i = sum_j e_ij, c = eps / N,
    w_i = 1 / (S_i + eps), out = (e + c) w (the official weights), result O = out v.

    Forward: y = softmax(a) = x / Z_i is one fused pass; its row max is 1 / Z_i (x = 1 at the
    argmax), so x = y Z without computing exp(a - m) separately. P is never built: it is policy_j
    off the diagonal and policy_j + (1 - policy_j) on it, so y P v = y (policy v) + a diagonal
    term, and S comes from the same matmul (a column of policy appended to v). Neither P nor the
    weights `out` are materialised; the only N x N tensor kept for backward is y.
    Backward, with g = dO v^T and r_i = sum_j g_ij out_ij = dO_i . O_i:
      t_ij := dL/dP_ij = w_i (g_ij - r_i) x_ij,   dL/da_ij = t_ij P_ij + [j == argmax_i] dL/dm_i,
      dL/dm_i = -sum_j t_ij P_ij = -w_i (eps r_i - c sum_j g_ij)   (routed to the argmax, as
      autograd routes it through torch.max; it only matters where S_i is of the order of eps),
      dL/dpolicy_j = sum over heads and rows i != j of t_ij.
    """

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, policy: Tensor, scale: float) -> Tensor:
        batch, heads, tokens, dim = q.shape
        qs = q * scale
        y = torch.softmax(qs @ k.transpose(-2, -1), dim=-1)  # x / Z
        y_max, argmax = y.max(dim=-1, keepdim=True)  # 1 / Z, at the argmax of a
        keep = policy.reshape(batch, 1, tokens, 1)  # indexes keys (and rows, on the diagonal)
        diag_minus_keep = (keep + (1.0 - keep)) - keep  # P_ii - policy_i, P_ii as the reference builds it
        y_diag_corr = y.diagonal(dim1=-2, dim2=-1).unsqueeze(-1) * diag_minus_keep
        both = y @ torch.cat([v * keep, keep.expand(batch, heads, tokens, 1)], dim=-1)
        # In units of y (a factor 1 / Z per row): S / Z = both[..., dim] + y_diag_corr and
        # inv = Z w = 1 / (S / Z + eps / Z); O = (y P v + (c / Z) sum_j v_j) * inv.
        inv = (both[..., dim:] + y_diag_corr).add_(y_max, alpha=MASK_EPS).reciprocal_()
        out = torch.addcmul(both[..., :dim], y_diag_corr, v)
        out.addcmul_(y_max, v.sum(dim=-2, keepdim=True), value=MASK_EPS / tokens).mul_(inv)
        ctx.save_for_backward(qs, k, v, policy, y, y_max, inv, argmax, out)
        ctx.scale = scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        qs, k, v, policy, y, y_max, inv, argmax, out = ctx.saved_tensors
        batch, heads, tokens, dim = qs.shape
        need_q, need_k, need_v, need_policy = ctx.needs_input_grad[:4]
        grad_out = grad_out.contiguous()
        keep = policy.reshape(batch, 1, tokens, 1)
        diag_minus_keep = (keep + (1.0 - keep)) - keep
        y_diag = y.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)
        r = (grad_out * out).sum(dim=-1, keepdim=True)
        w_grad = grad_out * inv  # Z_i w_i dO_i
        grad_q = grad_k = grad_v = grad_policy = None
        if need_v:  # dv_j = sum_i out_ij dO_i
            grad_v = (y.transpose(-2, -1) @ w_grad).mul_(keep)
            grad_v.addcmul_(y_diag * diag_minus_keep, w_grad)
            grad_v.add_((w_grad * y_max).sum(dim=-2, keepdim=True), alpha=MASK_EPS / tokens)
        if not (need_q or need_k or need_policy):
            return None, None, grad_v, None, None
        t = w_grad @ v.transpose(-2, -1)
        t.sub_(r * inv).mul_(y)  # w_i (g_ij - r_i) x_ij
        t_diag = t.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)
        if need_policy:  # P_ij depends on policy_j off the diagonal only
            grad_policy = (t.sum(dim=(1, 2)) - t_diag.sum(dim=(1, 3))).reshape(policy.shape)
        if need_q or need_k:
            t_diag_corr = t_diag * diag_minus_keep  # dL/da_ii - t_ii policy_i
            g_sum = grad_out @ v.sum(dim=-2).unsqueeze(-1)  # sum_j g_ij
            grad_max = (r * MASK_EPS).sub_(g_sum, alpha=MASK_EPS / tokens).mul_(inv * y_max).neg_()
            index = argmax.expand(batch, heads, tokens, dim)
            if need_q:
                grad_q = t @ (k * keep)
                grad_q.addcmul_(t_diag_corr, k).addcmul_(grad_max, k.gather(2, index)).mul_(ctx.scale)
            if need_k:
                grad_k = (t.transpose(-2, -1) @ qs).mul_(keep)
                grad_k.addcmul_(t_diag_corr, qs).scatter_add_(2, index, grad_max * qs)
        return grad_q, grad_k, grad_v, grad_policy, None


def masked_attention(q: Tensor, k: Tensor, v: Tensor, policy: Tensor, scale: float) -> Tensor:
    """`masked_softmax((q * scale) @ k^T, policy) @ v` for fp32 q/k/v (B, H, N, d), policy (B, N).

    Equal to the reference formula up to float rounding (forward and every gradient, including
    the one with respect to the policy), with fewer passes over the B x H x N x N tensor.
    """
    return _MaskedAttentionFn.apply(q, k, v, policy, scale)


class MaskedAttention(Attention):
    """timm's Attention plus an optional keep policy and the CLS attention row.

    Without a policy and without the CLS row request it is timm's fused attention. With a policy,
    fp32 inputs (no autocast) and no attention dropout it is `masked_attention`; otherwise, or with
    `fused_masked_attn = False`, the reference `masked_softmax` path, which materialises the
    attention weights.
    """

    fused_masked_attn: bool = True

    def forward(  # type: ignore[override]
        self,
        x: Tensor,
        policy: Tensor | None = None,
        return_cls_attn: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        cls_attn: Tensor | None = None

        if policy is None and self.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
            if return_cls_attn:  # one extra row: the CLS query against every key
                cls_row = (q[:, :, :1] * self.scale) @ k.transpose(-2, -1)
                cls_attn = cls_row.softmax(dim=-1).mean(dim=1)[:, 0, 1:]
        elif (
            policy is not None
            and self.fused_masked_attn
            and not return_cls_attn
            and not (self.training and self.attn_drop.p > 0)
            and q.dtype == torch.float32
            and policy.dtype == torch.float32
            and not torch.is_autocast_enabled(q.device.type)
        ):
            out = masked_attention(q, k, v, policy, self.scale)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if policy is None:
                attn = attn.softmax(dim=-1)
            else:
                attn = masked_softmax(attn, policy).to(q.dtype)
            if return_cls_attn:
                cls_attn = attn[:, :, 0, 1:].mean(dim=1)
            out = self.attn_drop(attn) @ v

        out = out.transpose(1, 2).reshape(batch, tokens, self.attn_dim)
        out = self.proj_drop(self.proj(self.norm(out)))
        return out, cls_attn
