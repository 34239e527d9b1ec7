"""Losses for the STACT-Time stages.

* ``focal_loss`` / ``FocalLoss``: focal loss (Lin et al. 2017) for the 2-logit heads of the paper's classifiers
  (ViT head, mask CNN, attention head; STACT-Time sec. 2.5: alpha = 0.9, gamma = 2.4 for the ViT stage).
* ``dice_loss``: soft Dice (AsyCMST Eq. 5; the Dice term of ``SegLoss``).
* ``SegLoss``: weighted Dice + BCE (+ binary focal) for the MSU-Net stage (sec. 2.5 "training loop replicated
  from [*]" -- the weights are config arguments because the paper does not give them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

_REDUCTIONS = ("mean", "sum", "none")


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def focal_loss(
    logits: Tensor,
    target: Tensor,
    alpha: float | None = 0.25,
    gamma: float = 2.0,
    reduction: str = "mean",
) -> Tensor:
    """Focal loss on 2-class logits.

    ``logits`` (N, 2), ``target`` (N,) in {0, 1}. With p_t the softmax probability of the true class,
    alpha_t = alpha for class 1 and 1 - alpha for class 0 (no weighting when ``alpha`` is None):

        loss = -alpha_t * (1 - p_t) ** gamma * log(p_t)

    Since softmax([z0, z1])[1] = sigmoid(z1 - z0), this equals ``torchvision.ops.sigmoid_focal_loss`` on the
    logit difference z1 - z0 (tested). Written with log_softmax so that log(p_t) is stable for large logits.
    """
    if logits.ndim != 2 or logits.shape[1] != 2:
        raise ValueError(f"focal_loss expects (N, 2) logits, got {tuple(logits.shape)}")
    target = target.long()
    log_p_t = F.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
    p_t = log_p_t.exp()
    loss = -((1.0 - p_t) ** gamma) * log_p_t
    if alpha is not None:
        alpha_t = torch.where(target == 1, alpha, 1.0 - alpha)
        loss = alpha_t * loss
    return _reduce(loss, reduction)


class FocalLoss(nn.Module):
    """``nn.Module`` wrapper of :func:`focal_loss` (paper defaults alpha 0.9, gamma 2.4, sec. 2.5)."""

    def __init__(self, alpha: float | None = 0.9, gamma: float = 2.4, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.alpha, self.gamma, self.reduction = alpha, gamma, reduction

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return focal_loss(logits, target, self.alpha, self.gamma, self.reduction)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}"


def dice_loss(logits: Tensor, target: Tensor, smooth: float = 1e-6) -> Tensor:
    """Soft Dice loss ``1 - (2 sum p g + smooth) / (sum p + sum g + smooth)``, ``p = sigmoid(logits)``, per
    image (sums over its pixels), averaged over the batch (logits and target (B, 1, H, W)).

    The one Dice loss of the project: AsyCMST's Eq. 5 (default ``smooth`` 1e-6; pass only annotated frames)
    and the Dice term of :class:`SegLoss` (MSU-Net, ``smooth`` 1.0). Hand-written: torchmetrics' Dice is a
    metric (hard, not differentiable) and no dependency of the project ships a soft Dice loss. ``smooth``
    keeps empty masks (frames without nodule) finite: empty prediction on an empty mask gives loss 0. An empty
    input (no annotated frame in the batch) gives a zero that still keeps the graph.
    """
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    prob = torch.sigmoid(logits.float()).flatten(1)
    target = target.float().flatten(1)
    inter = (prob * target).sum(1)
    denom = prob.sum(1) + target.sum(1)
    return (1.0 - (2.0 * inter + smooth) / (denom + smooth)).mean()


class SegLoss(nn.Module):
    """Weighted segmentation loss ``dice_weight * Dice + bce_weight * BCE + focal_weight * focal`` on logits.

    The binary focal term is ``torchvision.ops.sigmoid_focal_loss`` (mean over pixels); set a weight to 0 to
    drop a term. ``forward`` returns the total; ``terms`` returns each unweighted term (for logging) and
    ``combine`` their weighted sum.
    """

    def __init__(
        self,
        dice_weight: float = 1.0,
        bce_weight: float = 1.0,
        focal_weight: float = 0.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        smooth: float = 1.0,
    ) -> None:
        super().__init__()
        if min(dice_weight, bce_weight, focal_weight) < 0 or dice_weight + bce_weight + focal_weight == 0:
            raise ValueError("SegLoss weights must be >= 0 and not all 0")
        self.dice_weight, self.bce_weight, self.focal_weight = dice_weight, bce_weight, focal_weight
        self.focal_alpha, self.focal_gamma, self.smooth = focal_alpha, focal_gamma, smooth

    def terms(self, logits: Tensor, target: Tensor) -> dict[str, Tensor]:
        target = target.to(logits.dtype)
        out: dict[str, Tensor] = {}
        if self.dice_weight:
            out["dice"] = dice_loss(logits, target, self.smooth)
        if self.bce_weight:
            out["bce"] = F.binary_cross_entropy_with_logits(logits, target)
        if self.focal_weight:
            out["focal"] = sigmoid_focal_loss(
                logits, target, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="mean"
            )
        return out

    def combine(self, terms: dict[str, Tensor]) -> Tensor:
        """Weighted sum of the output of ``terms``."""
        weights = {"dice": self.dice_weight, "bce": self.bce_weight, "focal": self.focal_weight}
        return sum(weights[k] * v for k, v in terms.items())  # type: ignore[return-value]

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return self.combine(self.terms(logits, target))
