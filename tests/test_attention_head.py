"""Attention head (STACT-Time sec. 2.4) and CineTransformer: shapes, padding invariance, cross-attention uses seg."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.nets.attention_head import (
    VARIANTS,
    AttentionHead,
    CineTransformer,
    masked_mean,
    sinusoidal_encoding,
)

D = 16


def _inputs(b=3, s=5):
    img, seg = torch.randn(b, s, D), torch.randn(b, s, D)
    lengths = torch.tensor([5, 2, 3])[:b]
    valid = torch.arange(s)[None] < lengths[:, None]
    return img, seg, valid


def _pad(x, extra, value):
    b, _, d = x.shape
    return torch.cat([x, torch.full((b, extra, d), value)], dim=1)


def test_sinusoidal_encoding_matches_vaswani():
    pe = sinusoidal_encoding(7, 6)
    assert pe.shape == (7, 6)
    pos, i = 3, 1
    assert torch.isclose(pe[pos, 2 * i], torch.tensor(pos / 10000 ** (2 * i / 6)).sin())
    assert torch.isclose(pe[pos, 2 * i + 1], torch.tensor(pos / 10000 ** (2 * i / 6)).cos())


@pytest.mark.parametrize("variant", VARIANTS)
def test_shapes_and_padding_invariance(variant):
    head = AttentionHead(variant=variant, dim=D, num_heads=2).eval()
    img, seg, valid = _inputs()
    out = head(img, seg, valid)
    assert out.shape == (3, 2)
    # Garbage in padded positions, and extra padding, must not change anything.
    img2, seg2 = img.clone(), seg.clone()
    img2[~valid], seg2[~valid] = 1e4, -1e4
    valid2 = torch.cat([valid, torch.zeros(3, 4, dtype=torch.bool)], 1)
    out2 = head(_pad(img2, 4, 7e3), _pad(seg2, 4, -3e3), valid2)
    torch.testing.assert_close(out2, out, rtol=1e-4, atol=1e-5)
    # A nodule alone in its batch (no padding at all) gives the same output.
    n = int(valid[1].sum())
    torch.testing.assert_close(
        head(img[1:2, :n], seg[1:2, :n], valid[1:2, :n]), out[1:2], rtol=1e-4, atol=1e-5
    )


def test_cross_attention_uses_segmentation_as_key_value():
    head = AttentionHead(variant="stact", dim=D, num_heads=2).eval()
    img, seg, valid = _inputs()
    out = head(img, seg, valid)
    seg2 = seg.clone()
    seg2[valid] += torch.randn_like(seg2[valid])
    assert not torch.allclose(head(img, seg2, valid), out)
    # pooled [self || cross]: only the cross half (query = image, K2 = V2 = seg) moves with seg
    e1, e2 = head.forward_features(img, seg, valid), head.forward_features(img, seg2, valid)
    torch.testing.assert_close(e2[:, :D], e1[:, :D])
    assert not torch.allclose(e2[:, D:], e1[:, D:])
    # and it moves with the image (the query) as well
    assert not torch.allclose(head.forward_features(img + 1.0, seg, valid)[:, D:], e1[:, D:])
    # seg at padded positions is never attended
    seg3 = seg.clone()
    seg3[~valid] = 123.0
    torch.testing.assert_close(head(img, seg3, valid), out)


def test_variants_use_the_right_inputs():
    img, seg, valid = _inputs()
    seg2 = seg + 1.0
    vit = AttentionHead(variant="vit_self", dim=D, num_heads=2).eval()
    torch.testing.assert_close(vit(img, seg2, valid), vit(img, seg, valid))
    segself = AttentionHead(variant="seg_self", dim=D, num_heads=2).eval()
    torch.testing.assert_close(segself(img + 1.0, seg, valid), segself(img, seg, valid))
    joint = AttentionHead(variant="joint", dim=D, num_heads=2).eval()
    assert joint.self_attn.attn.embed_dim == 2 * D
    assert not torch.allclose(joint(img, seg2, valid), joint(img, seg, valid))
    with pytest.raises(ValueError):
        AttentionHead(variant="nope")
    with pytest.raises(ValueError, match="at least one valid"):
        vit(img, seg, torch.zeros(3, 5, dtype=torch.bool))


def test_cine_transformer_padding_invariance():
    net = CineTransformer(dim=D, num_heads=2, ff_dim=32).eval()
    assert len(net.encoder.layers) == 2
    img, _, valid = _inputs()
    out = net(img, valid)
    assert out.shape == (3, 2)
    img2 = img.clone()
    img2[~valid] = 5e3
    valid2 = torch.cat([valid, torch.zeros(3, 2, dtype=torch.bool)], 1)
    torch.testing.assert_close(net(_pad(img2, 2, -5e3), valid2), out, rtol=1e-4, atol=1e-5)


def test_masked_mean():
    x = torch.arange(6.0).reshape(1, 3, 2)
    torch.testing.assert_close(
        masked_mean(x, torch.tensor([[True, False, True]])), torch.tensor([[2.0, 3.0]])
    )
