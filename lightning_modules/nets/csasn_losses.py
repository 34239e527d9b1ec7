"""CSASN's dynamically weighted loss: per-class weights of the subtype cross-entropy, updated from per-class
performance during training.

The summary (``papers/csasn-summary.txt``) says only "dynamically weighted loss function ... to enhance
classification stability ... under class-imbalanced conditions".  The rule, our choice (:class:`DynamicClassWeights`):

* at the end of every training epoch, the per-class recall ``r_k = TP_k / N_k`` of that epoch's predictions
  (argmax of the subtype logits; the training batches by default, the validation part with
  ``weight_source: val`` in the stage) gives a target weight

      t_k = 1 / (r_k + eps)                       (inverse recall: the worst-recognised class weighs most)

  for every class seen that epoch (``N_k > 0``); a class not seen keeps ``t_k = w_k`` (its current weight);
* the targets are normalised to mean 1 over the classes, ``t <- K t / sum(t)`` (the loss keeps its scale);
* the weights move towards them by exponential smoothing, ``w <- (1 - momentum) w + momentum t``
  (``momentum`` 0.5: half-way per epoch, so one noisy epoch of a rare class does not swing the loss).

Both ``w`` and ``t`` have mean 1, so ``w`` keeps mean 1 too.  ``eps`` (0.1) bounds the ratio between two
targets to ``(1 + eps) / eps`` = 11.  The weights start at 1 (``mode="dynamic"``); ``mode="frequency"`` sets them
once from the training-set class counts, ``t_k = 1 / N_k`` normalised the same way, and never moves them;
``mode="none"`` keeps 1 everywhere (the "without dynamic weighting" ablation: plain cross-entropy).
The weights are a buffer: they are saved in checkpoints, so a resumed fit continues from them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MODES = ("dynamic", "frequency", "none")


def recall_target(correct: Tensor, total: Tensor, current: Tensor, eps: float = 0.1) -> Tensor:
    """Target weights ``t`` from per-class ``correct`` (TP_k) and ``total`` (N_k) counts (module docstring):
    ``1 / (r_k + eps)`` where ``N_k > 0``, the ``current`` weight elsewhere, normalised to mean 1."""
    correct, total, current = correct.double(), total.double(), current.double()
    seen = total > 0
    recall = torch.where(seen, correct / total.clamp_min(1), torch.zeros_like(total))
    target = torch.where(seen, 1.0 / (recall + eps), current)
    return target * (len(target) / target.sum())


def frequency_weights(counts: Sequence[int] | Tensor) -> Tensor:
    """``1 / N_k`` normalised to mean 1 (a class with no sample gets the largest weight of the others)."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    inv = torch.where(counts > 0, 1.0 / counts.clamp_min(1), torch.zeros_like(counts))
    inv = torch.where(counts > 0, inv, inv.max())
    return inv * (len(inv) / inv.sum())


