"""Still ultrasound images with nodule masks: the manifest and its reader (numpy only; the Dataset and
LightningDataModule are in :mod:`datamodules.still_data`, the importers in :mod:`datamodules.still_import`).

The input of the two still-image systems (two-stage TransUNet -> ROI -> ResNet-18; CSASN).  A manifest CSV

    [case_id,]image,mask,label,patient_id[,subtype][, any other columns]

lists one image per row; paths are relative to the CSV's folder (or absolute).  Images and masks are PNG, JPEG,
BMP, TIFF or single-frame DICOM (a DICOM file is recognised by its suffix or its preamble).  Choices:

* ``case_id`` is optional (the spec's columns are ``image, mask, label, patient_id[, subtype]``): without it the
  id is the ``image`` cell as written.  The importers (:mod:`datamodules.still_import`) write one, so that the
  ids in ``splits.json`` do not depend on where the output folder sits relative to the source.
* ``mask`` may be blank: the image has no drawn mask (``has_mask`` False in the items, an all-zero mask
  tensor).  A mask *file* that is all zero is a drawn "no lesion" (BUSI ``normal``).
* ``label`` is malignancy, 0/1; ``subtype`` is free text (``benign``, ``PTC``, ``FTC``, ``MTC``...) for
  multi-class models, blank when unknown.  Other columns (``tirads``, ``source``...) are carried, not read.
* ``patient_id`` blank or absent -> the case id (each image its own group; ``usnodule split`` then warns).
* Images come back gray (the project's pixel convention, BT.601 for colour) and are repeated to ``channels``
  (default 3, for ImageNet backbones); masks are {0,1} (stored {0,1} or {0,255}; JPEG masks thresholded at 128).

Validated on load (:func:`read_manifest`), one :class:`DataError` line naming the file for each problem:
missing columns, empty or duplicate case ids, the same image listed twice, labels other than 0/1, files that do
not exist or are not images, a mask whose size differs from its image (read from the headers, no pixels).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from datamodules.clips import IMAGE_SUFFIXES, image_size, is_dicom, read_image, read_image_mask
from datamodules.dicom import dicom_shape, read_dicom_frames
from datamodules.errors import DataError
from datamodules.paired import _parse_label, _read_csv

__all__ = [
    "StillCase",
    "STILL_COLUMNS",
    "read_still",
    "read_still_mask",
    "still_size",
    "read_manifest",
    "write_manifest",
    "is_still_manifest",
]

STILL_COLUMNS = ("case_id", "image", "mask", "label", "patient_id", "subtype")
_REQUIRED = ("image", "mask", "label")


@dataclass(frozen=True)
class StillCase:
    """One still image; paths absolute.  ``extra`` holds the manifest's other columns (not read by anything)."""

    case_id: str
    image: Path
    mask: Path | None
    label: int
    patient_id: str
    subtype: str = ""
    extra: dict[str, str] = field(default_factory=dict, compare=False, repr=False)


# ------------------------------------------------------------------------------------------------- pixels


def _kind(path: Path) -> str:
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return "image"
    if is_dicom(path):
        return "dicom"
    raise DataError(
        path,
        f"unsupported still-image format {path.suffix or '(no suffix)'!r}; expected "
        f"{', '.join(sorted(IMAGE_SUFFIXES))} or DICOM",
    )


def _one_frame(path: Path) -> np.ndarray:
    frames = read_dicom_frames(path)
    if len(frames) != 1:
        raise DataError(path, f"multi-frame DICOM ({len(frames)} frames); a still image needs one frame")
    return frames[0]


def read_still(path: str | os.PathLike) -> np.ndarray:
    """An image file or single-frame DICOM -> ``(H, W)`` uint8 gray."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "does not exist")
    return read_image(path) if _kind(path) == "image" else _one_frame(path)


def read_still_mask(path: str | os.PathLike) -> np.ndarray:
    """A mask image or single-frame DICOM -> ``(H, W)`` uint8 in {0, 1}."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "does not exist")
    if _kind(path) == "image":
        return read_image_mask(path)
    frame = _one_frame(path)
    values = set(np.unique(frame).tolist())
    if not values <= {0, 1} and not values <= {0, 255}:
        raise DataError(path, f"mask values {sorted(values)[:6]} outside {{0,1}} / {{0,255}}")
    return (frame > 0).astype(np.uint8)


