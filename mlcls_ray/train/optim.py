"""The optimiser and the schedule of every training loop: AdamW with the ML-Decoder head at its own rate, and a
linear warm-up then PaddleX's cosine or a constant rate (``Train.lr_scheduler``), stepped per iteration.

The head's rate is capped because the head is a post-norm transformer decoder behind a ReLU projection: at the
rates a backbone trained from scratch wants (1e-3 and up), most of its projected channels die (ReLU never fires
again) and its outputs stop depending on the image, the "same predictions for every image" failure. The
from-scratch cap (``Train.head_learning_rate``, 5e-5) is the best of those measured on three backbones of 512 and
2048 channels; 2e-4 left ResNet-50 0.06 and HGNetV2-B0 0.18 mAP short of a plain timm loop
(``jobs/bench_accuracy.py``). The presets set the cap to their fine-tuning rate, so head and backbone train at one
rate, as PaddleX trains both.
"""

from __future__ import annotations

import torch
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler, StepLRScheduler

from mlcls_ray.models.zoo import MLClassifier

__all__ = ["build_optimizer", "build_schedule", "cosine_schedule"]

_WARMUP_LR = 1e-6  # PaddleX: linear warm-up from 1e-6
_MIN_LR = 1e-10  # PaddleX's cosine eta_min


def build_optimizer(model: MLClassifier, lr: float, head_lr_cap: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW: the backbone at ``lr``, the head at ``min(lr, head_lr_cap)``; no weight decay on 1-D parameters (norms,
    biases) nor on what the backbone exempts (a ViT's position embedding and CLS token)."""
    head_lr = min(lr, head_lr_cap)
    in_head = {id(p) for p in model.head.parameters()}
    groups = []
    for group in param_groups_weight_decay(model, weight_decay, no_weight_decay_list=model.no_weight_decay()):
        for rate, head in ((lr, False), (head_lr, True)):
            params = [p for p in group["params"] if (id(p) in in_head) == head]
            if params:
                groups.append({**group, "params": params, "lr": rate})
    return torch.optim.AdamW(groups, lr=lr)


def cosine_schedule(optimizer: torch.optim.Optimizer, epochs: int, steps: int, warmup_epochs: int
                    ) -> CosineLRScheduler:
    """PaddleX's schedule, stepped per iteration: linear warm-up from 1e-6 over ``warmup_epochs``, then a cosine
    from each parameter group's base rate to 1e-10 over the remaining epochs (the cosine starts after the warm-up,
    not under it)."""
    warmup = min(warmup_epochs, epochs - 1) * steps
    return CosineLRScheduler(optimizer, t_initial=max(1, epochs * steps - warmup), lr_min=_MIN_LR, warmup_t=warmup,
                             warmup_lr_init=_WARMUP_LR, warmup_prefix=True, t_in_epochs=False)


def build_schedule(optimizer: torch.optim.Optimizer, name: str, epochs: int, steps: int, warmup_epochs: int
                   ) -> CosineLRScheduler | StepLRScheduler:
    """``Train.lr_scheduler``: ``"cosine"`` (:func:`cosine_schedule`, PaddleX's) or ``"constant"``: the same linear
    warm-up, then each group's base rate to the end. From scratch on a short run the cosine's decay costs accuracy
    (``jobs/bench_accuracy.py``: 0.921 against 0.956 on the digits grid, 3 seeds), so the generic recipe keeps the
    rate; the presets, which fine-tune, decay it as PaddleX does."""
    if name == "cosine":
        return cosine_schedule(optimizer, epochs, steps, warmup_epochs)
    warmup = min(warmup_epochs, epochs - 1) * steps
    return StepLRScheduler(optimizer, decay_t=epochs * steps + 1, decay_rate=1.0, warmup_t=warmup,
                           warmup_lr_init=_WARMUP_LR, t_in_epochs=False)
