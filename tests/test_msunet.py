"""MSU-Net: shapes, any frame size, both branches of the multi-scale block really used."""

from __future__ import annotations

import torch
from torch import nn

from lightning_modules.nets.msunet import MSUNet, MultiScaleBlock


def test_block_has_3x3_and_7x7_branches_fused_by_1x1():
    block = MultiScaleBlock(2, 4)
    k3 = [m.kernel_size for m in block.branch3.modules() if isinstance(m, nn.Conv2d)]
    k7 = [m.kernel_size for m in block.branch7.modules() if isinstance(m, nn.Conv2d)]
    assert k3 == [(3, 3), (3, 3)] and k7 == [(7, 7), (7, 7)]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in block.branch3.modules()) == 2
    fuse = [m for m in block.fuse.modules() if isinstance(m, nn.Conv2d)]
    assert fuse[0].kernel_size == (1, 1) and fuse[0].in_channels == 8


def test_zeroing_either_branch_changes_output():
    block = MultiScaleBlock(1, 4).eval()
    x = torch.randn(1, 1, 12, 12)
    ref = block(x)
    for name in ("branch3", "branch7"):
        other = MultiScaleBlock(1, 4).eval()
        other.load_state_dict(block.state_dict())
        with torch.no_grad():
            for m in getattr(other, name).modules():
                if isinstance(m, nn.Conv2d):
                    m.weight.zero_()
        assert not torch.allclose(other(x), ref), name


def test_msunet_shapes_and_widths():
    net = MSUNet(base=2)
    assert [b.fuse[0].out_channels for b in net.encoder] == [2, 4, 8, 16, 32]
    assert MSUNet(base=32).encoder[-1].fuse[0].out_channels == 512  # paper size 32-512
    assert all(isinstance(u, nn.ConvTranspose2d) for u in net.up)
    for h, w in [(32, 32), (35, 50)]:  # not a multiple of 16 -> padded and cropped back
        out = net(torch.randn(2, 1, h, w))
        assert out.shape == (2, 1, h, w)
    out.mean().backward()
    assert net.encoder[0].branch7[0][0].weight.grad is not None
