"""Nodule-level heads over per-stack embeddings.

``AttentionHead`` -- STACT-Time's cross-attention augmented encoding (sec. 2.4, Fig. 2):
sinusoidal positional encoding (Vaswani et al. 2017) added to both sequences; self-attention on the image
embeddings (Q1 = K1 = V1 = image); cross-attention with query Q2 = image and key/value K2 = V2 = segmentation;
the two outputs concatenated, mean-pooled over the valid (non-padded) stacks, classified by Linear(2).
``variant`` selects the Table 3/4 ablations:

==========  =====================================================================
"stact"     image self-attention || image->seg cross-attention (STACT-Time)
"vit_self"  self-attention on image embeddings only (Table 4 "ViT + Self")
"seg_self"  self-attention on segmentation embeddings only (Table 4 "Seg + Self")
"joint"     self-attention on the concatenated [image, seg] embeddings (Table 3 "Joint Fusion")
==========  =====================================================================

Where the paper is silent we choose: each attention module is a transformer sublayer
``LayerNorm(q + Dropout(MHA(q, kv, kv)))`` (residual + post-norm, as in Vaswani), 4 heads, no feed-forward.

``CineTransformer`` -- the CineCNN-Trans baseline (Yamashita et al. 2022): a 2-layer transformer encoder over the
stack features, masked mean, Linear(2).

Padding: ``valid`` (B, S) is True for real stacks. Padded keys are excluded through ``key_padding_mask`` (they get
exactly zero attention weight) and padded positions are left out of the mean, so a nodule's output does not
depend on how much padding its batch has.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

VARIANTS = ("stact", "vit_self", "seg_self", "joint")


def sinusoidal_encoding(length: int, dim: int, *, device=None, dtype=None) -> Tensor:
    """(length, dim) sinusoidal positional encoding of Vaswani et al. (2017), eq. in sec. 3.5.

    PE(pos, 2i) = sin(pos / 10000^(2i/dim)), PE(pos, 2i+1) = cos(pos / 10000^(2i/dim)). Hand-written: neither
    torch nor timm exports a 1-D sinusoidal table as a function. Computed on the fly, so any S works.
    """
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device, dtype=torch.float32)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return pe.to(dtype or torch.float32)


def add_position(x: Tensor) -> Tensor:
    """x (B, S, D) + sinusoidal encoding of stack positions 0..S-1 (temporal order of the stacks)."""
    return x + sinusoidal_encoding(x.shape[1], x.shape[2], device=x.device, dtype=x.dtype)


def masked_mean(x: Tensor, valid: Tensor) -> Tensor:
    """Mean of x (B, S, D) over positions where valid (B, S) is True -> (B, D)."""
    w = valid.to(x.dtype)[..., None]
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)


def _check_valid(valid: Tensor, batch: int, length: int) -> Tensor:
    if valid.shape != (batch, length):
        raise ValueError(f"valid must be (B, S) = {(batch, length)}, got {tuple(valid.shape)}")
    valid = valid.bool()
    if torch.compiler.is_exporting():  # ONNX / torch.export graph: no data-dependent branch (nor check)
        return valid
    if not bool(valid.any(1).all()):
        raise ValueError("every nodule needs at least one valid stack")
    return valid


class AttentionBlock(nn.Module):
    """``LayerNorm(q + Dropout(MHA(q, kv, kv)))`` with padded keys masked out.

    ``nn.MultiheadAttention`` gives the learnable Q/K/V projections of sec. 2.4 and runs
    ``F.scaled_dot_product_attention`` underneath (need_weights=False); padded keys get -inf scores.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, q: Tensor, kv: Tensor, valid: Tensor) -> Tensor:
        out, _ = self.attn(q, kv, kv, key_padding_mask=~valid, need_weights=False)
        return self.norm(q + self.dropout(out))

    def weights(self, q: Tensor, kv: Tensor, valid: Tensor) -> Tensor:
        """Attention weights (B, S_q, S_k) averaged over heads (for plots; the slower non-SDPA path)."""
        return self.attn(q, kv, kv, key_padding_mask=~valid, need_weights=True, average_attn_weights=True)[1]


