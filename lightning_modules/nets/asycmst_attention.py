"""AsyCMST attention blocks: factorised spatio-temporal self-attention (STSA) and the cross-modal attention
(ACMST, Sec. 3.3, Algorithm 2, Eq. 6-13) with the cross-attention strategies of Table 5.

Tokens are ``(B, T, N, D)``: T frames, N = h*w positions per frame.  All attention goes through
``F.scaled_dot_product_attention`` after einops reshapes that put the attended axis last-but-one; there is no
Python loop over t or n.  The one exception is the ``symmetric`` strategy, whose key set per query is the union
of a column and a row (see :func:`attend`): SDPA cannot take two key sets under one softmax without gathering
keys or paying for the full global pattern with a mask, so that pattern computes its two score blocks with
``einsum`` and one softmax over their concatenation (hand-written because no library kernel does this).

Stream naming follows the paper (Algorithm 2, Eq. 8-13): ``Att_{B->C}`` is the attention whose *queries* come
from BUS and keys/values from CEUS; its result updates BUS (Eq. 13: ``X_B + Att_{B->C}``).  ``Att_{C->B}``
has CEUS queries and BUS keys/values and updates CEUS (Eq. 12: ``X_C + Att_{C->B}``).  Here the two streams
are called ``c`` (the paper's upper branch, CEUS by default) and ``b`` (lower branch, BUS by default), so
Fig. 9's swaps are just a different choice of inputs.  Algorithm 2 lines 6 and 12 multiply the softmax by
``V[t, n]``; Eq. 8 and Eq. 10 (and any attention) use the values of the attended keys, ``V_C[:, n]`` and
``V_B[t, :]``, which is what is done here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

STRATEGIES = ("none", "global", "symmetric", "asymmetric", "spatial", "temporal")

# Key pattern used by each direction, per strategy (Table 5 and Sec. 4.6):
#   (pattern for c-stream queries over b keys  = Att_{C->B},  pattern for b-stream queries over c keys = Att_{B->C})
STRATEGY_PATTERNS: dict[str, tuple[str, str] | None] = {
    "none": None,
    "global": ("global", "global"),  # Q[t,n] <-> K[:, :]                       2 (NT)(NT) interactions
    "symmetric": ("cross", "cross"),  # Q[t,n] <-> K[:, n] u K[t, :] (N+T-1 keys)  2 (NT)(N+T-1)
    "asymmetric": ("spatial", "temporal"),  # Q_C[t,n] <-> K_B[t,:], Q_B[t,n] <-> K_C[:,n]   (NT)(N+T)
    "spatial": ("spatial", "spatial"),  # Q[t,n] <-> K[t, :]                  2 (NT) N
    "temporal": ("temporal", "temporal"),  # Q[t,n] <-> K[:, n]               2 (NT) T
}


def allowed_keys(pattern: str, t: int, n: int, *, frames: int, positions: int) -> torch.Tensor:
    """``(T, N)`` bool: the key positions a query at ``(t, n)`` sees under ``pattern`` (for tests and docs)."""
    m = torch.zeros(frames, positions, dtype=torch.bool)
    if pattern == "global":
        m[:] = True
    elif pattern == "spatial":
        m[t, :] = True
    elif pattern == "temporal":
        m[:, n] = True
    elif pattern == "cross":
        m[t, :] = True
        m[:, n] = True
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    return m


def dense_weights(q: torch.Tensor, k: torch.Tensor, pattern: str) -> torch.Tensor:
    """Head-averaged attention weights of ``q`` over ``k`` (both ``(B, M, T, N, d)``) under ``pattern``, for
    inspection: ``(B, T, N, T, N)`` = (query frame, query position, key frame, key position).

    The softmax :func:`attend` takes inside SDPA, written out densely: ``softmax(QK^T / sqrt(d))`` in float32
    over the pattern's keys (:func:`allowed_keys`; the others get weight 0), then the mean over the M heads.
    Every query's weights sum to 1.
    """
    t, n = q.shape[2:4]
    allowed = torch.stack(
        [allowed_keys(pattern, i // n, i % n, frames=t, positions=n).flatten() for i in range(t * n)]
    ).to(q.device)
    flat = "b m t n d -> b m (t n) d"
    scores = (rearrange(q, flat) @ rearrange(k, flat).transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    w = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).mean(1)
    return rearrange(w, "b (t n) (s k) -> b t n s k", t=t, s=t)


def summarise_weights(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, T, T)`` query frame -> key frame (mean over query positions, sum over key positions) and
    ``(B, N, N)`` query position -> key position (mean over query frames, sum over key frames) of dense
    weights ``(B, T, N, T, N)`` (:func:`dense_weights`); each row sums to 1."""
    return w.sum(-1).mean(2), w.sum(-2).mean(1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: str) -> torch.Tensor:
    """Multi-head attention of ``q`` over ``k, v`` restricted to a structured key set.

    All of ``q, k, v`` are ``(B, M, T, N, d)``; the result has the shape of ``q``.  Patterns, for the query at
    frame t and position n:

    - ``spatial``: keys of the same frame, all positions, ``K[t, :]`` (N keys; Eq. 10 for C->B).
    - ``temporal``: keys at the same position, all frames, ``K[:, n]`` (T keys; Eq. 8 for B->C).
    - ``global``: every key, ``K[:, :]`` (T*N keys).
    - ``cross``: ``K[:, n]`` together with ``K[t, :]``, each key once (N+T-1 keys; Sec. 4.6 "symmetric").
    """
    b, m, t, n, _ = q.shape
    if pattern == "spatial":
        fold, unfold = "b m t n d -> (b t) m n d", "(b t) m n d -> b m t n d"
    elif pattern == "temporal":
        fold, unfold = "b m t n d -> (b n) m t d", "(b n) m t d -> b m t n d"
    elif pattern == "global":
        fold, unfold = "b m t n d -> b m (t n) d", "b m (t n) d -> b m t n d"
    elif pattern == "cross":
        return _attend_cross(q, k, v)
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    out = F.scaled_dot_product_attention(rearrange(q, fold), rearrange(k, fold), rearrange(v, fold))
    return rearrange(out, unfold, b=b, t=t, n=n)


