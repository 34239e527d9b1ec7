"""Stage 2 of STACT-Time: fine-tune MSU-Net on frames + nodule masks (sec. 2.3, 2.5: 50 epochs from a checkpoint).

Loss: ``SegLoss`` (weighted Dice + BCE (+ focal)); metrics: Dice and IoU over all pixels of the epoch
(torchmetrics ``BinaryF1Score`` -- pixel F1 is exactly Dice 2TP / (2TP + FP + FN) -- and
``BinaryJaccardIndex``), at threshold 0.5 on the sigmoid probability.
Batch: {"image": (B,1,H,W) float, "mask": (B,1,H,W) float in {0,1}}.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as L
import torch
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryF1Score, BinaryJaccardIndex

from datamodules.errors import DataError
from lightning_modules.losses import SegLoss
from lightning_modules.nets.msunet import MSUNet


def load_msunet_weights(net: MSUNet, path: str | Path) -> None:
    """Load MSU-Net weights from a plain state dict or a ``SegStage`` Lightning checkpoint (keys ``net.*``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "MSU-Net checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # corrupt/unknown file: one line, not a traceback
        raise DataError(path, f"cannot read checkpoint ({e.__class__.__name__})") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise DataError(path, "no state dict in checkpoint")
    if any(k.startswith("net.") for k in state):
        state = {k[4:]: v for k, v in state.items() if k.startswith("net.")}
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise DataError(path, f"weights do not fit this MSU-Net: {str(e).splitlines()[0]}") from None


class SegStage(L.LightningModule):
    """LightningModule around :class:`MSUNet`; ``predict_step`` returns mask probabilities.

    ``checkpoint_path``: MSU-Net weights to fine-tune from (plain state dict or a SegStage checkpoint). Reload a
    trained stage with ``load_for_inference(SegStage, path)``, which switches ``checkpoint_path`` off
    (``load_from_checkpoint`` cannot: its own first parameter has that name).
    """

    def __init__(
        self,
        base: int = 32,
        depth: int = 5,
        checkpoint_path: str | None = None,
        dice_weight: float = 1.0,
        bce_weight: float = 1.0,
        focal_weight: float = 0.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        threshold: float = 0.5,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = MSUNet(in_channels=1, out_channels=1, base=base, depth=depth)
        if checkpoint_path is not None:
            load_msunet_weights(self.net, checkpoint_path)
        self.loss_fn = SegLoss(dice_weight, bce_weight, focal_weight, focal_alpha, focal_gamma)
        metrics = MetricCollection(
            {"dice": BinaryF1Score(threshold=threshold), "iou": BinaryJaccardIndex(threshold=threshold)}
        )
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    def forward(self, image: Tensor) -> Tensor:
        return self.net(image)

    def _step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        logits = self.net(batch["image"])
        target = batch["mask"].float()
        terms = self.loss_fn.terms(logits, target)
        loss = self.loss_fn.combine(terms)
        bs = len(logits)
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=stage == "train", on_epoch=True, batch_size=bs,
                 sync_dist=stage != "train")
        for k, v in terms.items():
            self.log(f"{stage}/loss_{k}", v, on_step=False, on_epoch=True, batch_size=bs, sync_dist=stage != "train")
        if stage != "train":
            metrics = self.val_metrics if stage == "val" else self.test_metrics
            metrics.update(torch.sigmoid(logits), target.long())
            self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=bs)
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """{"prob": (B,1,H,W) sigmoid mask probability, + "index"/"nodule"/"frame" when the batch has them}."""
        out = {k: batch[k] for k in ("index", "nodule", "frame") if k in batch}
        out["prob"] = torch.sigmoid(self.net(batch["image"]))
        return out
