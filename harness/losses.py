"""The DynamicViT training objective, one switchable term at a time (for the loss ablation).

loss = w_cls * CE(student, target) + w_ratio * ratio + w_kl * KL(teacher || student)
       + w_token * MSE(student tokens, teacher tokens over kept tokens)
as in the official DeiT recipe (weights 1, 2.0, 0.5, 0.5). LV-ViT (`LVViTLoss`, picked by
`loss_for`) replaces the token MSE with a KL between the student's and the teacher's aux-head
token logits over the kept tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.config import LossConfig
from models.dynamic_vit import DynamicViTOutput
from models.lvvit import LVViTOutput
from models.spatial import SpatialOutput


def ratio_loss(keep_fractions: Tensor, targets: Sequence[float]) -> Tensor:
    """Mean over stages of the batch-mean squared gap between kept fraction and target ratio."""
    if keep_fractions.shape[1] == 0:
        return keep_fractions.new_zeros(())
    target = torch.as_tensor(list(targets), dtype=keep_fractions.dtype, device=keep_fractions.device)
    return (keep_fractions - target).pow(2).mean(dim=0).mean()


def kl_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """KL(teacher || student) over classes, summed over classes and averaged over the batch."""
    return F.kl_div(
        F.log_softmax(student_logits.float(), dim=-1),
        F.log_softmax(teacher_logits.float(), dim=-1),
        reduction="batchmean",
        log_target=True,
    )


def token_loss(student_tokens: Tensor, teacher_tokens: Tensor, decision: Tensor | None) -> Tensor:
    """MSE between final normalised patch tokens, over the tokens the final decision keeps.

    With no token kept anywhere in the batch the term is 0 (the official guard), never NaN.
    """
    diff = (student_tokens.float() - teacher_tokens.float()).pow(2)
    if decision is None:
        return diff.mean()
    kept = decision > 0.5
    if not kept.any():
        return diff.new_zeros(())
    return diff[kept].mean()


class DynamicViTLoss(nn.Module):
    """Combines the four terms; returns the total and each weighted-free component for logging."""

    def __init__(self, cfg: LossConfig, stage_ratios: Sequence[float], base_criterion: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        self.stage_ratios = list(stage_ratios)
        self.base_criterion = base_criterion

    @property
    def needs_teacher(self) -> bool:
        return self.cfg.kl.active or self.cfg.token.active

    def forward(
        self,
        output: DynamicViTOutput,
        targets: Tensor,
        teacher: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        parts: dict[str, Tensor] = {}
        total = output.logits.new_zeros((), dtype=torch.float32)
        if self.cfg.cls.active:
            parts["cls"] = self.base_criterion(output.logits.float(), targets)
            total = total + self.cfg.cls.weight * parts["cls"]
        if self.cfg.ratio.active and output.keep_fractions.shape[1] > 0:
            parts["ratio"] = ratio_loss(output.keep_fractions.float(), self.stage_ratios)
            total = total + self.cfg.ratio.weight * parts["ratio"]
        if self.needs_teacher and teacher is not None:
            teacher_logits, teacher_tokens = teacher
            if self.cfg.kl.active:
                parts["kl"] = kl_loss(output.logits, teacher_logits)
                total = total + self.cfg.kl.weight * parts["kl"]
            if self.cfg.token.active:
                parts["token"] = token_loss(output.tokens, teacher_tokens, output.decision)
                total = total + self.cfg.token.weight * parts["token"]
        return total, parts


# ---------------------------------------------------------------------------------- LV-ViT
def token_kl_loss(student_logits: Tensor, teacher_logits: Tensor, decision: Tensor | None) -> Tensor:
    """KL(teacher || student) of per-token class logits (B, N, K) over the tokens the decision keeps.

    Summed over classes and averaged over the kept tokens of the whole batch (each kept token is
    one KL sample); with no token kept anywhere the term is 0, never NaN. LV-ViT's token
    distillation: its aux head labels every token, so the student's token labels follow the teacher's.
    """
    student, teacher = student_logits.flatten(0, 1), teacher_logits.flatten(0, 1)
    if decision is not None:
        kept = decision.flatten() > 0.5
        if not kept.any():
            return student.new_zeros((), dtype=torch.float32)
        student, teacher = student[kept], teacher[kept]
    return kl_loss(student, teacher)


class LVViTLoss(DynamicViTLoss):
    """The DynamicViT objective on LV-ViT (the official `mse_token=False` loss).

    Differences from the DeiT objective:
    - the token term is `token_kl_loss` of the aux-head logits (`LVViTOutput.tokens`, the
      teacher's the same), not an MSE of features;
    - with a teacher (the KL or token term on), CE and KL see the CLS head's logits alone, as the
      official model's distillation output; without one, CE sees the combined prediction
      (CLS head + 0.5 x max over all tokens of the aux head), as the official model returns when
      it trains without distillation (so a dense LV-ViT trains its aux head, too).
    """

    def forward(  # type: ignore[override]
        self,
        output: LVViTOutput,
        targets: Tensor,
        teacher: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        distilling = self.needs_teacher and teacher is not None
        parts: dict[str, Tensor] = {}
        total = output.logits.new_zeros((), dtype=torch.float32)
        if self.cfg.cls.active:
            logits = output.logits if distilling else output.combined
            parts["cls"] = self.base_criterion(logits.float(), targets)
            total = total + self.cfg.cls.weight * parts["cls"]
        if self.cfg.ratio.active and output.keep_fractions.shape[1] > 0:
            parts["ratio"] = ratio_loss(output.keep_fractions.float(), self.stage_ratios)
            total = total + self.cfg.ratio.weight * parts["ratio"]
        if distilling and teacher is not None:  # (distilling says so: repeated for the type checker)
            teacher_logits, teacher_tokens = teacher
            if self.cfg.kl.active:
                parts["kl"] = kl_loss(output.logits, teacher_logits)
                total = total + self.cfg.kl.weight * parts["kl"]
            if self.cfg.token.active:
                parts["token"] = token_kl_loss(output.tokens, teacher_tokens, output.decision)
                total = total + self.cfg.token.weight * parts["token"]
        return total, parts


def loss_for(model: nn.Module) -> type[DynamicViTLoss]:
    """The objective of a model's family: LV-ViT distils its aux-head token logits by KL,
    Swin / ConvNeXt (dynamic spatial sparsification) the whole final feature map."""
    if getattr(model, "distills_feature_map", False):
        return SpatialSparsificationLoss
    return LVViTLoss if getattr(model, "token_distillation", "mse") == "kl" else DynamicViTLoss


# ----------------------------------------------------------------- Swin / ConvNeXt (spatial)
def feature_map_loss(student_map: Tensor, teacher_map: Tensor) -> Tensor:
    """MSE between the whole final normalised feature maps, every position (kept or not)."""
    return (student_map.float() - teacher_map.float()).pow(2).mean()


class SpatialSparsificationLoss(DynamicViTLoss):
    """The T-PAMI objective of DynamicSwin / DynamicCNN (official `ConvNextDistillDiffPruningLoss`).

    loss = w_cls CE + w_ratio ratio + w_kl KL(teacher || student) + w_token MSE(whole final map),
    official weights 1, 10, 0.5, 0.5 (HEAD main.py:413-418, losses.py:7-91). The ratio term is
    the DeiT family's formula (mean over locations of the batch-mean squared gap) on every
    location's own decision, against [rho, rho - 0.2, rho - 0.4]; the token term does not look
    at the decisions: nothing is dropped from the map, so the whole map is distilled.
    Not copied: the official class crashes on its 100th call (it prints an undefined attribute).
    """

    def forward(  # type: ignore[override]
        self,
        output: SpatialOutput,
        targets: Tensor,
        teacher: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        parts: dict[str, Tensor] = {}
        total = output.logits.new_zeros((), dtype=torch.float32)
        if self.cfg.cls.active:
            parts["cls"] = self.base_criterion(output.logits.float(), targets)
            total = total + self.cfg.cls.weight * parts["cls"]
        if self.cfg.ratio.active and output.keep_fractions.shape[1] > 0:
            parts["ratio"] = ratio_loss(output.keep_fractions.float(), self.stage_ratios)
            total = total + self.cfg.ratio.weight * parts["ratio"]
        if self.needs_teacher and teacher is not None:
            teacher_logits, teacher_map = teacher
            if self.cfg.kl.active:
                parts["kl"] = kl_loss(output.logits, teacher_logits)
                total = total + self.cfg.kl.weight * parts["kl"]
            if self.cfg.token.active:
                parts["token"] = feature_map_loss(output.tokens, teacher_map)
                total = total + self.cfg.token.weight * parts["token"]
        return total, parts
