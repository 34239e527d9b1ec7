"""Stage 2 of STACT-Time: fine-tune MSU-Net on frames + nodule masks (sec. 2.3, 2.5: 50 epochs from a checkpoint).

Loss: ``SegLoss`` (weighted Dice + BCE (+ focal)); metrics: Dice and IoU over all pixels of the epoch
(pixel F1 = Dice 2TP / (2TP + FP + FN), Jaccard TP / (TP + FP + FN), as torchmetrics' ``BinaryF1Score`` /
``BinaryJaccardIndex`` define them) at threshold 0.5 on the sigmoid probability. :class:`PixelOverlap` keeps
per-frame counts keyed by (nodule, frame), so under DDP a frame repeated by DistributedSampler padding counts
once and the numbers equal a single-process run (the loss terms are batch means averaged over ranks).
With a W&B logger, the first validation batch is logged as predicted / true mask overlays.
Batch: {"image": (B,1,H,W) float, "mask": (B,1,H,W) float in {0,1}}.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from datamodules.errors import DataError
from lightning_modules import wandb_media
from lightning_modules.base import BaseStage, first_per_key
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


class PixelOverlap(Metric):
    """Dice and IoU over all pixels of the epoch from per-frame (TP, FP, FN) counts.

    Rows are keyed by (nodule, frame) when the batch has them; repeated keys (DistributedSampler padding) count
    once after the ranks' states are concatenated. Without keys every row counts. 0 when there is no positive
    pixel at all (torchmetrics' zero_division default).

    Kept by hand, not torchmetrics' ``BinaryF1Score`` / ``BinaryJaccardIndex`` (or ``segmentation.DiceScore``
    with global aggregation): the same functions of the pooled counts (tests/test_overlap_metrics.py compares
    them on random masks, empty ones included), but their states are the summed counts, so a frame that
    DistributedSampler repeats to pad a rank would count twice and the DDP numbers would differ from one process.
    """

    full_state_update = False

    def __init__(self, threshold: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold
        for name in ("nodule", "frame", "counts"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(
        self, prob: Tensor, target: Tensor, nodule: Tensor | None = None, frame: Tensor | None = None
    ) -> None:
        pred, true = prob.detach().flatten(1) > self.threshold, target.detach().flatten(1).bool()
        counts = torch.stack([(pred & true).sum(1), (pred & ~true).sum(1), (~pred & true).sum(1)], 1)
        self.counts.append(counts.long())
        missing = torch.full((len(counts),), -1, dtype=torch.long, device=counts.device)
        self.nodule.append(missing if nodule is None else nodule.detach().long().flatten())
        self.frame.append(missing if frame is None else frame.detach().long().flatten())

    def compute(self) -> dict[str, Tensor]:
        counts = dim_zero_cat(self.counts)
        tp, fp, fn = (
            counts[first_per_key(dim_zero_cat(self.nodule), dim_zero_cat(self.frame))].sum(0).double()
        )
        dice = 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn > 0 else tp * 0
        iou = tp / (tp + fp + fn) if tp + fp + fn > 0 else tp * 0
        return {"dice": dice.float(), "iou": iou.float()}


class SegStage(BaseStage):
    """LightningModule around :class:`MSUNet`; ``predict_step`` returns mask probabilities.

    ``checkpoint_path``: MSU-Net weights to fine-tune from (plain state dict or a SegStage checkpoint). Reload a
    trained stage with ``SegStage.from_checkpoint(path)``, which switches ``checkpoint_path`` off
    (``load_from_checkpoint`` cannot: its own first parameter has that name).
    """

    batch_keys = ("image", "mask")

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
        self.net = self.build_net(MSUNet, in_channels=1, out_channels=1)
        if checkpoint_path is not None:
            load_msunet_weights(self.net, checkpoint_path)
        self.loss_fn = SegLoss(dice_weight, bce_weight, focal_weight, focal_alpha, focal_gamma)
        self.val_metrics = PixelOverlap(threshold)
        self.test_metrics = PixelOverlap(threshold)

    def forward(self, image: Tensor) -> Tensor:
        return self.net(image)

    def _step(self, batch: dict[str, Tensor], stage: str, batch_idx: int = 0) -> Tensor:
        self.check_batch(batch)
        logits = self.net(batch["image"])
        target = batch["mask"].float()
        terms = self.loss_fn.terms(logits, target)
        loss = self.loss_fn.combine(terms)
        bs = len(logits)
        # sync_dist: epoch values are means over all DDP ranks (train too: not rank 0's share alone).
        self.log(
            f"{stage}/loss",
            loss,
            prog_bar=True,
            on_step=stage == "train",
            on_epoch=True,
            batch_size=bs,
            sync_dist=True,
        )
        for k, v in terms.items():
            self.log(f"{stage}/loss_{k}", v, on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)
        if stage != "train":
            prob = torch.sigmoid(logits)
            metrics = self.val_metrics if stage == "val" else self.test_metrics
            metrics.update(prob, target, batch.get("nodule"), batch.get("frame"))
            if stage == "val" and batch_idx == 0 and (run := wandb_media.wandb_run(self)) is not None:
                names = wandb_media.nodule_names(self, "val", batch["nodule"]) if "nodule" in batch else None
                captions = (
                    None
                    if names is None
                    else [
                        f"{n} frame {int(f)}"
                        for n, f in zip(names, batch.get("frame", batch["nodule"]), strict=True)
                    ]
                )
                wandb_media.log_mask_overlays(
                    run,
                    "val/masks",
                    batch["image"],
                    prob > self.hparams.threshold,
                    target,
                    self.global_step,
                    captions=captions,
                )
        return loss

    def _log_overlap(self, stage: str) -> None:
        metric = self.val_metrics if stage == "val" else self.test_metrics
        if metric.update_called:
            self.log_dict({f"{stage}/{k}": v for k, v in metric.compute().items()})  # collective under DDP
            metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_overlap("val")

    def on_test_epoch_end(self) -> None:
        self._log_overlap("test")

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "val", batch_idx)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "test", batch_idx)

    def predict_step(
        self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, Tensor]:
        """{"prob": (B,1,H,W) sigmoid mask probability, + "index"/"nodule"/"frame" when the batch has them}."""
        out = {k: batch[k] for k in ("index", "nodule", "frame") if k in batch}
        out["prob"] = torch.sigmoid(self.net(batch["image"]))
        return out
