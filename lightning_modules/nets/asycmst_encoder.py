"""AsyCMST per-frame blocks: the ResNet-18 frame encoder (Sec. 3.1, Fig. 2a), the frame self-sorting scorer
(Sec. 3.2, Eq. 1-2) and the light BUS mask decoder (Sec. 3.2, Fig. 2b).

Every frame is encoded on its own: the clip ``(B, T, C, H, W)`` is folded into a batch of ``B*T`` images with
einops, never with ``.view`` across the time axis (the authors' public code scrambles time that way).
"""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from torch import nn

from lightning_modules.nets.vit_stack import timm_model


class FrameEncoder(nn.Module):
    """ResNet-18 truncated after its last stage (stride 32: 7 x 7 at 224 px), then a 1x1 conv to ``dim``
    (Sec. 3.1).  Built with timm (``features_only``, last stage); ``backbone`` can name another timm model of
    the same kind, e.g. ``test_resnet`` (stride 32, 0.4 M parameters) for CPU tests, and ``backbone_args`` are
    passed to ``timm.create_model`` (e.g. ``{"channels": [16, 32, 48, 64], "stem_width": 8}`` with
    ``resnet10t`` for a 0.13 M-parameter ResNet at demo size; ``{"out_indices": [3]}`` stops a ResNet after
    its third stage, stride 16).

    ``(B, T, C, H, W) -> (B, T, N, D)`` with ``N = (H/s) * (W/s)`` (``s = stride``, 32 for a whole ResNet) in
    row-major order.  Frames never mix (except through BatchNorm batch statistics in training mode, as in any
    CNN trained on a batch).
    """

    def __init__(
        self,
        *,
        dim: int,
        backbone: str = "resnet18",
        in_chans: int = 3,
        pretrained: bool = False,
        backbone_args: dict[str, Any] | None = None,
    ):
        super().__init__()
        # pretrained=True downloads ImageNet weights through timm; the default stays offline
        kwargs = {"features_only": True, "out_indices": (-1,), "in_chans": in_chans}
        kwargs |= {k: tuple(v) if isinstance(v, list) else v for k, v in (backbone_args or {}).items()}
        self.body = timm_model(backbone, downloads=pretrained, pretrained=pretrained, **kwargs)
        self.stride = int(self.body.feature_info.reduction()[-1])
        self.proj = nn.Conv2d(int(self.body.feature_info.channels()[-1]), dim, kernel_size=1)

    def feature_maps(self, clip: torch.Tensor) -> torch.Tensor:
        """``(B, T, C, H, W) -> (B*T, D, h, w)``, frames in ``(b t)`` order."""
        x = rearrange(clip, "b t c h w -> (b t) c h w")
        return self.proj(self.body(x)[-1])

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        b = clip.shape[0]
        maps = self.feature_maps(clip)
        return rearrange(maps, "(b t) d h w -> b t (h w) d", b=b)


class FrameSorter(nn.Module):
    """Frame self-sorting scorer, Eq. 1-2: ``v_t = 1/2 GAP(F_t) + 1/2 GMP(F_t)``, two-layer MLP -> ``s_t``.

    ``(B, T, N, D) -> (B, T)`` scores; the loss is :func:`asycmst_losses.fss_loss` (Eq. 3-4).
    """

    def __init__(self, *, dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or dim
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        v = 0.5 * feats.mean(dim=2) + 0.5 * feats.amax(dim=2)  # Eq. 1, pooled over the N positions
        return self.mlp(v).squeeze(-1)  # Eq. 2


class MaskDecoder(nn.Module):
    """Light mask decoder on BUS frame features (Sec. 3.2): stride-2 transposed convs, no skip connections
    (the paper drops them so that the segmentation signal has to shape the encoder's own features).

    ``(K, D, h, w) -> (K, 1, h*2^u, w*2^u)`` mask logits, ``u = log2(stride)`` upsampling steps (5 for ResNet-18).
    Channels halve each step from ``width`` down to a floor of 16.
    """

    def __init__(self, *, dim: int, stride: int = 32, width: int = 128):
        super().__init__()
        steps = stride.bit_length() - 1
        if 2**steps != stride:
            raise ValueError(f"stride must be a power of two, got {stride}")
        layers: list[nn.Module] = []
        c_in, c_out = dim, width
        for _ in range(steps):
            layers += [
                nn.ConvTranspose2d(c_in, c_out, kernel_size=2, stride=2),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
            c_in, c_out = c_out, max(16, c_out // 2)
        layers.append(nn.Conv2d(c_in, 1, kernel_size=1))
        self.net = nn.Sequential(*layers)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.net(maps)
