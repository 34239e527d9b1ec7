"""TransUNet (Chen et al. 2021, "TransUNet: Transformers Make Strong Encoders for Medical Image Segmentation"):
stage 1 of the two-stage framework (Abdelrazik et al. 2025, ``papers/two-stage-transunet-resnet18-summary.txt``).

Encoder: timm's hybrid ResNet-ViT.  A ResNetV2 (GroupNorm, weight-standardised convs) runs the image to 1/16;
its output is projected by a 1x1 "patch" conv to ``embed_dim`` tokens, position embeddings are added and ViT
blocks mix them.  ``backbone="vit_base_r50_s16_224"`` is exactly TransUNet's R50-ViT-B/16 (R50 with stages of
3, 4, 9 blocks, ViT-B/16: 12 blocks of width 768), whose ImageNet weights timm loads with ``pretrained: true``
or from a local ``checkpoint_path``.  For CPU tests and demos, ``hybrid={...}`` builds a small hybrid from the
same timm parts (ResNetV2 + ``HybridEmbed`` + ``VisionTransformer``), random init.

Decoder ("cascaded upsampler", TransUNet sec. 3.2): the token grid is reshaped to (D, H/16, W/16), a 3x3 conv
brings it to ``head_channels``; then one block per factor of 2: bilinear x2 upsampling, concatenation with the
CNN feature map of that scale (1/8, 1/4, 1/2: the outputs of the second and first ResNet stages and of the stem
convolution), two 3x3 conv + BN + ReLU; the last block (full size) has no skip.  A 3x3 conv gives
``num_classes`` logits (2 = background / nodule, softmax, as TransUNet's code).

Choices where the papers are silent or this code differs:

* Any input size: the image is zero-padded at the bottom/right to a multiple of the encoder stride (16), and
  the logits cropped back, so odd sizes work; position embeddings are resampled to the token grid (timm's
  ``dynamic_img_size``), so ``img_size`` is only the grid the embeddings are stored at.
* Upsampling goes to the skip's exact size (not a fixed x2), so nothing depends on sizes dividing evenly.
* The class token timm's hybrid carries is kept in the attention (pretrained weights expect it) and dropped
  before the reshape.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.nets.vit_stack import create_backbone

# Small hybrid for tests and the CPU demo (keys of ``hybrid``): ResNetV2 stage depths and widths, stem width,
# GroupNorm groups, ViT width / depth / heads.
TINY_HYBRID: dict[str, Any] = {
    "layers": (1, 1, 1),
    "channels": (16, 32, 64),
    "stem_chs": 8,
    "norm_groups": 4,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
}


def build_hybrid(*, img_size: int, in_chans: int, **spec: Any) -> nn.Module:
    """A small timm hybrid ViT (ResNetV2 -> HybridEmbed -> VisionTransformer), as timm's
    ``vit_*_r50_s16_*`` are built, from ``spec`` (keys of :data:`TINY_HYBRID`); random init."""
    from timm.layers import GroupNormAct, HybridEmbed, StdConv2dSame
    from timm.models.resnetv2 import ResNetV2
    from timm.models.vision_transformer import VisionTransformer

    s = {**TINY_HYBRID, **spec}
    unknown = set(s) - set(TINY_HYBRID)
    if unknown:
        raise ValueError(f"unknown hybrid keys {sorted(unknown)}; expected {sorted(TINY_HYBRID)}")
    cnn = ResNetV2(
        layers=list(s["layers"]),
        channels=tuple(s["channels"]),
        stem_chs=s["stem_chs"],
        num_classes=0,
        global_pool="",
        in_chans=in_chans,
        preact=False,
        stem_type="same",
        conv_layer=StdConv2dSame,
        norm_layer=partial(GroupNormAct, num_groups=s["norm_groups"]),
    )
    return VisionTransformer(
        img_size=img_size,
        patch_size=1,
        in_chans=in_chans,
        num_classes=0,
        embed_dim=s["embed_dim"],
        depth=s["depth"],
        num_heads=s["num_heads"],
        embed_layer=partial(HybridEmbed, backbone=cnn),
        dynamic_img_size=True,
    )


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


class DecoderBlock(nn.Module):
    """Upsample (bilinear) to the skip's size (or x2 without skip), concatenate the skip, two conv-BN-ReLU."""

    def __init__(self, c_in: int, c_skip: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv_bn_relu(c_in + c_skip, c_out), _conv_bn_relu(c_out, c_out))

    def forward(self, x: Tensor, skip: Tensor | None = None, size: tuple[int, int] | None = None) -> Tensor:
        size = skip.shape[-2:] if skip is not None else (size or (x.shape[-2] * 2, x.shape[-1] * 2))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv(x)


