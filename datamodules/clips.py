"""The clip reader of every stage: one file, folder or dataset -> ``(T,H,W)`` uint8 gray frames.

Formats, chosen by :data:`FORMATS` (suffix -> :class:`ClipFormat`, the one dispatch table):

========================  ====================================================================================
``.mp4 .avi .mov .mkv``   video, any codec FFmpeg decodes (PyAV), decoded to gray by FFmpeg's swscale
``.webm .m4v``
a folder                  frame images (``.png .jpg .jpeg .bmp .tif .tiff``), whatever the folder's own name
``.npy``                  ``(T,H,W)`` or ``(T,H,W,1|3)``, memory-mapped
``.npz``                  key ``frames`` (masks: ``mask``/``masks``/``frames``), else its only array
``.h5 .hdf5``             dataset ``frames`` (masks: ``mask``/``masks``/``frames``), else the only dataset;
                          ``file.h5:/group/key`` names any dataset
``.dcm .dicom``           single- or multi-frame DICOM (:func:`datamodules.dicom.read_dicom_frames`)
no / another suffix       DICOM if the file has the DICOM preamble (``DICM`` at byte 128), else a DataError
========================  ====================================================================================

Choices:

* Every clip comes back as ``(T,H,W)`` uint8 gray, RGB -> gray with ITU-R BT.601 weights
  (:func:`datamodules.frames.rgb_to_gray`), so every stage sees one pixel convention whatever the source.
* Frame folders are ordered by *natural* name sort (``frame2`` < ``frame10``), never filesystem order, which
  differs between machines.
* A known suffix wins over content sniffing: the DICOM preamble is looked for only when the suffix is unknown
  (scanners often write no suffix), so a ``.npy`` whose data happens to start with ``DICM`` is still an array.
* Shape and dtype are checked from metadata before pixels are read where the format allows, and ``index``
  reads only the chosen frames from HDF5, ``.npy`` and folders (videos and DICOM are decoded whole, then
  indexed).
* Mask clips come back as ``(T,H,W)`` uint8 in {0,1} plus a ``(T,)`` bool "annotated" flag (``.npz`` key /
  HDF5 sibling dataset ``annotated``; all True for formats that cannot carry it), because AsyCMST supervises
  segmentation only on the BUS frames that have a drawn mask.  Stored mask values must be {0,1} or {0,255};
  masks from lossy sources (video, JPEG frames) are thresholded at 128 instead.
* Videos are decoded with PyAV (a declared dependency); OpenCV is not used for reading.

Every problem is raised as :class:`~datamodules.errors.DataError` naming the file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# dicom.py imports pydicom inside its functions, so this costs nothing until a DICOM clip is read.
from datamodules.dicom import dicom_shape, read_dicom_frames
from datamodules.errors import DataError
from datamodules.frames import natural_key, rgb_to_gray

__all__ = [
    "ClipFormat",
    "FORMATS",
    "FOLDER",
    "clip_format",
    "read_clip",
    "read_mask_clip",
    "clip_shape",
    "read_image",
    "read_image_mask",
    "image_size",
    "is_dicom",
    "split_h5_spec",
    "rgb_to_gray",
    "natural_key",
    "VIDEO_SUFFIXES",
    "IMAGE_SUFFIXES",
    "H5_SUFFIXES",
    "DICOM_SUFFIXES",
]

VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"})
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
H5_SUFFIXES = frozenset({".h5", ".hdf5"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
# Lossy sources cannot hold exact 0/255 mask values, so masks from them are thresholded at 128 instead of checked.
_LOSSY_IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg"})

_H5_SPEC = re.compile(r"^(.*\.(?:h5|hdf5))(?::(.*))?$", re.IGNORECASE)

# (raw frames for the index, "annotated" or None, lossy source?) -- raw: possibly RGB, any integer dtype
RawClip = tuple[np.ndarray, np.ndarray | None, bool]


# --------------------------------------------------------------------------------------------------- helpers


def split_h5_spec(path: str | os.PathLike) -> tuple[Path, str | None]:
    """``"a/b.h5:/grp/key"`` -> ``(Path("a/b.h5"), "/grp/key")``; other paths -> ``(path, None)``."""
    m = _H5_SPEC.match(str(path))
    if m is None:
        return Path(path), None
    key = m.group(2)
    return Path(m.group(1)), (key if key else None)


def _file_part(path: str | os.PathLike) -> Path:
    return split_h5_spec(path)[0]


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
# Per format a ``read(path, index, mask) -> RawClip`` and a ``shape(path, mask) -> (T,H,W)``; shape/dtype are
# validated before pixel data is read where the format allows.


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


def _folder_frames(folder: Path, files: list[Path], index: np.ndarray | None) -> np.ndarray:
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


def _read_h5(path: Path, index, mask: bool) -> RawClip:
    arr, ann = _h5_read(path, index, mask)
    return arr, ann, False


def _read_folder(path: Path, index, mask: bool) -> RawClip:
    files = _frame_files(path)
    lossy = any(f.suffix.lower() in _LOSSY_IMAGE_SUFFIXES for f in files)
    return _folder_frames(path, files, index), None, lossy


def _read_npy(path: Path, index, mask: bool) -> RawClip:
    arr = _npy_open(path)
    _check_layout(arr.shape, arr.dtype, path, mask=mask)
    idx = _as_index(index, arr.shape[0], path)
    return np.array(arr if idx is None else arr[idx]), None, False


def _shape_npy(path: Path, mask: bool) -> tuple[int, int, int]:
    arr = _npy_open(path)
    _check_layout(arr.shape, arr.dtype, path, mask=mask)
    return tuple(arr.shape[:3])  # type: ignore[return-value]


def _read_npz(path: Path, index, mask: bool) -> RawClip:
    arr, ann = _npz_arrays(path, mask)
    _check_layout(arr.shape, arr.dtype, path, mask=mask)
    if ann is not None:
        ann = _check_annotated(ann, arr.shape[0], path)
    idx = _as_index(index, arr.shape[0], path)
    if idx is not None:
        arr = arr[idx]
        ann = None if ann is None else ann[idx]
    return arr, ann, False


def _shape_npz(path: Path, mask: bool) -> tuple[int, int, int]:
    # .npz members are zip entries without a cheap header read; the array is loaded.
    arr, _ = _npz_arrays(path, mask)
    _check_layout(arr.shape, arr.dtype, path, mask=mask)
    return tuple(arr.shape[:3])  # type: ignore[return-value]


def _read_video(path: Path, index, mask: bool) -> RawClip:
    # Decoded whole: seeking by frame number is unreliable across containers and codecs.
    arr = _video_frames(path)
    idx = _as_index(index, arr.shape[0], path)
    return (arr if idx is None else arr[idx]), None, True


def _read_dicom(path: Path, index, mask: bool) -> RawClip:
    arr = read_dicom_frames(path)
    idx = _as_index(index, arr.shape[0], path)
    return (arr if idx is None else arr[idx]), None, False


def _shape_dicom(path: Path, mask: bool) -> tuple[int, int, int]:
    return dicom_shape(path)


# ------------------------------------------------------------------------------------------------ the table


@dataclass(frozen=True)
class ClipFormat:
    """One clip format: how to read its frames (``read(path, index, mask)`` -> raw frames, annotated or None,
    lossy?) and how to get ``(T,H,W)`` cheaply (``shape(path, mask)``)."""

    name: str
    read: Callable[[Path, Sequence[int] | np.ndarray | None, bool], RawClip]
    shape: Callable[[Path, bool], tuple[int, int, int]]


_VIDEO = ClipFormat("video", _read_video, lambda path, mask: _video_shape(path))
_NPY = ClipFormat("npy", _read_npy, _shape_npy)
_NPZ = ClipFormat("npz", _read_npz, _shape_npz)
_H5 = ClipFormat("hdf5", _read_h5, _h5_shape)  # type: ignore[arg-type]
_DICOM = ClipFormat("dicom", _read_dicom, _shape_dicom)
FOLDER = ClipFormat("folder", _read_folder, lambda path, mask: _folder_shape(path))
"""Any directory, whatever its name: a folder of frame images."""

FORMATS: dict[str, ClipFormat] = {
    **dict.fromkeys(sorted(VIDEO_SUFFIXES), _VIDEO),
    ".npy": _NPY,
    ".npz": _NPZ,
    **dict.fromkeys(sorted(H5_SUFFIXES), _H5),
    **dict.fromkeys(sorted(DICOM_SUFFIXES), _DICOM),
}
"""File suffix (lower case) -> format; the one place a clip's format is decided (with :data:`FOLDER`)."""


