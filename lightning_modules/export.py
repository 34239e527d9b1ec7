"""Inference-only composition of trained stages (no training): what ``usnodule embeddings``, ``usnodule masks``
and ``usnodule predict`` run, kept here so that the command shims in ``stages/`` need not import each other."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import lightning.pytorch as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from datamodules.errors import DataError
from datamodules.stacks import RowBlocks

if TYPE_CHECKING:  # the stages import timm: not needed to build the command-line parser
    from lightning_modules.maskcnn_stage import MaskCNNStage
    from lightning_modules.vit_stage import ViTStage


class EmbeddingExport(L.LightningModule):
    """Both STACT-Time encoders side by side; ``predict_step`` returns per-stack embeddings and probabilities.

    Batch: ``{"image": (B,3,h,w), "mask": (B,3,h',w'), "nodule": (B,), "stack": (B,)}``
    (:class:`datamodules.stacks.PairedStackDataset`).
    """

    def __init__(self, vit: ViTStage, maskcnn: MaskCNNStage) -> None:
        super().__init__()
        self.vit, self.maskcnn = vit, maskcnn

    def predict_step(
        self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, Tensor]:
        image = self.vit.net.forward_features(batch["image"])
        seg = self.maskcnn.net.forward_features(batch["mask"])
        return {
            "nodule": batch["nodule"],
            "stack": batch["stack"],
            "image": image,
            "seg": seg,
            "image_prob": self.vit.malignant_prob(self.vit.net.forward_head(image)),
            "seg_prob": self.maskcnn.malignant_prob(self.maskcnn.net.forward_head(seg)),
        }


@torch.inference_mode()
def segment_blocks(
    model: torch.nn.Module,
    blocks: RowBlocks,
    shape: tuple[int, int],
    threshold: float,
    device: torch.device,
    num_workers: int = 0,
) -> Iterator[tuple[int, np.ndarray]]:
    """``(first row, (b, H, W) uint8 {0, 1} masks)`` per block: the mask inference of ``usnodule masks`` and
    ``usnodule predict``, one copy so that a new clip is segmented exactly as the training set was."""
    loader = DataLoader(blocks, batch_size=None, num_workers=num_workers, pin_memory=device.type == "cuda")
    for r0, x in loader:
        logits = model(x.to(device, non_blocking=True))
        # Back to full frame size before thresholding: smoother edges than resizing a binary mask.
        logits = F.interpolate(logits.float(), size=shape, mode="bilinear", align_corners=False)
        yield r0, (torch.sigmoid(logits) > threshold)[:, 0].to(torch.uint8).cpu().numpy()


def segment_frames(
    model: torch.nn.Module,
    frames: np.ndarray,
    size: int,
    threshold: float,
    device: torch.device,
    batch_size: int = 16,
) -> np.ndarray:
    """(T, H, W) uint8 {0, 1} masks of a clip held in memory, computed as :func:`predict_masks` computes them
    for the rows of a cine file."""
    out = np.empty(frames.shape, dtype=np.uint8)
    blocks = RowBlocks(frames, len(frames), batch_size, (size, size))
    shape = (int(frames.shape[1]), int(frames.shape[2]))
    for r0, mask in segment_blocks(model, blocks, shape, threshold, device):
        out[r0 : r0 + len(mask)] = mask
    return out


def pick_device(device: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``...; CUDA asked for but absent is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(None, f"--device {device}: CUDA is not available on this machine")
    try:
        return torch.device(device)
    except RuntimeError:
        raise DataError(None, f"--device {device}: not a device (cpu, cuda, cuda:1, ...)") from None
