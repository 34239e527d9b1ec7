"""DICOM ultrasound -> ``(T,H,W)`` uint8 grayscale frames, the input format for prediction on scanner files.

Handled: single- and multi-frame; MONOCHROME1 (inverted) / MONOCHROME2; RGB; YBR_FULL / YBR_FULL_422 (converted
to RGB by pydicom's decoder, or by :func:`pydicom.pixels.convert_color_space` when it did not); PALETTE COLOR
(:func:`pydicom.pixels.apply_color_lut`); any transfer syntax pydicom can decode — native little/big endian, and
JPEG 2000 through pylibjpeg-openjpeg (its YBR_ICT / YBR_RCT are undone by the codec, giving RGB).  Colour ends as
gray with ITU-R BT.601 weights (:func:`datamodules.frames.rgb_to_gray`).

Mapping to uint8 (the choice documented here, as the brief asks):

* 8-bit unsigned data (nearly all ultrasound) is used as stored: scanners write display-ready values, and a
  stored window would only re-map an image the sonographer already saw.
* Deeper or signed monochrome data go through the Modality LUT (Rescale Slope/Intercept), then the first
  Window Center/Width by the DICOM linear function (PS3.3 C.11.2.1.2.1) onto 0..255 if a window is present, else
  a VOI LUT Sequence if present, else the clip's own min..max.  Min/max is taken over the *whole clip*, not per
  frame, so intensity changes over time (CEUS wash-in / wash-out) are kept.
* Deeper RGB / palette output is scaled by its full range (2**BitsStored - 1; 2**LUT bits - 1 for palettes).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from datamodules.errors import DataError
from datamodules.frames import natural_key, rgb_to_gray

__all__ = ["read_dicom_frames", "dicom_shape", "read_dicom_dir"]

_COLOUR_TO_RGB = ("YBR_FULL", "YBR_FULL_422")
_CODEC_RGB = ("YBR_ICT", "YBR_RCT")  # JPEG 2000 component transforms, undone inside the codec


def _read_dataset(path: Path, *, pixels: bool = True):
    import pydicom
    from pydicom.errors import InvalidDicomError

    if not path.exists():
        raise DataError(path, "does not exist")
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=not pixels)
    except InvalidDicomError as e:
        raise DataError(path, f"not a DICOM file ({e})") from None
    except Exception as e:  # pydicom raises many types on truncated/corrupt files
        raise DataError(path, f"unreadable DICOM ({type(e).__name__}: {e})") from None
    return ds


def _n_frames(ds) -> int:
    try:
        return max(int(ds.get("NumberOfFrames", 1) or 1), 1)
    except (TypeError, ValueError):
        return 1


def dicom_shape(path: str | os.PathLike) -> tuple[int, int, int]:
    """``(T,H,W)`` from the header alone (pixel data not read)."""
    path = Path(path)
    ds = _read_dataset(path, pixels=False)
    if "Rows" not in ds or "Columns" not in ds:
        raise DataError(path, "no image (Rows/Columns missing); not an image DICOM")
    return _n_frames(ds), int(ds.Rows), int(ds.Columns)


def _decode(ds, path: Path) -> tuple[np.ndarray, str]:
    """Pixel array after the decoder's own colour handling, and the photometric interpretation it ends in."""
    from pydicom.pixels import get_decoder

    tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if tsyntax is None:
        raise DataError(path, "no Transfer Syntax UID in the file meta; cannot decode pixel data")
    decoder = get_decoder(tsyntax)
    if decoder is None:
        raise DataError(path, f"no pixel data decoder for transfer syntax {tsyntax.name}")
    if not decoder.is_available:
        missing = "; ".join(f"{k}: {', '.join(v)}" for k, v in decoder.missing_dependencies.items()) or "?"
        raise DataError(path, f"cannot decode {tsyntax.name}: missing plugin dependencies ({missing})")
    try:
        # as_rgb converts YBR_FULL / YBR_FULL_422 to RGB; meta says what the array now holds.
        arr, meta = decoder.as_array(ds, as_rgb=True)
    except Exception as e:  # decoders raise ValueError/RuntimeError/AttributeError on bad headers or data
        raise DataError(path, f"cannot decode pixel data ({type(e).__name__}: {e})") from None
    pi = str(meta.get("photometric_interpretation", ds.get("PhotometricInterpretation", "")))
    return arr, pi


