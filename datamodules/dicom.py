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

Ultrasound regions (:func:`ultrasound_regions`, :func:`tissue_regions`): the Sequence of Ultrasound Regions
(0018,6011, US Region Calibration module, PS3.3 C.8.5.5) says which rectangles of the frame hold which data,
so burned-in text, rulers, colour bars and a second view can be told from the image.  Choices:

* Only the top-level sequence is read (where the US Image and US Multi-frame Image objects carry it); it
  applies to every frame of the file.  Per-frame functional groups of enhanced US objects are not read.
* A *tissue* region is one with RegionSpatialFormat 1 (2D) and RegionDataType 1 (tissue) or 2 (colour flow:
  taken too, so that a colour-Doppler clip whose 2D area carries that type is not left out).  A tissue region
  lying inside another one (a colour box over the B-mode area) is dropped: the larger one holds it.  M-mode,
  spectral, waveform and graphics regions are never predicted on.
* Spacing in mm per pixel only when both PhysicalUnitsXDirection and PhysicalUnitsYDirection are 3 (cm) and both
  deltas are positive; anything else leaves the spacing unknown rather than guessed.
* RegionLocationMax* are inclusive pixel coordinates in DICOM; :class:`UltrasoundRegion` holds end-exclusive
  ones, as every box in this project.  A region that does not fit in the frame is a :class:`DataError`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datamodules.errors import DataError
from datamodules.frames import natural_key, rgb_to_gray

__all__ = [
    "read_dicom_frames",
    "dicom_shape",
    "read_dicom_dir",
    "UltrasoundRegion",
    "ultrasound_regions",
    "tissue_regions",
]

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


# ------------------------------------------------------------------------------------------ ultrasound regions
SPATIAL_2D = 1  # RegionSpatialFormat: 2D (tissue or flow)
TISSUE_DATA = (1, 2)  # RegionDataType: tissue, colour flow
UNITS_CM = 3  # PhysicalUnitsX/YDirection


@dataclass(frozen=True)
class UltrasoundRegion:
    """One item of the Sequence of Ultrasound Regions, in frame pixels, end-exclusive.

    ``item`` is its 1-based position in the sequence (what the prediction CSV reports), ``spacing_mm`` the
    ``(dy, dx)`` pixel size in mm, or None when the units are not cm (``units``: the X and Y unit codes).
    """

    item: int
    x0: int
    y0: int
    x1: int
    y1: int
    spatial_format: int
    data_type: int
    units: tuple[int, int]
    spacing_mm: tuple[float, float] | None

    @property
    def box(self) -> tuple[int, int, int, int]:
        """``(y0, x0, y1, x1)``, the box convention of :mod:`datamodules.stanford`."""
        return self.y0, self.x0, self.y1, self.x1

    def contains(self, other: UltrasoundRegion) -> bool:
        return self.x0 <= other.x0 and self.y0 <= other.y0 and self.x1 >= other.x1 and self.y1 >= other.y1

    def crop(self, frames: np.ndarray) -> np.ndarray:
        """The region's pixels of ``(T, H, W)`` frames (a view)."""
        return frames[:, self.y0 : self.y1, self.x0 : self.x1]


def _item_int(item, keyword: str, path: Path, n: int, default: int | None = None) -> int:
    value = item.get(keyword)
    if value in (None, ""):
        if default is not None:
            return default
        raise DataError(path, f"Sequence of Ultrasound Regions item {n} has no {keyword}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DataError(
            path, f"Sequence of Ultrasound Regions item {n}: {keyword} {value!r} is not a number"
        ) from None


def _spacing(item, units: tuple[int, int]) -> tuple[float, float] | None:
    if units != (UNITS_CM, UNITS_CM):
        return None
    try:
        dx, dy = float(item.get("PhysicalDeltaX")), float(item.get("PhysicalDeltaY"))
    except (TypeError, ValueError):
        return None
    if not (dx > 0 and dy > 0 and np.isfinite(dx) and np.isfinite(dy)):
        return None
    return dy * 10.0, dx * 10.0  # cm -> mm


def ultrasound_regions(path: str | os.PathLike) -> list[UltrasoundRegion] | None:
    """Every item of the file's Sequence of Ultrasound Regions (header only, pixels not read), None when the
    file has no such sequence.  A region outside the ``Rows x Columns`` frame, or with Min > Max, is a
    :class:`DataError` naming the item."""
    path = Path(path)
    ds = _read_dataset(path, pixels=False)
    if "SequenceOfUltrasoundRegions" not in ds or not ds.SequenceOfUltrasoundRegions:
        return None
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    regions = []
    for n, item in enumerate(ds.SequenceOfUltrasoundRegions, start=1):
        x0, y0 = (
            _item_int(item, "RegionLocationMinX0", path, n),
            _item_int(item, "RegionLocationMinY0", path, n),
        )
        x1, y1 = (
            _item_int(item, "RegionLocationMaxX1", path, n),
            _item_int(item, "RegionLocationMaxY1", path, n),
        )
        if not (0 <= x0 <= x1 < cols and 0 <= y0 <= y1 < rows):
            raise DataError(
                path,
                f"Sequence of Ultrasound Regions item {n}: region x {x0}..{x1}, y {y0}..{y1} does not fit in "
                f"the {cols} x {rows} frame",
            )
        units = (
            _item_int(item, "PhysicalUnitsXDirection", path, n, default=0),
            _item_int(item, "PhysicalUnitsYDirection", path, n, default=0),
        )
        regions.append(
            UltrasoundRegion(
                item=n,
                x0=x0,
                y0=y0,
                x1=x1 + 1,  # DICOM's Max is inclusive
                y1=y1 + 1,
                spatial_format=_item_int(item, "RegionSpatialFormat", path, n, default=0),
                data_type=_item_int(item, "RegionDataType", path, n, default=0),
                units=units,
                spacing_mm=_spacing(item, units),
            )
        )
    return regions


def tissue_regions(regions: list[UltrasoundRegion]) -> list[UltrasoundRegion]:
    """The 2D tissue / colour-flow regions, without those lying inside another one, in sequence order."""
    found = [r for r in regions if r.spatial_format == SPATIAL_2D and r.data_type in TISSUE_DATA]

    def inside_another(r: UltrasoundRegion) -> bool:
        # Of two regions with the same box, the first in the sequence stays.
        return any(o is not r and o.contains(r) and (o.box != r.box or o.item < r.item) for o in found)

    return [r for r in found if not inside_another(r)]
