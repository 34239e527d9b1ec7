"""Stage 5 of STACT-Time: the cross-attention head over per-nodule embedding sequences (sec. 2.4-2.5, Tables 2, 4).

Paper config (``conf/head.yaml``): focal loss, AdamW lr 1e-4, CosineAnnealingLR, 100 epochs. ``variant`` picks
the Table 3/4 ablations ("stact", "vit_self", "seg_self", "joint") or the CineCNN-Trans baseline
("cine_trans": 2-layer transformer encoder on the image embeddings, Table 2).
Batch: {"image_emb": (B,S,256), "seg_emb": (B,S,256), "valid": (B,S) bool, "label": (B,), "nodule": (B,)}.

``calibrate`` (default on; the paper is silent): at the end of every validation epoch the head refits a Platt
scaling on its validation nodules (:mod:`lightning_modules.calibration`) and keeps it in the ``platt`` buffer, so
the checkpoint of the selected epoch carries the calibration fitted on that epoch's outputs. Validation metrics
are computed on the raw probabilities (the data the scaling is fitted on); test metrics, ``predict_step`` and
every consumer of :meth:`malignant_prob` (``usnodule baselines``, ``usnodule predict``) get calibrated ones.
Ranking, hence AUROC per fold, is unchanged; pooled AUROC over folds, thresholds and Brier/ECE are not.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_modules import wandb_media
from lightning_modules.calibration import IDENTITY, apply_platt, fit_platt, logit_margin, prob_to_margin
from lightning_modules.classifier import ClassifierStage
from lightning_modules.nets.attention_head import VARIANTS, AttentionHead, CineTransformer

HEAD_VARIANTS = (*VARIANTS, "cine_trans")


class HeadStage(ClassifierStage):
    """LightningModule around :class:`AttentionHead` (or :class:`CineTransformer`); nodule-level metrics only.

    ``dim`` must equal the embedding width (256). ``num_layers``/``ff_dim`` apply to ``cine_trans`` only.
    ``predict_step`` returns the malignant probability of each nodule.
    """

    batch_keys = ("image_emb", "seg_emb", "valid", "label")

    def __init__(
        self,
        variant: str = "stact",
        dim: int = 256,
        num_heads: int = 4,
        dropout: float = 0.1,
        positional: bool = True,
        num_layers: int = 2,
        ff_dim: int = 512,
        focal_alpha: float | None = 0.9,
        focal_gamma: float = 2.4,
        calibrate: bool = True,
    ) -> None:
        super().__init__(focal_alpha=focal_alpha, focal_gamma=focal_gamma, stack_level=False)
        if variant not in HEAD_VARIANTS:
            raise ValueError(f"variant must be one of {HEAD_VARIANTS}, got {variant!r}")
        self.save_hyperparameters()
        self.variant = variant
        # W&B job_type / run name (stages.fit.stage_name): the variants of one fold are separate runs, like
        # their checkpoints runs/<exp>/fold<k>/head_<variant>.ckpt.
        self.stage = f"head_{variant}"
        self.net = self.build_net(CineTransformer if variant == "cine_trans" else AttentionHead)
        self.calibrate = calibrate
        self.register_buffer("platt", torch.tensor(IDENTITY))  # (a, b) of sigmoid(a * z + b)
        self._raw_scores = False

    # -- calibration (module docstring) -----------------------------------------------------------------------
    def malignant_prob(self, logits: Tensor) -> Tensor:  # type: ignore[override]
        if self._raw_scores or not self.calibrate:
            return super().malignant_prob(logits)
        return apply_platt(logit_margin(logits), self.platt)

    def on_validation_epoch_start(self) -> None:
        self._raw_scores = True

    def on_validation_epoch_end(self) -> None:
        scores = self.log_case_metrics("val", self.val_nodule)
        self._raw_scores = False
        if scores is None or not self.calibrate:
            return
        # every DDP rank holds the same gathered scores, so every rank fits the same (a, b)
        a, b = fit_platt(prob_to_margin(scores["prob"]), scores["label"])
        self.platt.copy_(torch.tensor((a, b)))
        self.log_dict({"val/platt_scale": a, "val/platt_bias": b})

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        if "platt" not in state_dict:  # a checkpoint from before calibration: identity, as it was trained
            state_dict = {**state_dict, "platt": torch.tensor(IDENTITY)}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, image_emb: Tensor, seg_emb: Tensor, valid: Tensor) -> Tensor:
        if self.variant == "cine_trans":
            return self.net(image_emb, valid)
        return self.net(image_emb, seg_emb, valid)

    def logits(self, batch: dict[str, Tensor]) -> Tensor:
        return self(batch["image_emb"], batch["seg_emb"], batch["valid"])

    def attention_maps(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Attention weights per block, name -> (B, S, S) averaged over heads (see the nets' ``attention_maps``)."""
        if self.variant == "cine_trans":
            return self.net.attention_maps(batch["image_emb"], batch["valid"])
        return self.net.attention_maps(batch["image_emb"], batch["seg_emb"], batch["valid"])

    def log_samples(self, run: Any, batch: dict[str, Tensor], prob: Tensor) -> None:
        """W&B: attention maps of the first nodules of the first validation batch."""
        names = wandb_media.nodule_names(self, "val", batch["nodule"])
        captions = [
            f"{n} label {int(y)} p={float(p):.2f}"
            for n, y, p in zip(names, batch["label"], prob, strict=True)
        ]
        wandb_media.log_attention(
            run, "val/attention", self.attention_maps(batch), batch["valid"], self.global_step, captions
        )

    def predict_step(
        self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, Tensor]:
        """{"prob": (B,) malignant probability per nodule, + nodule/label/index from the batch}."""
        return {**self.passthrough(batch), "prob": self.malignant_prob(self.logits(batch))}
