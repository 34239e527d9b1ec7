"""Stage 2 of the two-stage framework (Abdelrazik et al. 2025): a ResNet-18 on the nodule ROI crop.

Any timm backbone (``resnet18``, the paper's; ``pretrained``/``checkpoint_path`` as every backbone here,
:func:`~lightning_modules.nets.vit_stack.create_backbone`) with its ImageNet classifier replaced by dropout +
one linear layer to ``num_classes`` logits.  The paper says "fed directly into a ResNet-18 classifier": a
single linear layer on the pooled features, no extra hidden layer, is our reading.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lightning_modules.nets.vit_stack import create_backbone


class RoiClassifier(nn.Module):
    """timm backbone -> pooled features -> dropout -> Linear -> (B, num_classes) logits.

    ``forward_features`` gives the pooled pre-logit features (timm's convention), ``forward_head`` the logits.
    """

    def __init__(
        self,
        *,
        backbone: str = "resnet18",
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        img_size: int | None = None,
        in_chans: int = 3,
        num_classes: int = 2,
        dropout: float = 0.0,
        backbone_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = create_backbone(
            backbone,
            pretrained=pretrained,
            checkpoint_path=checkpoint_path,
            img_size=img_size,
            in_chans=in_chans,
            **(backbone_kwargs or {}),
        )
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(self.backbone.num_features, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.dropout(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
