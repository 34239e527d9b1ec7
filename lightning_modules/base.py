"""The one shape of every trainable stage: :class:`BaseStage`, and the case-level metrics all of them log.

Modelled on torchgeo's ``BaseTask`` (``torchgeo.trainers.BaseTask``): one LightningModule base that owns what
every task would otherwise re-implement, so that a stage only says what is particular to it.  ``BaseStage``
owns

- **building the net from plain arguments**: a stage lists its arguments once (in its ``__init__``, so
  LightningCLI and the YAML see every switch) and :meth:`BaseStage.build_net` hands the net the ones its
  constructor takes, read from the saved hyper-parameters (no second list of the same arguments);
- **case-indexed metrics with one key convention** (:class:`CaseMetrics`): a case is what the paper scores (a
  STACT-Time nodule, an AsyCMST paired clip); its binary metrics are logged as ``{split}/{acc, precision,
  recall, specificity, f1, auroc}``, per-stack ones (STACT-Time stages 1 and 3) as ``{split}/stack_<same>``,
  and the loss as ``{split}/loss``.  A checkpoint ``monitor: val/auroc`` means the same quantity for every
  stage;
- **the batch schema**: ``batch_keys`` names the keys a training batch must carry (checked with a one-line
  error) and ``PASSTHROUGH_KEYS`` the bookkeeping keys copied into prediction outputs;
- **reloading**: :meth:`BaseStage.from_checkpoint` returns the trained model in eval mode *and* the data
  settings it was trained with (the datamodule's hyper-parameters that Lightning saves in the checkpoint), the
  only way the command stages (``usnodule masks``/``embeddings``/``predict``/``baselines``) load a stage.

Nets (``lightning_modules/nets``) stay plain ``nn.Module``\\ s with no Lightning and no data imports; their
pre-logit features come from ``forward_features`` (timm's convention, see the README's layout section).
"""

from __future__ import annotations

import importlib
import inspect
import os
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as L
import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.functional.classification import (
    binary_accuracy,
    binary_auroc,
    binary_f1_score,
    binary_precision,
    binary_recall,
    binary_specificity,
)
from torchmetrics.utilities import dim_zero_cat

from datamodules.errors import DataError, OptionError
from lightning_modules import wandb_media
from lightning_modules.nets import WeightsUnavailable

# Batch keys copied unchanged into predict_step outputs when present (what a prediction writer needs).
PASSTHROUGH_KEYS = ("nodule", "stack", "label", "index")

# Init args that fetched a starting point (ImageNet / a fine-tuning start file): switched off on reload, the
# trained weights come from the checkpoint.
_STARTING_POINT = {
    "pretrained": False,
    "checkpoint_path": None,
    "cnn_checkpoint_path": None,  # CSASN's two branches
    "vit_checkpoint_path": None,
}


