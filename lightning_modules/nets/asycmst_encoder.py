"""AsyCMST per-frame blocks: the ResNet-18 frame encoder (Sec. 3.1, Fig. 2a), the frame self-sorting scorer
(Sec. 3.2, Eq. 1-2) and the light BUS mask decoder (Sec. 3.2, Fig. 2b).

Every frame is encoded on its own: the clip ``(B, T, C, H, W)`` is folded into a batch of ``B*T`` images with
einops, never with ``.view`` across the time axis (the authors' public code scrambles time that way).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from einops import rearrange
from torch import nn


def create_encoder(
    backbone: str, *, pretrained: bool = False, checkpoint_path: str | Path | None = None, **kwargs: Any
) -> nn.Module:
    """``timm.create_model(backbone, **kwargs)`` with its starting weights.

    - ``checkpoint_path``: a local weights file (a timm or torchvision ResNet state dict, .pth / .bin /
      .safetensors; torchvision's ``resnet18-f37072fd.pth`` has timm's key names), loaded by timm's own loader
      (the ImageNet classifier is dropped for ``features_only``).  Missing: ``FileNotFoundError``.
    - else ``pretrained``: timm's weights for the name's tag, downloaded once (``resnet18.tv_in1k`` is
      torchvision's ``IMAGENET1K_V1``; a bare ``resnet18`` means timm's default tag, ``resnet18.a1_in1k``).
      No network and no cache: ``FileNotFoundError`` with one line saying what to set instead.
    - neither: random init.

    The stage (:meth:`~lightning_modules.base.BaseStage.build_net`) turns the ``FileNotFoundError`` into the
    one-line ``DataError`` of the command lines.
    """
    if checkpoint_path is not None:
        path = Path(checkpoint_path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: encoder checkpoint not found")
        return timm.create_model(
            backbone, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs
        )
    if not pretrained:
        return timm.create_model(backbone, pretrained=False, **kwargs)
    try:
        return timm.create_model(backbone, pretrained=True, **kwargs)
    except OSError as e:  # huggingface_hub / urllib / requests: no network, no cache, a proxy refusing
        first = (str(e).splitlines() or [""])[0][:120]
        raise FileNotFoundError(
            f"{backbone}: could not fetch the pretrained weights ({type(e).__name__}: {first}); offline, set "
            f"model.init_args.checkpoint_path to a local weights file, or pretrained: false for random init"
        ) from None


class FrameEncoder(nn.Module):
    """ResNet-18 truncated after its last stage (stride 32: 7 x 7 at 224 px), then a 1x1 conv to ``dim``
    (Sec. 3.1).  Built with timm (``features_only``, last stage); ``backbone`` can name another timm model of
    the same kind, e.g. ``test_resnet`` (stride 32, 0.4 M parameters) for CPU tests, and ``backbone_args`` are
    passed to ``timm.create_model`` (e.g. ``{"channels": [16, 32, 48, 64], "stem_width": 8}`` with
    ``resnet10t`` for a 0.13 M-parameter ResNet at demo size; ``{"out_indices": [3]}`` stops a ResNet after
    its third stage, stride 16).  Starting weights: :func:`create_encoder` (``pretrained`` /
    ``checkpoint_path``).

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
        checkpoint_path: str | Path | None = None,
        backbone_args: dict[str, Any] | None = None,
    ):
        super().__init__()
        kwargs = {"features_only": True, "out_indices": (-1,), "in_chans": in_chans}
        kwargs |= {k: tuple(v) if isinstance(v, list) else v for k, v in (backbone_args or {}).items()}
        self.body = create_encoder(backbone, pretrained=pretrained, checkpoint_path=checkpoint_path, **kwargs)
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