class TransUNet(nn.Module):
    """Hybrid ResNet-ViT encoder + cascaded upsampler with CNN skips: (B, C, H, W) -> (B, num_classes, H, W).

    Args:
        backbone: a timm hybrid ViT whose ``patch_embed.backbone`` is a ResNetV2 (``vit_base_r50_s16_224`` =
            R50-ViT-B/16, TransUNet's; ``vit_small_r26_s32_224`` etc. work too); ignored when ``hybrid`` is set.
        pretrained: timm's ImageNet weights (downloads: needs a network).
        checkpoint_path: a local timm weights file of ``backbone`` instead (offline).
        img_size: the grid the position embeddings are stored at (other input sizes are resampled).
        in_chans: image channels (3 to use ImageNet weights; gray images are repeated).
        num_classes: output channels (2: background / nodule, softmax).
        head_channels: width of the conv after the token grid (TransUNet: 512).
        decoder_channels: widths of the upsampling blocks, deepest first (TransUNet: 256, 128, 64, 16).
        hybrid: build a small hybrid from timm parts instead (keys of :data:`TINY_HYBRID`), random init.
    """

    def __init__(
        self,
        *,
        backbone: str = "vit_base_r50_s16_224",
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        img_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 2,
        head_channels: int = 512,
        decoder_channels: tuple[int, ...] | list[int] = (256, 128, 64, 16),
        hybrid: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if hybrid is not None:
            self.vit = build_hybrid(img_size=img_size, in_chans=in_chans, **hybrid)
        else:
            self.vit = create_backbone(
                backbone,
                pretrained=pretrained,
                checkpoint_path=checkpoint_path,
                img_size=img_size,
                in_chans=in_chans,
                dynamic_img_size=True,
            )
        cnn = getattr(getattr(self.vit, "patch_embed", None), "backbone", None)
        if cnn is None or not hasattr(cnn, "stem") or not hasattr(cnn, "stages"):
            raise ValueError(
                f"{backbone!r} is not a timm hybrid ResNet-ViT (patch_embed.backbone = ResNetV2)"
            )
        info = cnn.feature_info  # stem (1/2), stage outputs (1/4, 1/8, 1/16 ...)
        self.stride = int(info[-1]["reduction"])
        # skips: the stem conv (1/2) and every stage but the last, deepest first
        skip_chs = [int(f["num_chs"]) for f in info[:-1]][::-1]
        n_up = self.stride.bit_length() - 1  # x2 blocks from 1/stride to full size
        decoder_channels = list(decoder_channels)
        if len(decoder_channels) != n_up:
            raise ValueError(f"decoder_channels needs {n_up} widths for stride {self.stride}")
        skip_chs = (skip_chs + [0] * n_up)[:n_up]
        self.skip_chs = skip_chs
        self.conv_more = _conv_bn_relu(self.vit.embed_dim, head_channels)
        ins = [head_channels, *decoder_channels[:-1]]
        self.blocks = nn.ModuleList(
            DecoderBlock(c_in, c_skip, c_out)
            for c_in, c_skip, c_out in zip(ins, skip_chs, decoder_channels, strict=True)
        )
        self.head = nn.Conv2d(decoder_channels[-1], num_classes, 3, padding=1)
        self.num_classes = num_classes

    def forward_encoder(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """(token grid (B, D, H/16, W/16), CNN skips deepest first) of a padded image."""
        cnn = self.vit.patch_embed.backbone
        stem = cnn.stem
        x = stem.norm(stem.conv(x))
        skips = [x]
        x = stem.pool(x)
        for i, stage in enumerate(cnn.stages):
            x = stage(x)
            if i < len(cnn.stages) - 1:
                skips.append(x)
        x = cnn.norm(x)
        x = self.vit.patch_embed.proj(x)  # (B, D, h, w)
        h, w = x.shape[-2:]
        x = self.vit._pos_embed(x.permute(0, 2, 3, 1))  # timm's dynamic-size path: NHWC in, tokens out
        x = self.vit.norm(self.vit.blocks(self.vit.norm_pre(self.vit.patch_drop(x))))
        x = x[:, self.vit.num_prefix_tokens :]  # drop the class token
        return x.transpose(1, 2).reshape(x.shape[0], -1, h, w), skips[::-1]

    def forward(self, x: Tensor) -> Tensor:
        H, W = x.shape[-2:]
        s = self.stride
        pad_h, pad_w = (-H) % s, (-W) % s
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        size = x.shape[-2:]
        grid, skips = self.forward_encoder(x)
        y = self.conv_more(grid)
        for i, block in enumerate(self.blocks):
            skip = skips[i] if self.skip_chs[i] else None
            y = block(y, skip, size if i == len(self.blocks) - 1 else None)
        return self.head(y)[..., :H, :W]
