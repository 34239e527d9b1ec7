"""MSU-Net (Su et al. 2021, "MSU-Net: Multi-scale U-Net for 2D medical image segmentation").

STACT-Time (sec. 2.3, "Segmentation Encoder") fine-tunes an MSU-Net to predict a nodule mask for every frame.
Each U-Net double-conv block is replaced by a multi-scale block: two parallel branches, 3x3-3x3 and 7x7-7x7
convolutions (each conv followed by BN + ReLU), concatenated and fused by a 1x1 conv (+ BN + ReLU).
Encoder: 5 levels with filters 32-64-128-256-512 (``base`` * 1, 2, 4, 8, 16) joined by 2x2 max-pooling;
decoder: 2x2 transposed convolutions, concatenation with the encoder skip, multi-scale block; a final 1x1 conv
gives one logit channel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _conv_bn_relu(c_in: int, c_out: int, k: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


class MultiScaleBlock(nn.Module):
    """Parallel 3x3-3x3 and 7x7-7x7 conv branches, concatenated and fused by a 1x1 conv (MSU-Net block)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.branch3 = nn.Sequential(_conv_bn_relu(c_in, c_out, 3), _conv_bn_relu(c_out, c_out, 3))
        self.branch7 = nn.Sequential(_conv_bn_relu(c_in, c_out, 7), _conv_bn_relu(c_out, c_out, 7))
        self.fuse = _conv_bn_relu(2 * c_out, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fuse(torch.cat([self.branch3(x), self.branch7(x)], dim=1))


class MSUNet(nn.Module):
    """MSU-Net: (B, in_channels, H, W) -> (B, out_channels, H, W) logits.

    ``base=32`` is the paper size (filters 32-512); use e.g. ``base=4`` for CPU demos. Any H, W is accepted:
    the input is zero-padded to a multiple of 2**(depth-1) and the output cropped back (real frames are
    802 x 1054, not a multiple of 16).
    """

    def __init__(
        self, *, in_channels: int = 1, out_channels: int = 1, base: int = 32, depth: int = 5
    ) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError("MSUNet depth must be >= 2")
        widths = [base * 2**i for i in range(depth)]
        self.depth = depth
        self.encoder = nn.ModuleList()
        c = in_channels
        for w in widths:
            self.encoder.append(MultiScaleBlock(c, w))
            c = w
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.up.append(nn.ConvTranspose2d(c, w, kernel_size=2, stride=2))
            self.decoder.append(MultiScaleBlock(2 * w, w))
            c = w
        self.head = nn.Conv2d(c, out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        m = 2 ** (self.depth - 1)
        pad_h, pad_w = (-h) % m, (-w) % m
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        skips = []
        for i, block in enumerate(self.encoder):
            if i:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        skips.pop()  # the bottleneck output is x itself
        for up, block in zip(self.up, self.decoder, strict=True):
            x = block(torch.cat([skips.pop(), up(x)], dim=1))
        return self.head(x)[..., :h, :w]
