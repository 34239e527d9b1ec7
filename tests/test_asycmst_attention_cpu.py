"""The CPU batched-matmul path of ``attend`` (spatial / temporal patterns, issue 14 item 4) against the SDPA
implementation it replaced, kept here as the reference: outputs and gradients equal in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from lightning_modules.nets.asycmst_attention import CrossModalAttention, STSABlock, attend

FOLDS = {  # the pre-issue-14 code path: einops fold, one SDPA call, unfold
    "spatial": ("b m t n d -> (b t) m n d", "(b t) m n d -> b m t n d"),
    "temporal": ("b m t n d -> (b n) m t d", "(b n) m t d -> b m t n d"),
}


def attend_sdpa(q, k, v, pattern):
    b, _, t, n, _ = q.shape
    fold, unfold = FOLDS[pattern]
    out = F.scaled_dot_product_attention(rearrange(q, fold), rearrange(k, fold), rearrange(v, fold))
    return rearrange(out, unfold, b=b, t=t, n=n)


def _grads(fn, inputs, grad_out):
    out = fn(*inputs)
    return (out, *torch.autograd.grad(out, inputs, grad_out))


@pytest.mark.parametrize("pattern", ["spatial", "temporal"])
@pytest.mark.parametrize("shape", [(1, 2, 3, 5, 4), (2, 3, 4, 7, 8), (1, 6, 16, 49, 64)])
@pytest.mark.parametrize("layout", ["contiguous", "qkv-view"])
def test_bmm_path_equals_sdpa(pattern, shape, layout):
    torch.manual_seed(0)
    b, m, t, n, d = shape
    if layout == "contiguous":
        q, k, v = (torch.randn(shape, dtype=torch.float64, requires_grad=True) for _ in range(3))
        inputs = (q, k, v)
    else:  # what the modules pass: strided views of one Linear output
        x = torch.randn(b, t, n, 3 * m * d, dtype=torch.float64, requires_grad=True)
        inputs = tuple(rearrange(x, "b t n (k m d) -> k b m t n d", k=3, m=m))
    grad_out = torch.randn(shape, dtype=torch.float64)
    new = _grads(lambda *a: attend(*a, pattern), inputs, grad_out)
    ref = _grads(lambda *a: attend_sdpa(*a, pattern), inputs, grad_out)
    for a, r in zip(new, ref, strict=True):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-12)


@pytest.mark.parametrize("strategy", ["asymmetric", "spatial", "temporal"])
def test_modules_equal_the_sdpa_path(strategy, monkeypatch):
    """Whole ``CrossModalAttention`` / ``STSABlock``: outputs and parameter gradients equal with either path."""
    from lightning_modules.nets import asycmst_attention as mod

    torch.manual_seed(0)
    cross = CrossModalAttention(dim=24, heads=3, strategy=strategy).double()
    stsa = STSABlock(dim=24, heads=3).double()
    x_c, x_b = (torch.randn(2, 4, 6, 24, dtype=torch.float64) for _ in range(2))

    def run():
        cross.zero_grad(set_to_none=True)
        stsa.zero_grad(set_to_none=True)
        a, c = cross(x_c, x_b)
        s = stsa(x_c)
        (a.square().sum() + c.square().sum() + s.square().sum()).backward()
        params = [p.grad.clone() for p in (*cross.parameters(), *stsa.parameters())]
        return [a.detach(), c.detach(), s.detach(), *params]

    new = run()
    monkeypatch.setattr(mod, "_attend_axis_bmm", attend_sdpa)
    ref = run()
    for a, r in zip(new, ref, strict=True):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-11)
