"""Paired B-mode (BUS) + contrast-enhanced (CEUS) ultrasound clips: manifest, case loading, AsyCMST importer.

The AsyCMST paper (``papers/asycmst.md`` Sec. 4.1) trains on synchronised BUS/CEUS video pairs of T frames with
BUS nodule masks on some frames.  This module reads such pairs from a manifest CSV

    case_id,patient_id,label,bus,ceus[,bus_mask]

whose clip paths (relative to the CSV's folder, or absolute) may be anything
:func:`datamodules.clips.read_clip` reads (video, a folder of frames, .npy/.npz, HDF5 with
``file.h5:/group/key`` for any dataset, DICOM); see that module for formats and conversions.  BUS masks are
read with :func:`datamodules.clips.read_mask_clip`, which also returns the per-frame "annotated" flag, because
AsyCMST supervises segmentation only on the BUS frames that have a drawn mask (paper Eq. for L_Seg).

Every problem is raised as :class:`~datamodules.errors.DataError` naming the file.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datamodules.atomic import atomic_path
from datamodules.clips import (
    VIDEO_SUFFIXES,
    clip_shape,
    natural_key,
    read_clip,
    read_mask_clip,
    split_h5_spec,
)
from datamodules.errors import DataError

__all__ = [
    "PairedCase",
    "read_manifest",
    "write_manifest",
    "load_case",
    "check_case",
    "import_asycmst_layout",
]

MANIFEST_COLUMNS = ("case_id", "patient_id", "label", "bus", "ceus", "bus_mask")
_REQUIRED_COLUMNS = ("case_id", "label", "bus", "ceus")
_ASYCMST_COLUMNS = ("id", "bus_vid", "ceus_vid", "label")
_ASYCMST_CLASS_DIRS = {0: "0.ben", 1: "1.mal"}


@dataclass(frozen=True)
class PairedCase:
    """One BUS/CEUS pair; paths are absolute (HDF5 paths may carry ``:/group/key``)."""

    case_id: str
    patient_id: str
    label: int
    bus: Path
    ceus: Path
    bus_mask: Path | None = None


def _check_pair(case: PairedCase, bus_shape, ceus_shape, mask_shape) -> None:
    if bus_shape[0] != ceus_shape[0]:
        raise DataError(
            case.ceus,
            f"CEUS has {ceus_shape[0]} frames but BUS {case.bus} has {bus_shape[0]} "
            f"(case {case.case_id}); paired clips must have the same length",
        )
    if mask_shape is not None and tuple(mask_shape) != tuple(bus_shape):
        raise DataError(
            case.bus_mask,
            f"mask shape {tuple(mask_shape)} does not match BUS {case.bus} shape {tuple(bus_shape)} "
            f"(case {case.case_id})",
        )


def load_case(
    case: PairedCase,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``(bus, ceus, mask or None, annotated or None)``; BUS/CEUS of equal length, mask shaped like BUS."""
    bus = read_clip(case.bus)
    ceus = read_clip(case.ceus)
    mask = annotated = None
    if case.bus_mask is not None:
        mask, annotated = read_mask_clip(case.bus_mask)
    _check_pair(case, bus.shape, ceus.shape, None if mask is None else mask.shape)
    return bus, ceus, mask, annotated


def check_case(case: PairedCase) -> int:
    """Validate a case from clip metadata (no full decode where avoidable) and return its frame count.

    Meant for a DataModule's ``setup`` so that bad pairs fail in the main process, not in a worker.
    """
    bus = clip_shape(case.bus)
    ceus = clip_shape(case.ceus)
    mask = None if case.bus_mask is None else clip_shape(case.bus_mask, mask=True)
    _check_pair(case, bus, ceus, mask)
    return bus[0]


# ---------------------------------------------------------------------------------------------------- manifest


def _parse_label(value: str, where: Path, row: int, case_id: str) -> int:
    text = (value or "").strip()
    try:
        number = float(text)
    except ValueError:
        number = None
    if number not in (0.0, 1.0):
        raise DataError(where, f"row {row} (case {case_id!r}): label {text!r} is not 0/1")
    return int(number)  # type: ignore[arg-type]


