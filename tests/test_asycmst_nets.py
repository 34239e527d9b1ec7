"""AsyCMST building blocks: frame independence, time axis, FSS (Alg. 1), Dice (Eq. 5), strategy receptive sets."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_modules.losses import dice_loss
from lightning_modules.nets.asycmst import AsyCMSTNet
from lightning_modules.nets.asycmst_attention import (
    STRATEGIES,
    STRATEGY_PATTERNS,
    CrossModalAttention,
    allowed_keys,
    attend,
)
from lightning_modules.nets.asycmst_encoder import FrameEncoder, MaskDecoder
from lightning_modules.nets.asycmst_losses import fss_loss, fss_loss_loop

TINY = dict(dim=16, depth=2, heads=2, num_frames=4, img_size=64, backbone="test_resnet", decoder_width=16)


@pytest.fixture(scope="module")
def encoder() -> FrameEncoder:
    torch.manual_seed(0)
    return FrameEncoder(dim=8, backbone="test_resnet").eval()  # eval: BatchNorm must not mix frames


def test_encoder_shape(encoder):
    out = encoder(torch.randn(2, 3, 3, 64, 64))
    assert out.shape == (2, 3, 4, 8)  # N = (64/32)^2


def test_encoder_backbone_args_reach_timm():
    """``backbone_args`` go to timm: narrower channels, and ``out_indices`` stopping after stage 3 (stride 16)."""
    enc = FrameEncoder(dim=8, backbone="resnet10t",
                       backbone_args={"channels": [16, 32, 48, 64], "stem_width": 8, "out_indices": [3]})  # fmt: skip
    assert enc.stride == 16 and enc.proj.in_channels == 48
    assert enc.eval()(torch.randn(1, 2, 3, 32, 32)).shape == (1, 2, 4, 8)  # N = (32/16)^2
    net = AsyCMSTNet(**{**TINY, "img_size": 32, "backbone": "resnet10t"},
                     backbone_args={"channels": [16, 32, 48, 64], "stem_width": 8, "out_indices": [3]})  # fmt: skip
    out = net.eval()(torch.randn(2, 4, 3, 32, 32), torch.randn(2, 4, 3, 32, 32), masks=True)
    assert out["logits"].shape == (2, 2) and out["mask_logits"].shape == (8, 1, 32, 32)


def test_frame_features_depend_on_own_frame_only(encoder):
    clip = torch.randn(2, 4, 3, 64, 64, requires_grad=True)
    out = encoder(clip)
    for b in range(2):
        for t in range(4):
            (g,) = torch.autograd.grad(out[b, t].sum(), clip, retain_graph=True)
            touched = g.abs().flatten(2).sum(-1) > 0  # (B, T)
            expected = torch.zeros(2, 4, dtype=torch.bool)
            expected[b, t] = True
            assert torch.equal(touched, expected)


def test_permuting_frames_permutes_features(encoder):
    clip = torch.randn(2, 5, 3, 64, 64)
    perm = torch.tensor([3, 0, 4, 1, 2])
    with torch.no_grad():
        a, b = encoder(clip), encoder(clip[:, perm])
    torch.testing.assert_close(b, a[:, perm])


def test_time_axis_survives_the_whole_net():
    """The per-frame FSS scores and decoded masks follow the frames (no `.view` scrambling of (b, t))."""
    torch.manual_seed(0)
    net = AsyCMSTNet(**TINY).eval()
    c, b = torch.randn(2, 4, 3, 64, 64), torch.randn(2, 4, 3, 64, 64)
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        o1, o2 = net(c, b, masks=True), net(c[:, perm], b[:, perm], masks=True)
    torch.testing.assert_close(o2["sort_scores"], o1["sort_scores"][:, perm])
    m1 = o1["mask_logits"].reshape(2, 4, 1, 64, 64)
    m2 = o2["mask_logits"].reshape(2, 4, 1, 64, 64)
    torch.testing.assert_close(m2, m1[:, perm])


@pytest.mark.parametrize("t", [2, 5, 16])
def test_fss_vectorised_matches_algorithm_1(t):
    torch.manual_seed(t)
    s = torch.randn(3, t) * 3
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    a, b = fss_loss(s1), fss_loss_loop(s2)
    torch.testing.assert_close(a, b)
    a.backward()
    b.backward()
    torch.testing.assert_close(s1.grad, s2.grad)


def test_fss_clamp_and_order():
    ordered = torch.arange(8.0)[None] * 10  # confidently sorted: every pair clamped at phi
    assert fss_loss(ordered).item() == pytest.approx(-math.log(0.9))
    assert fss_loss(ordered.flip(-1)).item() > 5.0  # reversed order is expensive
    flat = torch.zeros(1, 6)
    assert fss_loss(flat).item() == pytest.approx(math.log(2.0))


def test_dice_loss():
    g = torch.zeros(2, 1, 8, 8)
    g[:, :, 2:6, 2:6] = 1
    perfect = (g * 2 - 1) * 50  # logits
    assert dice_loss(perfect, g).item() == pytest.approx(0.0, abs=1e-5)
    assert dice_loss(-perfect, g).item() == pytest.approx(1.0, abs=1e-5)
    # epsilon 1e-6 keeps an empty frame with an empty prediction finite (and near zero)
    assert dice_loss(torch.full((1, 1, 8, 8), -50.0), torch.zeros(1, 1, 8, 8)).item() == pytest.approx(
        0, abs=1e-3
    )
    assert dice_loss(torch.zeros(0, 1, 8, 8), torch.zeros(0, 1, 8, 8)).item() == 0.0


def test_mask_decoder_restores_resolution():
    dec = MaskDecoder(dim=8, stride=32, width=16)
    assert dec(torch.randn(3, 8, 2, 2)).shape == (3, 1, 64, 64)


@pytest.mark.parametrize("pattern", ["spatial", "temporal", "global", "cross"])
def test_attend_receptive_set(pattern):
    torch.manual_seed(0)
    b, m, t, n, d = 1, 2, 3, 4, 8
    q = torch.randn(b, m, t, n, d)
    k = torch.randn(b, m, t, n, d, requires_grad=True)
    v = torch.randn(b, m, t, n, d)
    out = attend(q, k, v, pattern)
    for ti in range(t):
        for ni in range(n):
            (g,) = torch.autograd.grad(out[:, :, ti, ni].sum(), k, retain_graph=True)
            touched = g.abs().sum(dim=(0, 1, 4)) > 0
            assert torch.equal(touched, allowed_keys(pattern, ti, ni, frames=t, positions=n)), (ti, ni)


def test_cross_pattern_matches_masked_dense_attention():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 3, 5, 4) for _ in range(3))
    mask = torch.stack(
        [allowed_keys("cross", ti, ni, frames=3, positions=5) for ti in range(3) for ni in range(5)]
    )
    flat = lambda x: x.flatten(2, 3)  # noqa: E731
    dense = torch.nn.functional.scaled_dot_product_attention(
        flat(q), flat(k), flat(v), attn_mask=mask.flatten(1)
    )
    torch.testing.assert_close(attend(q, k, v, "cross"), dense.reshape(2, 2, 3, 5, 4))


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "none"])
def test_strategy_receptive_sets(strategy):
    """Gradient of each stream's cross-attention output at (t, n) w.r.t. the *other* stream's input is
    non-zero exactly on the keys the strategy allows; asymmetric: C->B same frame, B->C same position."""
    torch.manual_seed(0)
    t, n, dim = 3, 4, 8
    cross = CrossModalAttention(dim=dim, heads=2, strategy=strategy)
    x_c = torch.randn(1, t, n, dim, requires_grad=True)
    x_b = torch.randn(1, t, n, dim, requires_grad=True)
    att_c, att_b = cross(x_c, x_b)
    pattern_c, pattern_b = STRATEGY_PATTERNS[strategy]
    for ti in range(t):
        for ni in range(n):
            (g_b,) = torch.autograd.grad(att_c[0, ti, ni].sum(), x_b, retain_graph=True)
            (g_c,) = torch.autograd.grad(att_b[0, ti, ni].sum(), x_c, retain_graph=True)
            assert torch.equal(
                g_b[0].abs().sum(-1) > 0, allowed_keys(pattern_c, ti, ni, frames=t, positions=n)
            )
            assert torch.equal(
                g_c[0].abs().sum(-1) > 0, allowed_keys(pattern_b, ti, ni, frames=t, positions=n)
            )
    if strategy == "asymmetric":
        assert (pattern_c, pattern_b) == ("spatial", "temporal")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_net_runs_every_strategy(strategy):
    net = AsyCMSTNet(**TINY, strategy=strategy)
    frames = torch.tensor([[True, False, True, False], [False, False, False, True]])
    out = net(torch.randn(2, 4, 3, 64, 64), torch.randn(2, 4, 3, 64, 64), mask_frames=frames)
    assert out["logits"].shape == (2, 2)
    assert out["sort_scores"].shape == (2, 4)
    assert out["mask_logits"].shape == (3, 1, 64, 64)
    assert len(net.acmst) == (0 if strategy == "none" else 2)


def test_switches():
    net = AsyCMSTNet(**TINY, fss=False, ns=False, acmst_layers=[1], share_encoders=True)
    assert net.sorter is None and net.decoder is None and list(net.acmst) == ["1"]
    assert net.encoder_b is net.encoder_c
    out = net(torch.randn(1, 4, 3, 64, 64), torch.randn(1, 4, 3, 64, 64), masks=True)
    assert set(out) == {"logits"}
    with pytest.raises(ValueError, match="acmst_layers"):
        AsyCMSTNet(**TINY, acmst_layers=[5])
    with pytest.raises(ValueError, match="strategy"):
        AsyCMSTNet(**TINY, strategy="bogus")
    with pytest.raises(ValueError, match="expected"):
        net(torch.randn(1, 3, 3, 64, 64), torch.randn(1, 3, 3, 64, 64))


@pytest.mark.parametrize("strategy", ["asymmetric", "global", "symmetric"])
def test_attention_maps_follow_the_strategy(strategy):
    """The inspection maps are proper distributions and only put weight where the strategy allows."""
    from lightning_modules.nets.asycmst_attention import CrossModalAttention

    t, n = 3, 4
    cross = CrossModalAttention(dim=8, heads=2, strategy=strategy)
    w = cross.attention_weights(torch.randn(2, t, n, 8), torch.randn(2, t, n, 8))
    for name in ("c_to_b", "b_to_c"):
        torch.testing.assert_close(w[f"{name}_frames"].sum(-1), torch.ones(2, t))
        torch.testing.assert_close(w[f"{name}_positions"].sum(-1), torch.ones(2, n))
    if strategy == "asymmetric":
        # C->B sees only its own frame (Eq. 10); B->C sees only its own position (Eq. 8).
        torch.testing.assert_close(w["c_to_b_frames"], torch.eye(t).expand(2, t, t))
        torch.testing.assert_close(w["b_to_c_positions"], torch.eye(n).expand(2, n, n))
    else:
        assert (w["c_to_b_frames"] > 0).all()
