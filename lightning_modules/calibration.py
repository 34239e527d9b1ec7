"""Platt scaling of a 2-class head on its validation nodules (Platt 1999; Guo et al. 2017 for the one-scale case).

Why: each fold's head is selected on validation AUROC, which is blind to calibration, and is trained with a
class-weighted (focal) loss that shifts its probabilities by a fold-dependent amount. On the seed-0 demo the
five STACT-Time heads put their median test probability anywhere between 0.07 and 0.80: each fold ranks well
(AUROC 0.77-0.84) but the pooled AUROC over folds (0.784) mixes five scales, and the Brier score is 0.22.
Refitting ``p = sigmoid(a * z + b)`` (``z`` the head's logit margin) on the fold's own validation nodules is the
deployable fix: it uses no test nodule, it is what ``usnodule predict`` applies to a new clip, and with ``a > 0``
it cannot change a fold's ranking (its AUROC), only the scale its probabilities live on.

Choices (the STACT-Time paper is silent on calibration): ``a`` is kept in [1e-2, 1e2] (a positive scale keeps the
ranking; the bounds keep a degenerate validation split from flattening or exploding the scores); fewer than two
validation nodules of either class leave the identity (there is nothing to fit).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

IDENTITY = (1.0, 0.0)
SCALE_BOUNDS = (1e-2, 1e2)
MIN_PER_CLASS = 2


def logit_margin(logits: Tensor) -> Tensor:
    """``z = l_1 - l_0`` of ``(B, 2)`` logits: ``softmax(logits)[:, 1] == sigmoid(z)``."""
    logits = logits.float()
    return logits[:, 1] - logits[:, 0]


def prob_to_margin(prob: Tensor, eps: float = 1e-7) -> Tensor:
    """The margin ``z`` whose sigmoid is ``prob`` (clipped away from 0 and 1)."""
    return torch.logit(prob.double().clamp(eps, 1 - eps))


def fit_platt(z: Tensor, label: Tensor, max_iter: int = 200) -> tuple[float, float]:
    """``(a, b)`` minimising the mean binary cross-entropy of ``sigmoid(a * z + b)`` against ``label``."""
    positives = int(label.sum())
    if min(positives, label.numel() - positives) < MIN_PER_CLASS:
        return IDENTITY
    lo, hi = (math.log(b) for b in SCALE_BOUNDS)
    # validation hooks run under no_grad, `trainer.validate` under inference_mode: leave both, on copies
    with torch.inference_mode(False), torch.enable_grad():
        z, y = z.detach().double().flatten().clone(), label.detach().double().flatten().clone()
        log_a = torch.zeros((), dtype=torch.double, requires_grad=True)
        b = torch.zeros((), dtype=torch.double, requires_grad=True)
        opt = torch.optim.LBFGS([log_a, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(log_a.clamp(lo, hi).exp() * z + b, y)
            loss.backward()
            return loss

        opt.step(closure)
    a, b = math.exp(min(max(log_a.item(), lo), hi)), b.item()
    if not (math.isfinite(a) and math.isfinite(b)):
        return IDENTITY
    return a, b


def apply_platt(z: Tensor, params: Tensor) -> Tensor:
    """Calibrated probability ``sigmoid(a * z + b)``; ``params = (a, b)``."""
    return torch.sigmoid(params[0].to(z.dtype) * z + params[1].to(z.dtype)).float()