def _read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    if not path.is_file():
        raise DataError(path, "does not exist" if not path.exists() else "is not a file")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in required if c not in header]
            if missing:
                raise DataError(
                    path, f"missing column(s) {', '.join(missing)} (found: {', '.join(header) or 'none'})"
                )
            reader.fieldnames = header
            rows = [{k: (v or "").strip() for k, v in r.items() if k is not None} for r in reader]
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(path, f"not a readable CSV ({e})") from None
    rows = [r for r in rows if any(r.values())]  # tolerate blank lines
    if not rows:
        raise DataError(path, "no rows")
    return rows


def _resolve(value: str, base: Path) -> Path:
    file, key = split_h5_spec(value)
    file = (file if file.is_absolute() else base / file).resolve()
    return Path(f"{file}:{key}") if key else file


def read_manifest(csv_path: str | os.PathLike) -> list[PairedCase]:
    """Read and validate a manifest ``case_id,patient_id,label,bus,ceus[,bus_mask]``.

    Checks: required columns (``patient_id`` may be absent or blank -> the case id), unique case ids, labels 0/1,
    every referenced clip exists.  Relative paths are resolved against the CSV's folder.
    """
    csv_path = Path(csv_path)
    rows = _read_csv(csv_path, _REQUIRED_COLUMNS)
    base = csv_path.parent.resolve()
    cases: list[PairedCase] = []
    seen: set[str] = set()
    for n, r in enumerate(rows, start=2):  # row numbers as a spreadsheet shows them (header = 1)
        case_id = r["case_id"]
        if not case_id:
            raise DataError(csv_path, f"row {n}: empty case_id")
        if case_id in seen:
            raise DataError(csv_path, f"row {n}: duplicate case_id {case_id!r}")
        seen.add(case_id)
        label = _parse_label(r["label"], csv_path, n, case_id)
        paths: dict[str, Path | None] = {}
        for col in ("bus", "ceus", "bus_mask"):
            value = r.get(col, "")
            if not value:
                if col != "bus_mask":
                    raise DataError(csv_path, f"row {n} (case {case_id!r}): empty {col} path")
                paths[col] = None
                continue
            p = _resolve(value, base)
            if not split_h5_spec(p)[0].exists():
                raise DataError(p, f"does not exist (manifest {csv_path}, row {n}, column {col})")
            paths[col] = p
        cases.append(
            PairedCase(
                case_id=case_id,
                patient_id=r.get("patient_id") or case_id,
                label=label,
                bus=paths["bus"],  # type: ignore[arg-type]
                ceus=paths["ceus"],  # type: ignore[arg-type]
                bus_mask=paths["bus_mask"],
            )
        )
    return cases


def _rel(p: Path | None, base: Path) -> str:
    if p is None:
        return ""
    file, key = split_h5_spec(p)
    try:
        text = os.path.relpath(file.resolve(), base)
    except ValueError:  # another drive on Windows
        text = str(file.resolve())
    text = Path(text).as_posix()
    return f"{text}:{key}" if key else text


def write_manifest(
    cases: Sequence[PairedCase], out_csv: str | os.PathLike, extra: Sequence[dict[str, str]] | None = None
) -> Path:
    """Write ``cases`` as a manifest (paths relative to the CSV's folder) atomically; returns the path.

    ``extra``: optional per-case dicts of additional columns (ignored by :func:`read_manifest`).
    """
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    base = out_csv.parent.resolve()
    extra_cols = sorted({k for e in (extra or []) for k in e})
    with atomic_path(out_csv) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow([*MANIFEST_COLUMNS, *extra_cols])
            for i, c in enumerate(cases):
                more = extra[i] if extra else {}
                w.writerow(
                    [
                        c.case_id,
                        c.patient_id,
                        c.label,
                        _rel(c.bus, base),
                        _rel(c.ceus, base),
                        _rel(c.bus_mask, base),
                    ]
                    + [more.get(k, "") for k in extra_cols]
                )
    return out_csv


# ------------------------------------------------------------------------------------------ AsyCMST authors' layout


