"""Shared step and metric code of the classification stages (ViT, mask CNN, attention head).

``ClassifierStage`` subclasses implement ``logits(batch) -> (B, 2)`` (and usually ``predict_step``); this base
gives the focal loss (STACT-Time sec. 2.5), stack-level metrics (Table 3 "Frame" columns) and nodule-level
metrics (Tables 2-4): a nodule's probability is the mean of its stack probabilities (CineCNN-AvePool style);
for the attention head every sample is already one nodule, so the mean is over one value.

Optimizers and schedulers come from the LightningCLI ``optimizer:`` / ``lr_scheduler:`` keys of the YAML, so no
stage defines ``configure_optimizers``. Frozen parameters (``requires_grad=False``) never get a gradient, and
torch optimizers skip parameters whose ``grad`` is None, so handing them ``model.parameters()`` is safe.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import BinaryAccuracy
from torchmetrics.functional.classification import (
    binary_accuracy,
    binary_auroc,
    binary_f1_score,
    binary_precision,
    binary_recall,
    binary_specificity,
)
from torchmetrics.utilities import dim_zero_cat

from datamodules.errors import DataError
from lightning_modules import wandb_media
from lightning_modules.losses import FocalLoss, focal_loss

# Batch keys copied unchanged into predict_step outputs when present (what a prediction writer needs).
PASSTHROUGH_KEYS = ("nodule", "stack", "label", "index")


def nodule_scores(nodule: Tensor, prob: Tensor, label: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Group per-stack rows by nodule: (unique nodule ids, mean probability, label) sorted by id."""
    ids, inverse = torch.unique(nodule, return_inverse=True)
    count = torch.zeros(len(ids), dtype=prob.dtype, device=prob.device).index_add_(
        0, inverse, torch.ones_like(prob)
    )
    mean = torch.zeros(len(ids), dtype=prob.dtype, device=prob.device).index_add_(0, inverse, prob) / count
    lab = torch.zeros(len(ids), dtype=label.dtype, device=label.device).scatter_(0, inverse, label)
    return ids, mean, lab


def first_per_key(nodule: Tensor, stack: Tensor) -> Tensor:
    """Row indices to keep: the first row of each (nodule, stack >= 0) pair, and every row with stack < 0.

    Repeated (nodule, stack) rows (DistributedSampler padding) carry the same probability, so dropping them
    makes the nodule mean exact; rows without a stack id (-1) are kept (repeats of a whole nodule do not move
    its mean anyway).
    """
    rows = torch.arange(len(nodule), device=nodule.device)
    has = stack >= 0
    if not bool(has.any()):
        return rows
    pairs = torch.stack([nodule[has], stack[has]], 1)
    _, inverse = torch.unique(pairs, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), len(nodule), dtype=torch.long, device=nodule.device)
    first = first.scatter_reduce(0, inverse, rows[has], reduce="amin")
    return torch.cat([first, rows[~has]]).sort().values