def is_dicom(path: str | os.PathLike) -> bool:
    """``.dcm``/``.dicom`` suffix, or a file with the DICOM preamble (scanners often write no suffix)."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        head = f.read(132)
    return len(head) == 132 and head[128:] == b"DICM"


def clip_format(path: str | os.PathLike) -> ClipFormat:
    """The format of the clip at ``path`` (which must exist): by suffix, a folder, or a sniffed DICOM."""
    path = Path(path)
    file, key = split_h5_spec(path)
    suffix = file.suffix.lower()
    fmt = FORMATS.get(suffix)
    if fmt is _H5:  # before the folder test, so "x.h5:/key" is never looked up as a directory
        return fmt
    if key is not None:
        raise DataError(path, "a ':key' suffix is only meaningful for .h5/.hdf5 files")
    if file.is_dir():
        return FOLDER
    if fmt is None and is_dicom(file):
        return _DICOM
    if fmt is None:
        raise DataError(
            path,
            f"unsupported clip format {suffix or '(no suffix)'!r}; expected .mp4/.avi, a folder of frames, "
            ".npy/.npz, .h5/.hdf5 or .dcm",
        )
    return fmt


def _raw(path: Path, index, *, mask: bool) -> RawClip:
    _check_exists(path)
    return clip_format(path).read(path, index, mask)


# ------------------------------------------------------------------------------------------------- public API


def read_clip(path: str | os.PathLike, index: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """Read a clip as ``(T,H,W)`` uint8 gray.

    ``index`` (optional) selects frame positions; for HDF5, .npy (memory-mapped) and frame folders only those
    frames are read, for videos and DICOM the clip is decoded and then indexed.
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


