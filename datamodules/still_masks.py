"""Predicted still-image masks of one fold (``usnodule still-masks``): their provenance, and the stage-2 data
module that checks it.

The file is what :class:`~datamodules.still_data.PredictedStillMasks` reads (one ``(H, W)`` uint8 {0,1}
dataset per case, key = case id, at the image's own size) plus file attributes saying what made it
(:func:`provenance`): ``fold``, the segmentation ``checkpoint`` and its SHA-256, the ``manifest`` and
``splits`` files and their SHA-256.  Every consumer (the stage-2 data module :class:`TwoStageDataModule`, the
shape forest, ``usnodule roi-predict``) calls :func:`check_still_masks` with what it is about to use, and a
mask file of another fold, manifest or splits file stops it with one line.  Why it matters: fold k's TransUNet
was fitted on fold k's training images only; its masks of fold j's test images would be in-sample ones.

An HDF5 file without these attributes (masks a user made elsewhere) is accepted as it is: nothing can be
checked about it.  A folder of PNGs is never checked (it has no attributes).
"""

from __future__ import annotations

import os
from pathlib import Path

from datamodules.errors import DataError
from datamodules.files import file_digest
from datamodules.still_data import StillDataModule

__all__ = ["provenance", "check_still_masks", "TwoStageDataModule"]


def provenance(
    *, fold: int, checkpoint: str | os.PathLike, manifest: str | os.PathLike, splits: str | os.PathLike
) -> dict[str, str | int]:
    """The attributes a predicted-mask file records (see the module doc)."""
    return {
        "fold": int(fold),
        "checkpoint": str(Path(checkpoint).resolve()),
        "checkpoint_sha256": file_digest(checkpoint),
        "manifest": str(Path(manifest).resolve()),
        "manifest_sha256": file_digest(manifest),
        "splits": str(Path(splits).resolve()),
        "splits_sha256": file_digest(splits),
    }


def read_provenance(path: str | os.PathLike) -> dict:
    """The file attributes of a predicted-mask HDF5 (``{}`` for a folder)."""
    import h5py

    path = Path(path)
    if not path.exists():
        raise DataError(path, "predicted masks do not exist (run `usnodule still-masks`)")
    if path.is_dir():
        return {}
    try:
        with h5py.File(path, "r") as f:
            return {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
    except OSError as e:
        raise DataError(path, f"not a readable HDF5 file ({e})") from None


def check_still_masks(
    path: str | os.PathLike,
    *,
    fold: int | None,
    manifest: str | os.PathLike | None = None,
    splits: str | os.PathLike | None = None,
) -> dict:
    """One :class:`DataError` line when the mask file says it was made for another fold, manifest or splits
    file (by content digest, so a copied file still matches); returns its attributes."""
    attrs = read_provenance(path)
    if "fold" not in attrs:
        return attrs
    if fold is not None and int(attrs["fold"]) != int(fold):
        raise DataError(
            path, f"predicted masks of fold {attrs['fold']}, not fold {fold} (rerun `usnodule still-masks`)"
        )
    for key, want in (("manifest", manifest), ("splits", splits)):
        if want is not None and attrs.get(f"{key}_sha256") != file_digest(want):
            raise DataError(
                path, f"predicted masks were made for {key} {attrs.get(key)}, which differs from {want}"
            )
    return attrs


class TwoStageDataModule(StillDataModule):
    """:class:`~datamodules.still_data.StillDataModule` for stage 2 of the two-stage framework: with
    ``roi: predicted`` it first checks that ``predicted_masks`` were made for this fold, manifest and splits
    file (:func:`check_still_masks`).  Arguments are the parent's."""

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if not self.datasets and hp.roi == "predicted" and hp.predicted_masks is not None:
            check_still_masks(hp.predicted_masks, fold=hp.fold, manifest=hp.manifest, splits=hp.splits)
        super().setup(stage)
