"""DICOM reader: every photometric interpretation, bit depth, endianness and JPEG 2000, built with pydicom here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import convert_color_space
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

from datamodules.clips import clip_shape, read_clip, rgb_to_gray
from datamodules.dicom import dicom_shape, read_dicom_dir, read_dicom_frames
from datamodules.errors import DataError

T, H, W = 3, 32, 40  # JPEG 2000 (openjpeg) needs frames of at least ~32 px


def new_ds(tsyntax=ExplicitVRLittleEndian) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = tsyntax
    ds.SOPClassUID = UltrasoundMultiFrameImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = "US"
    return ds


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def gray_clip(t: int = T, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (t, H, W), dtype=np.uint8)


def rgb_clip(t: int = T, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (t, H, W, 3), dtype=np.uint8)


@pytest.mark.parametrize("frames", [1, T])
def test_monochrome2_single_and_multi_frame(tmp_path, frames):
    arr = gray_clip(frames)
    ds = new_ds()
    ds.set_pixel_data(arr[0] if frames == 1 else arr, "MONOCHROME2", 8)
    p = save(ds, tmp_path / "m2.dcm")
    got = read_dicom_frames(p)
    assert got.dtype == np.uint8 and got.shape == (frames, H, W)
    np.testing.assert_array_equal(got, arr)
    assert dicom_shape(p) == (frames, H, W)
    np.testing.assert_array_equal(read_clip(p), arr)  # manifests may point at DICOM clips too


def test_monochrome1_is_inverted(tmp_path):
    arr = gray_clip()
    ds = new_ds()
    ds.set_pixel_data(arr, "MONOCHROME1", 8)
    np.testing.assert_array_equal(read_dicom_frames(save(ds, tmp_path / "m1.dcm")), 255 - arr)


def test_rgb(tmp_path):
    rgb = rgb_clip()
    ds = new_ds()
    ds.set_pixel_data(rgb, "RGB", 8)
    np.testing.assert_array_equal(read_dicom_frames(save(ds, tmp_path / "rgb.dcm")), rgb_to_gray(rgb))


def test_ybr_full(tmp_path):
    rgb = rgb_clip()
    ds = new_ds()
    ds.set_pixel_data(convert_color_space(rgb, "RGB", "YBR_FULL"), "YBR_FULL", 8)
    got = read_dicom_frames(save(ds, tmp_path / "ybr.dcm"))
    assert np.abs(got.astype(int) - rgb_to_gray(rgb)).max() <= 1  # YCbCr round trip rounds


def test_ybr_full_422_native(tmp_path):
    # Native 4:2:2: per pixel pair the bytes are Y0 Y1 Cb Cr (PS3.3 C.7.6.3.1.2); build from a colour that is
    # constant over each horizontal pair so subsampling loses nothing.
    rgb = np.repeat(rgb_clip()[:, :, ::2], 2, axis=2)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    packed = np.stack(
        [ybr[:, :, 0::2, 0], ybr[:, :, 1::2, 0], ybr[:, :, 0::2, 1], ybr[:, :, 0::2, 2]], axis=-1
    )
    ds = new_ds()
    ds.set_pixel_data(rgb, "RGB", 8)  # sets Rows/Columns/NumberOfFrames/bits, then overwrite pixel bytes
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PixelData = packed.tobytes()
    got = read_dicom_frames(save(ds, tmp_path / "ybr422.dcm"))
    assert np.abs(got.astype(int) - rgb_to_gray(rgb)).max() <= 1


@pytest.mark.parametrize("lut_bits", [8, 16])
def test_palette_colour(tmp_path, lut_bits):
    idx = gray_clip()
    lut = np.random.default_rng(3).integers(0, 256, (256, 3)).astype(np.uint16)
    ds = new_ds()
    ds.set_pixel_data(idx, "PALETTE COLOR", 8)
    for i, colour in enumerate(("Red", "Green", "Blue")):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, lut_bits])
        entries = lut[:, i] * 257 if lut_bits == 16 else lut[:, i]
        # 8-bit LUT entries are still stored in 16-bit words (PS3.3 C.7.6.3.1.6)
        setattr(ds, f"{colour}PaletteColorLookupTableData", entries.astype("<u2").tobytes())
    got = read_dicom_frames(save(ds, tmp_path / "pal.dcm"))
    np.testing.assert_array_equal(got, rgb_to_gray(lut[idx].astype(np.uint8)))


def test_big_endian_16bit_min_max(tmp_path):
    arr = np.random.default_rng(4).integers(100, 4000, (T, H, W)).astype(np.uint16)
    ds = new_ds()
    ds.set_pixel_data(arr, "MONOCHROME2", 12)
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    ds.PixelData = arr.astype(">u2").tobytes()  # pydicom writes OW bytes as given
    p = save(ds, tmp_path / "be.dcm")
    assert pydicom.dcmread(p).file_meta.TransferSyntaxUID == ExplicitVRBigEndian
    got = read_dicom_frames(p)
    # no window: min..max over the whole clip (not per frame) onto 0..255
    lo, hi = arr.min(), arr.max()
    np.testing.assert_array_equal(got, np.rint((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8))


def test_big_endian_8bit(tmp_path):
    arr = gray_clip()
    ds = new_ds()
    ds.set_pixel_data(arr, "MONOCHROME2", 8)
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    np.testing.assert_array_equal(read_dicom_frames(save(ds, tmp_path / "be8.dcm")), arr)


def test_16bit_window_and_rescale(tmp_path):
    arr = np.array([[0, 1000, 1500, 2000, 4000]], np.uint16).repeat(H, 0)[None]
    arr = np.pad(arr, ((0, 0), (0, 0), (0, W - 5)))
    ds = new_ds()
    ds.set_pixel_data(arr, "MONOCHROME2", 16)
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1000  # modality values -1000, 0, 500, 1000, 3000
    ds.WindowCenter, ds.WindowWidth = 500, 1001  # linear window: 0 -> 0, 500 -> ~128, 1000 -> 255
    got = read_dicom_frames(save(ds, tmp_path / "win.dcm"))[0, 0, :5]
    np.testing.assert_array_equal(got, [0, 0, 128, 255, 255])


def test_jpeg2000_gray_and_rgb(tmp_path):
    arr, rgb = gray_clip(), rgb_clip()
    ds = new_ds()
    ds.set_pixel_data(arr, "MONOCHROME2", 8)
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    np.testing.assert_array_equal(read_dicom_frames(save(ds, tmp_path / "j2k_gray.dcm")), arr)
    ds = new_ds()
    ds.set_pixel_data(rgb, "RGB", 8)
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg", use_mct=True)  # colour transform inside codec
    p = save(ds, tmp_path / "j2k_rgb.dcm")
    assert pydicom.dcmread(p).file_meta.TransferSyntaxUID == JPEG2000Lossless
    np.testing.assert_array_equal(read_dicom_frames(p), rgb_to_gray(rgb))


def test_clip_reader_sniffs_dicom_without_suffix(tmp_path):
    """Scanners often write DICOM without a suffix: the clip reader (every stage's) finds the preamble."""
    arr = gray_clip()
    ds = new_ds()
    ds.set_pixel_data(arr, "MONOCHROME2", 8)
    p = save(ds, tmp_path / "IM0001.dcm").rename(tmp_path / "IM0001")
    np.testing.assert_array_equal(read_clip(p), arr)
    np.testing.assert_array_equal(read_clip(p, [2, 0]), arr[[2, 0]])
    assert clip_shape(p) == (T, H, W)
    (tmp_path / "notes").write_bytes(b"plain text" * 20)
    with pytest.raises(DataError, match=r"notes: unsupported clip format '\(no suffix\)'"):
        read_clip(tmp_path / "notes")


def test_read_dicom_dir(tmp_path):
    for i in (10, 2):
        ds = new_ds()
        ds.set_pixel_data(gray_clip(seed=i), "MONOCHROME2", 8)
        save(ds, tmp_path / f"im{i}.dcm")
    assert list(read_dicom_dir(tmp_path)) == ["im2.dcm", "im10.dcm"]


def test_bad_dicom(tmp_path):
    (tmp_path / "junk.dcm").write_bytes(b"this is not dicom" * 20)
    with pytest.raises(DataError, match=r"junk\.dcm: not a DICOM file"):
        read_dicom_frames(tmp_path / "junk.dcm")
    ds = new_ds()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # a structured report: no image
    ds.PatientName = "Anon"
    with pytest.raises(DataError, match=r"sr\.dcm: no pixel data; not an image DICOM"):
        read_dicom_frames(save(ds, tmp_path / "sr.dcm"))
    with pytest.raises(DataError, match="not an image DICOM"):
        dicom_shape(tmp_path / "sr.dcm")
    ds = new_ds()
    ds.set_pixel_data(gray_clip(), "MONOCHROME2", 8)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]  # truncated pixel data
    with pytest.raises(DataError, match=r"short\.dcm: cannot decode pixel data"):
        read_dicom_frames(save(ds, tmp_path / "short.dcm"))
    full = save(new_ds(), tmp_path / "cut.dcm")
    data = full.read_bytes()
    full.write_bytes(data[: len(data) - 5])
    with pytest.raises(DataError, match=r"cut\.dcm"):
        read_dicom_frames(full)
    with pytest.raises(DataError, match=r"nothere\.dcm: does not exist"):
        read_dicom_frames(tmp_path / "nothere.dcm")