def read_image(path: str | os.PathLike) -> np.ndarray:
    """One image file (``.png .jpg .jpeg .bmp .tif .tiff``) -> ``(H,W)`` uint8 gray, RGB with BT.601 weights: the
    frame-folder reader's own decoding, for still images (:mod:`datamodules.stills`)."""
    im = _read_image(Path(path))
    return im if im.ndim == 2 else rgb_to_gray(im)


def read_image_mask(path: str | os.PathLike) -> np.ndarray:
    """One mask image -> ``(H,W)`` uint8 in {0,1}: values {0,1} or {0,255} (else DataError), JPEG masks thresholded
    at 128 (the rule of :func:`read_mask_clip`)."""
    path = Path(path)
    return _binarize(read_image(path), path, lossy=path.suffix.lower() in _LOSSY_IMAGE_SUFFIXES)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(H, W)`` of an image file from its header (no pixels decoded)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(path, f"unreadable image ({e})") from None
    return h, w


def clip_shape(path: str | os.PathLike, *, mask: bool = False) -> tuple[int, int, int]:
    """``(T,H,W)`` of a clip, cheaply where the format allows (HDF5/.npy metadata, folder listing + one image
    header, video packet count, DICOM header); .npz is loaded."""
    path = Path(path)
    _check_exists(path)
    return clip_format(path).shape(path, mask)
