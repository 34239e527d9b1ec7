"""AsyCMST's transformer as the authors built it (``block: official``), next to this project's paper-text reading
(``block: factorised``, :mod:`lightning_modules.nets.asycmst_attention`).

Written from the paper (Sec. 3.1, 3.3, Algorithm 2) and from a description of the authors' public model
(github.com/HongchengHan/AsyCMST, ``models/asycmst.py``), not from their code.  What differs from the
factorised reading, and is reproduced here:

- **one layer per branch and stage** with three post-norm sub-layers, in this order:
  ``x = LN(x + SelfAttn(x))``, ``x = LN(x + CrossAttn(x, other))``, ``x = LN(x + FFN(x))`` (a LayerNorm after
  the FFN too; the factorised blocks are pre-norm with a separate ACMST block after the STSA);
- **joint spatio-temporal self-attention**: every one of the T x N tokens of a stream attends all T x N (the
  factorised reading attends within a frame, then along time);
- **FFN** Linear -> ReLU -> Dropout -> Linear -> Dropout, 2048 hidden units whatever D (GELU and 4 D there);
  **dropout 0.1** on the self-attention weights and in the FFN (none on the cross-attention);
- **cross-attention per branch**: the branch's own query projection and its own key / value projections of the
  other stream, then an output projection (the same 4 D^2 per direction as Eq. 6-11); key pattern per
  strategy from :data:`~lightning_modules.nets.asycmst_attention.STRATEGY_PATTERNS` (Table 5);
- **update order**: in each stage the lower branch (``b``, BUS in the paper; its queries attend the other
  stream along time, Eq. 8) is updated first from the upper branch's current tokens, then the upper branch
  (``c``, CEUS; queries within the frame, Eq. 10) from the lower branch's *updated* tokens (Algorithm 2 and
  Eq. 12-13 update both from the same layer-l inputs, as the factorised reading does);
- **one positional table** ``(T*N, D)`` shared by both streams (not one per stream);
- **head**: the mean of the two streams' tokens, averaged over all tokens, then the classifier (no LayerNorm;
  Eq. 15's sum differs by a factor the classifier absorbs).

Kept from this project: the initialisation (truncated normal, std 0.02, for the positional table and every
Linear; the authors draw the table from a unit normal), SDPA for every attention, einops reshapes (the
authors' ``.view`` reshapes mix the time axis into the channels; see
:mod:`lightning_modules.nets.asycmst_encoder`), and the frame encoders, FSS and NS heads (the public model has
neither auxiliary head, and encodes both modalities with one ResNet-18: ``share_encoders: true``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from lightning_modules.nets.asycmst_attention import (
    STRATEGY_PATTERNS,
    attend,
    dense_weights,
    summarise_weights,
)

OFFICIAL_FFN = 2048  # the authors' feed-forward width (independent of D)
OFFICIAL_DROPOUT = 0.1


class JointSelfAttention(nn.Module):
    """Multi-head self-attention over all T x N tokens of one stream, dropout on the attention weights."""

    def __init__(self, *, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        q, k, v = rearrange(self.qkv(x), "b t n (k m d) -> k b m (t n) d", k=3, m=self.heads)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(rearrange(out, "b m (t n) d -> b t n (m d)", t=t))


class BranchCrossAttention(nn.Module):
    """One direction of the cross-modal attention, owned by the querying branch: ``Q = W_q x``,
    ``K = W_k other``, ``V = W_v other`` (M heads of D/M), keys restricted to ``pattern``
    (:func:`~lightning_modules.nets.asycmst_attention.attend`), then the output projection (Eq. 8-11)."""

    def __init__(self, *, dim: int, heads: int, pattern: str):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.pattern = heads, pattern
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(x, "b t n (m d) -> b m t n d", m=self.heads)

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.q(x)), self._split(self.k(other)), self._split(self.v(other))
        return self.proj(rearrange(attend(q, k, v, self.pattern), "b m t n d -> b t n (m d)"))

    @torch.no_grad()
    def dense_weights(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """Head-averaged weights ``(B, T, N, T, N)`` of this direction on these inputs
        (:func:`~lightning_modules.nets.asycmst_attention.dense_weights`), for inspection."""
        return dense_weights(self._split(self.q(x)), self._split(self.k(other)), self.pattern)

    @torch.no_grad()
    def attention_weights(self, x: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Head-averaged weights summarised as ``(B, T, T)`` query frame -> key frame and ``(B, N, N)`` query
        position -> key position (the summaries of ``CrossModalAttention.attention_weights``)."""
        return summarise_weights(self.dense_weights(x, other))


