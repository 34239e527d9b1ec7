"""AsyCMST LightningModule: multi-task BUS + CEUS training (paper Sec. 3.4, Eq. 14-16).

``L = L_Diag + w1 * L_FSS + w2 * L_Seg`` with ``w1 = w2 = 0.4`` (Eq. 14, Fig. 14):

- ``L_Diag``: cross-entropy over the two softmax outputs, i.e. Eq. 15-16's binary cross-entropy;
- ``L_FSS``: frame self-sorting on the upper (CEUS) branch, Eq. 3-4 (``fss=False`` removes head and term);
- ``L_Seg``: Dice on the lower (BUS) branch, Eq. 5, only on frames whose mask was drawn (``mask_valid``);
  ``ns=False`` removes decoder and term.

Which modality feeds which branch is ``streams`` (Fig. 9): ``("ceus", "bus")`` is the paper's model.  The
attention roles belong to the branches (the spatial C->B query on the upper branch, the temporal B->C query on
the lower one), so ``("bus", "ceus")`` swaps the attention directions.  The auxiliary tasks follow
``aux_tasks``: ``"modality"`` (default) keeps FSS on the CEUS branch and the mask decoder on the BUS branch
whichever branch that is, so the swap changes only the attention directions (Fig. 9 de-confounded);
``"branch"`` keeps them on their branches (FSS upper, NS lower: with the swap FSS then sorts BUS frames and the
decoder reads CEUS features, the behaviour before issue 13).  With one modality in both branches
(``("ceus", "ceus")``, ``("bus", "bus")``) both settings put FSS on the upper and NS on the lower branch.  The
BUS mask is the decoder's target in every case (paired clips share one geometry).

Model selection: ``conf/asycmst.yaml`` keeps the checkpoint with the best ``val/auroc`` and stops early on it
(the authors kept the best validation accuracy; the total ``val/loss`` is dominated by the FSS term).

Optimizer and schedule come from the LightningCLI ``optimizer:`` / ``lr_scheduler:`` keys (see
``conf/asycmst.yaml``: RMSprop lr 1e-3, weight decay 1e-4, momentum 0.9, ExponentialLR), as in the other stages.

Logged: ``{train,val,test}/loss`` (the total), ``.../loss_diag``, ``.../loss_fss``, ``.../loss_seg``,
``{val,test}/{acc,precision,recall,specificity,f1,auroc}`` (the case-level keys of
:class:`~lightning_modules.base.BaseStage`, one row per paired clip; binary, threshold 0.5 on the malignant
probability).  ``validate`` and ``test`` runs also write ``roc_<stage>.png`` into the logger's (else
the trainer's) directory.

Per-case predictions: every ``test`` run writes ``predictions_<method>.csv`` (``annot_id,label,prob``, one row
per test case, ``annot_id`` = the manifest's ``case_id``; the format ``usnodule report`` reads) into
``predictions_dir`` (default: the trainer's ``default_root_dir``), atomically; every ``validate`` run likewise
``val_predictions_<method>.csv`` of the validation cases (the report picks each fold's operating threshold on
them, never on the test cases; the validation epochs inside a fit write nothing).  With ``test_after_fit`` a
``fit`` ends by validating, then testing, its best checkpoint in the same process (the Makefile's one process
per fold: fit, validation and test predictions, test metrics).

Why the test FSS loss was ~25 against ~0.7 in training (issue 8): with RMSprop at lr 1e-3 and momentum 0.9
for 3 epochs, the frame encoders' weights changed so much per step that BatchNorm's running statistics (an
exponential average over past steps) no longer described the current features; in eval mode (validation, test)
the features came out ~100x too large and the sort scores (and logits) were huge and confidently wrong, on
training clips as much as on unseen ones (train-mode FSS on the test clips was 0.55).  Not a data bug: frame
sampling, order and normalisation are the same in every split.  A schedule that anneals the learning rate
(conf/demo/asycmst.yaml: AdamW + cosine) lets the running statistics catch up; at paper length (100 epochs,
x0.97 per epoch) the rate has decayed 20-fold by the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc, binary_roc

from datamodules.atomic import atomic_path, write_predictions
from lightning_modules import wandb_media
from lightning_modules.base import BaseStage, CaseMetrics
from lightning_modules.losses import dice_loss
from lightning_modules.nets.asycmst import AsyCMSTNet
from lightning_modules.nets.asycmst_losses import fss_loss

MODALITIES = ("bus", "ceus")
AUX_TASKS = ("modality", "branch")


def aux_branches(streams: Sequence[str], aux_tasks: str = "modality") -> dict[str, str]:
    """``{"fss_branch", "ns_branch"}`` of the net (``"c"`` upper, ``"b"`` lower) for ``streams`` = (upper,
    lower): with ``"modality"`` FSS reads the branch that receives CEUS and NS the one that receives BUS (when
    exactly one does), else (``"branch"``, or one modality in both) FSS the upper and NS the lower branch."""
    upper, lower = streams
    if aux_tasks == "modality" and upper != lower:
        ceus = "c" if upper == "ceus" else "b"
        return {"fss_branch": ceus, "ns_branch": "b" if ceus == "c" else "c"}
    return {"fss_branch": "c", "ns_branch": "b"}


def save_roc_png(prob: Tensor, label: Tensor, path: Path, title: str) -> None:
    """ROC curve with its AUC in the legend, written atomically (matplotlib Agg, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fpr, tpr, _ = binary_roc(prob.cpu(), label.cpu())
    auc = binary_auroc(prob.cpu(), label.cpu()).item()
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    ax.plot(fpr.numpy(), tpr.numpy(), label=f"AsyCMST (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8)
    ax.set(
        xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.02)
    )
    ax.legend(loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


class AsyCMST(BaseStage):
    """AsyCMST trained end to end (all args plain, so LightningCLI YAML can set every switch).

    Args (the network's, see :class:`~lightning_modules.nets.asycmst.AsyCMSTNet`): ``dim, depth, heads,
    num_frames, img_size, mlp_ratio, dropout, block, strategy, acmst_layers, fss, ns, backbone,
    backbone_args, pretrained, checkpoint_path, share_encoders, decoder_width``.  Loss and data wiring:

    Args:
        w1: weight of L_FSS (Eq. 14), 0.4.
        w2: weight of L_Seg (Eq. 14), 0.4.
        phi: FSS clamp threshold (Eq. 4), 0.9.
        streams: ``(upper, lower)`` batch keys: ``("ceus", "bus")`` in the paper, ``("bus", "ceus")``,
            ``("ceus", "ceus")`` or ``("bus", "bus")`` for Fig. 9.
        aux_tasks: ``"modality"``: FSS on the CEUS branch, NS on the BUS branch, wherever ``streams`` puts
            them; ``"branch"``: FSS on the upper, NS on the lower branch whatever they receive (see above).
        method: name in ``predictions_<method>.csv`` and in the report (``asycmst``; ``asycmst_none`` for the
            ``strategy: none`` comparison).
        predictions_dir: folder of the predictions CSV; ``None`` = the trainer's ``default_root_dir``.
        test_after_fit: at the end of ``fit``, test the best checkpoint (else the last weights) on the
            datamodule's test part in the same process.
        lr_per_step: step the YAML's ``lr_scheduler`` after every optimiser step instead of every epoch (LightningCLI
            steps it per epoch); a ``CosineAnnealingLR`` then spans the whole fit (its ``T_max`` is set to the
            fit's number of optimiser steps), so a fit of one or two epochs still ends at a small rate.
        seg_frames: in training, decode (and Dice-supervise) at most this many annotated frames per clip, drawn
            at random each step; ``None`` = every annotated frame (the paper).  Evaluation uses every one.
    """

    batch_keys = ("bus", "ceus", "label", "index", "mask", "mask_valid")

    def __init__(
        self,
        *,
        dim: int = 384,
        depth: int = 6,
        heads: int = 6,
        num_frames: int = 16,
        img_size: int = 224,
        mlp_ratio: float | None = None,
        dropout: float | None = None,
        block: str = "factorised",
        strategy: str = "asymmetric",
        acmst_layers: list[int] | None = None,
        fss: bool = True,
        ns: bool = True,
        backbone: str = "resnet18",
        backbone_args: dict[str, Any] | None = None,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        share_encoders: bool = False,
        decoder_width: int = 128,
        w1: float = 0.4,
        w2: float = 0.4,
        phi: float = 0.9,
        streams: Sequence[str] = ("ceus", "bus"),
        aux_tasks: str = "modality",
        method: str = "asycmst",
        predictions_dir: str | None = None,
        test_after_fit: bool = False,
        lr_per_step: bool = False,
        seg_frames: int | None = None,
    ) -> None:
        super().__init__()
        streams = tuple(streams)
        if len(streams) != 2 or any(s not in MODALITIES for s in streams):
            raise ValueError(f"streams must be two of {MODALITIES}, got {streams}")
        if aux_tasks not in AUX_TASKS:
            raise ValueError(f"aux_tasks must be one of {AUX_TASKS}, got {aux_tasks!r}")
        self.save_hyperparameters()
        self.streams = streams
        self.net = self.build_net(AsyCMSTNet, num_classes=2, **aux_branches(streams, aux_tasks))
        self.w1, self.w2, self.phi = w1, w2, phi
        self.method, self.predictions_dir, self.test_after_fit = method, predictions_dir, test_after_fit
        self.lr_per_step, self.seg_frames = lr_per_step, seg_frames
        self.val_scores, self.test_scores = CaseMetrics(), CaseMetrics()

    # -- model ---------------------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Tensor], *, mask_frames: Tensor | None = None) -> dict[str, Tensor]:
        """The net on a batch; ``mask_frames`` ``(B, T)`` bool: decode masks for these frames of the NS branch."""
        upper, lower = (batch[s] for s in self.streams)
        return self.net(upper, lower, mask_frames=mask_frames)

    def seg_frame_mask(self, valid: Tensor) -> Tensor:
        """The annotated frames the Dice term uses: all of them, or in training at most ``seg_frames`` per clip
        drawn at random (the rest are left out of the decoder)."""
        if self.seg_frames is None or not self.training or valid.shape[1] <= self.seg_frames:
            return valid
        draw = torch.rand(valid.shape, device=valid.device).masked_fill(~valid, -1.0)
        keep = torch.zeros_like(valid).scatter_(1, draw.topk(self.seg_frames, dim=1).indices, True)
        return keep & valid

    def losses(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        """``({"loss", "loss_diag", "loss_fss", "loss_seg"}, logits)`` for one batch (Eq. 14)."""
        self.check_batch(batch)
        frames = self.seg_frame_mask(batch["mask_valid"]) if self.net.decoder is not None else None
        out = self(batch, mask_frames=frames)
        logits = out["logits"]
        parts = {"loss_diag": F.cross_entropy(logits.float(), batch["label"].long())}
        total = parts["loss_diag"]
        if "sort_scores" in out:
            parts["loss_fss"] = fss_loss(out["sort_scores"].float(), phi=self.phi)
            total = total + self.w1 * parts["loss_fss"]
        if "mask_logits" in out:
            target = batch["mask"][frames]
            parts["loss_seg"] = dice_loss(out["mask_logits"], target)
            total = total + self.w2 * parts["loss_seg"]
        parts["loss"] = total
        return parts, logits

    def on_train_start(self) -> None:
        if not self.lr_per_step:
            return
        for config in self.trainer.lr_scheduler_configs:
            config.interval, config.frequency = "step", 1
            if isinstance(config.scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
                config.scheduler.T_max = max(1, int(self.trainer.estimated_stepping_batches))

    # -- steps -----------------------------------------------------------------------------------------------------
    def _log_losses(self, parts: dict[str, Tensor], stage: str, batch_size: int) -> None:
        for name, value in parts.items():
            self.log(
                f"{stage}/{name}",
                value,
                prog_bar=name == "loss",
                on_step=stage == "train" and name == "loss",
                on_epoch=True,
                batch_size=batch_size,
                sync_dist=stage != "train",
            )

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        parts, _ = self.losses(batch)
        self._log_losses(parts, "train", len(batch["label"]))
        return parts["loss"]

    def _eval_step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        parts, logits = self.losses(batch)
        self._log_losses(parts, stage, len(batch["label"]))
        scores = self.val_scores if stage == "val" else self.test_scores
        # one row per case: the dataset index is the case id (stack 0 drops DistributedSampler repeats)
        index = batch["index"]
        scores.update(index, self.malignant_prob(logits), batch["label"], torch.zeros_like(index))
        return parts["loss"]

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        run = wandb_media.wandb_run(self) if batch_idx == 0 else None
        if run is not None:  # cross-modal attention maps of the first cases, once per validation epoch
            maps = self.net.attention_maps(*(batch[s] for s in self.streams))
            side = max(m.shape[-1] for m in maps.values()) if maps else 0
            valid = torch.ones(len(batch["label"]), side, dtype=torch.bool)
            captions = [
                f"case {int(i)} label {int(y)}" for i, y in zip(batch["index"], batch["label"], strict=True)
            ]
            wandb_media.log_attention(run, "val/attention", maps, valid, self.global_step, captions)
        return self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._eval_step(batch, "test")

    def _epoch_end(self, stage: str, roc: bool) -> None:
        scores = self.log_case_metrics(stage, self.val_scores if stage == "val" else self.test_scores)
        if scores is None:
            return
        prob, label, index = scores["prob"], scores["label"], scores["nodule"]
        # trainer.log_dir is a broadcast under DDP: every rank asks, else rank 0 waits for the others for ever
        folder = self.run_dir() if roc else None
        if roc and self.trainer.is_global_zero and label.min() != label.max():
            save_roc_png(prob, label, folder / f"roc_{stage}.png", f"ROC ({stage}, n={len(label)})")
        if stage == "test" and self.trainer.is_global_zero:
            self.write_predictions(prob, label, index)
            if label.min() != label.max():  # the key metric for `python -m stages.step` (one line per step)
                print(f"RESULT test/auroc={binary_auroc(prob, label).item():.4f}", flush=True)
        # A validation run (not the epochs of a fit, whose weights are not the final ones) writes the validation
        # cases' predictions: the report chooses each fold's operating threshold on them, never on test.
        if stage == "val" and self.trainer.state.fn == TrainerFn.VALIDATING and self.trainer.is_global_zero:
            self.write_predictions(prob, label, index, stage="val")

    def on_validation_epoch_end(self) -> None:
        # the ROC plot only for a `validate` run: during fit it would be redrawn every epoch
        self._epoch_end("val", roc=self.trainer.state.fn == TrainerFn.VALIDATING)

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test", roc=True)

    def predictions_path(self, stage: str = "test") -> Path:
        """``predictions_<method>.csv`` (test) or ``val_predictions_<method>.csv`` (validation)."""
        prefix = "val_" if stage == "val" else ""
        return (
            Path(self.predictions_dir or self.trainer.default_root_dir)
            / f"{prefix}predictions_{self.method}.csv"
        )

    def write_predictions(self, prob: Tensor, label: Tensor, index: Tensor, stage: str = "test") -> Path:
        """``annot_id,label,prob`` of the ``stage`` cases (``annot_id`` = the manifest's ``case_id``, looked up by
        dataset index), in dataset order."""
        loader = self.trainer.val_dataloaders if stage == "val" else self.trainer.test_dataloaders
        cases = getattr(getattr(loader, "dataset", None), "cases", None)
        order = torch.argsort(index.cpu())
        ids = [cases[int(i)].case_id if cases is not None else str(int(i)) for i in index.cpu()[order]]
        return write_predictions(
            self.predictions_path(stage), ids, label.cpu()[order], prob.float().cpu()[order]
        )

    def on_fit_end(self) -> None:
        """``test_after_fit``: validate, then test, the kept weights in the same process (saves a second start-up
        of Python and Lightning): the validation run writes ``val_predictions_<method>.csv`` (the report's
        operating threshold), the test run ``predictions_<method>.csv``, both from the same checkpoint."""
        trainer = self.trainer
        if not self.test_after_fit or trainer.interrupted or trainer.datamodule is None:
            return
        cb = trainer.checkpoint_callback
        ckpt = (cb.best_model_path or cb.last_model_path) if cb is not None else ""
        trainer.validate(self, datamodule=trainer.datamodule, ckpt_path=ckpt or None)
        trainer.test(self, datamodule=trainer.datamodule, ckpt_path=ckpt or None)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        logits = self(batch)["logits"]
        prob = self.malignant_prob(logits)
        return {
            "index": batch["index"].cpu(),
            "label": batch["label"].cpu(),
            "prob": prob.cpu(),
            "pred": (prob >= 0.5).long().cpu(),
        }

    def run_dir(self) -> Path:
        """Where per-run files go: the logger's directory, else the trainer's root directory."""
        trainer = self.trainer
        return Path(trainer.log_dir or trainer.default_root_dir)
