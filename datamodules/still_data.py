"""Still images for training: :class:`StillDataset` (resize, optional ROI crop around the annotated or a
predicted mask, augmentation) and :class:`StillDataModule` (one fold of ``splits.json``), over the manifest
of :mod:`datamodules.stills`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from datamodules.clips import read_image_mask
from datamodules.errors import DataError, OptionError
from datamodules.folds import load_fold
from datamodules.frames import natural_key
from datamodules.parts import BaseDataModule
from datamodules.stacks import NORMALIZE, centred_box, grow_box, seeded
from datamodules.stanford import Box, bbox_from_mask
from datamodules.stills import StillCase, read_manifest, read_still, read_still_mask

__all__ = [
    "roi_box",
    "jitter_box",
    "PredictedStillMasks",
    "StillDataset",
    "StillDataModule",
    "build_transform",
    "subtype_indices",
]

PARTS = ("train", "val", "test")


# -------------------------------------------------------------------------------------------------- ROI


def roi_box(mask: np.ndarray, margin: float, square: bool = False, min_side: float = 0.0) -> Box | None:
    """Box ``(y0, x0, y1, x1)`` (end-exclusive) of the mask's non-zero pixels grown by ``margin`` times the
    box's longer side on every side, clipped at the image border; None for an empty mask (the caller keeps
    the whole image).  The margin is relative (not STACT-Time's fixed 5 px) because public still sets mix
    image sizes from ~200 to ~1500 px: a choice, made here.

    ``square=True``: a square of side ``longer side * (1 + 2 * margin)`` centred on the box, shifted to lie
    inside the image rather than clipped (at most the image's shorter side), as the AsyCMST crop
    (:func:`datamodules.paired_video.roi_box`).  Resized to a square input it keeps the nodule's aspect ratio
    (taller-than-wide, roundness) and its size relative to the crop, which the plain box, stretched to a square,
    throws away; no padding is invented, so a nodule near the border sits off-centre instead.

    ``min_side`` (with ``square``): the square is at least this fraction of the image's shorter side.  When it
    exceeds ``longer side * (1 + 2 * margin)`` for every nodule of a set (e.g. 0.6 of a 96 px still: a 58 px
    window, nodules up to 48 px), every crop has the same scale, so after the resize the nodule keeps its size
    in pixels as well as its aspect (and its foci their native sharpness), and a small nodule comes with more
    of its surroundings (a halo, the acoustic shadow below a calcification) rather than blown up to fill the
    input.  0 (default): the square follows the nodule's size."""
    box = bbox_from_mask(mask)
    if box is None:
        return None
    side = max(box[2] - box[0], box[3] - box[1])
    if not square:
        return grow_box(box, int(round(margin * side)), mask.shape)
    s = int(min(max(side + 2 * round(margin * side), round(min_side * min(mask.shape))), *mask.shape))
    return centred_box((box[0] + box[2]) / 2, (box[1] + box[3]) / 2, s, s, mask.shape)


def jitter_box(box: Box, jitter: float, shape: tuple[int, int]) -> Box:
    """``box`` moved by up to ``jitter`` times its height / width along each axis and its sides scaled by one
    factor in ``[1 - jitter, 1 + jitter]`` (a square stays a square), kept inside the image of ``shape``: the
    training-time ROI augmentation of ``roi_jitter`` (random numbers from torch, so ``seed_everything`` and the
    loader's worker seeding govern it).  Translation and a mild zoom keep the nodule's shape and its ring of
    surrounding tissue, where the plain flips show the network the same crops every epoch."""
    h, w = shape
    y0, x0, y1, x1 = box
    bh, bw = y1 - y0, x1 - x0
    u = (2 * torch.rand(3) - 1).tolist()
    f = 1 + jitter * u[0]
    nh, nw = max(1, min(round(bh * f), h)), max(1, min(round(bw * f), w))
    if bh == bw:
        nh = nw = min(nh, nw)
    cy, cx = (y0 + y1) / 2 + jitter * u[1] * bh, (x0 + x1) / 2 + jitter * u[2] * bw
    return centred_box(cy, cx, nh, nw, shape)


class PredictedStillMasks:
    """Predicted masks of still images (what a segmentation stage writes), looked up by case id.

    ``source``: an HDF5 file with one ``(H, W)`` uint8 dataset per case at key = case id (ids with ``/`` become
    groups), or a folder holding ``<case id>.png`` (``/`` in ids = sub-folders).  Values: {0,1} or {0,255}.
    Every case asked for must be present (checked by :meth:`check` in the main process).
    """

    def __init__(self, source: str | os.PathLike):
        self.source = Path(source)
        if not self.source.exists():
            raise DataError(self.source, "predicted masks do not exist (a folder of PNGs or an HDF5 file)")
        self.is_h5 = self.source.is_file()
        self._h5 = None
        self._pid = None

    def _file(self):
        import h5py

        if self._h5 is None or self._pid != os.getpid():  # a handle per process, as LazyH5
            try:
                self._h5 = h5py.File(self.source, "r")
            except OSError as e:
                raise DataError(self.source, f"not a readable HDF5 file ({e})") from None
            self._pid = os.getpid()
        return self._h5

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_h5": None, "_pid": None}

    def _png(self, case_id: str) -> Path:
        return self.source / f"{case_id}.png"

    def check(self, case_ids: Sequence[str]) -> None:
        missing = [
            i for i in case_ids if (i not in self._file() if self.is_h5 else not self._png(i).is_file())
        ]
        if missing:
            raise DataError(self.source, f"no predicted mask for {len(missing)} case(s), e.g. {missing[:3]}")

    def mask(self, case_id: str, shape: tuple[int, int]) -> np.ndarray:
        if self.is_h5:
            arr = np.asarray(self._file()[case_id][()])
            if not np.isin(arr, (0, 1, 255)).all():
                raise DataError(
                    self.source, f"predicted mask {case_id!r} has values outside {{0,1}} / {{0,255}}"
                )
            arr = (arr > 0).astype(np.uint8)
        else:
            arr = read_image_mask(self._png(case_id))
        if arr.shape != tuple(shape):
            raise DataError(
                self.source, f"predicted mask {case_id!r} is {arr.shape}, the image is {tuple(shape)}"
            )
        return arr


# ------------------------------------------------------------------------------------------------ subtypes


def subtype_indices(
    cases: Sequence[StillCase],
    subtypes: Sequence[str],
    benign_subtypes: Sequence[str] = ("benign",),
    source: str | os.PathLike | None = None,
) -> list[int]:
    """The index of each case's ``subtype`` in ``subtypes`` (the class list, fixed by the caller so that an
    index means the same class in every fold, also when a fold's training part lacks a rare class).

    Exact, case-sensitive names.  One :class:`DataError` line (naming ``source``, the manifest) for a blank or
    unknown subtype, and for a subtype that contradicts the malignancy label: a subtype in
    ``benign_subtypes`` needs ``label`` 0, any other one ``label`` 1 (e.g. ``benign`` with label 1 is refused).
    """
    subtypes = list(subtypes)
    if len(set(subtypes)) != len(subtypes) or len(subtypes) < 2:
        raise ValueError(f"subtypes must be at least two distinct names, got {subtypes}")
    benign = set(benign_subtypes)
    if not benign <= set(subtypes):
        raise ValueError(f"benign_subtypes {sorted(benign - set(subtypes))} are not in subtypes {subtypes}")
    index = {name: i for i, name in enumerate(subtypes)}
    out = []
    for c in cases:
        if c.subtype not in index:
            what = "has no subtype" if not c.subtype else f"has subtype {c.subtype!r}"
            raise DataError(source, f"case {c.case_id!r} {what}; expected one of {subtypes}")
        if int(c.subtype not in benign) != c.label:
            kind = "benign" if c.subtype in benign else "malignant"
            raise DataError(
                source,
                f"case {c.case_id!r}: subtype {c.subtype!r} is {kind} but its label is {c.label} "
                f"(benign_subtypes: {sorted(benign)})",
            )
        out.append(index[c.subtype])
    return out


# ------------------------------------------------------------------------------------------------ dataset


def build_transform(size: int, augment: bool):
    """Resize to ``size`` x ``size`` (the aspect ratio is not kept, as every reader here), plus, for training,
    horizontal flip and brightness/contrast (the light augmentation of the stack stages), applied to image and
    mask with one draw of random parameters.  Vertical flips are left out: ultrasound has a depth direction."""
    import albumentations as A

    ops = [A.Resize(size, size)]
    if augment:
        ops += [
            A.HorizontalFlip(p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
        ]
    return A.Compose(ops)


class StillDataset(Dataset):
    """Items of still images: ``{"image": (C, S, S) float, "mask": (1, S, S) float {0,1}, "has_mask": bool,
    "label": long, "index": long (position in ``cases``), "patient": long (position in ``patients``)}``.

    Args:
        cases: validated cases (:func:`read_manifest`).
        img_size: output side ``S``.
        roi: ``None`` (whole image), ``"annotated"`` (crop to the drawn mask's box + margin) or ``"predicted"``
            (crop to the box of ``predicted``'s mask: the deployable protocol).  An empty or absent mask keeps
            the whole image.  The returned mask is always the drawn one (cropped like the image).
        roi_margin: margin on every side as a fraction of the box's longer side (:func:`roi_box`).
        roi_square: crop a square around the box (:func:`roi_box` ``square=True``: the resize to ``S`` x ``S``
            then keeps the nodule's aspect ratio) instead of the box itself, stretched (default False).
        roi_min_side: with ``roi_square``, the square's least side as a fraction of the image's shorter side
            (:func:`roi_box` ``min_side``: one scale for every crop); 0 (default): it follows the nodule.
        predicted: the predicted masks (needed for ``roi="predicted"``).
        augment: training augmentation (:func:`build_transform`).
        roi_jitter: with ``augment``, the ROI box is also moved and zoomed at random by up to this fraction of
            its side (:func:`jitter_box`); 0 (default): the same box every epoch.
        channels: gray repeated to this many channels (3 for ImageNet backbones, 1 for segmentation nets).
        normalize: ``"imagenet"``, ``"half"`` or None ([0, 1]), as :class:`~datamodules.stacks.StackDataModule`.
        patients: the patient id list that ``patient`` indexes (default: the sorted patients of ``cases``).
        subtypes: the class list of a multi-class model (e.g. ``["benign", "PTC", "FTC", "MTC"]``); items then
            carry ``"subtype"`` (long, the index of the case's subtype in this list; :func:`subtype_indices`).
            None (default): no ``subtype`` key.
        benign_subtypes: the names in ``subtypes`` that are benign (label 0); the others are malignant.
    """

    def __init__(
        self,
        cases: Sequence[StillCase],
        *,
        img_size: int = 224,
        roi: str | None = None,
        roi_margin: float = 0.1,
        roi_square: bool = False,
        roi_min_side: float = 0.0,
        predicted: PredictedStillMasks | None = None,
        augment: bool = False,
        roi_jitter: float = 0.0,
        channels: int = 3,
        normalize: str | None = "imagenet",
        patients: Sequence[str] | None = None,
        subtypes: Sequence[str] | None = None,
        benign_subtypes: Sequence[str] = ("benign",),
    ):
        if roi not in (None, "annotated", "predicted"):
            raise ValueError(f"roi must be None, 'annotated' or 'predicted', got {roi!r}")
        if roi == "predicted" and predicted is None:
            raise ValueError("roi='predicted' needs predicted masks")
        if normalize not in NORMALIZE:
            raise ValueError(f"normalize must be 'imagenet', 'half' or None, got {normalize!r}")
        if roi_margin < 0:
            raise ValueError(f"roi_margin must be >= 0, got {roi_margin}")
        if not 0 <= roi_min_side <= 1:
            raise ValueError(f"roi_min_side must be in [0, 1], got {roi_min_side}")
        if not 0 <= roi_jitter < 1:
            raise ValueError(f"roi_jitter must be in [0, 1), got {roi_jitter}")
        self.cases = list(cases)
        self.img_size, self.roi, self.roi_margin, self.predicted = img_size, roi, roi_margin, predicted
        self.roi_square, self.roi_jitter, self.roi_min_side = roi_square, roi_jitter, roi_min_side
        self.channels = channels
        self.patients = (
            sorted({c.patient_id for c in self.cases}, key=natural_key)
            if patients is None
            else list(patients)
        )
        self._patient = {p: i for i, p in enumerate(self.patients)}
        mean, std = NORMALIZE[normalize]
        self.mean = self.std = None
        if mean is not None:
            # per-RGB-channel statistics; another channel count gets their mean (a choice, made here)
            self.mean, self.std = torch.tensor(mean), torch.tensor(std)
            if channels != len(mean):
                self.mean, self.std = self.mean.mean().repeat(channels), self.std.mean().repeat(channels)
        self.transform = build_transform(img_size, augment)
        self.augment = augment
        self.subtypes = None if subtypes is None else list(subtypes)
        self.subtype_index = (
            None if subtypes is None else subtype_indices(self.cases, subtypes, benign_subtypes)
        )

    def __len__(self) -> int:
        return len(self.cases)

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray, bool, Box | None]:
        """The image and drawn mask at full size, whether it has a drawn mask, and the ROI box (or None)."""
        case = self.cases[i]
        image = read_still(case.image)
        if case.mask is not None:
            mask = read_still_mask(case.mask)
            if mask.shape != image.shape:
                raise DataError(
                    case.mask, f"mask size {mask.shape} differs from image {case.image} {image.shape}"
                )
        else:
            mask = np.zeros_like(image)
        box = None
        if self.roi == "annotated":
            box = roi_box(mask, self.roi_margin, self.roi_square, self.roi_min_side)
        elif self.roi == "predicted":
            pred = self.predicted.mask(case.case_id, image.shape)  # type: ignore[union-attr]
            box = roi_box(pred, self.roi_margin, self.roi_square, self.roi_min_side)
        return image, mask, case.mask is not None, box

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        image, mask, has_mask, box = self.read(i)
        if box is not None:
            if self.augment and self.roi_jitter > 0:
                box = jitter_box(box, self.roi_jitter, image.shape)
            y0, x0, y1, x1 = box
            image, mask = image[y0:y1, x0:x1], mask[y0:y1, x0:x1]
        transform = seeded(self.transform) if self.augment else self.transform
        out = transform(image=image, mask=mask)
        x = torch.from_numpy(np.ascontiguousarray(out["image"])).float().div_(255.0)
        x = x[None].expand(self.channels, -1, -1)
        if self.mean is not None:
            x = (x - self.mean.view(-1, 1, 1)) / self.std.view(-1, 1, 1)
        case = self.cases[i]
        return {
            "image": x.contiguous(),
            "mask": torch.from_numpy(np.ascontiguousarray(out["mask"])).float()[None],
            "has_mask": torch.tensor(has_mask),
            "label": torch.tensor(case.label, dtype=torch.long),
            "index": torch.tensor(i, dtype=torch.long),
            "patient": torch.tensor(self._patient[case.patient_id], dtype=torch.long),
            **(
                {}
                if self.subtype_index is None
                else {"subtype": torch.tensor(self.subtype_index[i], dtype=torch.long)}
            ),
        }


class StillDataModule(BaseDataModule):
    """Still images of one fold of ``splits.json`` (test = fold k, validation = fold k+1, training = the rest;
    :mod:`datamodules.folds`), read from a manifest (:func:`read_manifest`).

    Args:
        manifest: the still-image manifest CSV.
        splits: ``splits.json`` written by ``usnodule split <manifest>`` (ids = the manifest's case ids).
        fold: the fold; ``None`` = every case in training.
        img_size: output side in pixels.
        roi: ``None`` | ``"annotated"`` | ``"predicted"`` (:class:`StillDataset`); the same in every part.
        roi_margin: ROI margin, a fraction of the box's longer side.
        roi_square: a square crop around the box, so the resize keeps the nodule's aspect ratio
            (:func:`roi_box`); False (default): the box itself, stretched to a square.
        roi_min_side: with ``roi_square``, the square's least side as a fraction of the image's shorter side
            (one scale for every crop: the nodule keeps its size in pixels); 0 (default): none.  Ours (neither
            paper crops this way): a switch for crops that keep size as well as aspect (:func:`roi_box`).
        predicted_masks: a folder of ``<case id>.png`` or an HDF5 file keyed by case id
            (:class:`PredictedStillMasks`), for ``roi="predicted"``.
        channels: image channels (gray repeated).
        normalize: ``"imagenet"`` | ``"half"`` | None.
        augment: training augmentation (flip, brightness/contrast); other parts are only resized.
        roi_jitter: with ``augment``, the training ROI box moved and zoomed at random by up to this fraction of
            its side (:func:`jitter_box`); 0 (default): none.
        predict_ids: ``"all"`` (default), ``"train"``, ``"val"``, ``"test"`` or a list of case ids.
        subtypes: the class list of a multi-class model, fixed here (not read from the data) so that indices
            are the same in every fold; items then carry ``subtype`` (:func:`subtype_indices`: every case of the
            manifest must have one of these names, consistent with its label).  None: no ``subtype`` key.
        benign_subtypes: the names of ``subtypes`` that are benign (label 0).
        class_sampling: the training loader draws each epoch's ``len(train)`` images with replacement, an image
            of a class of ``N_c`` training images with probability proportional to ``N_c ** -class_sampling``
            (the class: its subtype with ``subtypes``, else its label): 1 = every class equally often (the rare
            subtypes seen ~12x more, each time with a new augmentation draw), 0.5 = square-root sampling; 0
            (default): a plain shuffle, each image once per epoch.  Ours, not CSASN's (its class balancing is
            the dynamically weighted loss): with ~18 training images per rare subtype a batch of 32 holds one
            or two of them, and the weighted loss alone left MTC nearly never predicted (BENCHMARKS.md, CSASN
            rounds 2 and 3); drawing them more often gives the loss more of them to weigh.
        batch_size, num_workers: the loaders (:class:`~datamodules.parts.BaseDataModule`).

    ``setup`` validates the manifest and splits (and the predicted masks of every case used) in the main
    process, so a bad file stops the run with one :class:`DataError` line before a worker starts.
    """

    drop_single_last = True  # ResNet / EfficientNet have BatchNorm

    def __init__(
        self,
        manifest: str | os.PathLike = "data/stills/manifest.csv",
        splits: str | os.PathLike | None = None,
        fold: int | None = 0,
        img_size: int = 224,
        roi: str | None = None,
        roi_margin: float = 0.1,
        roi_square: bool = False,
        roi_min_side: float = 0.0,
        predicted_masks: str | os.PathLike | None = None,
        channels: int = 3,
        normalize: str | None = "imagenet",
        augment: bool = False,
        roi_jitter: float = 0.0,
        predict_ids: str | list[str] = "all",
        subtypes: list[str] | None = None,
        benign_subtypes: list[str] = ["benign"],  # noqa: B006  (a YAML default, never mutated)
        class_sampling: float = 0.0,
        batch_size: int = 32,
        num_workers: int = 0,
    ):
        super().__init__()
        # checked here, not first in setup(): a bad value is a one-line error before any fit starts
        if not 0 <= roi_min_side <= 1:
            raise OptionError(
                "roi_min_side", f"must be in [0, 1] (a share of the image's side), got {roi_min_side}"
            )
        if roi_min_side and not (roi_square and roi):
            raise OptionError(
                "roi_min_side", "sets the size of the square ROI crop: it needs roi_square: true and a roi"
            )
        if not 0 <= class_sampling <= 1:
            raise OptionError(
                "class_sampling", f"must be in [0, 1] (0 shuffle, 1 balanced), got {class_sampling}"
            )
        self.save_hyperparameters()
        self.cases: list[StillCase] = []
        self.datasets: dict[str, StillDataset] = {}

    def _parts(self) -> dict[str, list[StillCase]]:
        hp = self.hparams
        by_id = {c.case_id: c for c in self.cases}
        if hp.splits is None:
            if hp.fold is not None:
                raise ValueError("fold needs a splits file (splits=None trains on every case: fold=None)")
            ids = {"train": list(by_id), "val": [], "test": []}
        else:
            ids = load_fold(hp.splits, hp.fold)
        missing = sorted({i for part in ids.values() for i in part} - set(by_id))
        if missing:
            raise DataError(
                hp.splits, f"{len(missing)} case id(s) not in manifest {hp.manifest}, e.g. {missing[:3]}"
            )
        parts = {part: [by_id[i] for i in ids[part]] for part in PARTS}
        pred = hp.predict_ids
        if isinstance(pred, str):
            if pred != "all" and pred not in parts:
                raise ValueError(f"predict_ids must be 'all', 'train', 'val', 'test' or a list, got {pred!r}")
            parts["predict"] = self.cases if pred == "all" else parts[pred]
        else:
            unknown = [i for i in pred if i not in by_id]
            if unknown:
                raise DataError(hp.manifest, f"predict_ids not in the manifest, e.g. {unknown[:3]}")
            parts["predict"] = [by_id[i] for i in pred]
        return parts

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        hp = self.hparams
        self.cases = read_manifest(hp.manifest)
        if hp.subtypes is not None:  # every case of the manifest, so a bad row stops every fold alike
            subtype_indices(self.cases, hp.subtypes, hp.benign_subtypes, hp.manifest)
        parts = self._parts()
        predicted = None
        if hp.roi == "predicted":
            if hp.predicted_masks is None:
                raise ValueError("roi='predicted' needs predicted_masks (a folder of PNGs or an HDF5 file)")
            predicted = PredictedStillMasks(hp.predicted_masks)
            predicted.check(sorted({c.case_id for cases in parts.values() for c in cases}))
        patients = sorted({c.patient_id for c in self.cases}, key=natural_key)
        for part, cases in parts.items():
            self.datasets[part] = StillDataset(
                cases,
                img_size=hp.img_size,
                roi=hp.roi,
                roi_margin=hp.roi_margin,
                roi_square=hp.roi_square,
                roi_min_side=hp.roi_min_side,
                predicted=predicted,
                augment=hp.augment and part == "train",
                roi_jitter=hp.roi_jitter,
                channels=hp.channels,
                normalize=hp.normalize,
                patients=patients,
                subtypes=hp.subtypes,
                benign_subtypes=hp.benign_subtypes,
            )

    def sample_weights(self) -> torch.Tensor:
        """Each training image's draw weight, ``N_c ** -class_sampling`` of its class (``class_sampling``)."""
        train = self.datasets["train"]
        classes = train.subtype_index if train.subtype_index is not None else [c.label for c in train.cases]
        classes = torch.as_tensor(classes, dtype=torch.long)
        counts = torch.bincount(classes).double()
        return counts[classes] ** -float(self.hparams.class_sampling)

    def train_dataloader(self) -> DataLoader:
        if not self.hparams.class_sampling:
            return super().train_dataloader()
        # torch's global generator draws the indices: seed_everything makes them repeatable
        n = len(self.datasets["train"])
        return self._loader(
            "train", sampler=WeightedRandomSampler(self.sample_weights(), n, replacement=True)
        )
