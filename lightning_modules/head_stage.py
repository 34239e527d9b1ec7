"""Stage 5 of STACT-Time: the cross-attention head over per-nodule embedding sequences (sec. 2.4-2.5, Tables 2, 4).

Paper config (``conf/head.yaml``): focal loss, AdamW lr 1e-4, CosineAnnealingLR, 100 epochs. ``variant`` picks
the Table 3/4 ablations ("stact", "vit_self", "seg_self", "joint") or the CineCNN-Trans baseline
("cine_trans": 2-layer transformer encoder on the image embeddings, Table 2).
Batch: {"image_emb": (B,S,256), "seg_emb": (B,S,256), "valid": (B,S) bool, "label": (B,), "nodule": (B,)}.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_modules import wandb_media
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
