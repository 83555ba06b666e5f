"""Multi-label losses: Asymmetric Loss (Ben-Baruch et al., ICCV 2021, arXiv 2009.14119) and a float32 BCE.

Both are computed in float32 whatever the autocast dtype and are reduced by SUM over batch and classes, as in the
official ASL code and every ML-Decoder recipe: the scale grows with B x C, which Adam/AdamW (scale-invariant up to
eps) do not mind, but SGD learning rates and gradient-clipping thresholds do.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["AsymmetricLoss", "build_loss"]


class AsymmetricLoss(nn.Module):
    """ASL: ``-sum(y * (1-p)^gamma_pos * log p + (1-y) * p_m^gamma_neg * log(1-p_m))`` with ``p_m = max(p-clip, 0)``.

    The focusing weight is computed under ``torch.no_grad()`` (the official training setting,
    ``disable_torch_grad_focal_loss=True``), so gradients flow only through the log terms. Grad mode is never
    toggled globally, so calling the loss inside ``torch.no_grad()`` keeps grad off. The defaults are the recipe
    values (gamma_neg 4, gamma_pos 0, clip 0.05), not the official class defaults (gamma_pos 1). Soft targets in
    [0, 1] are accepted. Reduction: sum over batch and classes.
    """

    def __init__(self, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05, eps: float = 1e-8) -> None:
        super().__init__()
        self.gamma_neg = gamma_neg
        self.gamma_pos = gamma_pos
        self.clip = clip
        self.eps = eps

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        """``logits`` and ``targets`` ``[B, C]`` (any float dtype) -> float32 scalar."""
        logits, targets = logits.float(), targets.float()
        p = torch.sigmoid(logits)
        p_neg = (1 - p + self.clip).clamp(max=1) if self.clip > 0 else 1 - p  # 1 - p_m
        loss = targets * torch.log(p.clamp(min=self.eps)) + (1 - targets) * torch.log(p_neg.clamp(min=self.eps))
        if self.gamma_neg > 0 or self.gamma_pos > 0:
            with torch.no_grad():
                pt = p * targets + p_neg * (1 - targets)
                weight = torch.pow(1 - pt, self.gamma_pos * targets + self.gamma_neg * (1 - targets))
            loss = loss * weight
        return -loss.sum()

    def extra_repr(self) -> str:
        return f"gamma_neg={self.gamma_neg}, gamma_pos={self.gamma_pos}, clip={self.clip}, eps={self.eps}"


class _Float32Loss(nn.Module):
    """Runs a wrapped loss on float32 copies of logits and targets (e.g. under bf16 autocast)."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return self.loss(logits.float(), targets.float())


_LOSSES = ("asl", "bce")


def build_loss(name: str) -> nn.Module:
    """``"asl"``: ASL with the recipe values (gamma_neg 4, gamma_pos 0, clip 0.05); ``"bce"``: BCE with logits.

    Both reduce by sum and compute in float32.
    """
    if name == "asl":
        return AsymmetricLoss(gamma_neg=4.0, gamma_pos=0.0, clip=0.05)
    if name == "bce":
        return _Float32Loss(nn.BCEWithLogitsLoss(reduction="sum"))
    raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(_LOSSES)}")
