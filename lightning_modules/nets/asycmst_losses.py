"""AsyCMST auxiliary loss: frame self-sorting (Eq. 3-4, Algorithm 1); its Dice (Eq. 5) is
:func:`lightning_modules.losses.dice_loss`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def fss_loss(scores: torch.Tensor, *, phi: float = 0.9) -> torch.Tensor:
    """Frame self-sorting loss, Eq. 3-4, vectorised over all pairs ``t < i`` (Algorithm 1 without its loops).

    ``f_sort(s_t, s_i) = -log(min(sigmoid(s_i - s_t), phi))``, summed over the ``T(T-1)/2`` pairs ``t < i``,
    divided by ``T(T-1)/2`` (Eq. 3) and averaged over the batch.  Frames must be in temporal order.

    ``-log(min(sigmoid(x), phi)) = max(-logsigmoid(x), -log(phi))``; logsigmoid keeps it finite for large
    ``|x|``.  Once a pair is ranked with confidence ``> phi`` it gives no gradient (the paper's soft clamp).

    Args:
        scores: ``(B, T)`` predicted temporal index scores ``s_t`` (Eq. 2).
        phi: the clamp threshold, 0.9 in the paper.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be (B, T), got {tuple(scores.shape)}")
    t = scores.shape[1]
    if t < 2:
        return scores.sum() * 0.0
    diff = scores[:, None, :] - scores[:, :, None]  # diff[b, t, i] = s_i - s_t
    pair = torch.clamp_min(-F.logsigmoid(diff), -math.log(phi))
    upper = torch.triu(torch.ones(t, t, dtype=torch.bool, device=scores.device), diagonal=1)  # t < i
    per_clip = (pair * upper).sum(dim=(1, 2)) / (t * (t - 1) / 2)
    return per_clip.mean()


def fss_loss_loop(scores: torch.Tensor, *, phi: float = 0.9) -> torch.Tensor:
    """Algorithm 1 written literally (double loop, min and sigmoid); the reference for :func:`fss_loss`."""
    losses = []
    for s in scores:
        t_len = s.shape[0]
        total = s.new_zeros(())
        for t in range(t_len - 1):
            for i in range(t + 1, t_len):
                total = total + -torch.log(torch.minimum(torch.sigmoid(s[i] - s[t]), s.new_tensor(phi)))
        losses.append(total / (0.5 * t_len * (t_len - 1)))
    return torch.stack(losses).mean()
