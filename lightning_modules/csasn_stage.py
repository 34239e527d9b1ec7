"""CSASN LightningModule: multitask subtype + malignancy training on still images, multi-class metrics.

The net is :class:`~lightning_modules.nets.csasn.CSASNNet` (dual-branch EfficientNet + ViT, fusion, cascaded
channel-then-spatial attention, residual multiscale classifier, two heads); the data
:class:`~datamodules.still_data.StillDataModule` with ``subtypes:`` set (items carry ``subtype``).

Loss (the summary gives no weights; ours, switches): ``L = subtype_weight * CE_w(subtype) + malignant_weight *
CE(malignant)`` with both weights 1.0: the subtype cross-entropy weighted per class by
:class:`~lightning_modules.nets.csasn_losses.DynamicClassWeights` (``class_weighting: dynamic`` -- inverse
per-class recall of the previous epoch, smoothed; ``frequency``; ``none`` = the "without dynamic weighting"
ablation), the malignancy cross-entropy unweighted (benign vs malignant is far less imbalanced than the
subtypes).  The malignant probability of the prediction files and of the binary metrics is the malignancy
head's (``malignant_source: head``) or ``1 - P(benign subtypes)`` of the subtype head (``subtype``).

Subtype decision rule (the summary is silent; ours, switch ``decision``): ``argmax`` takes the class of largest
softmax probability; ``balanced`` divides each class's probability by its share of the fold's training part
(``class_prior``, counted at fit start and saved in the checkpoint) and renormalises, ``q_k = (p_k / pi_k) /
sum_j (p_j / pi_j)``, i.e. the posterior as if every class were equally frequent (post-hoc logit adjustment,
``logit_k - log pi_k``), so a rare class is predicted when it is more likely than its base rate says.  The
``p_<subtype>`` columns, the predicted class and every multi-class metric use ``q``; the malignant probability
of ``malignant_source: subtype`` uses the plain softmax.  A checkpoint saved before the rule existed loads with
a uniform prior (``balanced`` = ``argmax`` there).

Input (ours, switch ``mask_channel``, default off): the still images are gray, repeated on the net's 3 input
channels; with ``mask_channel: true`` the last channel carries the drawn mask instead (cropped and resized with
the image, 0 / 1), so the nets see the outline the feature-forest baseline measures.  Prediction then needs the
drawn mask, as the ROI crop already does.

Auxiliary shape head (ours, not in the paper; switch ``shape_weight``, default 0 = off): a third linear head on
the same pre-logit features regresses four descriptors of the batch's drawn mask, cropped and resized with the
image (:func:`~lightning_modules.nets.csasn_losses.mask_shape_targets`: vertical-to-horizontal spread,
elongation, area share, isoperimetric ratio; standardised by a running BatchNorm without affine parameters),
and ``shape_weight * MSE`` joins the loss (images without a mask are left out of it).  With ``mask_channel``
the net sees that very mask; without it, it has to read the outline from the image.  The targets come from the input itself (self-supervision: no label, no
extra input at prediction, where the head is ignored).  Why: on the demo subtype set the rarest class (MTC) is
told apart mostly by its round outline (the feature forest's eccentricity alone scores MTC one-vs-rest AUROC
0.87), and a randomly initialised net shown the mask does not learn to measure roundness from ~24 MTC
training images (BENCHMARKS.md, CSASN round 3); the auxiliary task makes every image teach it.  Needs the
batch's ``mask`` (StillDataModule items carry it).

Logged (``{split}`` = val, test): the binary case-level keys of
:class:`~lightning_modules.base.BaseStage` (``{split}/{acc,precision,recall,specificity,f1,auroc}`` on the
malignant probability, one row per image); the multi-class keys of :func:`multiclass_metrics`
(``{split}/macro_f1``, ``{split}/balanced_acc``, ``{split}/macro_auroc``, ``{split}/recall_<subtype>``,
``{split}/precision_<subtype>``, ``{split}/auroc_<subtype>`` one-vs-rest); ``{train,val,test}/loss``,
``.../loss_subtype``, ``.../loss_malignant``; ``train/class_weight_<subtype>`` per epoch.  With a W&B logger the
subtype confusion matrix goes to W&B at every validation / test end; a ``test`` run writes
``confusion_test.png`` into the run folder and ``predictions_<method>.csv`` (``annot_id, subtype,
pred_subtype, p_<subtype>..., label, prob``: the shared binary report reads ``annot_id,label,prob``, the
multi-class report ``usnodule report-multiclass`` the rest) into ``predictions_dir``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassConfusionMatrix
from torchmetrics.functional.classification import (
    binary_auroc,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)
from torchmetrics.utilities import dim_zero_cat

from datamodules.atomic import write_predictions
from datamodules.errors import DataError, OptionError
from lightning_modules import wandb_media
from lightning_modules.base import BaseStage, CaseMetrics
from lightning_modules.nets.csasn import CSASNNet
from lightning_modules.nets.csasn_losses import SHAPE_TARGETS, DynamicClassWeights, mask_shape_targets

SOURCES = ("train", "val")
DECISIONS = ("argmax", "balanced")


def multiclass_metrics(prob: Tensor, target: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
    """Multi-class metrics of ``(N, K)`` class probabilities against ``(N,)`` class indices (torchmetrics;
    predicted class = argmax):

    ``recall_<name>``, ``precision_<name>`` per class (0 when the class is never true / never predicted, as
    scikit-learn's ``zero_division=0``), ``macro_f1`` (F1 averaged over the classes that occur in ``target`` or in
    the predictions: torchmetrics' and scikit-learn's default), ``balanced_acc`` (mean
    recall over the classes present in ``target``: scikit-learn's ``balanced_accuracy_score``),
    ``auroc_<name>`` one-vs-rest (NaN when the class is absent from ``target`` or is all of it), ``macro_auroc``
    (their mean over defined ones) and ``confusion`` (``(K, K)``, rows = true class, columns = predicted).
    """
    k = len(names)
    prob, target = prob.float(), target.long()
    recall = multiclass_recall(prob, target, num_classes=k, average="none")
    precision = multiclass_precision(prob, target, num_classes=k, average="none")
    present = torch.bincount(target, minlength=k) > 0
    out: dict[str, Tensor] = {
        "macro_f1": multiclass_f1_score(prob, target, num_classes=k, average="macro"),
        "balanced_acc": recall[present].mean(),
    }
    aurocs = []
    for i, name in enumerate(names):
        out[f"recall_{name}"], out[f"precision_{name}"] = recall[i], precision[i]
        hit = target == i
        auc = (
            binary_auroc(prob[:, i], hit.long())
            if 0 < int(hit.sum()) < len(hit)
            else prob.new_tensor(float("nan"))
        )
        out[f"auroc_{name}"] = auc
        aurocs.append(auc)
    out["macro_auroc"] = torch.stack(aurocs).nanmean()
    out["confusion"] = multiclass_confusion_matrix(prob, target, num_classes=k)
    return out


class SubtypeMetrics(Metric):
    """Per-image class probabilities gathered from every DDP rank; ``compute`` = :func:`multiclass_metrics`
    with repeated images (DistributedSampler padding) counted once, so the numbers equal a single-process run.
    The last scores stay in :attr:`scores` (``index``, ``prob`` (N, K), ``target``; sorted by index)."""

    full_state_update = False

    def __init__(self, names: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.names = list(names)
        self.scores: dict[str, Tensor] = {}
        for name in ("index", "prob", "target"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, index: Tensor, prob: Tensor, target: Tensor) -> None:
        self.index.append(index.detach().long().flatten())
        self.prob.append(prob.detach().float().reshape(len(index), -1))
        self.target.append(target.detach().long().flatten())

    def compute(self) -> dict[str, Tensor]:
        index, prob, target = dim_zero_cat(self.index), dim_zero_cat(self.prob), dim_zero_cat(self.target)
        ids, inverse = torch.unique(index, return_inverse=True)
        rows = torch.arange(len(index), device=index.device)
        first = torch.full((len(ids),), len(index), dtype=torch.long, device=index.device)
        first = first.scatter_reduce(0, inverse, rows, reduce="amin")  # unique ids are sorted
        self.scores = {"index": ids, "prob": prob[first], "target": target[first]}
        return multiclass_metrics(prob[first], target[first], self.names)


class CSASNStage(BaseStage):
    """CSASN trained end to end (module docstring).  Net args: those of
    :class:`~lightning_modules.nets.csasn.CSASNNet` (``num_subtypes`` = ``len(subtypes)``).

    Args:
        subtypes: the class list (must equal the datamodule's ``subtypes``; checked at setup).
        benign_subtypes: the benign names in ``subtypes`` (for ``malignant_source: subtype``).
        class_weighting: ``dynamic`` | ``frequency`` | ``none`` (:mod:`~lightning_modules.nets.csasn_losses`).
        weight_source: the predictions the dynamic rule reads: ``train`` (that epoch's training batches,
            default: no validation data steers training) or ``val`` (that epoch's validation part).
        weight_momentum, weight_eps: smoothing and ``eps`` of the rule.
        subtype_weight, malignant_weight: the two loss weights (1.0, 1.0).
        malignant_source: ``head`` (the malignancy head) or ``subtype`` (``1 - P(benign subtypes)``).
        decision: the subtype decision rule, ``argmax`` or ``balanced`` (probabilities divided by the training
            part's class shares, renormalised; module docstring).
        mask_channel: the drawn mask replaces the image's last input channel (module docstring).
        shape_weight: weight of the auxiliary shape regression on the drawn mask (module docstring); 0 = off.
        method: name in ``predictions_<method>.csv`` and the reports (``csasn``; the ablations
            ``csasn_no_effnet``, ``csasn_no_vit``, ``csasn_no_refine``, ``csasn_no_dynamic`` in the Makefile).
        predictions_dir: folder of the predictions CSV (default: the trainer's ``default_root_dir``).
        test_after_fit: at the end of ``fit``, test the best (else last) checkpoint in the same process.
    """

    batch_keys = ("image", "label", "subtype", "index")
    stage = "csasn"

    def __init__(
        self,
        *,
        cnn_backbone: str = "efficientnet_b0",
        vit_backbone: str = "vit_base_patch16_224",
        pretrained: bool = False,
        cnn_checkpoint_path: str | None = None,
        vit_checkpoint_path: str | None = None,
        img_size: int = 224,
        fusion_dim: int = 256,
        grid: int | None = None,
        reduction: int = 16,
        spatial_kernel: int = 7,
        scales: list[int] = [1, 2, 4],  # noqa: B006  (a YAML default, never mutated)
        depth: int = 2,
        hidden_dim: int = 256,
        dropout: float = 0.1,
        use_cnn: bool = True,
        use_vit: bool = True,
        use_refinement: bool = True,
        cnn_kwargs: dict[str, Any] | None = None,
        vit_kwargs: dict[str, Any] | None = None,
        subtypes: list[str] = ["benign", "PTC", "FTC", "MTC"],  # noqa: B006
        benign_subtypes: list[str] = ["benign"],  # noqa: B006
        class_weighting: str = "dynamic",
        weight_source: str = "train",
        weight_momentum: float = 0.5,
        weight_eps: float = 0.1,
        subtype_weight: float = 1.0,
        malignant_weight: float = 1.0,
        malignant_source: str = "head",
        decision: str = "argmax",
        mask_channel: bool = False,
        shape_weight: float = 0.0,
        method: str = "csasn",
        predictions_dir: str | None = None,
        test_after_fit: bool = False,
    ) -> None:
        super().__init__()
        if weight_source not in SOURCES:
            raise ValueError(f"weight_source must be one of {SOURCES}, got {weight_source!r}")
        if malignant_source not in ("head", "subtype"):
            raise ValueError(f"malignant_source must be 'head' or 'subtype', got {malignant_source!r}")
        if decision not in DECISIONS:
            raise ValueError(f"decision must be one of {DECISIONS}, got {decision!r}")
        if not shape_weight >= 0:  # NaN too
            raise OptionError("shape_weight", f"must be >= 0 (0 = no shape head), got {shape_weight}")
        if not set(benign_subtypes) <= set(subtypes):
            raise ValueError(f"benign_subtypes {benign_subtypes} not all in subtypes {subtypes}")
        self.save_hyperparameters()
        self.subtypes = list(subtypes)
        k = len(self.subtypes)
        self.benign_index = [self.subtypes.index(s) for s in benign_subtypes]
        n_shape = len(SHAPE_TARGETS) if shape_weight > 0 else 0
        self.net = self.build_net(CSASNNet, num_subtypes=k, shape_outputs=n_shape)
        # running standardisation of the shape targets (their scales differ by ~10x)
        self.shape_norm = nn.BatchNorm1d(n_shape, affine=False) if n_shape else None
        self.class_weights = DynamicClassWeights(k, class_weighting, weight_momentum, weight_eps)
        # the training part's class shares, for decision="balanced" (set at fit start, saved in checkpoints)
        self.register_buffer("class_prior", torch.full((k,), 1.0 / k))
        self.weight_counts = MulticlassConfusionMatrix(num_classes=k)  # summed over ranks by torchmetrics
        self.val_cases, self.test_cases = CaseMetrics(), CaseMetrics()
        self.val_subtypes, self.test_subtypes = SubtypeMetrics(self.subtypes), SubtypeMetrics(self.subtypes)

    # -- model ---------------------------------------------------------------------------------------------------
    def forward(self, image: Tensor) -> dict[str, Tensor]:
        return self.net(image)

    def inputs(self, batch: dict[str, Tensor]) -> Tensor:
        """The net's input of a batch: ``image``, or with ``mask_channel`` the image with its last channel
        replaced by ``mask``."""
        image = batch["image"]
        if not self.hparams.mask_channel:
            return image
        if "mask" not in batch:
            raise KeyError("mask_channel needs the batch's 'mask' (StillDataModule items carry it)")
        if image.shape[1] < 2:  # the mask would replace the image itself
            raise ValueError("mask_channel needs an image of at least 2 channels (the gray image repeated)")
        return torch.cat([image[:, :-1], batch["mask"].to(image)], dim=1)

    def probabilities(self, out: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(subtype probabilities (B, K), malignant probability (B,))`` from the net's logits."""
        sub = out["subtype"].float().softmax(dim=-1)
        if self.hparams.malignant_source == "subtype":
            return self.decide(sub), 1.0 - sub[:, self.benign_index].sum(dim=1)
        return self.decide(sub), self.malignant_prob(out["malignant"])

    def decide(self, prob: Tensor) -> Tensor:
        """The subtype probabilities the decision rule argmaxes (module docstring): ``prob`` itself for
        ``argmax``, ``prob / class_prior`` renormalised for ``balanced``."""
        if self.hparams.decision == "argmax":
            return prob
        q = prob / self.class_prior.to(prob).clamp_min(1e-12)
        return q / q.sum(dim=1, keepdim=True)

    def losses(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``({"loss", "loss_subtype", "loss_malignant"}, logits)`` of one batch."""
        self.check_batch(batch)
        out = self.net(self.inputs(batch))
        parts = {
            "loss_subtype": self.class_weights(out["subtype"], batch["subtype"]),
            "loss_malignant": F.cross_entropy(out["malignant"].float(), batch["label"].long()),
        }
        hp = self.hparams
        parts["loss"] = (
            hp.subtype_weight * parts["loss_subtype"] + hp.malignant_weight * parts["loss_malignant"]
        )
        if self.shape_norm is not None:
            parts["loss_shape"] = self.shape_loss(out["shape"], batch)
            parts["loss"] = parts["loss"] + hp.shape_weight * parts["loss_shape"]
        return parts, out

    def shape_loss(self, pred: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """MSE of the shape head against the standardised descriptors of the batch's drawn masks (rows without
        a mask left out; 0 when none has one)."""
        if "mask" not in batch:
            raise KeyError("shape_weight needs the batch's 'mask' (StillDataModule items carry it)")
        target, valid = mask_shape_targets(batch["mask"])
        if int(valid.sum()) < 2:  # BatchNorm needs two rows; no shape to learn from
            return pred.sum() * 0.0
        # standardised in float32 whatever the precision (the running variance of a log ratio is small)
        target = self.shape_norm(target[valid].to(pred.device, torch.float32))  # type: ignore[misc]
        return F.mse_loss(pred[valid].float(), target)

    # -- fit set-up ----------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """The datamodule's ``subtypes`` must be the model's (same classes, same order)."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        theirs = getattr(getattr(dm, "hparams", None), "subtypes", None) if dm is not None else None
        if dm is not None and list(theirs or []) != self.subtypes:
            raise DataError(
                getattr(dm.hparams, "manifest", None),
                f"the data's subtypes {theirs} differ from the model's {self.subtypes} "
                "(set data.init_args.subtypes to the same list)",
            )

    def on_fit_start(self) -> None:
        dm = self.trainer.datamodule
        if dm is None:  # plain dataloaders: no class counts, the prior stays as it is
            return
        train = dm.datasets["train"]
        counts = torch.bincount(torch.tensor(train.subtype_index), minlength=len(self.subtypes))
        self.class_prior.copy_(counts.to(self.class_prior) / counts.sum().clamp_min(1))
        if self.class_weights.mode == "frequency":
            self.class_weights.set_frequency(counts)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint from before ``class_prior`` existed loads with a uniform prior."""
        state = checkpoint.get("state_dict", {})
        state.setdefault("class_prior", torch.full((len(self.subtypes),), 1.0 / len(self.subtypes)))

    # -- steps ---------------------------------------------------------------------------------------------------
    def _log_losses(self, parts: dict[str, Tensor], split: str, batch_size: int) -> None:
        for name, value in parts.items():
            self.log(
                f"{split}/{name}",
                value,
                prog_bar=name == "loss",
                on_step=split == "train" and name == "loss",
                on_epoch=True,
                batch_size=batch_size,
                sync_dist=split != "train",
            )

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        parts, out = self.losses(batch)
        self._log_losses(parts, "train", len(batch["label"]))
        if self.hparams.weight_source == "train":
            self.weight_counts.update(out["subtype"].detach().argmax(dim=1), batch["subtype"])
        return parts["loss"]

    def _eval_step(self, batch: dict[str, Tensor], split: str) -> Tensor:
        parts, out = self.losses(batch)
        self._log_losses(parts, split, len(batch["label"]))
        sub, mal = self.probabilities(out)
        index = batch["index"]
        cases = self.val_cases if split == "val" else self.test_cases
        cases.update(index, mal, batch["label"], torch.zeros_like(index))
        (self.val_subtypes if split == "val" else self.test_subtypes).update(index, sub, batch["subtype"])
        if split == "val" and self.hparams.weight_source == "val" and not self.trainer.sanity_checking:
            self.weight_counts.update(sub.argmax(dim=1), batch["subtype"])
        return parts["loss"]

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._eval_step(batch, "test")

    # -- epoch ends ----------------------------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        self.weight_counts.reset()

    def on_train_epoch_end(self) -> None:
        """The dynamic rule's update from this epoch's counts (Lightning runs the epoch's validation before
        this hook, so ``weight_source: val`` sees the same epoch's validation part)."""
        if self.class_weights.mode == "dynamic" and self.weight_counts.update_called:
            self.class_weights.step(self.weight_counts.compute())
        self.weight_counts.reset()
        for name, w in zip(self.subtypes, self.class_weights.weight, strict=True):
            self.log(f"train/class_weight_{name}", w)

    def _epoch_end(self, split: str) -> None:
        cases = self.val_cases if split == "val" else self.test_cases
        subtypes = self.val_subtypes if split == "val" else self.test_subtypes
        scores = self.log_case_metrics(split, cases)
        if scores is None or not subtypes.update_called:
            return
        values = subtypes.compute()
        confusion = values.pop("confusion")
        self.log_dict({f"{split}/{k}": v for k, v in values.items()})
        sub = subtypes.scores
        subtypes.reset()
        if (run := wandb_media.wandb_run(self)) is not None:
            import wandb

            run.log(
                {
                    f"{split}/subtype_confusion": wandb.plot.confusion_matrix(
                        y_true=sub["target"].cpu().tolist(),
                        preds=sub["prob"].argmax(dim=1).cpu().tolist(),
                        class_names=self.subtypes,
                        title=f"{split} subtype confusion matrix",
                    ),
                    wandb_media.STEP_KEY: self.global_step,
                }
            )
        # trainer.log_dir is a broadcast under DDP: every rank asks, else rank 0 waits for the others for ever
        folder = self.run_dir() if split == "test" else None
        if split == "test" and self.trainer.is_global_zero:
            from stages.report_multiclass import plot_confusion

            plot_confusion(
                confusion.cpu().numpy(),
                self.subtypes,
                folder / "confusion_test.png",
                f"CSASN test (n={len(sub['target'])})",
            )
            self.write_predictions(sub, scores)
            print(f"RESULT test/macro_f1={float(values['macro_f1']):.4f}", flush=True)

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")

    # -- outputs -------------------------------------------------------------------------------------------------
    def run_dir(self) -> Path:
        return Path(self.trainer.log_dir or self.trainer.default_root_dir)

    def predictions_path(self) -> Path:
        method = self.hparams.method
        return (
            Path(self.hparams.predictions_dir or self.trainer.default_root_dir) / f"predictions_{method}.csv"
        )

    def write_predictions(self, sub: dict[str, Tensor], cases: dict[str, Tensor]) -> Path:
        """``annot_id, subtype, pred_subtype, p_<subtype>..., label, prob`` per test image, in dataset order
        (``annot_id`` = the manifest's ``case_id``).  ``sub`` and ``cases`` are both sorted by index."""
        dataset = self.trainer.test_dataloaders.dataset
        index = sub["index"].cpu()
        if not torch.equal(index, cases["nodule"].cpu()):
            raise RuntimeError("subtype and malignancy scores cover different test images")
        ids = [dataset.cases[int(i)].case_id for i in index]
        prob = sub["prob"].cpu()
        extra: dict[str, Any] = {
            "subtype": [self.subtypes[int(t)] for t in sub["target"].cpu()],
            "pred_subtype": [self.subtypes[int(t)] for t in prob.argmax(dim=1)],
        }
        extra.update({f"p_{name}": prob[:, i].numpy() for i, name in enumerate(self.subtypes)})
        return write_predictions(
            self.predictions_path(), ids, cases["label"].cpu(), cases["prob"].float().cpu(), **extra
        )

    def on_fit_end(self) -> None:
        """``test_after_fit``: test in the same process (one process per fold in the Makefile)."""
        trainer = self.trainer
        if not self.hparams.test_after_fit or trainer.interrupted or trainer.datamodule is None:
            return
        cb = trainer.checkpoint_callback
        ckpt = (cb.best_model_path or cb.last_model_path) if cb is not None else ""
        trainer.test(self, datamodule=trainer.datamodule, ckpt_path=ckpt or None)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        sub, mal = self.probabilities(self.net(self.inputs(batch)))
        return {
            "index": batch["index"].cpu(),
            "label": batch["label"].cpu(),
            "prob": mal.cpu(),
            "subtype_prob": sub.cpu(),
            "pred_subtype": sub.argmax(dim=1).cpu(),
        }
