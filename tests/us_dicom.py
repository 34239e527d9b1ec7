"""Scanner-like ultrasound DICOM files for the tests, built with pydicom (data elements by keyword)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, UltrasoundMultiFrameImageStorage, generate_uid


def us_region(
    x0: int,
    y0: int,
    x1: int,
    y1: int,
    *,
    delta_cm: tuple[float, float] | None = (0.01, 0.01),
    spatial_format: int = 1,
    data_type: int = 1,
    units: tuple[int, int] = (3, 3),
) -> Dataset:
    """One item of the Sequence of Ultrasound Regions: inclusive pixel corners (x0, y0)-(x1, y1), spacing
    ``(dx, dy)`` in cm per pixel (PhysicalUnits 3 = cm), 2D tissue by default."""
    item = Dataset()
    item.RegionSpatialFormat = spatial_format
    item.RegionDataType = data_type
    item.RegionFlags = 0
    item.RegionLocationMinX0 = x0
    item.RegionLocationMinY0 = y0
    item.RegionLocationMaxX1 = x1
    item.RegionLocationMaxY1 = y1
    item.PhysicalUnitsXDirection, item.PhysicalUnitsYDirection = units
    if delta_cm is not None:
        item.PhysicalDeltaX, item.PhysicalDeltaY = delta_cm
    return item


def write_us_dicom(frames: np.ndarray, path: Path, regions: list[Dataset] | None = None) -> Path:
    """A multi-frame MONOCHROME2 8-bit ultrasound DICOM, with a Sequence of Ultrasound Regions if given."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = UltrasoundMultiFrameImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = "US"
    if regions is not None:
        ds.SequenceOfUltrasoundRegions = Sequence(regions)
    ds.set_pixel_data(np.ascontiguousarray(frames), "MONOCHROME2", 8)
    ds.save_as(path, enforce_file_format=True)
    return path


def burned_in(frames: np.ndarray, shape: tuple[int, int], at: tuple[int, int], seed: int = 0) -> np.ndarray:
    """``frames`` (T, h, w) pasted at ``at`` (y, x) into larger frames ``shape`` (H, W) whose other pixels are
    scanner clutter: random text-like noise and a bright ruler."""
    rng = np.random.default_rng(seed)
    out = rng.integers(0, 256, size=(len(frames), *shape), dtype=np.uint8)
    out[:, :, -3:] = 255  # a ruler down the right edge
    y, x = at
    out[:, y : y + frames.shape[1], x : x + frames.shape[2]] = frames
    return out
