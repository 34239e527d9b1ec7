"""Focal loss = its formula = torchvision sigmoid focal loss on the logit difference; SegLoss terms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from lightning_modules.losses import FocalLoss, SegLoss, dice_loss, focal_loss


def _formula(logits, target, alpha, gamma):
    p = logits.softmax(1)
    p_t = p[torch.arange(len(target)), target]
    alpha_t = torch.where(target == 1, torch.tensor(alpha), torch.tensor(1 - alpha))
    return -alpha_t * (1 - p_t) ** gamma * torch.log(p_t)


@pytest.mark.parametrize(("alpha", "gamma"), [(0.9, 2.4), (0.25, 2.0), (0.5, 0.0)])
def test_focal_equals_formula_and_torchvision(alpha, gamma):
    logits = torch.randn(64, 2, dtype=torch.float64) * 3
    target = torch.randint(0, 2, (64,))
    ours = focal_loss(logits, target, alpha, gamma, reduction="none").double()
    torch.testing.assert_close(ours, _formula(logits, target, alpha, gamma), rtol=1e-5, atol=1e-6)
    tv = sigmoid_focal_loss(
        logits[:, 1] - logits[:, 0], target.double(), alpha=alpha, gamma=gamma, reduction="none"
    )
    torch.testing.assert_close(ours, tv, rtol=1e-5, atol=1e-6)
    assert torch.isclose(focal_loss(logits, target, alpha, gamma), tv.mean().float(), rtol=1e-5)
    assert torch.isclose(FocalLoss(alpha, gamma, "sum")(logits, target), tv.sum().float(), rtol=1e-5)


def test_focal_gamma0_no_alpha_is_cross_entropy_and_stable():
    logits = torch.randn(16, 2)
    target = torch.randint(0, 2, (16,))
    torch.testing.assert_close(focal_loss(logits, target, None, 0.0), F.cross_entropy(logits, target))
    big = torch.tensor([[200.0, -200.0]])
    assert torch.isfinite(focal_loss(big, torch.tensor([1]), 0.9, 2.4))
    with pytest.raises(ValueError):
        focal_loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))


def test_seg_loss_weights_and_dice():
    logits = torch.randn(2, 1, 8, 8)
    target = (torch.rand(2, 1, 8, 8) > 0.5).float()
    loss = SegLoss(dice_weight=2.0, bce_weight=0.5, focal_weight=1.0)
    terms = loss.terms(logits, target)
    assert set(terms) == {"dice", "bce", "focal"}
    expect = 2.0 * terms["dice"] + 0.5 * terms["bce"] + terms["focal"]
    torch.testing.assert_close(loss(logits, target), expect)
    assert set(SegLoss(focal_weight=0.0).terms(logits, target)) == {"dice", "bce"}
    # perfect confident prediction -> dice loss ~0; empty mask with empty prediction -> 0
    assert dice_loss((target * 2 - 1) * 50, target, smooth=1.0) < 1e-3  # SegLoss's smooth
    assert dice_loss(torch.full((1, 1, 4, 4), -50.0), torch.zeros(1, 1, 4, 4), smooth=1.0) < 1e-6
    with pytest.raises(ValueError):
        SegLoss(0.0, 0.0, 0.0)