def case_scores(case: Tensor, prob: Tensor, label: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Group per-row scores by case: (unique case ids, mean probability, label) sorted by id."""
    ids, inverse = torch.unique(case, return_inverse=True)
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


def binary_metrics(prob: Tensor, label: Tensor, threshold: float = 0.5) -> dict[str, Tensor]:
    """Acc, precision, recall, specificity, F1 at ``threshold`` and AUROC (NaN when only one class is present:
    undefined, and ModelCheckpoint treats NaN as worst)."""
    t = threshold
    auroc = binary_auroc(prob, label) if label.min() != label.max() else prob.new_tensor(float("nan"))
    return {
        "acc": binary_accuracy(prob, label, threshold=t),
        "precision": binary_precision(prob, label, threshold=t),
        "recall": binary_recall(prob, label, threshold=t),
        "specificity": binary_specificity(prob, label, threshold=t),
        "f1": binary_f1_score(prob, label, threshold=t),
        "auroc": auroc,
    }


class CaseMetrics(Metric):
    """Case-level (and optionally stack-level) binary metrics and the loss from per-row scores.

    A row is one sample: a stack of a nodule (ViT, mask CNN), a whole nodule (attention head) or a paired clip
    (AsyCMST).  A case's probability is the mean of its rows' probabilities.  States are concatenated across
    DDP ranks by torchmetrics before ``compute``, so a case whose rows went to different ranks is still
    averaged whole, and repeated (case, stack) rows -- DistributedSampler pads the last batch of a rank by
    repeating samples -- are counted once.  So every number equals the single-process one, which stateful
    torchmetrics classes (``BinaryAUROC`` ...) fed per batch would not give under padding.

    ``compute`` returns ``acc, precision, recall, specificity, f1, auroc`` (case level), with
    ``stack_level=True`` also ``stack_<same>``, and ``loss`` (mean per-sample loss) when losses were given.
    The last computed case scores stay in :attr:`scores` (``nodule`` = case id, ``prob``, ``label``; sorted by
    id, gathered from all ranks) for the W&B ROC curve, the prediction table and prediction files.
    """

    full_state_update = False

    def __init__(self, threshold: float = 0.5, stack_level: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold
        self.stack_level = stack_level
        self.scores: dict[str, Tensor] = {}
        for name in ("nodule", "prob", "label", "stack", "loss"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(
        self,
        nodule: Tensor,
        prob: Tensor,
        label: Tensor,
        stack: Tensor | None = None,
        loss: Tensor | None = None,
    ) -> None:
        """``nodule``: the case id of each row; ``stack`` (position of the row in its case), when given, lets
        ``compute`` drop repeated (case, stack) rows; ``loss`` is the per-sample loss (NaN when not given)."""
        nodule = nodule.detach().long().flatten()
        self.nodule.append(nodule)
        self.prob.append(prob.detach().float().flatten())
        self.label.append(label.detach().long().flatten())
        self.stack.append(torch.full_like(nodule, -1) if stack is None else stack.detach().long().flatten())
        self.loss.append(
            torch.full_like(nodule, float("nan"), dtype=torch.float)
            if loss is None
            else loss.detach().float().flatten()
        )

    def compute(self) -> dict[str, Tensor]:
        nodule, prob = dim_zero_cat(self.nodule), dim_zero_cat(self.prob)
        label, stack, loss = dim_zero_cat(self.label), dim_zero_cat(self.stack), dim_zero_cat(self.loss)
        keep = first_per_key(nodule, stack)
        ids, p, y = case_scores(nodule[keep], prob[keep], label[keep])
        self.scores = {"nodule": ids, "prob": p, "label": y}
        out = binary_metrics(p, y, self.threshold)
        if self.stack_level:
            stack = binary_metrics(prob[keep], label[keep], self.threshold)
            out.update({f"stack_{k}": v for k, v in stack.items()})
        if not bool(loss[keep].isnan().all()):
            out["loss"] = loss[keep].nanmean()
        return out


def _resolve(class_path: str) -> type:
    module, name = class_path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


class BaseStage(L.LightningModule):
    """Base of every trainable stage (ViT, MSU-Net, mask CNN, attention head, AsyCMST); see the module doc.

    Like torchgeo's ``BaseTask`` it owns the parts that are the same for every stage, so that each stage is
    its net, its loss and its batch, and so that the stages agree on what a checkpoint holds, how it is
    reloaded and under which keys a metric is logged:

    - :meth:`build_net`: the net from the stage's plain (YAML) arguments;
    - :meth:`log_case_metrics` over :class:`CaseMetrics`: ``{split}/{acc,...,auroc}`` for the case-level
      quantity, ``{split}/stack_*`` below it, ``{split}/loss``;
    - ``batch_keys`` / :meth:`check_batch` / :meth:`passthrough`: the batch schema;
    - :meth:`from_checkpoint`: ``(model in eval mode, data settings)`` from a Lightning checkpoint.

    It is LightningCLI's subclass-mode base (``stages/fit.py``), so ``lightning fit --help`` lists exactly the
    project's stages.  Optimizers and schedulers come from the YAML's ``optimizer:`` / ``lr_scheduler:`` keys,
    so no stage defines ``configure_optimizers``.
    """

    #: keys every training / evaluation batch must carry (subclasses name theirs).
    batch_keys: ClassVar[tuple[str, ...]] = ()

    # -- net -------------------------------------------------------------------------------------------------
    def build_net(self, net_cls: type[nn.Module], **fixed: Any) -> nn.Module:
        """``net_cls`` built from the saved hyper-parameters that its constructor takes, plus ``fixed``.

        Call after ``save_hyperparameters()``.  The stage's signature is the one list of the net's arguments
        (LightningCLI reads it); this picks them out instead of re-listing them in the call.
        A ``FileNotFoundError`` of the net (a starting-weights file that is not there) becomes a one-line
        :class:`DataError` with the same text: nets import nothing from ``datamodules``.
        """
        params = inspect.signature(net_cls.__init__).parameters
        args = {k: v for k, v in self.hparams.items() if k in params and k not in fixed}
        size = args.get("img_size")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise OptionError("img_size", f"must be a positive integer (pixels) or null, got {size!r}")
        try:
            return net_cls(**args, **fixed)
        except WeightsUnavailable as e:
            raise OptionError("pretrained", str(e)) from None
        except FileNotFoundError as e:
            raise DataError(None, str(e)) from None

    # -- batch -----------------------------------------------------------------------------------------------
    def check_batch(self, batch: dict[str, Tensor]) -> None:
        """One-line error when the batch lacks a key of :attr:`batch_keys` (a datamodule of another stage)."""
        missing = [k for k in self.batch_keys if k not in batch]
        if missing:
            raise KeyError(
                f"{type(self).__name__} needs batch keys {list(self.batch_keys)}, "
                f"missing {missing} (got {sorted(batch)})"
            )

    @staticmethod
    def passthrough(batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The batch's bookkeeping keys (nodule, stack, label, index) for predict outputs."""
        return {k: batch[k] for k in PASSTHROUGH_KEYS if k in batch}

    @staticmethod
    def malignant_prob(logits: Tensor) -> Tensor:
        """Softmax probability of class 1 (malignant) from ``(B, 2)`` logits."""
        return logits.float().softmax(dim=-1)[:, 1]

    # -- metrics ---------------------------------------------------------------------------------------------
    def log_case_metrics(self, split: str, metric: CaseMetrics) -> dict[str, Tensor] | None:
        """Compute ``metric`` (collective under DDP: every rank calls it), log it under the key convention,
        send the per-case scores to W&B when a W&B logger is attached, reset it and return its case scores
        (``nodule``, ``prob``, ``label``); ``None`` when it saw no batch (e.g. sanity check disabled)."""
        if not metric.update_called:
            return None
        values = metric.compute()
        logged = {f"{split}/{k}": v for k, v in values.items()}
        if f"{split}/loss" in logged:
            self.log(f"{split}/loss", logged.pop(f"{split}/loss"), prog_bar=True)
        self.log_dict(logged, prog_bar=False)
        scores = metric.scores
        if (run := wandb_media.wandb_run(self)) is not None:
            names = wandb_media.nodule_names(self, split, scores["nodule"])
            wandb_media.log_classification(
                run,
                split,
                names,
                scores["prob"],
                scores["label"],
                self.global_step,
                threshold=metric.threshold,
            )
        metric.reset()
        return scores

    # -- reload ----------------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        map_location: Any = "cpu",
    ) -> tuple[BaseStage, dict[str, Any]]:
        """``(model in eval mode, data settings)`` from a Lightning checkpoint of this stage.

        The data settings are the datamodule's init args saved with the checkpoint (``img_size``, ``size``,
        ``buffer``, ``normalize``, ``fold``, ...; ``{}`` when the fit had no datamodule). Called on
        ``BaseStage`` itself, the stage class is the one LightningCLI recorded (``_class_path``). The init
        args that fetched a starting point (``pretrained``, ``checkpoint_path``) are switched off: the trained
        weights come from the checkpoint (``load_from_checkpoint`` would download / re-read them, and cannot
        take ``checkpoint_path=``, its own first parameter). A missing, corrupt or foreign file is a one-line
        :class:`DataError`.
        """
        path = Path(path)
        name = cls.__name__
        if not path.is_file():
            raise DataError(path, f"checkpoint not found (train the {name} first)")
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=False)
            hparams, state = dict(ckpt.get("hyper_parameters") or {}), ckpt["state_dict"]
            stage = cls
            if cls is BaseStage:
                stage = _resolve(hparams["_class_path"])
                if not (isinstance(stage, type) and issubclass(stage, BaseStage)):
                    raise TypeError(f"{hparams['_class_path']} is not a BaseStage")
            params = inspect.signature(stage.__init__).parameters
            args = {k: v for k, v in hparams.items() if k in params}  # drops LightningCLI's _class_path etc.
            args.update({k: v for k, v in _STARTING_POINT.items() if k in params})
            model = stage(**args)
            model.load_state_dict(state)
            data = dict(ckpt.get("datamodule_hyper_parameters") or {})
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001  (torch/pickle/Lightning raise many types for a bad file)
            first = (str(e).splitlines() or [""])[0][:200]
            raise DataError(path, f"not a {name} checkpoint ({type(e).__name__}: {first})") from None
        if isinstance(map_location, str | torch.device):
            model.to(map_location)
        return model.eval(), data
