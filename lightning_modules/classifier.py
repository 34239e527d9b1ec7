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
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryF1Score,
    BinaryPrecision,
    BinaryRecall,
    BinarySpecificity,
)
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
from lightning_modules.losses import FocalLoss

# Batch keys copied unchanged into predict_step outputs when present (what a prediction writer needs).
PASSTHROUGH_KEYS = ("nodule", "stack", "label", "index")


def stack_metrics(prefix: str) -> MetricCollection:
    """Stack-level (per-sample) binary metrics on the malignant probability, threshold 0.5."""
    return MetricCollection(
        {
            "acc": BinaryAccuracy(),
            "precision": BinaryPrecision(),
            "recall": BinaryRecall(),
            "specificity": BinarySpecificity(),
            "f1": BinaryF1Score(),
            "auroc": BinaryAUROC(),
        },
        prefix=prefix,
    )


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
    """Nodule-level binary metrics from per-stack (nodule id, probability, label) rows.

    A nodule's probability is the mean of its stack probabilities. States are concatenated across DDP ranks by
    torchmetrics before ``compute``, so a nodule whose stacks went to different ranks is still averaged whole.
    AUROC is NaN when the epoch holds only one class (undefined; ModelCheckpoint treats NaN as worst).
    """

    full_state_update = False

    def __init__(self, threshold: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold
        self.add_state("nodule", default=[], dist_reduce_fx="cat")
        self.add_state("prob", default=[], dist_reduce_fx="cat")
        self.add_state("label", default=[], dist_reduce_fx="cat")
        self.add_state("stack", default=[], dist_reduce_fx="cat")

    def update(self, nodule: Tensor, prob: Tensor, label: Tensor, stack: Tensor | None = None) -> None:
        """``stack`` (position of the stack in its nodule), when given, lets ``compute`` drop repeated
        (nodule, stack) rows -- DistributedSampler pads the last batch of a rank with repeated samples."""
        nodule = nodule.detach().long().flatten()
        self.nodule.append(nodule)
        self.prob.append(prob.detach().float().flatten())
        self.label.append(label.detach().long().flatten())
        self.stack.append(torch.full_like(nodule, -1) if stack is None else stack.detach().long().flatten())

    def compute(self) -> dict[str, Tensor]:
        nodule, prob = dim_zero_cat(self.nodule), dim_zero_cat(self.prob)
        label, stack = dim_zero_cat(self.label), dim_zero_cat(self.stack)
        keep = first_per_key(nodule, stack)
        _, p, y = nodule_scores(nodule[keep], prob[keep], label[keep])
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


class ClassifierStage(L.LightningModule):
    """Base of the 2-class stages: focal loss, stack- and nodule-level metrics, shared steps.

    ``stack_level=False`` (attention head) skips the stack-level metrics because each sample is a nodule.
    Logged keys: ``{train,val,test}/loss``, ``train/acc``, ``{val,test}/stack_{acc,...,auroc}``,
    ``{val,test}/nodule_{acc,precision,recall,specificity,f1,auroc}``.
    """

    def __init__(self, *, focal_alpha: float | None, focal_gamma: float, stack_level: bool = True) -> None:
        super().__init__()
        self.loss_fn = FocalLoss(focal_alpha, focal_gamma)
        self.stack_level = stack_level
        self.train_acc = BinaryAccuracy()
        if stack_level:
            self.val_stack = stack_metrics("val/stack_")
            self.test_stack = stack_metrics("test/stack_")
        self.val_nodule = NoduleMetrics()
        self.test_nodule = NoduleMetrics()

    # -- to implement ------------------------------------------------------------------------------------------
    def logits(self, batch: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    # -- shared steps --------------------------------------------------------------------------------------------
    @staticmethod
    def malignant_prob(logits: Tensor) -> Tensor:
        """Softmax probability of class 1 (malignant)."""
        return logits.float().softmax(dim=-1)[:, 1]

    def _shared(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        logits = self.logits(batch)
        label = batch["label"].long()
        return self.loss_fn(logits, label), self.malignant_prob(logits), label

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, prob, label = self._shared(batch)
        self.train_acc(prob, label)
        bs = len(label)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=bs)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=bs)
        return loss

    def _eval_step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        loss, prob, label = self._shared(batch)
        bs = len(label)
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=bs,
                 sync_dist=True)
        if self.stack_level:
            metrics = self.val_stack if stage == "val" else self.test_stack
            metrics.update(prob, label)
            # Logging the collection lets Lightning compute and reset it at epoch end.
            self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=bs)
        nodule = self.val_nodule if stage == "val" else self.test_nodule
        nodule.update(batch["nodule"], prob, label, batch.get("stack"))
        return loss

    def _log_nodule(self, stage: str) -> None:
        metric = self.val_nodule if stage == "val" else self.test_nodule
        if not metric.update_called:  # e.g. sanity check disabled and no batches
            return
        values = metric.compute()
        self.log_dict({f"{stage}/nodule_{k}": v for k, v in values.items()}, prog_bar=False)
        metric.reset()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_nodule("val")

    def on_test_epoch_end(self) -> None:
        self._log_nodule("test")

    def passthrough(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The batch's bookkeeping keys (nodule, stack, label, index) for predict outputs."""
        return {k: batch[k] for k in PASSTHROUGH_KEYS if k in batch}


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
