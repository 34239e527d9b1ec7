"""Shared step and metric code of the classification stages (ViT, mask CNN, attention head).

``ClassifierStage`` subclasses implement ``logits(batch) -> (B, 2)`` (and usually ``predict_step``); this base
gives the focal loss (STACT-Time sec. 2.5), stack-level metrics (Table 3 "Frame" columns) and nodule-level
metrics (Tables 2-4; the case level of :class:`~lightning_modules.base.CaseMetrics`): a nodule's probability
is the mean of its stack probabilities (CineCNN-AvePool style); for the attention head every sample is already
one nodule, so the mean is over one value (over its views, with cross-fitted embeddings: datamodules/embeddings.py).

Optimizers and schedulers come from the LightningCLI ``optimizer:`` / ``lr_scheduler:`` keys of the YAML, so no
stage defines ``configure_optimizers``. Frozen parameters (``requires_grad=False``) never get a gradient, and
torch optimizers skip parameters whose ``grad`` is None, so handing them ``model.parameters()`` is safe.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics.classification import BinaryAccuracy

from lightning_modules import wandb_media
from lightning_modules.base import BaseStage, CaseMetrics
from lightning_modules.losses import FocalLoss, focal_loss


class ClassifierStage(BaseStage):
    """Base of the 2-class STACT-Time stages: focal loss, stack- and nodule-level metrics, shared steps.

    ``stack_level=False`` (attention head) skips the stack-level metrics because each sample is a nodule.
    Logged keys (the :class:`~lightning_modules.base.BaseStage` convention, the case being the nodule):
    ``{train,val,test}/loss``, ``train/acc``, ``{val,test}/stack_{acc,...,auroc}``,
    ``{val,test}/{acc,precision,recall,specificity,f1,auroc}``. Validation and test numbers come from
    :class:`~lightning_modules.base.CaseMetrics` (rows gathered from every DDP rank, sampler padding counted
    once), so they equal a single-process run. With a W&B logger, the end of validation/test also logs a ROC
    curve, a confusion matrix and the per-nodule predictions, and the first validation batch a few samples
    (:meth:`log_samples`).
    """

    def __init__(self, *, focal_alpha: float | None, focal_gamma: float, stack_level: bool = True) -> None:
        super().__init__()
        self.loss_fn = FocalLoss(focal_alpha, focal_gamma)
        self.stack_level = stack_level
        self.train_acc = BinaryAccuracy()
        self.val_nodule = CaseMetrics(stack_level=stack_level)
        self.test_nodule = CaseMetrics(stack_level=stack_level)

    # -- to implement ------------------------------------------------------------------------------------------
    def logits(self, batch: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def log_samples(self, run: Any, batch: dict[str, Tensor], prob: Tensor) -> None:
        """Log a few samples of the first validation batch to the W&B ``run`` (rank 0 only): the input stacks
        (ROI crops for the ViT, predicted masks for the mask CNN). Subclasses log what suits them."""
        if batch.get("image") is not None and batch["image"].dim() == 4:
            wandb_media.log_stacks(run, "val/samples", batch, prob, self.global_step)

    # -- shared steps --------------------------------------------------------------------------------------------
    def _shared(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(mean loss, per-sample loss, malignant probability, label)."""
        self.check_batch(batch)
        logits = self.logits(batch)
        label = batch["label"].long()
        per_sample = focal_loss(logits, label, self.loss_fn.alpha, self.loss_fn.gamma, reduction="none")
        return per_sample.mean(), per_sample, self.malignant_prob(logits), label

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, _, prob, label = self._shared(batch)
        self.train_acc(prob, label)
        bs = len(label)
        # sync_dist: the epoch value is the mean over all ranks, not rank 0's share (one small all-reduce a step).
        self.log(
            "train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=bs, sync_dist=True
        )
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=bs)
        return loss

    def _eval_step(self, batch: dict[str, Tensor], stage: str, batch_idx: int) -> Tensor:
        loss, per_sample, prob, label = self._shared(batch)
        stack = batch.get("stack")
        if stack is None and not self.stack_level:
            # one sample per nodule view (one view unless cross-fitted): (nodule, view) is the sample key, so a
            # nodule's probability is the mean over its views and a view repeated by DDP padding counts once
            stack = batch.get("view", torch.zeros_like(batch["nodule"]))
        metric = self.val_nodule if stage == "val" else self.test_nodule
        metric.update(batch["nodule"], prob, label, stack, per_sample)
        if stage == "val" and batch_idx == 0 and (run := wandb_media.wandb_run(self)) is not None:
            self.log_samples(run, batch, prob)
        return loss

    def _log_nodule(self, stage: str) -> None:
        self.log_case_metrics(stage, self.val_nodule if stage == "val" else self.test_nodule)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._eval_step(batch, "val", batch_idx)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._eval_step(batch, "test", batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_nodule("val")

    def on_test_epoch_end(self) -> None:
        self._log_nodule("test")


class StackStage(ClassifierStage):
    """A stack classifier whose ``net`` maps (B, 3, h, w) -> logits and has ``forward_features`` (the 256-d
    last hidden layer) and ``forward_head`` (the classifier on it): the ViT and mask-CNN stages."""

    batch_keys = ("image", "label")

    def forward(self, image: Tensor) -> Tensor:
        return self.net(image)

    def logits(self, batch: dict[str, Tensor]) -> Tensor:
        return self.net(batch["image"])

    def predict_step(
        self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, Tensor]:
        """{"embedding": (B,256), "prob": (B,) malignant probability, + nodule/stack/label/index from the batch}."""
        emb = self.net.forward_features(batch["image"])
        prob = self.malignant_prob(self.net.forward_head(emb))
        return {**self.passthrough(batch), "embedding": emb, "prob": prob}
