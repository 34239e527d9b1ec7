"""Stage 1 of STACT-Time: fine-tune the image encoder on 3-stack frame instances (sec. 2.3, 2.5; Table 3).

Paper config (``conf/vit.yaml``): ImageNet ViT, only the last two fully connected layers train, focal loss
alpha 0.9 / gamma 2.4, SGD lr 1e-4 momentum 0.9, CosineAnnealingLR, 100 epochs.
Batch: {"image": (B,3,h,w), "label": (B,), "nodule": (B,), "stack": (B,)}, or during a fit with the feature
cache {"features": (B, D) the frozen backbone's pooled features, ...} in place of the image.

Frozen backbone, computed once (issue 14, item 1): with ``freeze_backbone`` and crops that never change (no
augmentation, the paper's setting) the backbone gives the same features every epoch, ~99% of the compute of
an epoch.  ``feature_cache: true`` (default) computes them once per fold and part into
``<default_root_dir>/feature_cache/`` and trains the two layers on them
(:class:`~lightning_modules.feature_cache.FrozenFeatureCache`); ``false`` runs the backbone every step.  The
trained weights are the uncached path's within float tolerance (``tests/test_feature_cache.py``); figures in
BENCHMARKS.md ("Frozen backbone, computed once").
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_modules.classifier import StackStage
from lightning_modules.feature_cache import FrozenFeatureCache
from lightning_modules.nets.vit_stack import StackClassifier


class ViTStage(StackStage):
    """LightningModule around :class:`StackClassifier`; ``predict_step`` gives 256-d stack embeddings.

    ``checkpoint_path``: a local backbone weights file (offline alternative to ``pretrained``). To reload a
    trained stage use :meth:`~lightning_modules.base.BaseStage.from_checkpoint` (``load_from_checkpoint``
    would fetch the starting weights again, and cannot override ``checkpoint_path``: its own first parameter).
    ``backbone`` is any timm name (Table 3
    also compares ``mobilenetv2_100``; leave ``img_size`` null for CNNs). With ``freeze_backbone`` the backbone
    stays in eval mode, so Lightning's "modules in eval mode at the start of training" warning is expected.
    ``feature_cache``: with a frozen backbone, train on its features computed once (module docstring).
    """

    def __init__(
        self,
        backbone: str = "vit_base_patch16_224",
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        img_size: int | None = None,
        hidden_dim: int = 256,
        activation: str = "gelu",
        dropout: float = 0.0,
        freeze_backbone: bool = True,
        backbone_kwargs: dict[str, Any] | None = None,
        focal_alpha: float | None = 0.9,
        focal_gamma: float = 2.4,
        feature_cache: bool = True,
    ) -> None:
        super().__init__(focal_alpha=focal_alpha, focal_gamma=focal_gamma)
        self.save_hyperparameters()
        self.net = self.build_net(StackClassifier)

    def configure_callbacks(self) -> list:
        if not (self.hparams.feature_cache and self.hparams.freeze_backbone):
            return []
        hp = self.hparams
        keys = ("backbone", "img_size", "backbone_kwargs")  # what shapes the backbone besides its weights
        return [FrozenFeatureCache({k: hp.get(k) for k in keys})]

    def check_batch(self, batch: dict[str, Tensor]) -> None:
        if "features" in batch:  # a cached-feature batch stands for an image batch
            batch = {"image": batch["features"], **batch}
        super().check_batch(batch)

    def logits(self, batch: dict[str, Tensor]) -> Tensor:
        if "features" in batch:
            return self.net.forward_head(self.net.forward_hidden(batch["features"]))
        return self.net(batch["image"])

    def input_size(self, data: dict | None = None) -> int:
        """Input side the image encoder was trained at: the training data's ``img_size`` (``data``: the data
        settings from :meth:`from_checkpoint`; what a CNN, which takes no ``img_size`` itself, saw), else the
        stage's ``img_size``, else timm's pretrained config."""
        if data and data.get("img_size"):
            return int(data["img_size"])
        if self.hparams.get("img_size"):
            return int(self.hparams["img_size"])
        size = getattr(self.net.backbone, "pretrained_cfg", {}).get("input_size", (3, 224, 224))
        return int(size[-1])