class OfficialLayer(nn.Module):
    """One branch of one stage: post-norm joint self-attention, cross-attention (``pattern``; ``None`` = no
    cross sub-layer: ``strategy: none`` or a stage outside ``acmst_layers``), post-norm ReLU FFN."""

    def __init__(self, *, dim: int, heads: int, pattern: str | None, hidden: int, dropout: float):
        super().__init__()
        self.self_attn = JointSelfAttention(dim=dim, heads=heads, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.cross = None if pattern is None else BranchCrossAttention(dim=dim, heads=heads, pattern=pattern)
        self.norm2 = None if pattern is None else nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
            nn.Dropout(dropout),
        )
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.self_attn(x))
        if self.cross is not None:
            x = self.norm2(x + self.cross(x, other))
        return self.norm3(x + self.ffn(x))


class OfficialFusion(nn.Module):
    """Positional table, ``depth`` stages of two :class:`OfficialLayer` (lower branch first, see the module
    doc), pooled pre-logits ``(B, D)`` from the frame features ``F_C, F_B`` ``(B, T, N, D)``.

    Args:
        dim, depth, heads: D, L, M.
        num_frames, n_tokens: T and N (the positional table is ``(T, N, D)``).
        strategy: cross-attention strategy (Table 5); ``none`` builds no cross sub-layer.
        acmst_layers: 0-based stages with a cross sub-layer; ``None`` = every stage.
        hidden: FFN width (2048 for the authors' model).
        dropout: attention-weight and FFN dropout (0.1).
    """

    def __init__(
        self,
        *,
        dim: int,
        depth: int,
        heads: int,
        num_frames: int,
        n_tokens: int,
        strategy: str = "asymmetric",
        acmst_layers: Sequence[int] | None = None,
        hidden: int = OFFICIAL_FFN,
        dropout: float = OFFICIAL_DROPOUT,
    ):
        super().__init__()
        patterns = STRATEGY_PATTERNS[strategy]
        cross = set() if patterns is None else set(range(depth) if acmst_layers is None else acmst_layers)
        pattern_c, pattern_b = patterns or (None, None)
        self.acmst_layers = sorted(cross)

        def layer(i: int, pattern: str | None) -> OfficialLayer:
            return OfficialLayer(
                dim=dim, heads=heads, pattern=pattern if i in cross else None, hidden=hidden, dropout=dropout
            )

        self.pos = nn.Parameter(torch.zeros(1, num_frames, n_tokens, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.layers_b = nn.ModuleList(
            layer(i, pattern_b) for i in range(depth)
        )  # lower branch, updated first
        self.layers_c = nn.ModuleList(layer(i, pattern_c) for i in range(depth))

    def tokens(self, f_c: torch.Tensor, f_b: torch.Tensor, stages: int | None = None):
        """``(X_C, X_B)`` after the first ``stages`` stages (all when ``None``)."""
        x_c, x_b = f_c + self.pos, f_b + self.pos
        for layer_b, layer_c in list(zip(self.layers_b, self.layers_c, strict=True))[:stages]:
            x_b = layer_b(x_b, x_c)
            x_c = layer_c(x_c, x_b)  # reads the lower branch's updated tokens (the authors' order)
        return x_c, x_b

    def forward(self, f_c: torch.Tensor, f_b: torch.Tensor) -> torch.Tensor:
        x_c, x_b = self.tokens(f_c, f_b)
        return ((x_c + x_b) / 2).mean(dim=(1, 2))
