"""Stage 2 of the two-stage framework: ROI crop -> ResNet-18 -> malignancy (Abdelrazik et al. 2025).

The crop is made by the data module (:class:`~datamodules.still_masks.TwoStageDataModule`): the box of the
fold's predicted TransUNet mask (``roi: predicted``, the deployable protocol: a new image has no drawn mask) or
of the drawn mask (``roi: annotated``, the switch), grown by ``roi_margin`` times the box's longer side, resized
to ``img_size``.  The paper gives neither the margin nor the loss: 10% (the data module's default) and
cross-entropy (:class:`~lightning_modules.classifier.ClassifierStage`'s focal loss with gamma 0; ``focal_alpha``
weights the malignant class) are ours.  Metrics are the case-level ``{val,test}/{acc, precision, recall,
specificity, f1, auroc}`` of :class:`~lightning_modules.base.CaseMetrics`, one image per case.

Batch: ``{"image": (B,3,S,S), "label": (B,), "index": (B,)}``; the case key is ``index`` (position in the part).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_modules.classifier import ClassifierStage
from lightning_modules.nets.roi_classifier import RoiClassifier


class RoiClassifierStage(ClassifierStage):
    """LightningModule around :class:`~lightning_modules.nets.roi_classifier.RoiClassifier`.

    ``predict_step``: ``{"prob": (B,) malignant probability, "embedding": pooled features, + index/label}``.
    Reload with :meth:`~lightning_modules.base.BaseStage.from_checkpoint`.  No ``img_size`` here: the data
    module's sets the crop size (a CNN takes any; a ViT backbone gets it through ``backbone_kwargs``).
    """

    batch_keys = ("image", "label", "index")

    def __init__(
        self,
        backbone: str = "resnet18",
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        in_chans: int = 3,
        dropout: float = 0.0,
        backbone_kwargs: dict[str, Any] | None = None,
        focal_alpha: float | None = None,
        focal_gamma: float = 0.0,
    ) -> None:
        super().__init__(focal_alpha=focal_alpha, focal_gamma=focal_gamma, stack_level=False)
        self.save_hyperparameters()
        self.net = self.build_net(RoiClassifier, num_classes=2)

    def forward(self, image: Tensor) -> Tensor:
        return self.net(image)

    def logits(self, batch: dict[str, Tensor]) -> Tensor:
        return self.net(batch["image"])

    def _eval_step(self, batch: dict[str, Tensor], stage: str, batch_idx: int) -> Tensor:
        return super()._eval_step({**batch, "nodule": batch["index"]}, stage, batch_idx)

    def predict_step(
        self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, Tensor]:
        emb = self.net.forward_features(batch["image"])
        prob = self.malignant_prob(self.net.forward_head(emb))
        return {**self.passthrough(batch), "embedding": emb, "prob": prob}