def _window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 linear VOI window onto 0..255 (written out: pydicom's version maps onto
    the stored bit range, not onto 8 bits)."""
    if width <= 1:
        return np.where(x > center - 0.5, 255.0, 0.0)
    y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    return np.clip(y, 0.0, 255.0)


def _first(value) -> float:
    try:
        return float(value[0])  # multi-valued (one window per explanation)
    except TypeError:
        return float(value)


def _mono_to_uint8(arr: np.ndarray, ds, path: Path) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)))
    if arr.dtype == np.uint8 and bits <= 8 and "ModalityLUTSequence" not in ds:
        return arr
    x = apply_modality_lut(arr, ds).astype(np.float64)
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center not in (None, "") and width not in (None, ""):
        y = _window(x, _first(center), _first(width))
    else:
        if "VOILUTSequence" in ds:
            x = apply_voi_lut(arr, ds, prefer_lut=True).astype(np.float64)
        lo, hi = float(x.min()), float(x.max())
        y = np.zeros_like(x) if hi <= lo else (x - lo) * (255.0 / (hi - lo))
    return np.rint(y).astype(np.uint8)


def _scale_colour(arr: np.ndarray, full: float) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if full == 255.0:
        return np.clip(arr, 0, 255).astype(np.uint8)
    return np.rint(np.clip(arr.astype(np.float64), 0, full) * (255.0 / full)).astype(np.uint8)


def read_dicom_frames(path: str | os.PathLike) -> np.ndarray:
    """Read a DICOM image (single- or multi-frame) as ``(T,H,W)`` uint8 gray frames."""
    from pydicom.pixels import apply_color_lut, convert_color_space

    path = Path(path)
    ds = _read_dataset(path)
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        raise DataError(path, "float pixel data is not an ultrasound image; not supported")
    if "PixelData" not in ds:
        raise DataError(path, "no pixel data; not an image DICOM")
    arr, pi = _decode(ds, path)
    samples = int(ds.get("SamplesPerPixel", 1))
    frames = _n_frames(ds)
    # Single-frame arrays come without the frame axis.
    if frames == 1 and arr.ndim == (2 if samples == 1 else 3):
        arr = arr[None]
    want = 3 if samples == 1 else 4
    if arr.ndim != want or arr.shape[0] != frames:
        raise DataError(path, f"decoded pixel array has shape {arr.shape}; expected {frames} frames")
    if arr.size == 0:
        raise DataError(path, "empty image")

    if pi in ("MONOCHROME1", "MONOCHROME2"):
        if samples != 1:
            raise DataError(path, f"{pi} with SamplesPerPixel {samples}")
        out = _mono_to_uint8(arr, ds, path)
        # MONOCHROME1: minimum value is white; invert so bright = echogenic, like every other input.
        return np.ascontiguousarray(255 - out if pi == "MONOCHROME1" else out)
    if pi == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(arr, ds)[..., :3]  # drop an alpha LUT if present
        except Exception as e:
            raise DataError(path, f"cannot apply the palette colour LUT ({type(e).__name__}: {e})") from None
        # LUT entries span 0..2**bits-1 (descriptor's 3rd value), stored in 8- or 16-bit words; a few writers put
        # 8-bit entries in the high byte, which shows as values above the declared range.
        bits = (
            int(ds.RedPaletteColorLookupTableDescriptor[2])
            if "RedPaletteColorLookupTableDescriptor" in ds
            else 16
        )
        full = float(2**bits - 1)
        if rgb.size and float(rgb.max()) > full:
            full = 65535.0
        return rgb_to_gray(_scale_colour(rgb, full))
    if samples != 3:
        raise DataError(path, f"photometric interpretation {pi!r} with SamplesPerPixel {samples}")
    full = float(2 ** int(ds.get("BitsStored", 8)) - 1)
    if pi in _COLOUR_TO_RGB:
        # The decoder normally did this already (as_rgb); kept for decoders that hand back YCbCr.
        arr = convert_color_space(arr, pi, "RGB")
    elif pi not in ("RGB", *_CODEC_RGB):
        raise DataError(path, f"photometric interpretation {pi!r} is not supported")
    return rgb_to_gray(_scale_colour(arr, full))


def read_dicom_dir(folder: str | os.PathLike, pattern: str = "*.dcm") -> dict[str, np.ndarray]:
    """Read every DICOM in ``folder`` (matching ``pattern``): ``{file name: (T,H,W) uint8}``, in name order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, "is not a folder")
    files = sorted((p for p in folder.glob(pattern) if p.is_file()), key=lambda p: natural_key(p.name))
    if not files:
        raise DataError(folder, f"no files matching {pattern!r}")
    return {p.name: read_dicom_frames(p) for p in files}