def still_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(H, W)`` from the file header (PIL header / DICOM Rows, Columns), no pixels decoded."""
    path = Path(path)
    if _kind(path) == "image":
        return image_size(path)
    n, h, w = dicom_shape(path)
    if n != 1:
        raise DataError(path, f"multi-frame DICOM ({n} frames); a still image needs one frame")
    return h, w


# ----------------------------------------------------------------------------------------------- manifest


def is_still_manifest(path: str | os.PathLike) -> bool:
    """Whether the CSV's header has an ``image`` column (a still-image manifest, not a paired one)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            header = next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError):
        return False
    return "image" in [h.strip() for h in header]


def _resolve(value: str, base: Path) -> Path:
    p = Path(value)
    return (p if p.is_absolute() else base / p).resolve()


def read_manifest(csv_path: str | os.PathLike, *, check_sizes: bool = True) -> list[StillCase]:
    """Read and validate a still-image manifest (module docstring); returns the cases in file order.

    ``check_sizes``: compare each mask's size with its image's from the file headers (cheap; on by default).
    """
    csv_path = Path(csv_path)
    rows = _read_csv(csv_path, _REQUIRED)
    base = csv_path.parent.resolve()
    cases: list[StillCase] = []
    seen_id: dict[str, int] = {}
    seen_image: dict[Path, int] = {}
    known = set(STILL_COLUMNS)
    for n, r in enumerate(rows, start=2):  # spreadsheet row numbers (header = 1)
        if not r["image"]:
            raise DataError(csv_path, f"row {n}: empty image path")
        case_id = r.get("case_id") or r["image"]
        if case_id in seen_id:
            raise DataError(
                csv_path, f"row {n}: duplicate case_id {case_id!r} (first in row {seen_id[case_id]})"
            )
        seen_id[case_id] = n
        label = _parse_label(r["label"], csv_path, n, case_id)
        image = _resolve(r["image"], base)
        if image in seen_image:
            raise DataError(
                csv_path, f"row {n}: image {r['image']!r} is already listed in row {seen_image[image]}"
            )
        seen_image[image] = n
        if not image.is_file():
            raise DataError(image, f"does not exist (manifest {csv_path}, row {n}, column image)")
        mask = _resolve(r["mask"], base) if r["mask"] else None
        if mask is not None and not mask.is_file():
            raise DataError(mask, f"does not exist (manifest {csv_path}, row {n}, column mask)")
        if mask is not None and check_sizes:
            hw_image, hw_mask = still_size(image), still_size(mask)
            if hw_image != hw_mask:
                raise DataError(
                    mask,
                    f"mask size {hw_mask[1]}x{hw_mask[0]} differs from image {image.name} "
                    f"{hw_image[1]}x{hw_image[0]} (manifest {csv_path}, row {n})",
                )
        cases.append(
            StillCase(
                case_id=case_id,
                image=image,
                mask=mask,
                label=label,
                patient_id=r.get("patient_id") or case_id,
                subtype=r.get("subtype", ""),
                extra={k: v for k, v in r.items() if k not in known},
            )
        )
    return cases


def _rel(p: Path | None, base: Path) -> str:
    if p is None:
        return ""
    try:
        return Path(os.path.relpath(Path(p).resolve(), base)).as_posix()
    except ValueError:  # another drive on Windows
        return Path(p).resolve().as_posix()


def write_manifest(cases: Sequence[StillCase], out_csv: str | os.PathLike) -> Path:
    """Write ``cases`` as a manifest at ``out_csv``, paths relative to its folder, the cases' ``extra`` columns
    after the standard ones (sorted).  Not atomic by itself: the importers write it into a temporary folder
    that is renamed as a whole (:mod:`datamodules.still_import`)."""
    out_csv = Path(out_csv)
    base = out_csv.parent.resolve()
    extra_cols = sorted({k for c in cases for k in c.extra})
    with open(out_csv, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow([*STILL_COLUMNS, *extra_cols])
        for c in cases:
            w.writerow(
                [c.case_id, _rel(c.image, base), _rel(c.mask, base), c.label, c.patient_id, c.subtype]
                + [c.extra.get(k, "") for k in extra_cols]
            )
    return out_csv