class DynamicClassWeights(nn.Module):
    """Class weights of the subtype cross-entropy and their update rule (module docstring).

    ``step(confusion)`` takes the epoch's ``(K, K)`` confusion matrix (rows = true class, columns = predicted)
    and returns the new weights; ``forward(logits, target)`` is the weighted cross-entropy (per-sample losses
    with ``reduction="none"``; the mean is ``sum(w_y * l) / sum(w_y)``, as ``F.cross_entropy``).
    """

    weight: Tensor

    def __init__(
        self, num_classes: int, mode: str = "dynamic", momentum: float = 0.5, eps: float = 0.1
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"class weighting must be one of {MODES}, got {mode!r}")
        if not 0.0 < momentum <= 1.0 or eps <= 0:
            raise ValueError(f"need 0 < momentum <= 1 and eps > 0, got {momentum}, {eps}")
        self.mode, self.momentum, self.eps = mode, momentum, eps
        self.register_buffer("weight", torch.ones(num_classes))

    def set_frequency(self, counts: Sequence[int] | Tensor) -> None:
        """``mode="frequency"``: the weights from the training-set class counts (no-op in other modes)."""
        if self.mode == "frequency":
            self.weight.copy_(frequency_weights(counts).to(self.weight))

    @torch.no_grad()
    def step(self, confusion: Tensor) -> Tensor:
        """One update from an epoch's confusion matrix (``mode="dynamic"`` only); returns the weights."""
        if self.mode != "dynamic":
            return self.weight
        confusion = confusion.to(self.weight.device)
        target = recall_target(confusion.diagonal(), confusion.sum(dim=1), self.weight, self.eps)
        new = (1.0 - self.momentum) * self.weight.double() + self.momentum * target
        self.weight.copy_(new.to(self.weight.dtype))
        return self.weight

    def forward(self, logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        return F.cross_entropy(logits.float(), target.long(), weight=self.weight.float(), reduction=reduction)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, momentum={self.momentum}, eps={self.eps}"


SHAPE_TARGETS = ("log_aspect", "elongation", "log_area", "log_isoperimetric")


def mask_shape_targets(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Shape descriptors of each ``(B, 1, S, S)`` (or ``(B, S, S)``) 0 / 1 mask, the targets of the auxiliary
    shape head (``shape_weight`` in the stage; ours, not the paper's), and which rows have a mask (under 4
    pixels: no shape):

    * ``log_aspect = 0.5 log(var_y / var_x)``: the pixels' vertical against horizontal spread (0 round, < 0
      wider than tall, > 0 taller than wide: TI-RADS' shape point);
    * ``elongation = 0.5 log(l1 / l2)`` of the second-moment matrix's eigenvalues (0 for a disc, any rotation:
      the forest's eccentricity);
    * ``log_area``: log of the mask's share of the input (the nodule's size at a fixed crop scale);
    * ``log_isoperimetric = log(P^2 / (4 pi A))`` with ``P`` the count of 4-neighbour edges between mask and
      background (a lobulated or irregular margin is long for its area; the forest's circularity / compactness;
      edges on the input's border are not counted, so a nodule cut by the crop has a shorter outline).

    Each pixel counts as a unit square (``+ 1/12`` to each variance), so an ``h`` x ``w`` rectangle gives exactly
    ``log(h / w)``, ``|log(h / w)|``, ``log(h w / S^2)`` and ``log((2h + 2w)^2 / (4 pi h w))``.

    ``(B, 4)`` float and ``(B,)`` bool."""
    m = mask.float().flatten(0, -3) if mask.dim() == 4 else mask.float()
    b, h, w = m.shape
    area = m.sum(dim=(1, 2))
    valid = area >= 4
    a = area.clamp_min(1.0)
    ys = torch.arange(h, dtype=m.dtype, device=m.device).view(1, h, 1)
    xs = torch.arange(w, dtype=m.dtype, device=m.device).view(1, 1, w)
    cy = (m * ys).sum(dim=(1, 2)) / a
    cx = (m * xs).sum(dim=(1, 2)) / a
    dy, dx = ys - cy.view(b, 1, 1), xs - cx.view(b, 1, 1)
    vy = (m * dy * dy).sum(dim=(1, 2)) / a + 1.0 / 12  # + a pixel's own spread: a 1-px line is not degenerate
    vx = (m * dx * dx).sum(dim=(1, 2)) / a + 1.0 / 12
    cov = (m * dy * dx).sum(dim=(1, 2)) / a
    half, root = (vy + vx) / 2, torch.sqrt(((vy - vx) / 2) ** 2 + cov**2)
    l1, l2 = half + root, (half - root).clamp_min(1e-6)
    edges = (m[:, 1:] - m[:, :-1]).abs().sum(dim=(1, 2)) + (m[:, :, 1:] - m[:, :, :-1]).abs().sum(dim=(1, 2))
    out = torch.stack(
        [
            0.5 * torch.log(vy / vx),
            0.5 * torch.log(l1 / l2),
            torch.log(a / (h * w)),
            torch.log(edges.clamp_min(1.0) ** 2 / (4 * torch.pi * a)),
        ],
        dim=1,
    )
    return torch.where(valid[:, None], out, torch.zeros_like(out)), valid