class NoduleMetrics(Metric):
    """Nodule-level (and optionally stack-level) binary metrics and the loss from per-stack rows.

    A nodule's probability is the mean of its stack probabilities. States are concatenated across DDP ranks by
    torchmetrics before ``compute``, so a nodule whose stacks went to different ranks is still averaged whole,
    and repeated (nodule, stack) rows -- DistributedSampler pads the last batch of a rank by repeating samples --
    are counted once. So every number equals the single-process one, which stateful torchmetrics classes
    (``BinaryAUROC`` ...) fed per batch would not give under padding.
    AUROC is NaN when the epoch holds only one class (undefined; ModelCheckpoint treats NaN as worst).

    ``compute`` returns ``acc, precision, recall, specificity, f1, auroc`` (nodule level), with
    ``stack_level=True`` also ``stack_<same>``, and ``loss`` (mean per-sample loss) when losses were given.
    The last computed nodule scores stay in :attr:`scores` (``nodule``, ``prob``, ``label``; gathered from all
    ranks) for the W&B ROC curve and prediction table.
    """

    full_state_update = False

    def __init__(self, threshold: float = 0.5, stack_level: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold
        self.stack_level = stack_level
        self.scores: dict[str, Tensor] = {}
        for name in ("nodule", "prob", "label", "stack", "loss"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, nodule: Tensor, prob: Tensor, label: Tensor, stack: Tensor | None = None,
               loss: Tensor | None = None) -> None:
        """``stack`` (position of the stack in its nodule), when given, lets ``compute`` drop repeated
        (nodule, stack) rows; ``loss`` is the per-sample loss (NaN when not given)."""
        nodule = nodule.detach().long().flatten()
        self.nodule.append(nodule)
        self.prob.append(prob.detach().float().flatten())
        self.label.append(label.detach().long().flatten())
        self.stack.append(torch.full_like(nodule, -1) if stack is None else stack.detach().long().flatten())
        self.loss.append(torch.full_like(nodule, float("nan"), dtype=torch.float) if loss is None
                         else loss.detach().float().flatten())

    def _binary(self, p: Tensor, y: Tensor) -> dict[str, Tensor]:
        t = self.threshold
        auroc = binary_auroc(p, y) if y.min() != y.max() else torch.tensor(float("nan"), device=p.device)
        return {
            "acc": binary_accuracy(p, y, threshold=t),
            "precision": binary_precision(p, y, threshold=t),
            "recall": binary_recall(p, y, threshold=t),
            "specificity": binary_specificity(p, y, threshold=t),
            "f1": binary_f1_score(p, y, threshold=t),
            "auroc": auroc,
        }

    def compute(self) -> dict[str, Tensor]:
        nodule, prob = dim_zero_cat(self.nodule), dim_zero_cat(self.prob)
        label, stack, loss = dim_zero_cat(self.label), dim_zero_cat(self.stack), dim_zero_cat(self.loss)
        keep = first_per_key(nodule, stack)
        ids, p, y = nodule_scores(nodule[keep], prob[keep], label[keep])
        self.scores = {"nodule": ids, "prob": p, "label": y}
        out = self._binary(p, y)
        if self.stack_level:
            out.update({f"stack_{k}": v for k, v in self._binary(prob[keep], label[keep]).items()})
        if not bool(loss[keep].isnan().all()):
            out["loss"] = loss[keep].nanmean()
        return out


class ClassifierStage(L.LightningModule):
    """Base of the 2-class stages: focal loss, stack- and nodule-level metrics, shared steps.

    ``stack_level=False`` (attention head) skips the stack-level metrics because each sample is a nodule.
    Logged keys: ``{train,val,test}/loss``, ``train/acc``, ``{val,test}/stack_{acc,...,auroc}``,
    ``{val,test}/nodule_{acc,precision,recall,specificity,f1,auroc}``. Validation and test numbers come from
    :class:`NoduleMetrics` (rows gathered from every DDP rank, sampler padding counted once), so they equal a
    single-process run. With a W&B logger, the end of validation/test also logs a ROC curve, a confusion matrix
    and the per-nodule predictions, and the first validation batch a few samples (:meth:`log_samples`).
    """

    def __init__(self, *, focal_alpha: float | None, focal_gamma: float, stack_level: bool = True) -> None:
        super().__init__()
        self.loss_fn = FocalLoss(focal_alpha, focal_gamma)
        self.stack_level = stack_level
        self.train_acc = BinaryAccuracy()
        self.val_nodule = NoduleMetrics(stack_level=stack_level)
        self.test_nodule = NoduleMetrics(stack_level=stack_level)

    # -- to implement ------------------------------------------------------------------------------------------
    def logits(self, batch: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def log_samples(self, run: Any, batch: dict[str, Tensor], prob: Tensor) -> None:
        """Log a few samples of the first validation batch to the W&B ``run`` (rank 0 only): the input stacks
        (ROI crops for the ViT, predicted masks for the mask CNN). Subclasses log what suits them."""
        if batch.get("image") is not None and batch["image"].dim() == 4:
            wandb_media.log_stacks(run, "val/samples", batch, prob, self.global_step)

    # -- shared steps --------------------------------------------------------------------------------------------
    @staticmethod
    def malignant_prob(logits: Tensor) -> Tensor:
        """Softmax probability of class 1 (malignant)."""
        return logits.float().softmax(dim=-1)[:, 1]

    def _shared(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(mean loss, per-sample loss, malignant probability, label)."""
        logits = self.logits(batch)
        label = batch["label"].long()
        per_sample = focal_loss(logits, label, self.loss_fn.alpha, self.loss_fn.gamma, reduction="none")
        return per_sample.mean(), per_sample, self.malignant_prob(logits), label

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, _, prob, label = self._shared(batch)
        self.train_acc(prob, label)
        bs = len(label)
        # sync_dist: the epoch value is the mean over all ranks, not rank 0's share (one small all-reduce a step).
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=bs, sync_dist=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=bs)
        return loss

    def _eval_step(self, batch: dict[str, Tensor], stage: str, batch_idx: int) -> Tensor:
        loss, per_sample, prob, label = self._shared(batch)
        stack = batch.get("stack")
        if stack is None and not self.stack_level:  # one sample per nodule: the nodule id is the sample key
            stack = torch.zeros_like(batch["nodule"])
        metric = self.val_nodule if stage == "val" else self.test_nodule
        metric.update(batch["nodule"], prob, label, stack, per_sample)
        if stage == "val" and batch_idx == 0 and (run := wandb_media.wandb_run(self)) is not None:
            self.log_samples(run, batch, prob)
        return loss

    def _log_nodule(self, stage: str) -> None:
        metric = self.val_nodule if stage == "val" else self.test_nodule
        if not metric.update_called:  # e.g. sanity check disabled and no batches
            return
        values = metric.compute()  # collective under DDP: every rank calls it
        logged = {f"{stage}/{k}" if k == "loss" or k.startswith("stack_") else f"{stage}/nodule_{k}": v
                  for k, v in values.items()}
        if f"{stage}/loss" in logged:
            self.log(f"{stage}/loss", logged.pop(f"{stage}/loss"), prog_bar=True)
        self.log_dict(logged, prog_bar=False)
        if (run := wandb_media.wandb_run(self)) is not None:
            s = metric.scores
            wandb_media.log_classification(run, stage, wandb_media.nodule_names(self, stage, s["nodule"]),
                                           s["prob"], s["label"], self.global_step, threshold=metric.threshold)
        metric.reset()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._eval_step(batch, "val", batch_idx)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._eval_step(batch, "test", batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_nodule("val")

    def on_test_epoch_end(self) -> None:
        self._log_nodule("test")

    def passthrough(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The batch's bookkeeping keys (nodule, stack, label, index) for predict outputs."""
        return {k: batch[k] for k in PASSTHROUGH_KEYS if k in batch}


class StackStage(ClassifierStage):
    """A stack classifier whose ``net`` maps (B, 3, h, w) -> logits and has ``embed`` (the 256-d last hidden
    layer) and ``fc2`` (the classifier on it): the ViT and mask-CNN stages."""

    def forward(self, image: Tensor) -> Tensor:
        return self.net(image)

    def logits(self, batch: dict[str, Tensor]) -> Tensor:
        return self.net(batch["image"])

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """{"embedding": (B,256), "prob": (B,) malignant probability, + nodule/stack/label/index from the batch}."""
        emb = self.net.embed(batch["image"])
        prob = self.malignant_prob(self.net.fc2(emb))
        return {**self.passthrough(batch), "embedding": emb, "prob": prob}


def load_for_inference(cls: type[L.LightningModule], path: str | Path, **overrides: Any) -> L.LightningModule:
    """Rebuild a stage from its Lightning checkpoint for prediction, without fetching initial weights again.

    The trained weights come from the checkpoint, so the init args that built the starting point
    (``pretrained``, ``checkpoint_path``) are switched off: ``cls.load_from_checkpoint`` would download / re-read
    them, and cannot take ``checkpoint_path=`` (its own first parameter). Works for every stage (SegStage too).
    Returns the model on CPU in eval mode.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        hparams, state = dict(ckpt.get("hyper_parameters", {})), ckpt["state_dict"]
    except Exception as e:  # not a Lightning checkpoint: one line, not a traceback
        raise DataError(path, f"not a Lightning checkpoint ({e.__class__.__name__}: {e})") from None
    params = inspect.signature(cls.__init__).parameters
    args = {k: v for k, v in hparams.items() if k in params}  # drops LightningCLI's _class_path etc.
    off = {"pretrained": False, "checkpoint_path": None}
    args.update({k: v for k, v in off.items() if k in params})
    model = cls(**{**args, **overrides})
    model.load_state_dict(state)
    return model.eval()
