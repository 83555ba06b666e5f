"""The learning-rate schedules: a linear warm-up, then PaddleX's cosine over the epochs that remain, or a constant
rate (the generic recipe's, from scratch)."""

from __future__ import annotations

import pytest
import torch

from mlcls_ray.config import load_config
from mlcls_ray.train.optim import build_schedule, cosine_schedule


def _rates(epochs: int, steps: int, warmup: int, base: float = 1e-3) -> list[float]:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=base)
    schedule = cosine_schedule(optimizer, epochs, steps, warmup)
    rates = []
    for step in range(epochs * steps + 1):
        schedule.step_update(step)
        rates.append(optimizer.param_groups[0]["lr"])
    return rates


def test_warm_up_reaches_the_base_rate_then_the_cosine_decays_from_it():
    rates = _rates(epochs=20, steps=10, warmup=5)
    assert rates[0] == pytest.approx(1e-6)
    assert rates[50] == pytest.approx(1e-3)  # the end of warm-up is the peak, not 0.85x of it
    assert rates[50 + 75] == pytest.approx(0.5e-3, rel=1e-3)  # half-way through the 15 cosine epochs
    assert rates[-1] == pytest.approx(1e-10, abs=1e-9)
    assert all(a >= b for a, b in zip(rates[50:], rates[51:]))


def test_warm_up_longer_than_the_run_still_decays():
    rates = _rates(epochs=2, steps=5, warmup=5)
    assert max(rates) == pytest.approx(1e-3) and rates[-1] < 1e-6


def test_constant_warms_up_then_holds_every_group_at_its_own_rate():
    optimizer = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 2e-3},
                                   {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 2e-4}])  # backbone, head
    schedule = build_schedule(optimizer, "constant", epochs=4, steps=5, warmup_epochs=1)
    rates = []
    for step in range(21):
        schedule.step_update(step)
        rates.append([g["lr"] for g in optimizer.param_groups])
    assert rates[0] == pytest.approx([1e-6, 1e-6]) and rates[2][0] < 2e-3
    assert all(r == pytest.approx([2e-3, 2e-4]) for r in rates[5:])


def test_from_scratch_keeps_the_rate_and_the_presets_decay_it():
    scratch, preset = (load_config(name, [], check_paths=False) for name in ("resnet18_ML", "ResNet50_ML"))
    assert scratch["Train.lr_scheduler"] == "constant" and preset["Train.lr_scheduler"] == "cosine"
    # from scratch the head trains far below the backbone (2e-4 left ResNet-50 0.06 mAP short of timm's loop); a
    # preset fine-tunes both at one rate, as PaddleX
    assert (scratch["Train.learning_rate"], scratch["Train.head_learning_rate"]) == (2e-3, 5e-5)
    assert (preset["Train.learning_rate"], preset["Train.head_learning_rate"]) == (1e-4, 1e-4)
