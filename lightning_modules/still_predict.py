"""The two still-image systems on new images: a fold's trained checkpoints and their test-time path.

Preprocessing is not re-implemented: each image becomes a :class:`~datamodules.stills.StillCase` read by
:class:`InMemoryStills`, the :class:`~datamodules.still_data.StillDataset` the fold's data module tests with
(resize, gray to channels, normalisation, ROI crop of box + margin), under the data settings saved in each
checkpoint; only where its pixels come from differs (held in memory, so that a DICOM tissue region can be cut
out first).

* **Two-stage** (:class:`TwoStage`): TransUNet's nodule probability at its input size, resized back to the
  image bilinearly and thresholded (:func:`full_size_mask`, the code of ``usnodule still-masks``), then the box
  of that mask + the classifier's margin, cropped, into the ROI ResNet-18: so an image gets the input its
  manifest row got in the fold's test step (the classifier was trained on predicted-mask crops, ``roi:
  predicted``).  An empty predicted mask keeps the whole image, as the data module does.  A classifier trained on
  drawn-mask crops (``roi: annotated``, the not-deployable switch) still gets the predicted-mask crop (a new
  image has no drawn mask), and the ``roi`` column says ``predicted (trained on drawn)``.
* **CSASN** (:class:`CSASN`): the subtype probabilities and the malignant probability of
  :meth:`~lightning_modules.csasn_stage.CSASNStage.probabilities`.  A checkpoint trained on drawn-mask crops
  (``roi: annotated``, the demo and paper-size configs) needs the drawn mask to crop a new image the same way;
  without one the whole image is used, as the data module does for an image without a mask, and the ``roi``
  column says ``missing`` (``empty`` for an all-zero mask): no box is guessed.

Checks (one :class:`~datamodules.errors.DataError` line each): a checkpoint of another stage than the one its
role needs (``--transunet`` given a CSASN checkpoint ...), checkpoints of another fold than the one asked for or
than the ``fold<k>`` folder they sit in, the two two-stage checkpoints of different folds or data, and an ROI
classifier fitted on predicted masks made by another TransUNet than the one given
(:mod:`datamodules.provenance`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from datamodules.errors import DataError
from datamodules.provenance import (
    UNKNOWN,
    check_fold_set,
    check_upstream,
    checkpoint_record,
    fold_name,
    fold_of,
    fold_of_dir,
)
from datamodules.stanford import Box
from datamodules.still_data import StillDataset, roi_box
from datamodules.stills import StillCase
from lightning_modules.export import pick_device

# The checkpoints of a fold folder, per system (the Makefile's names): option name -> file name.
SYSTEM_FILES = {
    "twostage": {"transunet": "transunet.ckpt", "roi-classifier": "roi_resnet18.ckpt"},
    "csasn": {"csasn": "csasn.ckpt"},
}
# The LightningModule each option must hold.
STAGE_CLASSES = {
    "transunet": "lightning_modules.transunet_stage.TransUNetStage",
    "roi-classifier": "lightning_modules.roi_stage.RoiClassifierStage",
    "csasn": "lightning_modules.csasn_stage.CSASNStage",
}


@dataclass(frozen=True)
class StillInput:
    """One image to predict: ``case`` (its id, file, label -1 when unknown, subtype), the gray pixels
    (``(H, W)`` uint8, already cut to ``region``'s box), the drawn mask cut alike (None: none given), and the
    ``region`` (``whole image`` or the DICOM region's item number) with its box in file pixels and spacing."""

    case: StillCase
    image: np.ndarray
    mask: np.ndarray | None = None
    region: str = "whole image"
    region_box: Box | None = None
    spacing_mm: tuple[float, float] | None = None


class InMemoryStills(StillDataset):
    """:class:`~datamodules.still_data.StillDataset` over :class:`StillInput` pixels held in memory: the parent
    does the crop, resize and normalisation; :meth:`read` only hands it these pixels and the box the parent's
    own ``read`` would compute (drawn mask for ``roi="annotated"``, ``predicted`` for ``roi="predicted"``)."""

    def __init__(self, inputs: Sequence[StillInput], **kwargs) -> None:
        super().__init__([x.case for x in inputs], **kwargs)
        self.inputs = list(inputs)

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray, bool, Box | None]:
        x = self.inputs[i]
        mask = x.mask if x.mask is not None else np.zeros_like(x.image)
        box = None
        if self.roi == "annotated":
            box = roi_box(mask, self.roi_margin, self.roi_square, self.roi_min_side)
        elif self.roi == "predicted":
            pred = self.predicted.mask(x.case.case_id, x.image.shape)  # type: ignore[union-attr]
            box = roi_box(pred, self.roi_margin, self.roi_square, self.roi_min_side)
        return x.image, mask, x.mask is not None, box


class MasksInMemory:
    """Predicted masks by case id, with :class:`~datamodules.still_data.PredictedStillMasks`' ``mask``."""

    def __init__(self, masks: Mapping[str, np.ndarray]) -> None:
        self.masks = dict(masks)

    def mask(self, case_id: str, shape: tuple[int, int]) -> np.ndarray:
        return self.masks[case_id]


def full_size_mask(prob: Tensor, shape: tuple[int, int], threshold: float) -> np.ndarray:
    """``(H, W)`` uint8 {0, 1} mask from a ``(1, h, w)`` nodule probability at the network's input size:
    resized to the image bilinearly, then thresholded (smoother edges than resizing a binary mask).  The one
    copy ``usnodule still-masks`` and ``usnodule predict-still`` share."""
    full = F.interpolate(prob[None].float(), size=tuple(shape), mode="bilinear", align_corners=False)[0, 0]
    return (full.numpy() > threshold).astype(np.uint8)


def _dataset(inputs: Sequence[StillInput], data: Mapping, **override) -> InMemoryStills:
    """The test-time dataset of a checkpoint's saved data settings (``override`` wins)."""
    kwargs = dict(
        img_size=int(data.get("img_size", 224)),
        roi=data.get("roi"),
        roi_margin=float(data.get("roi_margin", 0.1)),
        roi_square=bool(data.get("roi_square", False)),
        roi_min_side=float(data.get("roi_min_side", 0.0)),
        channels=int(data.get("channels", 3)),
        normalize=data.get("normalize", "imagenet"),
    )
    kwargs.update(override)
    return InMemoryStills(inputs, **kwargs)


# ---------------------------------------------------------------------------------------------- loading
def stage_class(path: str | os.PathLike) -> str | None:
    """The LightningModule class path a checkpoint records (LightningCLI's ``_class_path``), None if none."""
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except RuntimeError:  # an old (non-zip) checkpoint cannot be memory-mapped
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
        return str(hp["_class_path"]) if isinstance(hp, Mapping) and "_class_path" in hp else None
    except Exception:  # noqa: BLE001  (a bad file: from_checkpoint says why)
        return None


def check_kind(role: str, path: Path) -> None:
    """The checkpoint given for ``role`` (a key of :data:`STAGE_CLASSES`) must be of that stage: another
    stage's is one line naming both (before anything else is read from it)."""
    want, found = STAGE_CLASSES[role], stage_class(path)
    if found is not None and found != want:
        raise DataError(
            path,
            f"is a {found.rsplit('.', 1)[-1]} checkpoint, but --{role} needs a {want.rsplit('.', 1)[-1]} one",
        )


def load_stage(role: str, path: Path, device: torch.device):
    """``(stage in eval mode on device, data settings)`` of the checkpoint given for ``role``."""
    import importlib

    check_kind(role, path)
    module, name = STAGE_CLASSES[role].rsplit(".", 1)
    stage, data = getattr(importlib.import_module(module), name).from_checkpoint(path)
    return stage.to(device), data


def check_fold(
    paths: Mapping[str, Path], fold_dir: str | os.PathLike | None, fold: int | None
) -> int | None | object:
    """The checkpoints must be of the fold asked for (``--fold``), else of the one their ``fold<k>`` folder
    is named for, and of one fold and data set among themselves; returns that fold (or UNKNOWN)."""
    for role, p in paths.items():
        check_kind(role, Path(p))
    records = {f"{role} checkpoint": (Path(p), checkpoint_record(p)) for role, p in paths.items()}
    if fold is not None:
        want, asked = fold, "--fold asks for {fold}"
    else:
        want, asked = fold_of_dir(fold_dir), f"--fold-dir {fold_dir} is {{fold}}"
    got = check_fold_set(records, fold=want, asked=asked, data={"splits": None, "manifest": None})
    return got


@dataclass
class TwoStage:
    """A fold's TransUNet and ROI classifier, their data settings and the mask threshold."""

    seg: torch.nn.Module
    seg_data: dict
    roi: torch.nn.Module
    roi_data: dict
    threshold: float
    device: torch.device
    fold: object = UNKNOWN


@dataclass
class CSASN:
    """A fold's CSASN stage and its data settings."""

    stage: torch.nn.Module
    data: dict
    device: torch.device
    fold: object = UNKNOWN


def load_twostage(
    paths: Mapping[str, Path], *, fold_dir=None, fold: int | None = None, device: str = "auto"
) -> TwoStage:
    """``paths``: ``{"transunet": ..., "roi-classifier": ...}`` (:func:`datamodules.files.resolve_fold_files`)."""
    got = check_fold(paths, fold_dir, fold)
    roi_record = checkpoint_record(paths["roi-classifier"])
    check_upstream(
        paths["roi-classifier"],
        roi_record.get("predicted_masks"),
        "checkpoint_sha256",
        paths["transunet"],
        "TransUNet checkpoint",
    )
    dev = pick_device(device)
    seg, seg_data = load_stage("transunet", paths["transunet"], dev)
    roi, roi_data = load_stage("roi-classifier", paths["roi-classifier"], dev)
    threshold = float(seg.hparams.get("threshold", 0.5))
    return TwoStage(seg, seg_data, roi, roi_data, threshold, dev, got)


def load_csasn(
    paths: Mapping[str, Path], *, fold_dir=None, fold: int | None = None, device: str = "auto"
) -> CSASN:
    got = check_fold(paths, fold_dir, fold)
    dev = pick_device(device)
    stage, data = load_stage("csasn", paths["csasn"], dev)
    if data.get("roi") == "predicted":
        raise DataError(
            paths["csasn"],
            "was trained on crops around predicted masks (data.roi: predicted), which predict-still cannot "
            "make for CSASN; use a checkpoint trained with roi: annotated or null",
        )
    return CSASN(stage, data, dev, got)


def fold_label(fold) -> str:
    return "" if fold is UNKNOWN else ("all" if fold is None else str(fold))


# ---------------------------------------------------------------------------------------------- predicting
def _batches(ds: StillDataset, batch_size: int) -> Iterator[dict[str, Tensor]]:
    yield from DataLoader(ds, batch_size=batch_size)


@torch.inference_mode()
def predict_twostage(model: TwoStage, inputs: Sequence[StillInput], batch_size: int = 16) -> list[dict]:
    """Per input: ``mask`` (the full-size predicted mask), ``roi`` state, ``prob`` (malignant)."""
    sd = model.seg_data
    stage1 = _dataset(inputs, sd, roi=None, roi_margin=0.1)
    masks: dict[str, np.ndarray] = {}
    for batch in _batches(stage1, batch_size):
        prob = model.seg.nodule_prob(batch["image"].to(model.device)).float().cpu()
        for p, i in zip(prob, batch["index"].tolist(), strict=True):
            x = inputs[i]
            masks[x.case.case_id] = full_size_mask(p, x.image.shape, model.threshold)
    trained = model.roi_data.get("roi")
    stage2 = _dataset(
        inputs, model.roi_data, roi=None if trained is None else "predicted", predicted=MasksInMemory(masks)
    )
    probs = []
    for batch in _batches(stage2, batch_size):
        probs.append(model.roi.malignant_prob(model.roi(batch["image"].to(model.device))).float().cpu())
    p = torch.cat(probs).numpy() if probs else np.zeros(0)
    out = []
    for x, prob in zip(inputs, p, strict=True):
        mask = masks[x.case.case_id]
        if trained is None:
            state = "none"
        elif not mask.any():
            state = "empty"
        else:
            state = "predicted" if trained == "predicted" else "predicted (trained on drawn)"
        out.append({"mask": mask, "roi": state, "prob": float(prob)})
    return out


@torch.inference_mode()
def predict_csasn(model: CSASN, inputs: Sequence[StillInput], batch_size: int = 16) -> list[dict]:
    """Per input: ``roi`` state, ``subtype_prob`` ``(K,)``, ``prob`` (malignant)."""
    ds = _dataset(inputs, model.data)
    subs, mals = [], []
    for batch in _batches(ds, batch_size):
        sub, mal = model.stage.probabilities(model.stage(model.stage.inputs(batch).to(model.device)))
        subs.append(sub.float().cpu())
        mals.append(mal.float().cpu())
    sub = torch.cat(subs).numpy() if subs else np.zeros((0, len(model.stage.subtypes)))
    mal = torch.cat(mals).numpy() if mals else np.zeros(0)
    trained = model.data.get("roi")
    out = []
    for x, s, m in zip(inputs, sub, mal, strict=True):
        if trained is None:
            state = "none"
        elif x.mask is None:
            state = "missing"
        elif not x.mask.any():
            state = "empty"
        else:
            state = "annotated"
        out.append({"roi": state, "subtype_prob": s, "prob": float(m)})
    return out


def in_sample(record: Mapping, manifest: Path, ids: Sequence[str]) -> tuple[int, str] | None:
    """How many of ``ids`` (case ids of ``manifest``) the fold's networks were fitted or selected on (its
    training and validation parts), when ``manifest`` is the data the checkpoint recorded; None otherwise."""
    from datamodules.folds import load_fold
    from datamodules.provenance import same_data

    fold, splits = fold_of(record), record.get("splits")
    if fold is UNKNOWN or fold is None or not splits or not Path(str(splits)).is_file():
        return None
    if same_data(record.get("manifest"), manifest) is not True:
        return None
    part = load_fold(splits, int(fold))
    seen = set(part["train"]) | set(part["val"])
    return sum(i in seen for i in ids), f"{fold_name(int(fold))} of {splits}"
