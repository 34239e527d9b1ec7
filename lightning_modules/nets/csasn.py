"""CSASN, the Channel-Spatial Attention Synergy Network (rare thyroid carcinoma subtypes on ultrasound stills).

Written from the paper's summary (``papers/csasn-summary.txt``: "a dual-branch feature extractor -- EfficientNet
for local spatial encoding and ViT for global semantic modeling, with a cascaded channel-spatial attention
refinement module.  A residual multiscale classifier and dynamically weighted loss function ..., multitask").
The summary gives no equations, sizes or fusion rule; every choice below is ours, named, and a switch:

1. **Dual-branch extractor** (:class:`CSASNNet`): a timm CNN (``cnn_backbone``, EfficientNet-B0 at paper size)
   gives its last feature map ``(B, C_cnn, H/32, W/32)``; a timm ViT (``vit_backbone``) gives its patch tokens,
   prefix (class) tokens dropped, laid back on their grid ``(B, C_vit, H/p, W/p)``.
2. **Fusion** (our choice): each map is projected by a 1x1 conv + BatchNorm + GELU to ``fusion_dim`` channels
   and resampled (bilinear) to one common ``grid`` x ``grid`` (default: the ViT's patch grid, 14 at 224 px, so
   the EfficientNet's 7 x 7 map is upsampled); the maps are concatenated on channels and mixed by a 1x1 conv +
   BatchNorm + GELU back to ``fusion_dim``.  Feature maps rather than pooled vectors, so the attention below
   has a spatial layout to weigh; the ViT's class token is not used (its patch tokens already attend globally).
3. **Cascaded refinement** (:class:`ChannelSpatialAttention`, the CBAM order of Woo et al. 2018, written from
   that description): channel attention first, ``F' = M_c(F) * F`` with ``M_c = sigmoid(MLP(avgpool F) +
   MLP(maxpool F))`` (one MLP shared by both poolings, reduction ``reduction``), then spatial attention *on the
   channel-refined features*, ``F'' = M_s(F') * F'`` with ``M_s = sigmoid(conv_kxk([mean_c F'; max_c F']))``.
   Hand-written (timm's ``CbamModule`` exists but hides the intermediate maps that the tests and W&B read).
4. **Residual multiscale classifier** (:class:`ResidualMultiscaleClassifier`, our reading): the refined map is
   average-pooled at several scales (``scales`` = 1, 2, 4: a global vector, 2 x 2 and 4 x 4 regions, as a
   spatial pyramid), concatenated, projected to ``hidden_dim`` and passed through ``depth`` pre-norm residual
   MLP blocks ``z <- z + W2 GELU(W1 LN(z))`` -- the pre-logit features (``forward_features``).
5. **Multitask heads**: ``subtype`` (``num_subtypes`` logits: benign, PTC, FTC, MTC...) and ``malignant``
   (2 logits, benign vs malignant), two linear layers on the same features.  The loss (weights, dynamic class
   weighting) is the stage's (:mod:`lightning_modules.csasn_stage`, :mod:`lightning_modules.nets.csasn_losses`).

Ablation switches (the paper's ablation table): ``use_cnn=False`` (without EfficientNet: the CNN branch is not
built), ``use_vit=False`` (without ViT), ``use_refinement=False`` (the fused map goes straight to the
classifier).  "Without dynamic weighting" is a loss switch of the stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from lightning_modules.nets.vit_stack import create_backbone


class ChannelAttention(nn.Module):
    """``M_c(F) = sigmoid(MLP(avgpool(F)) + MLP(maxpool(F)))``, ``(B, C, 1, 1)``; the MLP (C -> C/r -> C, ReLU)
    is shared by both poolings (CBAM eq. 2)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        avg = self.mlp(F.adaptive_avg_pool2d(x, 1))
        mx = self.mlp(F.adaptive_max_pool2d(x, 1))
        return torch.sigmoid(avg + mx)


