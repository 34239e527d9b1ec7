"""Stage 1 of the two-stage framework: TransUNet segmentation of still images, Dice + CE (Abdelrazik et al. 2025).

The summary names TransUNet and "Dice + CE"; the weights and the Dice form are TransUNet's own code
(``trainer_synapse``: ``0.5 * CE + 0.5 * Dice``, Dice on softmax probabilities with squared sums, averaged over
the classes, smooth 1e-5, over the whole batch): :func:`dice_ce_loss`, written by hand because neither timm
nor torchmetrics has this loss (MONAI's ``DiceCELoss`` is the library version, not a dependency here).
Metrics: Dice and IoU of the nodule class over all pixels of the epoch (:class:`~lightning_modules.seg_stage.
PixelOverlap`, the MSU-Net stage's), logged as ``{val,test}/dice``, ``/iou``; ``val/dice`` is the checkpoint
monitor.  Batch (:class:`~datamodules.still_data.StillDataModule`, ``roi: null``):
``{"image": (B,C,S,S), "mask": (B,1,S,S) {0,1}, "index": (B,)}``.

The paper is silent on the optimiser, schedule, input size and augmentation: the configs use TransUNet's
(SGD 0.01, momentum 0.9, weight decay 1e-4, polynomial decay, 224 px) at paper size, ``conf/transunet.yaml``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_modules.base import BaseStage
from lightning_modules.nets.transunet import TransUNet
from lightning_modules.seg_stage import PixelOverlap


def soft_dice_loss(prob: Tensor, onehot: Tensor, smooth: float = 1e-5) -> Tensor:
    """TransUNet's Dice loss: mean over classes c of ``1 - (2 sum p_c t_c + s) / (sum p_c^2 + sum t_c^2 + s)``,
    sums over the batch and all pixels; ``prob``, ``onehot``: (B, K, H, W)."""
    dims = (0, 2, 3)
    inter = (prob * onehot).sum(dims)
    denom = (prob * prob).sum(dims) + (onehot * onehot).sum(dims)
    return (1 - (2 * inter + smooth) / (denom + smooth)).mean()


def dice_ce_loss(
    logits: Tensor, mask: Tensor, *, ce_weight: float = 0.5, dice_weight: float = 0.5
) -> dict[str, Tensor]:
    """``{"loss", "ce", "dice"}``: ``ce_weight * CE + dice_weight * Dice`` of (B, K, H, W) logits against a
    (B, 1, H, W) or (B, H, W) mask of class indices (0 background, 1 nodule)."""
    target = mask.long().reshape(logits.shape[0], *logits.shape[-2:])
    ce = F.cross_entropy(logits.float(), target)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).float()
    dice = soft_dice_loss(logits.float().softmax(1), onehot)
    return {"loss": ce_weight * ce + dice_weight * dice, "ce": ce, "dice": dice}


class TransUNetStage(BaseStage):
    """LightningModule around :class:`~lightning_modules.nets.transunet.TransUNet`.

    ``predict_step`` returns the nodule probability (softmax of class 1) at the input size.  Reload with
    ``TransUNetStage.from_checkpoint(path)`` (switches ``pretrained`` / ``checkpoint_path`` off).
    """

    batch_keys = ("image", "mask")

    def __init__(
        self,
        backbone: str = "vit_base_r50_s16_224",
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        img_size: int = 224,
        in_chans: int = 3,
        head_channels: int = 512,
        decoder_channels: tuple[int, ...] | list[int] = (256, 128, 64, 16),
        hybrid: dict[str, Any] | None = None,
        ce_weight: float = 0.5,
        dice_weight: float = 0.5,
        threshold: float = 0.5,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = self.build_net(TransUNet, num_classes=2)
        self.val_metrics = PixelOverlap(threshold)
        self.test_metrics = PixelOverlap(threshold)

    def forward(self, image: Tensor) -> Tensor:
        return self.net(image)

    def nodule_prob(self, image: Tensor) -> Tensor:
        """(B, 1, H, W) probability of the nodule class."""
        return self.net(image).float().softmax(1)[:, 1:2]

    def _step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        self.check_batch(batch)
        logits = self.net(batch["image"])
        terms = dice_ce_loss(
            logits, batch["mask"], ce_weight=self.hparams.ce_weight, dice_weight=self.hparams.dice_weight
        )
        bs = len(logits)
        self.log(
            f"{stage}/loss",
            terms["loss"],
            prog_bar=True,
            on_step=stage == "train",
            on_epoch=True,
            batch_size=bs,
            sync_dist=True,
        )
        for k in ("ce", "dice"):
            self.log(
                f"{stage}/loss_{k}", terms[k], on_step=False, on_epoch=True, batch_size=bs, sync_dist=True
            )
        if stage != "train":
            metrics = self.val_metrics if stage == "val" else self.test_metrics
            prob = logits.float().softmax(1)[:, 1:2]
            index = batch.get("index")
            metrics.update(
                prob, batch["mask"].float(), index, None if index is None else torch.zeros_like(index)
            )
        return terms["loss"]

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    def _log_overlap(self, stage: str) -> None:
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        if metrics.update_called:
            self.log_dict({f"{stage}/{k}": v for k, v in metrics.compute().items()}, prog_bar=stage == "val")
            metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_overlap("val")

    def on_test_epoch_end(self) -> None:
        self._log_overlap("test")

    def predict_step(
        self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, Tensor]:
        """{"prob": (B,1,H,W) nodule probability, + "index" when the batch has it}."""
        out = {k: batch[k] for k in ("index",) if k in batch}
        out["prob"] = self.nodule_prob(batch["image"])
        return out
