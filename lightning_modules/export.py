"""Inference-only composition of trained stages (no training): what ``usnodule embeddings`` and
``usnodule predict`` run, kept here so that the command shims in ``stages/`` need not import each other."""

from __future__ import annotations

from typing import TYPE_CHECKING

import lightning.pytorch as L
from torch import Tensor

if TYPE_CHECKING:  # the stages import timm: not needed to build the command-line parser
    from lightning_modules.maskcnn_stage import MaskCNNStage
    from lightning_modules.vit_stage import ViTStage


class EmbeddingExport(L.LightningModule):
    """Both STACT-Time encoders side by side; ``predict_step`` returns per-stack embeddings and probabilities.

    Batch: ``{"image": (B,3,h,w), "mask": (B,3,h',w'), "nodule": (B,), "stack": (B,)}``
    (:class:`datamodules.stacks.PairedStackDataset`).
    """

    def __init__(self, vit: ViTStage, maskcnn: MaskCNNStage) -> None:
        super().__init__()
        self.vit, self.maskcnn = vit, maskcnn

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        image = self.vit.net.forward_features(batch["image"])
        seg = self.maskcnn.net.forward_features(batch["mask"])
        return {
            "nodule": batch["nodule"], "stack": batch["stack"], "image": image, "seg": seg,
            "image_prob": self.vit.malignant_prob(self.vit.net.forward_head(image)),
            "seg_prob": self.maskcnn.malignant_prob(self.maskcnn.net.forward_head(seg)),
        }