class SpatialAttention(nn.Module):
    """``M_s(F) = sigmoid(conv_kxk([mean over channels; max over channels]))``, ``(B, 1, H, W)`` (CBAM eq. 3)."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"spatial kernel_size must be odd, got {kernel_size}")
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))


class ChannelSpatialAttention(nn.Module):
    """Cascaded refinement, channel first then spatial: ``F' = M_c(F) * F``, ``F'' = M_s(F') * F'``.

    The spatial map is computed on the channel-refined ``F'`` (not on ``F``): that is what "cascaded" means
    here, and the order the tests check.  ``forward_maps`` returns both attention maps as well.
    """

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7) -> None:
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention(kernel_size)

    def forward_maps(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        mc = self.channel(x)
        x = mc * x
        ms = self.spatial(x)
        return ms * x, {"channel": mc, "spatial": ms}

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_maps(x)[0]


class ResidualBlock(nn.Module):
    """Pre-norm residual MLP block ``z + Dropout(W2 GELU(W1 LayerNorm(z)))``."""

    def __init__(self, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, dim)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, z: Tensor) -> Tensor:
        return z + self.drop(self.body(z))


class ResidualMultiscaleClassifier(nn.Module):
    """Pre-logit features of a ``(B, C, G, G)`` map: average pooling at each of ``scales`` (an ``s x s`` grid of
    regions each; 1 = global), concatenated (``C * sum(s^2)``), Linear -> ``hidden_dim``, then ``depth``
    :class:`ResidualBlock` s and a final LayerNorm.  ``(B, hidden_dim)``."""

    def __init__(
        self,
        channels: int,
        hidden_dim: int,
        scales: Sequence[int] = (1, 2, 4),
        depth: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not scales or min(scales) < 1:
            raise ValueError(f"scales must be positive integers, got {scales}")
        self.scales = tuple(int(s) for s in scales)
        self.proj = nn.Linear(channels * sum(s * s for s in self.scales), hidden_dim)
        self.blocks = nn.Sequential(*(ResidualBlock(hidden_dim, dropout) for _ in range(depth)))
        self.norm = nn.LayerNorm(hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        pooled = [F.adaptive_avg_pool2d(x, s).flatten(1) for s in self.scales]
        return self.norm(self.blocks(self.proj(torch.cat(pooled, dim=1))))


def _project(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.GELU())


class CSASNNet(nn.Module):
    """Dual-branch CSASN on ``(B, 3, S, S)`` images -> ``{"subtype": (B, K), "malignant": (B, 2)}`` logits.

    See the module docstring for each part.  timm convention: ``forward_features`` gives the pre-logit
    ``(B, hidden_dim)`` features, ``forward_head`` the logits dict on them; the intermediate steps are
    ``forward_branches`` (the two projected maps on the common grid), ``forward_fusion`` and
    ``forward_refined`` (with the attention maps).

    Args:
        cnn_backbone / vit_backbone: timm names (any CNN with a feature map / any ViT with patch tokens).
        pretrained: timm's ImageNet weights for both branches (downloads; off in tests and the demo).
        cnn_checkpoint_path / vit_checkpoint_path: local weights files instead (offline clusters).
        img_size: input side; reaches the ViT (its position embeddings), not the CNN.
        num_subtypes: K of the subtype head.
        fusion_dim: channels of each projected branch and of the fused map.
        grid: side of the common grid; None = the ViT's patch grid (``img_size / patch``), or ``img_size // 16``
            without ViT.
        reduction / spatial_kernel: channel-attention MLP reduction, spatial-attention kernel (CBAM: 16, 7).
        scales / depth / hidden_dim / dropout: the classifier's pooling scales, residual blocks, width, dropout.
        use_cnn / use_vit / use_refinement: ablation switches (module docstring).
        cnn_kwargs / vit_kwargs: extra timm ``create_model`` arguments per branch.
        shape_outputs: > 0 adds a third linear head, ``"shape"`` (that many outputs), on the same features: the
            stage's auxiliary shape regression (``shape_weight``; not in the paper).  0 (default): two heads.
    """

    def __init__(
        self,
        *,
        cnn_backbone: str = "efficientnet_b0",
        vit_backbone: str = "vit_base_patch16_224",
        pretrained: bool = False,
        cnn_checkpoint_path: str | None = None,
        vit_checkpoint_path: str | None = None,
        img_size: int = 224,
        num_subtypes: int = 4,
        fusion_dim: int = 256,
        grid: int | None = None,
        reduction: int = 16,
        spatial_kernel: int = 7,
        scales: Sequence[int] = (1, 2, 4),
        depth: int = 2,
        hidden_dim: int = 256,
        dropout: float = 0.1,
        use_cnn: bool = True,
        use_vit: bool = True,
        use_refinement: bool = True,
        cnn_kwargs: dict[str, Any] | None = None,
        vit_kwargs: dict[str, Any] | None = None,
        shape_outputs: int = 0,
    ) -> None:
        super().__init__()
        if not (use_cnn or use_vit):
            raise ValueError("CSASN needs at least one branch: use_cnn and use_vit cannot both be false")
        self.img_size = img_size
        self.cnn = self.cnn_proj = self.vit = self.vit_proj = None
        if use_cnn:
            self.cnn = create_backbone(
                cnn_backbone,
                pretrained=pretrained,
                checkpoint_path=cnn_checkpoint_path,
                **(cnn_kwargs or {}),
            )
            self.cnn_proj = _project(self.cnn.num_features, fusion_dim)
        patch_grid = img_size // 16
        if use_vit:
            self.vit = create_backbone(
                vit_backbone,
                pretrained=pretrained,
                checkpoint_path=vit_checkpoint_path,
                img_size=img_size,
                **(vit_kwargs or {}),
            )
            if not hasattr(self.vit, "patch_embed"):
                raise ValueError(f"vit_backbone {vit_backbone!r} has no patch_embed: not a ViT")
            self.vit_proj = _project(self.vit.num_features, fusion_dim)
            patch_grid = self.vit.patch_embed.grid_size[0]
        self.grid = int(grid or patch_grid)
        self.fuse = _project(fusion_dim * (int(use_cnn) + int(use_vit)), fusion_dim)
        self.refine = (
            ChannelSpatialAttention(fusion_dim, reduction, spatial_kernel) if use_refinement else None
        )
        self.classifier = ResidualMultiscaleClassifier(fusion_dim, hidden_dim, scales, depth, dropout)
        self.head_drop = nn.Dropout(dropout)
        self.subtype_head = nn.Linear(hidden_dim, num_subtypes)
        self.malignant_head = nn.Linear(hidden_dim, 2)
        self.shape_head = nn.Linear(hidden_dim, shape_outputs) if shape_outputs > 0 else None

    # -- branches ------------------------------------------------------------------------------------------------
    def _to_grid(self, x: Tensor) -> Tensor:
        if x.shape[-2:] == (self.grid, self.grid):
            return x
        return F.interpolate(x, size=(self.grid, self.grid), mode="bilinear", align_corners=False)

    def vit_map(self, x: Tensor) -> Tensor:
        """The ViT's patch tokens (prefix tokens dropped) as a ``(B, C_vit, gh, gw)`` map."""
        tokens = self.vit.forward_features(x)  # type: ignore[union-attr]
        tokens = tokens[:, getattr(self.vit, "num_prefix_tokens", 1) :]
        gh, gw = self.vit.patch_embed.grid_size  # type: ignore[union-attr]
        return rearrange(tokens, "b (h w) c -> b c h w", h=gh, w=gw)

    def forward_branches(self, x: Tensor) -> dict[str, Tensor]:
        """Each present branch's map projected to ``fusion_dim`` on the common grid: ``{"cnn", "vit"}``."""
        out = {}
        if self.cnn is not None:
            out["cnn"] = self._to_grid(self.cnn_proj(self.cnn.forward_features(x)))  # type: ignore[misc]
        if self.vit is not None:
            out["vit"] = self._to_grid(self.vit_proj(self.vit_map(x)))  # type: ignore[misc]
        return out

    def forward_fusion(self, x: Tensor) -> Tensor:
        """The fused ``(B, fusion_dim, grid, grid)`` map (concat of the branches, 1x1 conv)."""
        return self.fuse(torch.cat(list(self.forward_branches(x).values()), dim=1))

    def forward_refined(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The refined map and the attention maps (``{}`` without refinement)."""
        fused = self.forward_fusion(x)
        if self.refine is None:
            return fused, {}
        return self.refine.forward_maps(fused)

    # -- timm convention -----------------------------------------------------------------------------------------
    def forward_features(self, x: Tensor) -> Tensor:
        """Pre-logit ``(B, hidden_dim)`` features of the residual multiscale classifier."""
        return self.classifier(self.forward_refined(x)[0])

    def forward_head(self, z: Tensor, pre_logits: bool = False) -> dict[str, Tensor] | Tensor:
        z = self.head_drop(z)
        if pre_logits:
            return z
        out = {"subtype": self.subtype_head(z), "malignant": self.malignant_head(z)}
        if self.shape_head is not None:
            out["shape"] = self.shape_head(z)
        return out

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.forward_head(self.forward_features(x))  # type: ignore[return-value]
