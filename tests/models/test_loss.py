"""ASL against its formula, the detached focusing weight, grad mode, float32 and sum reduction; build_loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mlcls_ray.models.loss import AsymmetricLoss, build_loss


def _batch(b: int = 6, c: int = 9, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, generator=g) * 3  # wide enough that some negatives fall inside the clip margin
    targets = (torch.rand(b, c, generator=g) < 0.3).float()
    return logits, targets


def _asl_elementwise(logits, targets, gamma_neg, gamma_pos, clip, eps=1e-8) -> float:
    """The paper's formula, one element at a time in float64."""
    total = 0.0
    for z, y in zip(logits.double().flatten().tolist(), targets.double().flatten().tolist()):
        p = 1.0 / (1.0 + math.exp(-z))
        if y == 1.0:
            total += (1.0 - p) ** gamma_pos * math.log(max(p, eps))
        else:
            p_m = max(p - clip, 0.0)
            total += p_m ** gamma_neg * math.log(max(1.0 - p_m, eps))
    return -total


@pytest.mark.parametrize(
    "gamma_neg, gamma_pos, clip",
    [(4.0, 0.0, 0.05), (4.0, 1.0, 0.05), (2.0, 1.0, 0.0), (0.0, 0.0, 0.0), (3.0, 2.0, 0.2)],
)
def test_asl_equals_elementwise_formula(gamma_neg, gamma_pos, clip):
    logits, targets = _batch()
    loss = AsymmetricLoss(gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip)(logits, targets)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(_asl_elementwise(logits, targets, gamma_neg, gamma_pos, clip), rel=1e-5)


def test_defaults_are_the_recipe_values():
    loss = AsymmetricLoss()
    assert (loss.gamma_neg, loss.gamma_pos, loss.clip, loss.eps) == (4.0, 0.0, 0.05, 1e-8)
    built = build_loss("asl")
    assert isinstance(built, AsymmetricLoss)
    assert (built.gamma_neg, built.gamma_pos, built.clip) == (4.0, 0.0, 0.05)


@pytest.mark.parametrize("gamma_pos", [0.0, 1.0])
def test_focusing_weight_is_detached(gamma_pos):
    gamma_neg, clip = 4.0, 0.05
    logits, targets = _batch(8, 10, seed=1)
    z = logits.clone().requires_grad_(True)
    AsymmetricLoss(gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip)(z, targets).backward()

    # analytic gradient of -sum(w * log pt) with w held constant, in float64
    z64, y = logits.double(), targets.double()
    p = torch.sigmoid(z64)
    p_m = (p - clip).clamp(min=0)
    w = torch.where(y == 1, (1 - p) ** gamma_pos, p_m ** gamma_neg)
    grad_pos = -w * (1 - p)  # d/dz -log p = -(1 - p)
    grad_neg = torch.where(p > clip, w * p * (1 - p) / (1 - p_m), torch.zeros_like(p))  # d/dz -log(1 - p + clip)
    analytic = torch.where(y == 1, grad_pos, grad_neg)
    torch.testing.assert_close(z.grad.double(), analytic, rtol=1e-4, atol=1e-6)

    # letting the gradient flow through w (timm / AsymmetricLossOptimized) gives something quite different
    z_ref = logits.double().requires_grad_(True)
    p_ref = torch.sigmoid(z_ref)
    pt = torch.where(y == 1, p_ref, 1 - (p_ref - clip).clamp(min=0))
    w_ref = (1 - pt) ** torch.where(y == 1, torch.tensor(gamma_pos, dtype=torch.float64), torch.tensor(gamma_neg))
    (-(w_ref * torch.log(pt.clamp(min=1e-8))).sum()).backward()
    assert (z_ref.grad - analytic).norm() / analytic.norm() > 0.1


def test_no_grad_context_is_respected():
    loss_fn = AsymmetricLoss()
    modes = []
    loss_fn.register_forward_hook(lambda module, args, out: modes.append(torch.is_grad_enabled()))
    logits, targets = _batch()
    with torch.no_grad():
        loss = loss_fn(logits.requires_grad_(True), targets)
        assert not torch.is_grad_enabled()
    assert modes == [False] and not loss.requires_grad
    assert torch.is_grad_enabled()
    assert loss_fn(logits, targets).requires_grad  # and with grad on, it stays on


@pytest.mark.parametrize("name", ["asl", "bce"])
def test_bf16_inputs_give_a_float32_loss(name):
    logits, targets = _batch()
    loss_fn = build_loss(name)
    loss = loss_fn(logits.bfloat16(), targets.bfloat16())
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(loss_fn(logits.bfloat16().float(), targets).item(), rel=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert loss_fn(logits, targets).dtype == torch.float32


@pytest.mark.parametrize("name", ["asl", "bce"])
def test_reduction_is_a_sum(name):
    logits, targets = _batch()
    loss_fn = build_loss(name)
    single = loss_fn(logits, targets)
    doubled = loss_fn(logits.repeat(2, 1), targets.repeat(2, 1))
    assert doubled.item() == pytest.approx(2 * single.item(), rel=1e-6)


def test_build_bce_equals_torch_sum_bce():
    logits, targets = _batch()
    expected = F.binary_cross_entropy_with_logits(logits.double(), targets.double(), reduction="sum")
    assert build_loss("bce")(logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)


def test_unknown_loss_raises_naming_the_choices():
    with pytest.raises(ValueError, match="asl.*bce"):
        build_loss("focal")
