"""Paired B-mode (BUS) + contrast-enhanced (CEUS) ultrasound clips: manifest, clip readers, AsyCMST importer.

The AsyCMST paper (``papers/asycmst.md`` Sec. 4.1) trains on synchronised BUS/CEUS video pairs of T frames with
BUS nodule masks on some frames.  This module reads such pairs from a manifest CSV

    case_id,patient_id,label,bus,ceus[,bus_mask]

whose clip paths (relative to the CSV's folder, or absolute) may be

* ``.mp4`` / ``.avi`` (any container PyAV/FFmpeg reads),
* a folder of frame images, ordered by *natural* name sort (``frame2`` < ``frame10``), never filesystem order,
* ``.npy`` ``(T,H,W)`` or ``(T,H,W,3)``; ``.npz`` with key ``frames`` (or its only array),
* HDF5 ``.h5`` / ``.hdf5`` with dataset ``frames``, or ``file.h5:/group/key`` for any dataset,
* ``.dcm`` (single- or multi-frame DICOM, via :func:`datamodules.dicom.read_dicom_frames`).

Every clip comes back as ``(T,H,W)`` uint8 grayscale (RGB -> gray with ITU-R BT.601 weights).  Mask clips come
back as ``(T,H,W)`` uint8 in {0,1} plus a ``(T,)`` bool "annotated" flag (``.npz`` key / HDF5 sibling dataset
``annotated``; all True for formats that cannot carry it), because AsyCMST supervises segmentation only on the
BUS frames that have a drawn mask (paper Eq. for L_Seg).

Every problem is raised as :class:`~datamodules.errors.DataError` naming the file.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datamodules.atomic import atomic_path
from datamodules.errors import DataError

__all__ = [
    "PairedCase",
    "read_manifest",
    "write_manifest",
    "read_clip",
    "read_mask_clip",
    "clip_shape",
    "load_case",
    "check_case",
    "import_asycmst_layout",
    "rgb_to_gray",
    "natural_key",
    "split_h5_spec",
]

VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"})
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
H5_SUFFIXES = frozenset({".h5", ".hdf5"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
# Lossy sources cannot hold exact 0/255 mask values, so masks from them are thresholded at 128 instead of checked.
_LOSSY_IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg"})

MANIFEST_COLUMNS = ("case_id", "patient_id", "label", "bus", "ceus", "bus_mask")
_REQUIRED_COLUMNS = ("case_id", "label", "bus", "ceus")
_ASYCMST_COLUMNS = ("id", "bus_vid", "ceus_vid", "label")
_ASYCMST_CLASS_DIRS = {0: "0.ben", 1: "1.mal"}

_H5_SPEC = re.compile(r"^(.*\.(?:h5|hdf5))(?::(.*))?$", re.IGNORECASE)


@dataclass(frozen=True)
class PairedCase:
    """One BUS/CEUS pair; paths are absolute (HDF5 paths may carry ``:/group/key``)."""

    case_id: str
    patient_id: str
    label: int
    bus: Path
    ceus: Path
    bus_mask: Path | None = None


# --------------------------------------------------------------------------------------------------- helpers


def rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    """``(...,3)`` uint8 RGB -> ``(...)`` uint8 gray, ITU-R BT.601 luma 0.299 R + 0.587 G + 0.114 B, rounded.

    Integer arithmetic (as PIL's ``convert("L")``) so large clips need no float copy.
    """
    rgb = np.asarray(rgb)
    if rgb.shape[-1] != 3:
        raise ValueError(f"expected a trailing RGB axis of 3, got shape {rgb.shape}")
    r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
    return ((r * 299 + g * 587 + b * 114 + 500) // 1000).astype(np.uint8)


def natural_key(name: str) -> tuple:
    """Sort key that orders embedded numbers numerically: ``frame2`` < ``frame10``; ties broken by the name."""
    parts = re.split(r"(\d+)", name.lower())
    # re.split puts text at even and digit runs at odd positions, so parts of two keys always compare like with like.
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), name


def split_h5_spec(path: str | os.PathLike) -> tuple[Path, str | None]:
    """``"a/b.h5:/grp/key"`` -> ``(Path("a/b.h5"), "/grp/key")``; other paths -> ``(path, None)``."""
    m = _H5_SPEC.match(str(path))
    if m is None:
        return Path(path), None
    key = m.group(2)
    return Path(m.group(1)), (key if key else None)


def _file_part(path: str | os.PathLike) -> Path:
    return split_h5_spec(path)[0]


def _kind(path: Path) -> str:
    file, key = split_h5_spec(path)
    suffix = file.suffix.lower()
    if suffix in H5_SUFFIXES:
        return "h5"
    if key is not None:
        raise DataError(path, "a ':key' suffix is only meaningful for .h5/.hdf5 files")
    if file.is_dir():
        return "folder"
    if suffix in VIDEO_SUFFIXES:
        return "video"
    if suffix == ".npy":
        return "npy"
    if suffix == ".npz":
        return "npz"
    if suffix in DICOM_SUFFIXES:
        return "dicom"
    raise DataError(
        path,
        f"unsupported clip format {suffix or '(no suffix)'!r}; expected .mp4/.avi, a folder of frames, "
        ".npy/.npz, .h5/.hdf5 or .dcm",
    )


def _check_exists(path: Path) -> None:
    file = _file_part(path)
    if not file.exists():
        raise DataError(path, "does not exist")


def _as_index(index: Sequence[int] | np.ndarray | None, n: int, path: Path) -> np.ndarray | None:
    if index is None:
        return None
    idx = np.asarray(index, dtype=np.int64).reshape(-1)
    bad = idx[(idx < 0) | (idx >= n)]
    if bad.size:
        raise DataError(path, f"frame index {int(bad[0])} out of range for a clip of {n} frames")
    return idx


def _check_layout(shape: tuple[int, ...], dtype: np.dtype, path: Path, *, mask: bool) -> None:
    """Validate shape/dtype from metadata alone, before reading any pixels."""
    ok_rank = len(shape) == 3 or (len(shape) == 4 and shape[-1] in (1, 3))
    if not ok_rank:
        raise DataError(path, f"expected frames shaped (T,H,W) or (T,H,W,3), got shape {tuple(shape)}")
    if shape[0] == 0:
        raise DataError(path, "empty clip (0 frames)")
    if shape[1] == 0 or shape[2] == 0:
        raise DataError(path, f"empty frames of shape {tuple(shape[1:3])}")
    kinds = "uib" + ("f" if mask else "")  # float masks are fine if their values are exactly 0/1 or 0/255
    if np.dtype(dtype).kind not in kinds:
        raise DataError(path, f"dtype {np.dtype(dtype)} not supported; expected uint8 frames")


def _to_gray_uint8(arr: np.ndarray, path: Path) -> np.ndarray:
    """``(T,H,W[,1|3])`` integer array with values 0..255 -> ``(T,H,W)`` uint8."""
    if arr.dtype != np.uint8:
        if arr.dtype == np.bool_:
            raise DataError(path, "boolean frames; expected uint8 gray values")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise DataError(path, f"{arr.dtype} values span {lo}..{hi}; expected uint8 values 0..255")
        arr = arr.astype(np.uint8)
    if arr.ndim == 4:
        arr = arr[..., 0] if arr.shape[-1] == 1 else rgb_to_gray(arr)
    return np.ascontiguousarray(arr)


def _binarize(arr: np.ndarray, path: Path, *, lossy: bool) -> np.ndarray:
    """Mask values {0,1} or {0,255} -> uint8 {0,1}; anything else is a DataError (lossy sources: >= 128)."""
    if arr.ndim == 4:
        if arr.shape[-1] == 1:
            arr = arr[..., 0]
        else:
            if arr.dtype.kind == "f":
                raise DataError(path, "RGB float masks are not supported; store a (T,H,W) mask")
            arr = rgb_to_gray(arr.astype(np.uint8) if arr.dtype != np.uint8 else arr)
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8)
    if lossy:
        # MPEG/JPEG blur edges and shift values by a few levels; a 0/255 mask survives only as "about 0 / 255".
        return (arr >= 128).astype(np.uint8)
    if arr.dtype == np.uint8:
        counts = np.bincount(arr.ravel(), minlength=256)
        values = np.flatnonzero(counts)
    else:
        values = np.unique(arr)
    present = {float(v) for v in values}
    if present <= {0.0, 1.0}:
        return arr.astype(np.uint8)
    if present <= {0.0, 255.0}:
        return (arr > 0).astype(np.uint8)
    shown = ", ".join(f"{v:g}" for v in sorted(present)[:6]) + (", ..." if len(present) > 6 else "")
    raise DataError(path, f"mask values {{{shown}}} outside {{0,1}} / {{0,255}}")


def _check_annotated(ann: np.ndarray, n: int, path: Path) -> np.ndarray:
    ann = np.asarray(ann)
    if ann.shape != (n,):
        raise DataError(path, f"'annotated' has shape {ann.shape}; expected ({n},) to match the mask frames")
    if ann.dtype != np.bool_:
        if ann.dtype.kind not in "uif" or not np.isin(ann, (0, 1)).all():
            raise DataError(path, "'annotated' must be boolean or 0/1")
        ann = ann.astype(bool)
    return ann


# --------------------------------------------------------------------------------------------- format readers
# Each returns the *raw* frames (possibly RGB, any integer dtype) for the requested positions, plus an optional
# "annotated" vector; validation of shape/dtype happens before pixel data is read where the format allows.


def _video_frames(path: Path) -> np.ndarray:
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DataError(path, "no video stream")
            stream = container.streams.video[0]
            frames = [frame.to_ndarray(format="gray") for frame in container.decode(stream)]
    except DataError:
        raise
    except (av.FFmpegError, OSError, ValueError, RuntimeError) as e:
        raise DataError(path, f"unreadable video ({type(e).__name__}: {e})") from None
    if not frames:
        raise DataError(path, "empty clip (video has 0 decodable frames)")
    shapes = {f.shape for f in frames}
    if len(shapes) > 1:
        raise DataError(path, f"video frames change size mid-stream: {sorted(shapes)}")
    return np.stack(frames)


def _video_shape(path: Path) -> tuple[int, int, int]:
    """Frame count by demuxing packets (no decoding; one packet per frame for the codecs we meet)."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DataError(path, "no video stream")
            stream = container.streams.video[0]
            h, w = stream.codec_context.height, stream.codec_context.width
            n = sum(1 for p in container.demux(stream) if p.size > 0)
    except DataError:
        raise
    except (av.FFmpegError, OSError, ValueError, RuntimeError) as e:
        raise DataError(path, f"unreadable video ({type(e).__name__}: {e})") from None
    if n == 0:
        raise DataError(path, "empty clip (video has 0 frames)")
    return n, h, w


def _frame_files(folder: Path) -> list[Path]:
    files = [
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not files:
        raise DataError(
            folder, f"empty clip: no frame images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder"
        )
    return sorted(files, key=lambda p: natural_key(p.name))


def _read_image(file: Path) -> np.ndarray:
    """One frame image -> (H,W) uint8 gray or (H,W,3) uint8 RGB."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as im:
            if im.mode in ("L", "RGB"):
                arr = np.asarray(im)
            elif im.mode in ("1", "P", "PA", "LA", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
                arr = np.asarray(im.convert("L" if im.mode in ("1", "LA") else "RGB"))
            else:
                raise DataError(
                    file, f"image mode {im.mode!r} not supported; expected 8-bit gray or RGB frames"
                )
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(file, f"unreadable frame image ({e})") from None
    return arr


def _folder_frames(folder: Path, index: np.ndarray | None) -> np.ndarray:
    files = _frame_files(folder)
    idx = _as_index(index, len(files), folder)
    chosen = files if idx is None else [files[i] for i in idx]
    frames = []
    for f in chosen:
        im = _read_image(f)
        frames.append(im if im.ndim == 2 else rgb_to_gray(im))
        if frames[-1].shape != frames[0].shape:
            raise DataError(
                f, f"frame size {frames[-1].shape} differs from {chosen[0].name} {frames[0].shape}"
            )
    return np.stack(frames)


def _folder_shape(folder: Path) -> tuple[int, int, int]:
    from PIL import Image, UnidentifiedImageError

    files = _frame_files(folder)
    try:
        with Image.open(files[0]) as im:  # reads the header only
            w, h = im.size
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(files[0], f"unreadable frame image ({e})") from None
    return len(files), h, w


def _npy_open(path: Path) -> np.ndarray:
    try:
        # mmap: a clip read with an index touches only those frames
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(path, f"not a readable .npy file ({e})") from None


def _npz_arrays(path: Path, mask: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """The frames (or mask) array of an .npz, and its 'annotated' vector for masks."""
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.files)
            preferred = ("mask", "masks", "frames") if mask else ("frames",)
            key = next((k for k in preferred if k in keys), None)
            if key is None:
                arrays = [k for k in keys if k != "annotated"]
                if len(arrays) != 1:
                    want = "'mask'" if mask else "'frames'"
                    raise DataError(path, f"no {want} array and not exactly one array (keys: {keys})")
                key = arrays[0]
            arr = z[key]
            ann = z["annotated"] if (mask and "annotated" in keys) else None
    except DataError:
        raise
    except (ValueError, OSError, EOFError, KeyError) as e:
        raise DataError(path, f"not a readable .npz file ({e})") from None
    return arr, ann


def _h5_dataset(f, path: Path, key: str | None, mask: bool):  # f: h5py.File
    import h5py

    if key is None:
        preferred = ("mask", "masks", "frames") if mask else ("frames",)
        key = next((k for k in preferred if isinstance(f.get(k), h5py.Dataset)), None)
        if key is None:
            datasets = [k for k, v in f.items() if isinstance(v, h5py.Dataset) and k != "annotated"]
            if len(datasets) != 1:
                want = "'mask'" if mask else "'frames'"
                raise DataError(
                    path, f"no {want} dataset and not exactly one dataset (keys: {list(f.keys())})"
                )
            key = datasets[0]
    obj = f.get(key)
    if obj is None:
        raise DataError(path, f"missing HDF5 dataset {key!r}")
    if not isinstance(obj, h5py.Dataset):
        raise DataError(path, f"HDF5 object {key!r} is a group, not a dataset")
    return obj


def _h5_read(path: Path, index: np.ndarray | None, mask: bool) -> tuple[np.ndarray, np.ndarray | None]:
    import h5py

    file, key = split_h5_spec(path)
    try:
        with h5py.File(file, "r") as f:
            ds = _h5_dataset(f, path, key, mask)
            _check_layout(ds.shape, ds.dtype, path, mask=mask)
            idx = _as_index(index, ds.shape[0], path)
            if idx is None:
                arr = ds[()]
            else:
                # h5py fancy indexing needs increasing unique positions; read those, then restore the order asked
                uniq, inverse = np.unique(idx, return_inverse=True)
                arr = ds[uniq.tolist()][inverse]
            ann = None
            if mask:
                sibling = ds.parent.get("annotated")
                if isinstance(sibling, h5py.Dataset):
                    ann = _check_annotated(sibling[()], ds.shape[0], path)
                    ann = ann if idx is None else ann[idx]
    except DataError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(path, f"not a readable HDF5 clip ({e})") from None
    return arr, ann


def _h5_shape(path: Path, mask: bool) -> tuple[int, ...]:
    import h5py

    file, key = split_h5_spec(path)
    try:
        with h5py.File(file, "r") as f:
            ds = _h5_dataset(f, path, key, mask)
            _check_layout(ds.shape, ds.dtype, path, mask=mask)
            return tuple(ds.shape[:3])
    except DataError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise DataError(path, f"not a readable HDF5 clip ({e})") from None


def _raw(path: Path, index, *, mask: bool) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """(raw frames for ``index``, annotated or None, lossy source?) for any supported clip format."""
    _check_exists(path)
    kind = _kind(path)
    if kind == "h5":
        arr, ann = _h5_read(path, index, mask)
        return arr, ann, False
    if kind == "folder":
        files = _frame_files(path)
        lossy = any(f.suffix.lower() in _LOSSY_IMAGE_SUFFIXES for f in files)
        return _folder_frames(path, index), None, lossy
    if kind == "npy":
        arr = _npy_open(path)
        _check_layout(arr.shape, arr.dtype, path, mask=mask)
        idx = _as_index(index, arr.shape[0], path)
        return np.array(arr if idx is None else arr[idx]), None, False
    if kind == "npz":
        arr, ann = _npz_arrays(path, mask)
        _check_layout(arr.shape, arr.dtype, path, mask=mask)
        if ann is not None:
            ann = _check_annotated(ann, arr.shape[0], path)
        idx = _as_index(index, arr.shape[0], path)
        if idx is not None:
            arr = arr[idx]
            ann = None if ann is None else ann[idx]
        return arr, ann, False
    if kind == "video":
        arr = _video_frames(path)
        idx = _as_index(index, arr.shape[0], path)
        return (arr if idx is None else arr[idx]), None, True
    # dicom
    from datamodules.dicom import read_dicom_frames

    arr = read_dicom_frames(path)
    idx = _as_index(index, arr.shape[0], path)
    return (arr if idx is None else arr[idx]), None, False


# ------------------------------------------------------------------------------------------------- public API


def read_clip(path: str | os.PathLike, index: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """Read a clip as ``(T,H,W)`` uint8 gray.

    ``index`` (optional) selects frame positions; for HDF5, .npy (memory-mapped) and frame folders only those
    frames are read, for videos the clip is decoded and then indexed.
    """
    path = Path(path)
    arr, _, _ = _raw(path, index, mask=False)
    _check_layout(arr.shape, arr.dtype, path, mask=False)
    return _to_gray_uint8(arr, path)


def read_mask_clip(
    path: str | os.PathLike, index: Sequence[int] | np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read a mask clip: ``(T,H,W)`` uint8 in {0,1} and ``(T,)`` bool "annotated" (all True if not stored).

    Stored values must be {0,1} or {0,255} (else DataError); masks from lossy sources (video, JPEG frames) are
    thresholded at 128 instead, because compression does not keep exact values.
    """
    path = Path(path)
    arr, ann, lossy = _raw(path, index, mask=True)
    _check_layout(arr.shape, arr.dtype, path, mask=True)
    mask = _binarize(arr, path, lossy=lossy)
    if ann is None:
        ann = np.ones(mask.shape[0], dtype=bool)
    return np.ascontiguousarray(mask), ann


def clip_shape(path: str | os.PathLike, *, mask: bool = False) -> tuple[int, int, int]:
    """``(T,H,W)`` of a clip, cheaply where the format allows (HDF5/.npy metadata, folder listing + one image
    header, video packet count, DICOM header); .npz is loaded."""
    path = Path(path)
    _check_exists(path)
    kind = _kind(path)
    if kind == "h5":
        return _h5_shape(path, mask)  # type: ignore[return-value]
    if kind == "folder":
        return _folder_shape(path)
    if kind == "npy":
        arr = _npy_open(path)
        _check_layout(arr.shape, arr.dtype, path, mask=mask)
        return tuple(arr.shape[:3])  # type: ignore[return-value]
    if kind == "npz":
        arr, _ = _npz_arrays(path, mask)
        _check_layout(arr.shape, arr.dtype, path, mask=mask)
        return tuple(arr.shape[:3])  # type: ignore[return-value]
    if kind == "video":
        return _video_shape(path)
    from datamodules.dicom import dicom_shape

    return dicom_shape(path)


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
            if not _file_part(p).exists():
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