class AttentionHead(nn.Module):
    """(image_emb (B,S,D), seg_emb (B,S,D), valid (B,S)) -> (B, num_classes) logits. See module docstring."""

    def __init__(
        self,
        *,
        variant: str = "stact",
        dim: int = 256,
        num_heads: int = 4,
        dropout: float = 0.1,
        num_classes: int = 2,
        positional: bool = True,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.variant, self.dim, self.positional = variant, dim, positional
        attn_dim = 2 * dim if variant == "joint" else dim
        self.self_attn = AttentionBlock(attn_dim, num_heads, dropout)
        self.cross_attn = AttentionBlock(dim, num_heads, dropout) if variant == "stact" else None
        out_dim = 2 * dim if variant in ("stact", "joint") else dim
        self.classifier = nn.Linear(out_dim, num_classes)

    def forward_features(self, image_emb: Tensor, seg_emb: Tensor, valid: Tensor) -> Tensor:
        """Pooled nodule representation (B, out_dim) before the classifier: the pre-logit features."""
        b, s, _ = image_emb.shape
        valid = _check_valid(valid, b, s)
        pe = add_position if self.positional else (lambda t: t)
        if self.variant == "joint":
            z = pe(torch.cat([image_emb, seg_emb], dim=-1))
            h = self.self_attn(z, z, valid)
        elif self.variant == "seg_self":
            z = pe(seg_emb)
            h = self.self_attn(z, z, valid)
        else:
            x = pe(image_emb)
            h = self.self_attn(x, x, valid)
            if self.cross_attn is not None:  # stact: query = image, key/value = segmentation
                h = torch.cat([h, self.cross_attn(x, pe(seg_emb), valid)], dim=-1)
        return masked_mean(h, valid)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Logits from :meth:`forward_features` (``pre_logits``: the features unchanged)."""
        return x if pre_logits else self.classifier(x)

    def forward(self, image_emb: Tensor, seg_emb: Tensor, valid: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(image_emb, seg_emb, valid))

    @torch.no_grad()
    def attention_maps(self, image_emb: Tensor, seg_emb: Tensor, valid: Tensor) -> dict[str, Tensor]:
        """Attention weights of each block, (B, S, S) averaged over heads, with the inputs of
        :meth:`forward_features`:
        ``"self"`` (image, or seg / joint for those variants) and, for "stact", ``"cross"`` (query image stacks,
        key segmentation stacks). For dashboards only; not on the training path."""
        b, s, _ = image_emb.shape
        valid = _check_valid(valid, b, s)
        pe = add_position if self.positional else (lambda t: t)
        if self.variant == "joint":
            z = pe(torch.cat([image_emb, seg_emb], dim=-1))
        else:
            z = pe(seg_emb if self.variant == "seg_self" else image_emb)
        maps = {"self": self.self_attn.weights(z, z, valid)}
        if self.cross_attn is not None:
            maps["cross"] = self.cross_attn.weights(z, pe(seg_emb), valid)
        return maps


class CineTransformer(nn.Module):
    """CineCNN-Trans baseline (Yamashita et al. 2022): 2-layer transformer encoder over stack features.

    (feats (B,S,D), valid (B,S)) -> (B, num_classes). Sinusoidal positions added like the attention head.
    """

    def __init__(
        self,
        *,
        dim: int = 256,
        num_heads: int = 4,
        num_layers: int = 2,
        ff_dim: int = 512,
        dropout: float = 0.1,
        num_classes: int = 2,
        positional: bool = True,
    ) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(dim, num_heads, ff_dim, dropout, batch_first=True)
        # Nested-tensor fast path off: same numerics in train and eval, no warning about it.
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.positional = positional
        self.classifier = nn.Linear(dim, num_classes)

    def forward_features(self, feats: Tensor, valid: Tensor) -> Tensor:
        """Masked mean of the encoder outputs (B, dim) before the classifier: the pre-logit features."""
        b, s, _ = feats.shape
        valid = _check_valid(valid, b, s)
        x = add_position(feats) if self.positional else feats
        h = self.encoder(x, src_key_padding_mask=~valid)
        return masked_mean(h, valid)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Logits from :meth:`forward_features` (``pre_logits``: the features unchanged)."""
        return x if pre_logits else self.classifier(x)

    def forward(self, feats: Tensor, valid: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(feats, valid))

    @torch.no_grad()
    def attention_maps(self, feats: Tensor, valid: Tensor) -> dict[str, Tensor]:
        """Self-attention weights of each encoder layer, (B, S, S) averaged over heads (post-norm layers: the
        attention input of layer i is the output of layer i - 1). For dashboards only."""
        b, s, _ = feats.shape
        valid = _check_valid(valid, b, s)
        h = add_position(feats) if self.positional else feats
        maps = {}
        for i, layer in enumerate(self.encoder.layers):
            maps[f"layer{i}"] = layer.self_attn(
                h, h, h, key_padding_mask=~valid, need_weights=True, average_attn_weights=True
            )[1]
            h = layer(h, src_key_padding_mask=~valid)
        return maps
