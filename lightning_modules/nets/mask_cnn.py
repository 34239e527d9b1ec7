"""Stage-3 segmentation encoder of STACT-Time (sec. 2.3, "Segmentation Encoder").

"3-stack segmentation instances were encoded using a 2-layer convolutional neural network (CNN) trained on
nodule malignancy labels ... 256 features from the last hidden layer were extracted." The paper gives no widths
or kernel sizes; we use two 3x3 conv + BN + ReLU + 2x2 max-pool layers (16 and 32 channels), an adaptive
average pool to a small grid (keeps coarse mask shape/position, which is all a binary mask carries), then
Linear(256) + ReLU (the embedding) and Linear(2).
"""

from __future__ import annotations

from torch import Tensor, nn


class MaskCNN(nn.Module):
    """(B, 3, h, w) stacks of predicted masks -> (B, num_classes) logits; ``forward_features`` ->
    (B, hidden_dim) pre-logit features, ``forward_head`` -> logits."""

    def __init__(
        self,
        *,
        in_channels: int = 3,
        channels: tuple[int, int] = (16, 32),
        pool_size: int = 4,
        hidden_dim: int = 256,
        num_classes: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        c1, c2 = channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1, bias=False),
            nn.BatchNorm2d(c1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1, bias=False),
            nn.BatchNorm2d(c2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(pool_size),
            nn.Flatten(),
        )
        self.fc1 = nn.Linear(c2 * pool_size * pool_size, hidden_dim)
        self.act = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_dim, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """The 256-d "last hidden layer" segmentation embedding: the pre-logit features."""
        return self.act(self.fc1(self.conv(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Logits from :meth:`forward_features` (``pre_logits``: the features after the head's dropout)."""
        x = self.dropout(x)
        return x if pre_logits else self.fc2(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
