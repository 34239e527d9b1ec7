"""DICOM Sequence of Ultrasound Regions (datamodules.dicom) and the nodule size in mm (datamodules.nodule_size)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from datamodules.dicom import read_dicom_frames, tissue_regions, ultrasound_regions
from datamodules.errors import DataError
from datamodules.nodule_size import largest_component, nodule_size
from tests.us_dicom import burned_in, us_region, write_us_dicom


def _views(t: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return (
        rng.integers(0, 256, (t, 20, 30), dtype=np.uint8),
        rng.integers(0, 256, (t, 20, 30), dtype=np.uint8),
    )


def test_two_views_side_by_side_crop_to_their_own_pixels(tmp_path):
    left, right = _views()
    frames = burned_in(left, (40, 80), (10, 5))
    frames[:, 10:30, 45:75] = right
    path = write_us_dicom(
        frames,
        tmp_path / "two.dcm",
        [
            us_region(0, 0, 79, 39, spatial_format=5, data_type=0),  # graphics over the whole screen
            us_region(5, 10, 34, 29, delta_cm=(0.01, 0.02)),
            us_region(45, 10, 74, 29, delta_cm=(0.015, 0.015)),
        ],
    )
    regions = ultrasound_regions(path)
    assert [r.item for r in regions] == [1, 2, 3]
    tissue = tissue_regions(regions)
    assert [r.item for r in tissue] == [2, 3]  # the graphics region is never predicted on
    pixels = read_dicom_frames(path)
    np.testing.assert_array_equal(tissue[0].crop(pixels), left)
    np.testing.assert_array_equal(tissue[1].crop(pixels), right)
    # DICOM's Max corners are inclusive: (5, 10)-(34, 29) is 30 x 20 pixels; spacing (dy, dx) in mm.
    assert tissue[0].box == (10, 5, 30, 35)
    assert tissue[0].spacing_mm == pytest.approx((0.2, 0.1))
    assert tissue[1].spacing_mm == pytest.approx((0.15, 0.15))


def test_nested_colour_box_and_non_cm_units(tmp_path):
    frames = np.zeros((2, 40, 60), np.uint8)
    path = write_us_dicom(
        frames,
        tmp_path / "colour.dcm",
        [
            us_region(0, 0, 59, 39, data_type=2),  # B-mode area labelled colour flow
            us_region(10, 10, 30, 30, data_type=2),  # the colour box inside it
            us_region(0, 0, 59, 39, units=(0, 0)),  # same box again, units "none"
        ],
    )
    tissue = tissue_regions(ultrasound_regions(path))
    assert [r.item for r in tissue] == [1]
    assert ultrasound_regions(path)[2].spacing_mm is None


def test_no_sequence_and_regions_outside_the_frame(tmp_path):
    frames = np.zeros((2, 40, 60), np.uint8)
    assert ultrasound_regions(write_us_dicom(frames, tmp_path / "plain.dcm")) is None
    outside = write_us_dicom(
        frames, tmp_path / "outside.dcm", [us_region(0, 0, 59, 39), us_region(30, 0, 60, 39)]
    )
    with pytest.raises(DataError) as e:
        ultrasound_regions(outside)
    msg = str(e.value)
    assert "outside.dcm" in msg and "item 2" in msg and "60 x 40 frame" in msg and "\n" not in msg
    flipped = write_us_dicom(frames, tmp_path / "flipped.dcm", [us_region(50, 0, 10, 39)])
    with pytest.raises(DataError, match="item 1: region x 50..10"):
        ultrasound_regions(flipped)


# ----------------------------------------------------------------------------------------------- size in mm
def test_size_in_mm_of_a_known_mask():
    """A 20 x 10 px rectangle at 0.1 mm x 0.2 mm per pixel is 2.0 x 2.0 mm, 2*sqrt(2) mm corner to corner,
    measured on its frame and not stretched by a one-pixel speck elsewhere."""
    masks = np.zeros((3, 40, 60), np.uint8)
    masks[0, 5:8, 5:9] = 1  # smaller nodule on the first frame
    masks[2, 10:20, 5:25] = 1
    masks[2, 35, 55] = 1  # a speck far away
    size = nodule_size(masks, (0.2, 0.1))
    assert size.frame == 2
    assert (size.width_px, size.height_px) == (20, 10)
    assert size.width_mm == pytest.approx(2.0)
    assert size.height_mm == pytest.approx(2.0)
    assert size.max_extent_mm == pytest.approx(2 * math.sqrt(2))
    # A disc of radius 10 px at 0.5 mm/px: about 10 mm across in every direction.
    yy, xx = np.mgrid[:40, :40]
    disc = ((yy - 20) ** 2 + (xx - 20) ** 2 <= 100).astype(np.uint8)[None]
    d = nodule_size(disc, (0.5, 0.5))
    assert d.width_mm == pytest.approx(10.5) and d.height_mm == pytest.approx(10.5)
    assert 10.5 <= d.max_extent_mm <= 10.5 * math.sqrt(2)


def test_size_without_spacing_or_mask():
    masks = np.zeros((2, 10, 10), np.uint8)
    assert nodule_size(masks, (0.1, 0.1)) is None
    masks[1, 2:4, 3:8] = 1
    size = nodule_size(masks, None)
    assert (size.frame, size.width_px, size.height_px) == (1, 5, 2)
    assert size.width_mm is None and size.max_extent_mm is None


def test_largest_component_uses_8_connectivity():
    m = np.zeros((6, 6), np.uint8)
    m[0, 0] = m[1, 1] = m[2, 2] = 1  # one diagonal line of 3
    m[4:6, 4] = 1  # 2 pixels
    assert largest_component(m).sum() == 3