def _attend_cross(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``K[:, n] u K[t, :]`` under one softmax: a temporal score block (T keys) and a spatial block (N keys,
    the query's own position masked out because the temporal block already holds ``K[t, n]``)."""
    n = q.shape[3]
    scale = q.shape[-1] ** -0.5
    s_time = torch.einsum("bmtnd,bmsnd->bmtns", q, k)
    s_space = torch.einsum("bmtnd,bmtkd->bmtnk", q, k)
    own = torch.eye(n, dtype=torch.bool, device=q.device)
    s_space = s_space.masked_fill(own, float("-inf"))
    # softmax in float32: the two blocks share one normaliser, which fp16 would round coarsely
    p = torch.softmax(torch.cat([s_time, s_space], dim=-1).float() * scale, dim=-1).to(v.dtype)
    p_time, p_space = p.split([q.shape[2], n], dim=-1)
    return torch.einsum("bmtns,bmsnd->bmtnd", p_time, v) + torch.einsum("bmtnk,bmtkd->bmtnd", p_space, v)


class MLP(nn.Sequential):
    """Transformer feed-forward: Linear -> GELU -> Linear."""

    def __init__(self, *, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__(
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
            nn.Dropout(dropout),
        )


class AxisSelfAttention(nn.Module):
    """Multi-head self-attention along one token axis of ``(B, T, N, D)``: ``spatial`` (within each frame)
    or ``temporal`` (across frames at each position)."""

    def __init__(self, *, dim: int, heads: int, axis: str):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        if axis not in ("spatial", "temporal"):
            raise ValueError(f"axis must be spatial or temporal, got {axis!r}")
        self.heads, self.axis = heads, axis
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b t n (k m d) -> k b m t n d", k=3, m=self.heads)
        out = attend(q, k, v, self.axis)
        return self.proj(rearrange(out, "b m t n d -> b t n (m d)"))


class STSABlock(nn.Module):
    """Spatio-temporal self-attention of one stream (Sec. 3.1, "adapted from ViViT").

    Variant: ViViT Model 3, "factorised self-attention", pre-norm:
    ``x += SpatialAttn(LN(x))`` (each frame's N tokens attend each other), then
    ``x += TemporalAttn(LN(x))`` (each position's T tokens attend each other), then ``x += MLP(LN(x))``.
    """

    def __init__(self, *, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.norm_s, self.norm_t, self.norm_m = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.spatial = AxisSelfAttention(dim=dim, heads=heads, axis="spatial")
        self.temporal = AxisSelfAttention(dim=dim, heads=heads, axis="temporal")
        self.mlp = MLP(dim=dim, hidden=int(dim * mlp_ratio), dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.spatial(self.norm_s(x))
        x = x + self.temporal(self.norm_t(x))
        return x + self.mlp(self.norm_m(x))


class CrossModalAttention(nn.Module):
    """The two cross-modal attentions of Algorithm 2 (Eq. 6-11), with the key pattern set by ``strategy``.

    ``f_Linear^C`` / ``f_Linear^B`` (Eq. 6-7) give Q, K, V of each stream; ``M`` heads of depth ``D/M``;
    ``W_C^O`` / ``W_B^O`` are the output projections (Eq. 11 / Eq. 9).  Returns ``(att_c, att_b)`` where
    ``att_c = Att_{C->B}`` (c queries, b keys/values; updates c) and ``att_b = Att_{B->C}`` (b queries, c
    keys/values; updates b).

    Strategies (Table 5, Sec. 4.6), for a query at frame t, position n:

    - ``asymmetric`` (AsyCMST): ``Q_B[t,n] <-> K_C[:, n]`` (all frames, same position, Eq. 8) and
      ``Q_C[t,n] <-> K_B[t, :]`` (same frame, all positions, Eq. 10); ``NT (N + T)`` interactions.
    - ``symmetric``: both directions use the same spatio-temporal cross, ``K[:, n]`` u ``K[t, :]``
      (N + T - 1 distinct keys); ``2 NT (N + T - 1)`` interactions.
    - ``global``: both directions attend every token of the other stream, ``K[:, :]``; ``2 (NT)^2``.
    - ``spatial``: both directions attend the other stream's same frame, ``K[t, :]``; ``2 NT N``.
    - ``temporal``: both directions attend the other stream's same position, ``K[:, n]``; ``2 NT T``.
    - ``none``: no cross-modal attention (the block is skipped by :class:`ACMSTBlock`'s owner).
    """

    def __init__(self, *, dim: int, heads: int, strategy: str = "asymmetric"):
        super().__init__()
        if strategy not in STRATEGIES or strategy == "none":
            raise ValueError(f"strategy must be one of {STRATEGIES[1:]}, got {strategy!r}")
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.pattern_c, self.pattern_b = STRATEGY_PATTERNS[strategy]
        self.qkv_c, self.qkv_b = nn.Linear(dim, 3 * dim), nn.Linear(dim, 3 * dim)  # Eq. 6, Eq. 7
        self.out_c, self.out_b = nn.Linear(dim, dim), nn.Linear(dim, dim)  # W_C^O (Eq. 11), W_B^O (Eq. 9)

    def forward(self, x_c: torch.Tensor, x_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        split = "b t n (k m d) -> k b m t n d"
        q_c, k_c, v_c = rearrange(self.qkv_c(x_c), split, k=3, m=self.heads)
        q_b, k_b, v_b = rearrange(self.qkv_b(x_b), split, k=3, m=self.heads)
        att_c = attend(q_c, k_b, v_b, self.pattern_c)  # Att_{C->B}, Eq. 10
        att_b = attend(q_b, k_c, v_c, self.pattern_b)  # Att_{B->C}, Eq. 8
        merge = "b m t n d -> b t n (m d)"
        return self.out_c(rearrange(att_c, merge)), self.out_b(rearrange(att_b, merge))

    @torch.no_grad()
    def dense_weights(self, x_c: torch.Tensor, x_b: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"c_to_b", "b_to_c"}``: each direction's head-averaged weights ``(B, T, N, T, N)`` on these inputs
        (:func:`dense_weights`; ``c_to_b`` = c queries over b keys), for inspection (not the training path)."""
        split = "b t n (k m d) -> k b m t n d"
        q_c, k_c, _ = rearrange(self.qkv_c(x_c), split, k=3, m=self.heads)
        q_b, k_b, _ = rearrange(self.qkv_b(x_b), split, k=3, m=self.heads)
        return {
            "c_to_b": dense_weights(q_c, k_b, self.pattern_c),
            "b_to_c": dense_weights(q_b, k_c, self.pattern_b),
        }

    @torch.no_grad()
    def attention_weights(self, x_c: torch.Tensor, x_b: torch.Tensor) -> dict[str, torch.Tensor]:
        """Head-averaged attention weights of both directions, for inspection (not the training path).

        Computed densely as ``softmax(QK^T / sqrt(d))`` over the strategy's allowed keys (the same key sets as
        :func:`attend`), then summarised two ways: ``*_frames`` ``(B, T, T)`` (query frame -> key frame, mean
        over query positions, sum over key positions) and ``*_positions`` ``(B, N, N)`` (query position -> key
        position, mean over query frames, sum over key frames).  Each row sums to 1.
        """
        out = {}
        for name, w in self.dense_weights(x_c, x_b).items():
            out[f"{name}_frames"], out[f"{name}_positions"] = summarise_weights(w)
        return out


class ACMSTBlock(nn.Module):
    """Cross-modal update of both streams, Eq. 12-13, from the same layer-l inputs.

    ``Y_C = LN(X_C + Att_{C->B})``, ``Y_B = LN(X_B + Att_{B->C})`` (post-norm residual exactly as Eq. 12-13);
    the ``FFN`` of Eq. 12-13 is read as a feed-forward sub-layer with its own residual,
    ``X^{(l+1)} = Y + MLP(Y)``, because a bare MLP would cut every stage's identity path.
    """

    def __init__(
        self,
        *,
        dim: int,
        heads: int,
        strategy: str = "asymmetric",
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.cross = CrossModalAttention(dim=dim, heads=heads, strategy=strategy)
        self.norm_c, self.norm_b = nn.LayerNorm(dim), nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.ffn_c = MLP(dim=dim, hidden=hidden, dropout=dropout)
        self.ffn_b = MLP(dim=dim, hidden=hidden, dropout=dropout)

    def forward(self, x_c: torch.Tensor, x_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        att_c, att_b = self.cross(x_c, x_b)
        y_c = self.norm_c(x_c + att_c)  # Eq. 12
        y_b = self.norm_b(x_b + att_b)  # Eq. 13
        return y_c + self.ffn_c(y_c), y_b + self.ffn_b(y_b)
