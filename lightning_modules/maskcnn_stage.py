"""Stage 3 of STACT-Time: the 2-layer mask CNN on 3-stacks of predicted masks (sec. 2.3, Table 3 "Segmentation
Backbone"). Focal loss like stage 1 (the paper gives no separate values). Batch as the ViT stage, with
"image" holding the three masks.
"""

from __future__ import annotations

from lightning_modules.classifier import StackStage
from lightning_modules.nets.mask_cnn import MaskCNN


class MaskCNNStage(StackStage):
    """LightningModule around :class:`MaskCNN`; ``predict_step`` gives 256-d segmentation embeddings.

    ``channels``: widths of the two conv layers; ``pool_size``: side of the pooled grid before Linear(256).
    """

    def __init__(
        self,
        in_channels: int = 3,
        channels: tuple[int, int] = (16, 32),
        pool_size: int = 4,
        hidden_dim: int = 256,
        dropout: float = 0.0,
        focal_alpha: float | None = 0.9,
        focal_gamma: float = 2.4,
    ) -> None:
        super().__init__(focal_alpha=focal_alpha, focal_gamma=focal_gamma)
        self.save_hyperparameters()
        self.net = self.build_net(MaskCNN, channels=tuple(channels))
