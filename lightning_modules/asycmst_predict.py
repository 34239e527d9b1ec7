"""AsyCMST on new BUS + CEUS pairs: a trained checkpoint's test-time path, and its cross-modal attention.

Preprocessing is not re-implemented: each pair becomes a :class:`~datamodules.paired.PairedCase` and is read by
:class:`~datamodules.paired_video.PairedVideoDataset` with ``augment=False``, the dataset
``PairedVideoDataModule`` serves its validation, test and predict parts with, under the data settings saved in
the checkpoint (``frames``, ``size``, ``roi``; :func:`pair_settings`).  So a pair gets, as a test case does:
T frames at ``linspace(0, n - 1, T)`` of the BUS clip's n frames (the same positions in CEUS and the mask), CEUS
resized onto the BUS grid when the two were exported at different sizes, the ROI crop below, a bilinear resize
to ``size``, gray repeated to 3 channels and ImageNet normalisation.  BUS and CEUS of different lengths are
refused (:func:`datamodules.paired.check_case`), as the datamodule refuses them: one frame index would point
at different moments of the two clips.

ROI: a checkpoint trained with ``roi`` (the demo's 1.15) saw square crops of ``roi`` x the longer side of the
drawn BUS mask's box (union over the sampled frames).  A new pair gets that crop when it comes with a BUS mask
(``--bus-mask``, or a manifest's ``bus_mask`` column).  Without one -- or when the mask is empty on every
sampled frame -- the dataset keeps the whole frame, as the datamodule does for an unannotated clip; the model
then sees an input unlike its training crops, so the case is marked (``roi`` = ``missing`` / ``empty``) and the
command warns.  No box is guessed: the model's own mask decoder was trained on the crops too, and a box found
on whole frames would be a new, unvalidated protocol.

Cross-modal attention: :meth:`~lightning_modules.nets.asycmst.AsyCMSTNet.capture_attention` records each
cross-attention sub-layer's head-averaged weights from forward hooks during the same forward pass that gives
the probability (the hooks return nothing, so the numbers are those of a plain forward; tested).  For the
overlays, the weights of the last cross-modal stage are reduced to the attention each *key* token receives:
the mean over all queries of the other stream (:func:`received_attention`), ``(T, N)`` per direction, summing
to 1 over the key stream's frames and positions, and laid back on the ``grid x grid`` token grid of each frame.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from datamodules.clips import read_mask_clip
from datamodules.errors import DataError
from datamodules.paired import PairedCase, check_case
from datamodules.paired_video import PairedVideoDataset, roi_box, sample_indices
from datamodules.parts import IMAGENET_MEAN, IMAGENET_STD
from lightning_modules.asycmst import AsyCMST
from lightning_modules.base import BaseStage
from lightning_modules.export import pick_device

# What the ``roi`` column says about the crop a pair got (see the module doc).
ROI_STATES = {
    "annotated": "cropped around the drawn BUS mask, as in training",
    "none": "whole frames, as in training (the checkpoint has no ROI crop)",
    "missing": "whole frames: no BUS mask given, but the checkpoint was trained on ROI crops",
    "empty": "whole frames: the BUS mask is empty on every sampled frame, but the checkpoint was trained on "
    "ROI crops",
}


@dataclass(frozen=True)
class PairSettings:
    """The test-time data settings of a checkpoint: ``frames`` (T), ``size`` (pixels), ``roi`` (context factor
    of the crop, ``None`` = whole frames) and where they came from."""

    frames: int
    size: int
    roi: float | None
    source: str


@dataclass
class PairPrediction:
    """One pair's result: the probability, what the model saw, and the attention it paid."""

    case: PairedCase
    n_frames: int
    indices: np.ndarray  # (T,) sampled frame positions
    roi: str  # a key of ROI_STATES
    box: tuple[int, int, int, int] | None  # (y0, y1, x0, x1) in BUS frame pixels, None = whole frame
    prob: float
    bus: np.ndarray  # (T, S, S) float in [0, 1]: the model's BUS input, before normalisation
    ceus: np.ndarray
    # direction ("c_to_b" / "b_to_c") -> (T, grid, grid) attention received by the key stream's tokens
    attention: dict[str, np.ndarray] = field(default_factory=dict)
    layer: int | None = None  # the cross-modal stage the attention comes from


