"""Paired BUS + CEUS clips for AsyCMST: Dataset and LightningDataModule.

Each item takes T frames spread uniformly over the clip's (already ordered) frames, the same positions in BUS,
CEUS and the BUS mask, and augments them with one albumentations pipeline called once on all frames of both
modalities and the mask, so every frame gets the same random rotation, crop, flips, brightness and contrast
(paper Sec. 4.1.2).  Gray frames are repeated to 3 channels and normalised with ImageNet statistics.

Batch (contract): ``bus``/``ceus`` ``(B, T, 3, H, W)`` float, ``mask`` ``(B, T, 1, H, W)`` float {0,1},
``mask_valid`` ``(B, T)`` bool (frame has a drawn mask), ``label`` ``(B,)`` long, ``index`` ``(B,)`` long
(position in the dataset's ``cases``).

Batch size: ``batch_size`` clips per device (per process), so the global batch grows with the device count;
``global_batch_size`` instead fixes the global batch (the paper's 32) and derives the per-device batch from the
trainer's devices x nodes x gradient-accumulation steps (:func:`device_batch`).  Either way ``fit`` starts
with one line saying what the global batch is.

Splits: ``splits.json`` fold ``k`` (grouped by patient, see :mod:`datamodules.folds`), or, without a splits
file, the paper's random 5:2:3 train/val/test split over patients (``split_ratio``, ``seed``).

The paper's robustness studies (options of the datamodule, so they sit in the run's saved hyper-parameters):

- ``label_noise`` (Sec. 4.7, Fig. 11a): that fraction of the *training* labels flipped, per class, seeded by
  ``noise_seed`` (:func:`datamodules.perturb.flip_indices`); validation and test keep their labels, so model
  selection and the reported metrics are on clean labels.  ``setup`` says in one line how many were flipped.
- ``mask_noise`` / ``mask_noise_px`` (Sec. 4.7, Fig. 11b): the *training* BUS masks dilated, eroded or jittered
  by that many pixels of the drawn mask (:mod:`datamodules.perturb`), the same way in every epoch.  The ROI crop
  (``roi``) is still taken around the drawn mask, so only the segmentation target changes, not the classifier's
  input (the paper feeds whole frames and has no crop to disturb).
- ``test_manifest`` / ``test_splits`` (Sec. 4.3, Table 3: train on one data set, test on another): the test
  (and predict) part comes from another paired manifest, fold ``k``'s test cases of ``test_splits`` (every case of
  ``test_manifest`` without it), while training and validation stay on ``manifest``'s fold ``k``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import Dataset

from datamodules.clips import read_clip, read_mask_clip
from datamodules.errors import DataError, OptionError
from datamodules.folds import load_fold
from datamodules.paired import PairedCase, check_case, read_manifest
from datamodules.parts import IMAGENET_MEAN, IMAGENET_STD, BaseDataModule
from datamodules.perturb import MASK_NOISE, flip_indices, perturb_masks
from datamodules.stacks import centred_box, seeded

PARTS = ("train", "val", "test")


def sample_indices(n_frames: int, frames: int) -> np.ndarray:
    """``frames`` positions spread uniformly over ``[0, n_frames)`` (first and last included; repeats when the
    clip is shorter than ``frames``)."""
    if n_frames < 1:
        raise ValueError("empty clip")
    return np.linspace(0, n_frames - 1, frames).round().astype(np.int64)


def build_transform(size: int, augment: bool) -> A.Compose:
    """The shared spatial + intensity pipeline (Sec. 4.1.2); called with ``images=`` / ``masks=`` so one draw
    of random parameters applies to every frame."""
    if not augment:
        return A.Compose([A.Resize(size, size)])
    return A.Compose(
        [
            A.Rotate(limit=15, border_mode=cv2.BORDER_CONSTANT, p=0.5),
            A.RandomResizedCrop(size=(size, size), scale=(0.7, 1.0), ratio=(0.85, 1.15)),
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
        ]
    )


def roi_box(mask: np.ndarray, valid: np.ndarray, context: float) -> tuple[int, int, int, int] | None:
    """Square crop ``(y0, y1, x0, x1)`` around the annotated nodule: the bounding box of the drawn masks of the
    clip (``valid`` frames, union), its longer side times ``context``, centred on the box and shifted to lie
    inside the frame (at most the whole frame's shorter side).  ``None`` when no frame has a drawn, non-empty
    mask (then the whole frame is used)."""
    drawn = mask[np.asarray(valid, dtype=bool)]
    if not drawn.size or not drawn.any():
        return None
    ys, xs = np.nonzero(drawn.max(axis=0))
    h, w = mask.shape[1:]
    side = int(min(round(max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) * context), h, w))
    cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
    y0, x0, y1, x1 = centred_box(cy, cx, side, side, (h, w))
    return y0, y1, x0, x1


def _resize_frames(frames: np.ndarray, size: int, interpolation: int) -> np.ndarray:
    """``(N, H, W)`` uint8 -> ``(N, size, size)``: the frames as the channels of one image, so one cv2 call
    resizes them all (cv2 takes up to 512 channels; each channel is interpolated on its own)."""
    if frames.shape[1:] == (size, size):
        return frames
    out = [
        cv2.resize(np.ascontiguousarray(chunk.transpose(1, 2, 0)), (size, size), interpolation=interpolation)
        for chunk in np.array_split(frames, -(-len(frames) // 512))
    ]
    return np.concatenate([o.reshape(size, size, -1).transpose(2, 0, 1) for o in out])


def _normalise(frames: np.ndarray) -> torch.Tensor:
    """``(T, H, W)`` uint8 gray -> ``(T, 3, H, W)`` float, ImageNet-normalised."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).float().div_(255.0)
    x = x[:, None].expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class PairedVideoDataset(Dataset):
    """T-frame BUS/CEUS/mask samples of validated cases.

    Args:
        cases: the cases, validated already (``n_frames`` from :func:`datamodules.paired.check_case`).
        n_frames: frame count of each case.
        frames: T frames per sample.
        size: output side in pixels.
        augment: random augmentation (training) or a plain resize.
        cache: keep each sample in memory after its first read when it is deterministic (``augment=False``),
            so later epochs skip decoding and resizing (a CPU-size set fits in RAM; each DataLoader worker
            holds its own copy).
        roi: crop every frame of both modalities (and the mask) to the annotated nodule before resizing: a
            square of ``roi`` times the longer side of the masks' bounding box (:func:`roi_box`); ``None``
            keeps the whole frame.  Clips without a drawn mask keep the whole frame.
        mask_noise: ``(mode, px, seed)``: perturb the drawn masks (:func:`datamodules.perturb.perturb_masks`)
            on the whole frame, after the ROI box is taken from the clean ones; ``None``: masks as drawn.
    """

    def __init__(
        self,
        cases: Sequence[PairedCase],
        n_frames: Sequence[int],
        *,
        frames: int,
        size: int,
        augment: bool,
        cache: bool = False,
        roi: float | None = None,
        mask_noise: tuple[str, float, int] | None = None,
    ):
        if len(cases) != len(n_frames):
            raise ValueError("cases and n_frames differ in length")
        if roi is not None and roi < 1:
            raise ValueError(f"roi must be >= 1 (context around the nodule box), got {roi}")
        self.cases, self.n_frames = list(cases), list(n_frames)
        self.frames, self.size, self.augment, self.roi = frames, size, augment, roi
        self.mask_noise = mask_noise
        self.transform = build_transform(size, augment)
        self._cache: dict[int, dict[str, torch.Tensor]] | None = {} if cache and not augment else None

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self._cache is None:
            return self._load(i)
        if i not in self._cache:
            self._cache[i] = self._load(i)
        return self._cache[i]

    def _load(self, i: int) -> dict[str, torch.Tensor]:
        case = self.cases[i]
        idx = sample_indices(self.n_frames[i], self.frames)
        bus = read_clip(case.bus, idx)
        ceus = read_clip(case.ceus, idx)
        if ceus.shape != bus.shape:  # BUS and CEUS from different exports: bring CEUS onto the BUS grid
            ceus = np.stack([cv2.resize(f, (bus.shape[2], bus.shape[1])) for f in ceus])
        if case.bus_mask is not None:
            mask, valid = read_mask_clip(case.bus_mask, idx)
        else:
            mask, valid = np.zeros_like(bus), np.zeros(self.frames, dtype=bool)
        box = roi_box(mask, valid, self.roi) if self.roi is not None else None
        if self.mask_noise is not None:  # on the whole frame, after the box: the crop stays the clean one
            mode, px, seed = self.mask_noise
            mask = perturb_masks(mask, valid, mode, px, seed=seed, case_id=case.case_id, frames=idx)
        if box is not None:
            y0, y1, x0, x1 = box
            bus, ceus, mask = (a[:, y0:y1, x0:x1] for a in (bus, ceus, mask))
        if self.augment:
            # one random draw for all 2T images and T masks
            out = seeded(self.transform)(images=np.concatenate([bus, ceus]), masks=mask)
            images, mask = out["images"], out["masks"]
        else:  # the plain resize of build_transform(augment=False), in two cv2 calls instead of 3T
            images = _resize_frames(np.concatenate([bus, ceus]), self.size, cv2.INTER_LINEAR)
            mask = _resize_frames(mask, self.size, cv2.INTER_NEAREST)
        t = self.frames
        images = _normalise(images)
        return {
            "bus": images[:t],
            "ceus": images[t:],
            "mask": torch.from_numpy(np.ascontiguousarray(mask)).float()[:, None],
            "mask_valid": torch.from_numpy(np.asarray(valid, dtype=bool)),
            "label": torch.tensor(case.label, dtype=torch.long),
            "index": torch.tensor(i, dtype=torch.long),
        }


def device_batch(global_batch: int, devices: int = 1, num_nodes: int = 1, accumulate: int = 1) -> int:
    """Clips per device and step for a global batch of ``global_batch`` clips per optimiser step over
    ``devices`` x ``num_nodes`` processes with ``accumulate`` gradient-accumulation steps; a global batch that
    does not divide evenly is a one-line :class:`DataError` (a rounded batch would silently change it)."""
    share = devices * num_nodes * accumulate
    per, rest = divmod(int(global_batch), share)
    if global_batch < 1 or rest or per < 1:
        raise DataError(
            None,
            f"data.global_batch_size {global_batch} does not split evenly over {devices} device(s) x "
            f"{num_nodes} node(s) x {accumulate} accumulation step(s); choose a multiple of {share}",
        )
    return per


def ratio_split(
    cases: Sequence[PairedCase], ratio: Sequence[float], seed: int
) -> dict[str, list[PairedCase]]:
    """Random train/val/test split over patients in proportion ``ratio`` (paper: 5:2:3), reproducible by seed.
    All cases of one patient land in the same part."""
    if len(ratio) != 3 or min(ratio) < 0 or sum(ratio) <= 0:
        raise ValueError(f"split_ratio must be three non-negative numbers, got {ratio}")
    patients = sorted({c.patient_id for c in cases})
    order = np.random.default_rng(seed).permutation(len(patients))
    cum = np.cumsum(ratio) / sum(ratio)
    cuts = np.round(cum * len(patients)).astype(int)
    part_of = {}
    for rank, p in enumerate(order):
        part_of[patients[p]] = PARTS[int(np.searchsorted(cuts, rank, side="right"))]
    return {part: [c for c in cases if part_of[c.patient_id] == part] for part in PARTS}


def _fold_parts(
    cases: list[PairedCase], splits: str | os.PathLike, fold: int | None, manifest: str | os.PathLike
) -> dict[str, list[PairedCase]]:
    """Fold ``fold`` of ``splits`` as train/val/test case lists of ``manifest``'s ``cases`` (every id must be
    in the manifest: one :class:`DataError` line naming the splits file otherwise)."""
    ids = load_fold(splits, fold)
    by_id = {c.case_id: c for c in cases}
    missing = sorted({i for part in ids.values() for i in part} - set(by_id))
    if missing:
        raise DataError(splits, f"{len(missing)} case id(s) not in manifest {manifest}, e.g. {missing[:3]}")
    return {part: [by_id[i] for i in ids[part]] for part in PARTS}


class PairedVideoDataModule(BaseDataModule):
    """BUS + CEUS clips from a manifest CSV (``case_id,patient_id,label,bus,ceus[,bus_mask]``).

    Args:
        manifest: the manifest CSV (:func:`datamodules.paired.read_manifest`).
        splits: ``splits.json`` with case ids; ``None`` = random ``split_ratio`` split over patients.
        fold: fold of ``splits`` (test = fold k, val = k+1, train = rest); ``None`` = every case in training.
        frames: T frames per clip (must equal the model's ``num_frames``).
        size: frame side in pixels (must equal the model's ``img_size``).
        batch_size: clips per batch on each device (process); ignored when ``global_batch_size`` is set.
        global_batch_size: clips per optimiser step over all devices (the paper: 32); the per-device batch is
            ``global_batch_size / (devices x num_nodes x accumulate_grad_batches)`` (:func:`device_batch`),
            so the lr stays matched to the batch on any number of GPUs.  ``None``: ``batch_size`` per device.
        num_workers: DataLoader workers.
        split_ratio: train:val:test proportions when there is no splits file (paper Sec. 4.1.2: 5:2:3).
        seed: seed of the ratio split.
        augment: augment training clips (validation/test/predict are only resized).
        cache: keep un-augmented samples in memory after their first read (validation, test, predict, and
            training when ``augment`` is off): at CPU demo size the epochs then cost only the model.
        roi: crop both modalities to the annotated nodule (the BUS mask's box times ``roi``, e.g. 1.5) before
            resizing, in every part, as STACT-Time's ROI crops do; ``None`` (the paper's input): whole frames.
        label_noise: fraction of the training labels flipped, per class (module docstring); 0: none.
        mask_noise: ``dilate``, ``erode`` or ``jitter`` the training masks by ``mask_noise_px`` pixels; ``None``:
            as drawn.
        mask_noise_px: the amount, in pixels of the drawn masks.
        noise_seed: seed of the flipped labels and of the jitter.
        test_manifest: test on this paired manifest instead (cross-data-set transfer); ``None``: ``manifest``.
        test_splits: ``splits.json`` of ``test_manifest``: test on its fold ``fold``; ``None``: every case of it.

    Loaders: :class:`~datamodules.parts.BaseDataModule`'s, training dropping its last incomplete batch.
    ``setup`` validates every case it uses (:func:`datamodules.paired.check_case`), so bad files raise
    :class:`DataError` in the main process, never from a worker.
    """

    def __init__(
        self,
        manifest: str | os.PathLike = "data/synth/paired/manifest.csv",
        splits: str | os.PathLike | None = None,
        fold: int | None = None,
        frames: int = 16,
        size: int = 224,
        batch_size: int = 32,
        num_workers: int = 0,
        split_ratio: tuple[float, float, float] = (5, 2, 3),
        seed: int = 0,
        augment: bool = True,
        cache: bool = False,
        roi: float | None = None,
        global_batch_size: int | None = None,
        label_noise: float = 0.0,
        mask_noise: str | None = None,
        mask_noise_px: float = 0.0,
        noise_seed: int = 0,
        test_manifest: str | os.PathLike | None = None,
        test_splits: str | os.PathLike | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.check_options()
        self.check_noise_options()
        self.datasets: dict[str, PairedVideoDataset] = {}
        self._device_batch: int | None = None
        self.flipped: list[str] = []  # case ids whose training label was flipped (label_noise)

    def check_noise_options(self) -> None:
        """One-line :class:`OptionError` for impossible noise or transfer settings, at construction."""
        hp = self.hparams
        if not 0.0 <= float(hp.label_noise) <= 1.0:
            raise OptionError("label_noise", f"must be a fraction in [0, 1], got {hp.label_noise}")
        if hp.mask_noise is not None and hp.mask_noise not in MASK_NOISE:
            raise OptionError(
                "mask_noise", f"must be one of {', '.join(MASK_NOISE)} or null, got {hp.mask_noise!r}"
            )
        if float(hp.mask_noise_px) < 0:
            raise OptionError("mask_noise_px", f"must be >= 0 pixels, got {hp.mask_noise_px}")
        if hp.test_splits is not None and hp.test_manifest is None:
            raise OptionError("test_splits", "needs test_manifest (the manifest those splits belong to)")

    @property
    def device_batch_size(self) -> int:
        """Clips per batch on this device: derived from ``global_batch_size`` in :meth:`setup` (from the
        trainer's devices, nodes and accumulation), else ``batch_size``."""
        return self._device_batch or self.hparams.batch_size

    def _derive_batch(self, stage: str | None) -> None:
        """Per-device batch from ``global_batch_size`` and the trainer; one line at the start of ``fit``."""
        hp, trainer = self.hparams, getattr(self, "trainer", None)
        if trainer is None:
            devices, nodes, accumulate = 1, 1, 1
        else:
            devices, nodes = trainer.num_devices, trainer.num_nodes
            accumulate = trainer.accumulate_grad_batches
        if hp.global_batch_size is not None:
            self._device_batch = device_batch(hp.global_batch_size, devices, nodes, accumulate)
        if stage == "fit":
            per = self.device_batch_size
            rank_zero_info(
                f"Global batch {per * devices * nodes * accumulate} clips per optimiser step = {per} per "
                f"device x {devices} device(s) x {nodes} node(s) x {accumulate} accumulation step(s)"
                + ("" if hp.global_batch_size is not None else " (data.batch_size is per device)")
            )

    def _parts(self, cases: list[PairedCase]) -> dict[str, list[PairedCase]]:
        hp = self.hparams
        if hp.splits is None:
            parts = ratio_split(cases, hp.split_ratio, hp.seed)
        else:
            parts = _fold_parts(cases, hp.splits, hp.fold, hp.manifest)
        if hp.test_manifest is not None:
            other = read_manifest(hp.test_manifest)
            if hp.test_splits is None:
                parts["test"] = other
            else:
                parts["test"] = _fold_parts(other, hp.test_splits, hp.fold, hp.test_manifest)["test"]
        if hp.label_noise:
            parts["train"] = self._flip(parts["train"])
        return parts

    def _flip(self, train: list[PairedCase]) -> list[PairedCase]:
        """The training cases with ``label_noise`` of each class's labels flipped (one line says how many)."""
        hp = self.hparams
        flip = set(
            flip_indices([c.label for c in train], [c.case_id for c in train], hp.label_noise, hp.noise_seed)
        )
        self.flipped = sorted(train[i].case_id for i in flip)
        counts = [(sum(train[i].label == c for i in flip), sum(x.label == c for x in train)) for c in (0, 1)]
        rank_zero_info(
            f"Label noise {hp.label_noise:g}: flipped {counts[0][0]} of {counts[0][1]} benign and {counts[1][0]} "
            f"of {counts[1][1]} malignant training labels (noise_seed {hp.noise_seed}); validation and test keep "
            "theirs"
        )
        return [dataclasses.replace(c, label=1 - c.label) if i in flip else c for i, c in enumerate(train)]

    def setup(self, stage: str | None = None) -> None:
        self._derive_batch(stage)
        if self.datasets:
            return
        hp = self.hparams
        cases = read_manifest(hp.manifest)
        if not cases:
            raise DataError(hp.manifest, "manifest lists no cases")
        parts = self._parts(cases)
        # validate every used case here, in the main process, from clip headers where the format allows:
        # a bad file stops the run with one DataError line before any DataLoader worker starts
        mask_noise = None
        if hp.mask_noise is not None and hp.mask_noise_px > 0:
            mask_noise = (hp.mask_noise, float(hp.mask_noise_px), int(hp.noise_seed))
        for part, part_cases in parts.items():
            self.datasets[part] = PairedVideoDataset(
                part_cases,
                [check_case(c) for c in part_cases],
                frames=hp.frames,
                size=hp.size,
                augment=hp.augment and part == "train",
                cache=hp.cache,
                roi=hp.roi,
                mask_noise=mask_noise if part == "train" else None,
            )
        # prediction: the held-out test cases, or every case when there is no test part (fold=None)
        test = self.datasets["test"]
        self.datasets["predict"] = PairedVideoDataset(
            test.cases or cases,
            test.n_frames if test.cases else [check_case(c) for c in cases],
            frames=hp.frames,
            size=hp.size,
            augment=False,
            cache=hp.cache,
            roi=hp.roi,
        )

    def drop_last(self, part: str, data: Dataset) -> bool:
        """Training drops its last, incomplete batch whenever there is more than one batch."""
        return part == "train" and len(data) > self.device_batch_size