def _asycmst_clip(root: Path, label: int, modality: str, name: str, source: str) -> Path:
    cls = _ASYCMST_CLASS_DIRS[label]
    if source == "images":
        # The authors' extracted frames: images/<cls>/<mod>/<video name without .mp4>/00000.jpg ...
        stem = name[: -len(Path(name).suffix)] if Path(name).suffix.lower() in VIDEO_SUFFIXES else name
        return root / "images" / cls / modality / stem
    p = root / "videos" / cls / modality / name
    if not p.suffix and not p.exists():
        p = p.with_name(name + ".mp4")  # ids given without extension
    return p


def import_asycmst_layout(
    root: str | os.PathLike,
    out_csv: str | os.PathLike,
    *,
    splits: Sequence[str | os.PathLike] | None = None,
    source: str = "videos",
) -> Path:
    """Turn the AsyCMST authors' data layout into one of our manifests.

    Layout (github.com/HongchengHan/AsyCMST README): ``root/videos/{0.ben,1.mal}/{bus,ceus}/<name>.mp4`` (and
    optionally the extracted frames ``root/images/{0.ben,1.mal}/{bus,ceus}/<name>/00000.jpg``) plus split CSVs
    ``root/*.csv`` (``train_1.csv``, ``valid_1.csv``, ``test_1.csv``, ...) with columns ``id,bus_vid,ceus_vid,label``.

    All split CSVs (or those given in ``splits``) are merged; a case listed in several must agree on label and
    files.  ``case_id`` = ``id``; ``patient_id`` = a ``patient_id`` column if the CSVs have one, else the id.
    An extra ``source_splits`` column records which split files listed the case.  ``source="images"`` points the
    manifest at the frame folders instead of the videos; our folder reader orders frames by name (the authors'
    loader used ``glob`` order, which is filesystem order).
    """
    root = Path(root)
    if source not in ("videos", "images"):
        raise ValueError(f"source must be 'videos' or 'images', got {source!r}")
    if not root.is_dir():
        raise DataError(root, "does not exist" if not root.exists() else "is not a folder")
    if splits is None:
        split_files = sorted(root.glob("*.csv"), key=lambda p: natural_key(p.name))
        if not split_files:
            raise DataError(root, "no split CSVs (columns id,bus_vid,ceus_vid,label) in the dataset folder")
    else:
        split_files = [Path(s) if Path(s).is_absolute() else root / s for s in splits]
    if not (root / source).is_dir():
        raise DataError(
            root / source, "does not exist (expected the AsyCMST '{0.ben,1.mal}/{bus,ceus}' tree)"
        )

    cases: dict[str, PairedCase] = {}
    where: dict[str, list[str]] = {}
    for split in split_files:
        rows = _read_csv(split, _ASYCMST_COLUMNS)
        for n, r in enumerate(rows, start=2):
            case_id = r["id"]
            if not case_id:
                raise DataError(split, f"row {n}: empty id")
            label = _parse_label(r["label"], split, n, case_id)
            if not r["bus_vid"] or not r["ceus_vid"]:
                raise DataError(split, f"row {n} (case {case_id!r}): empty bus_vid/ceus_vid")
            clips = {}
            for mod, col in (("bus", "bus_vid"), ("ceus", "ceus_vid")):
                p = _asycmst_clip(root, label, mod, r[col], source)
                if not p.exists():
                    raise DataError(p, f"does not exist (split {split.name}, row {n}, column {col})")
                clips[mod] = p.resolve()
            case = PairedCase(
                case_id, r.get("patient_id") or case_id, label, clips["bus"], clips["ceus"], None
            )
            old = cases.get(case_id)
            if old is not None and old != case:
                raise DataError(
                    split, f"row {n}: case {case_id!r} disagrees with an earlier split file ({old})"
                )
            cases[case_id] = case
            where.setdefault(case_id, [])
            if split.stem not in where[case_id]:
                where[case_id].append(split.stem)
    ordered = sorted(cases, key=natural_key)
    return write_manifest(
        [cases[c] for c in ordered], out_csv, extra=[{"source_splits": " ".join(where[c])} for c in ordered]
    )