def load_asycmst(path: str | Path, device: str = "cpu") -> tuple[AsyCMST, PairSettings]:
    """The AsyCMST stage in eval mode on ``device`` and its test-time data settings.

    Loaded by :meth:`BaseStage.from_checkpoint` (the class LightningCLI recorded); a checkpoint of another stage
    or not a checkpoint at all is a one-line :class:`DataError`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "checkpoint not found" if not path.exists() else "is not a file")
    try:
        stage, data = BaseStage.from_checkpoint(path)
    except DataError:
        # no recorded class (saved outside LightningCLI): try it as AsyCMST, whose error names the file
        stage, data = AsyCMST.from_checkpoint(path)
    if not isinstance(stage, AsyCMST):
        raise DataError(
            path,
            f"is a {type(stage).__name__} checkpoint, not AsyCMST (lightning_modules.asycmst.AsyCMST); "
            "STACT-Time folds are predicted by `usnodule predict`",
        )
    return stage.to(pick_device(device)).eval(), pair_settings(stage, data, path)


def pair_settings(stage: AsyCMST, data: dict, path: str | Path) -> PairSettings:
    """``frames``, ``size`` and ``roi`` from the checkpoint's saved datamodule hyper-parameters; without them
    (a checkpoint saved with no datamodule) the net's ``num_frames`` / ``img_size`` and whole frames."""
    net = stage.net
    if not data:
        return PairSettings(int(net.num_frames), int(net.img_size), None, "model (no data settings saved)")
    frames, size = int(data.get("frames", net.num_frames)), int(data.get("size", net.img_size))
    if (frames, size) != (net.num_frames, net.img_size):
        raise DataError(
            path,
            f"data settings (frames {frames}, size {size}) differ from the model's (num_frames "
            f"{net.num_frames}, img_size {net.img_size})",
        )
    roi = data.get("roi")
    return PairSettings(frames, size, None if roi is None else float(roi), "checkpoint data settings")


def roi_state(case: PairedCase, n_frames: int, settings: PairSettings) -> tuple[str, tuple | None]:
    """``(state, box)``: which crop the dataset gives this pair (a key of :data:`ROI_STATES`) and the box,
    computed as :class:`PairedVideoDataset` computes it (same sampled frames, same :func:`roi_box`)."""
    if settings.roi is None:
        return "none", None
    if case.bus_mask is None:
        return "missing", None
    mask, valid = read_mask_clip(case.bus_mask, sample_indices(n_frames, settings.frames))
    box = roi_box(mask, valid, settings.roi)
    return ("empty", None) if box is None else ("annotated", box)


def received_attention(weights: Tensor) -> Tensor:
    """``(B, T, N, T, N)`` dense weights (query frame, position, key frame, position) -> ``(B, T, N)``: the
    attention each key token receives, the mean over every query; sums to 1 over each case's key tokens."""
    return weights.float().mean(dim=(1, 2))


def _unnormalise(x: Tensor) -> np.ndarray:
    """``(B, T, 3, S, S)`` ImageNet-normalised gray clips -> ``(B, T, S, S)`` in [0, 1] (the first channel)."""
    return (x[:, :, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]).clamp(0, 1).cpu().numpy()


@torch.inference_mode()
def predict_pairs(
    stage: AsyCMST,
    settings: PairSettings,
    cases: Sequence[PairedCase],
    *,
    batch_size: int = 4,
    num_workers: int = 0,
    attention: bool = True,
) -> Iterator[PairPrediction]:
    """Predict every pair in order; with ``attention``, also capture the cross-modal attention in the same
    forward pass (the probabilities are the same either way)."""
    n_frames = [check_case(c) for c in cases]  # every pair checked before the first forward
    data = PairedVideoDataset(
        cases, n_frames, frames=settings.frames, size=settings.size, augment=False, roi=settings.roi
    )
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    device = next(stage.parameters()).device
    net, grid = stage.net, int(stage.net.grid)
    for batch in loader:
        clips = {k: batch[k].to(device) for k in ("bus", "ceus")}
        if attention:
            with net.capture_attention() as records:
                logits = stage(clips)["logits"]
        else:
            records, logits = [], stage(clips)["logits"]
        prob = stage.malignant_prob(logits).cpu()
        last = max((r["layer"] for r in records), default=None)
        received = {
            r["direction"]: received_attention(r["weights"]).cpu().numpy()
            for r in records
            if r["layer"] == last
        }
        bus, ceus = _unnormalise(batch["bus"]), _unnormalise(batch["ceus"])
        for j, i in enumerate(batch["index"].tolist()):
            state, box = roi_state(cases[i], n_frames[i], settings)
            yield PairPrediction(
                case=cases[i],
                n_frames=n_frames[i],
                indices=sample_indices(n_frames[i], settings.frames),
                roi=state,
                box=box,
                prob=float(prob[j]),
                bus=bus[j],
                ceus=ceus[j],
                attention={d: w[j].reshape(-1, grid, grid) for d, w in received.items()},
                layer=last,
            )
