"""Clip reader (every format, natural frame order, bad input), paired manifests, AsyCMST importer."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import av
import h5py
import numpy as np
import pytest
from PIL import Image

from datamodules.clips import clip_shape, natural_key, read_clip, read_mask_clip, rgb_to_gray, split_h5_spec
from datamodules.errors import DataError
from datamodules.paired import (
    PairedCase,
    check_case,
    import_asycmst_layout,
    load_case,
    read_manifest,
    write_manifest,
)

T, H, W = 12, 32, 48


def ramp_clip(t: int = T, h: int = H, w: int = W) -> np.ndarray:
    """Flat frames whose gray level encodes the frame number (robust to lossy codecs)."""
    return np.stack([np.full((h, w), 20 + 15 * i, np.uint8) for i in range(t)])


def texture_clip(t: int = T, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (t, H, W), dtype=np.uint8)


def box_mask(t: int = T) -> np.ndarray:
    m = np.zeros((t, H, W), np.uint8)
    m[:, 8:20, 10:30] = 1
    return m


def write_video(path: Path, frames: np.ndarray, codec: str = "mpeg4", pix_fmt: str = "yuv420p") -> Path:
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=10)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        if codec == "mpeg4":
            s.bit_rate = 2_000_000
        for f in frames:
            fmt = "rgb24" if f.ndim == 3 else "gray"
            for p in s.encode(av.VideoFrame.from_ndarray(f, format=fmt)):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def write_folder(
    folder: Path, frames: np.ndarray, names: list[str] | None = None, suffix: str = ".png"
) -> Path:
    folder.mkdir(parents=True)
    names = names or [f"frame{i + 1}" for i in range(len(frames))]
    for name, f in zip(names, frames, strict=True):
        Image.fromarray(f).save(folder / f"{name}{suffix}")
    return folder


# ------------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize(
    ("name", "codec", "pix"), [("c.mp4", "mpeg4", "yuv420p"), ("c.avi", "mjpeg", "yuvj420p")]
)
def test_video_round_trip(tmp_path, name, codec, pix):
    frames = ramp_clip()
    p = write_video(tmp_path / name, frames, codec, pix)
    got = read_clip(p)
    assert got.shape == (T, H, W) and got.dtype == np.uint8  # frame count exact
    assert np.abs(got.astype(int) - frames).max() <= 3  # gray values approximately preserved
    assert clip_shape(p) == (T, H, W)
    np.testing.assert_array_equal(read_clip(p, [3, 0]), got[[3, 0]])


def test_video_rgb_goes_gray(tmp_path):
    rgb = np.zeros((4, H, W, 3), np.uint8)
    rgb[..., 0] = 200  # pure red -> 0.299 * 200 = 60
    got = read_clip(write_video(tmp_path / "r.avi", rgb, "ffv1", "bgr0"))
    assert abs(int(np.median(got)) - 60) <= 2


def test_folder_natural_order_not_filesystem_order(tmp_path):
    frames = ramp_clip()
    names = [f"frame{i + 1}" for i in range(T)]
    folder = tmp_path / "clip"
    folder.mkdir()
    # Create files in reverse-lexicographic order, and give them mtimes that contradict the name order, so neither
    # creation order, mtime order nor plain string order ("frame10" < "frame2") gives the right sequence.
    order = sorted(range(T), key=lambda i: names[i], reverse=True)
    for k, i in enumerate(order):
        f = folder / f"{names[i]}.png"
        Image.fromarray(frames[i]).save(f)
        os.utime(f, (1_000_000 + k, 1_000_000 + k))
    (folder / ".DS_Store").write_bytes(b"junk")  # hidden and non-image files are ignored
    (folder / "notes.txt").write_text("x")
    got = read_clip(folder)
    np.testing.assert_array_equal(got, frames)
    assert [p for p in sorted(os.listdir(folder)) if p.endswith(".png")][:3] == [
        "frame1.png",
        "frame10.png",
        "frame11.png",
    ]
    assert clip_shape(folder) == (T, H, W)
    np.testing.assert_array_equal(read_clip(folder, [11, 1]), frames[[11, 1]])


def test_natural_key():
    assert sorted(["f10", "f2", "f1", "F3"], key=natural_key) == ["f1", "f2", "F3", "f10"]
    assert sorted(["00010.jpg", "00002.jpg"], key=natural_key) == ["00002.jpg", "00010.jpg"]


def test_folder_rgb_frames_use_bt601(tmp_path):
    rgb = np.zeros((2, H, W, 3), np.uint8)
    rgb[..., 1] = 100  # green 100 -> 58.7
    got = read_clip(write_folder(tmp_path / "rgb", rgb))
    assert (got == 59).all()
    assert rgb_to_gray(np.array([[255, 255, 255]], np.uint8))[0] == 255


def test_npy_gray_rgb_and_int_dtype(tmp_path):
    frames = texture_clip()
    np.save(tmp_path / "g.npy", frames)
    np.testing.assert_array_equal(read_clip(tmp_path / "g.npy"), frames)
    rgb = np.repeat(frames[..., None], 3, axis=-1)
    np.save(tmp_path / "c.npy", rgb)
    np.testing.assert_array_equal(read_clip(tmp_path / "c.npy"), frames)  # equal channels -> same gray
    np.save(tmp_path / "i.npy", frames.astype(np.int64))
    np.testing.assert_array_equal(read_clip(tmp_path / "i.npy", [2, 5]), frames[[2, 5]])
    assert clip_shape(tmp_path / "c.npy") == (T, H, W)


def test_npz_frames_and_mask_with_annotated(tmp_path):
    frames, mask = texture_clip(), box_mask()
    np.savez(tmp_path / "f.npz", frames=frames)
    np.savez(tmp_path / "only.npz", whatever=frames)
    np.testing.assert_array_equal(read_clip(tmp_path / "f.npz"), frames)
    np.testing.assert_array_equal(read_clip(tmp_path / "only.npz"), frames)
    ann = np.arange(T) % 3 == 0
    np.savez(tmp_path / "m.npz", mask=mask * 255, annotated=ann)
    m, a = read_mask_clip(tmp_path / "m.npz")
    np.testing.assert_array_equal(m, mask)
    np.testing.assert_array_equal(a, ann)
    m2, a2 = read_mask_clip(tmp_path / "m.npz", [3, 4])
    np.testing.assert_array_equal(a2, ann[[3, 4]])


def test_h5_default_key_and_path_spec(tmp_path):
    frames, mask = texture_clip(), box_mask()
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["frames"] = frames
        f.create_dataset("/cases/c1/ceus", data=frames[::-1].copy(), chunks=(1, H, W))
        f["/cases/c1/mask"] = mask.astype(bool)
        f["/cases/c1/annotated"] = np.arange(T) < 4
    np.testing.assert_array_equal(read_clip(tmp_path / "a.h5"), frames)
    spec = f"{tmp_path / 'a.h5'}:/cases/c1/ceus"
    assert split_h5_spec(spec) == (tmp_path / "a.h5", "/cases/c1/ceus")
    np.testing.assert_array_equal(read_clip(spec), frames[::-1])
    np.testing.assert_array_equal(read_clip(spec, [5, 1, 5]), frames[::-1][[5, 1, 5]])  # unsorted, repeated
    m, a = read_mask_clip(f"{tmp_path / 'a.h5'}:/cases/c1/mask")
    np.testing.assert_array_equal(m, mask)
    assert a.sum() == 4
    assert clip_shape(spec) == (T, H, W)


def test_mask_formats_and_defaults(tmp_path):
    mask = box_mask()
    np.save(tmp_path / "m01.npy", mask)
    np.save(tmp_path / "m255.npy", mask * 255)
    for name in ("m01.npy", "m255.npy"):
        m, a = read_mask_clip(tmp_path / name)
        np.testing.assert_array_equal(m, mask)
        assert a.dtype == bool and a.all()
    m, _ = read_mask_clip(write_folder(tmp_path / "mf", mask * 255))
    np.testing.assert_array_equal(m, mask)
    # a lossy video of a 0/255 mask is thresholded, not rejected
    m, _ = read_mask_clip(write_video(tmp_path / "m.mp4", mask * 255))
    assert m.shape == mask.shape and (m != mask).mean() < 0.02


# ----------------------------------------------------------------------------------------- manifest and cases


def write_case_files(
    folder: Path, case: str, t_bus: int = T, t_ceus: int = T, mask_shape=None
) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{case}_bus.npy", texture_clip(t_bus, 1))
    np.save(folder / f"{case}_ceus.npy", texture_clip(t_ceus, 2))
    np.save(folder / f"{case}_mask.npy", np.zeros(mask_shape or (t_bus, H, W), np.uint8))
    return {
        "bus": f"clips/{case}_bus.npy",
        "ceus": f"clips/{case}_ceus.npy",
        "bus_mask": f"clips/{case}_mask.npy",
    }


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in columns})
    return path


COLS = ["case_id", "patient_id", "label", "bus", "ceus", "bus_mask"]


def test_manifest_relative_paths_and_load_case(tmp_path):
    a = write_case_files(tmp_path / "clips", "a")
    b = write_case_files(tmp_path / "clips", "b")
    b["bus_mask"] = ""
    csv_path = write_csv(
        tmp_path / "manifest.csv",
        [{"case_id": "a", "patient_id": "p1", "label": "1", **a}, {"case_id": "b", "label": "0", **b}],
        COLS,
    )
    cases = read_manifest(csv_path)
    assert [c.case_id for c in cases] == ["a", "b"]
    assert cases[0].patient_id == "p1" and cases[1].patient_id == "b"  # blank patient -> case id
    assert cases[0].label == 1 and cases[1].bus_mask is None
    assert cases[0].bus == (tmp_path / "clips" / "a_bus.npy").resolve()
    bus, ceus, mask, ann = load_case(cases[0])
    assert bus.shape == ceus.shape == mask.shape == (T, H, W) and ann.all()
    assert load_case(cases[1])[2:] == (None, None)
    assert check_case(cases[0]) == T


def test_manifest_without_patient_column(tmp_path):
    a = write_case_files(tmp_path / "clips", "a")
    csv_path = write_csv(
        tmp_path / "m.csv", [{"case_id": "007", "label": "0", **a}], ["case_id", "label", "bus", "ceus"]
    )
    (case,) = read_manifest(csv_path)
    assert case.case_id == "007" and case.patient_id == "007" and case.bus_mask is None


def _bad_manifest(tmp_path, rows, columns=COLS):
    return write_csv(tmp_path / "bad.csv", rows, columns)


def test_manifest_bad_inputs(tmp_path):
    a = write_case_files(tmp_path / "clips", "a")
    no_ceus = _bad_manifest(tmp_path, [{"case_id": "a", "label": "0", **a}], ["case_id", "label", "bus"])
    with pytest.raises(DataError, match=r"bad\.csv: missing column\(s\) ceus"):
        read_manifest(no_ceus)
    with pytest.raises(DataError, match=r"bad\.csv: row 2 \(case 'a'\): label '2' is not 0/1"):
        read_manifest(_bad_manifest(tmp_path, [{"case_id": "a", "label": "2", **a}]))
    with pytest.raises(DataError, match="is not 0/1"):
        read_manifest(_bad_manifest(tmp_path, [{"case_id": "a", "label": "malignant", **a}]))
    gone = {**a, "ceus": "clips/missing.mp4"}
    with pytest.raises(
        DataError, match=r"missing\.mp4: does not exist \(manifest .*bad\.csv, row 2, column ceus\)"
    ):
        read_manifest(_bad_manifest(tmp_path, [{"case_id": "a", "label": "0", **gone}]))
    with pytest.raises(DataError, match="duplicate case_id 'a'"):
        read_manifest(_bad_manifest(tmp_path, [{"case_id": "a", "label": "0", **a}] * 2))
    with pytest.raises(DataError, match="bad.csv: no rows"):
        read_manifest(_bad_manifest(tmp_path, []))
    with pytest.raises(DataError, match="nothere.csv: does not exist"):
        read_manifest(tmp_path / "nothere.csv")


def test_load_case_length_and_mask_mismatch(tmp_path):
    d = tmp_path / "clips"
    write_case_files(d, "x", t_bus=T, t_ceus=T - 2)
    case = PairedCase("x", "x", 0, d / "x_bus.npy", d / "x_ceus.npy", None)
    with pytest.raises(DataError, match=r"x_ceus\.npy: CEUS has 10 frames but BUS .*x_bus\.npy has 12"):
        load_case(case)
    with pytest.raises(DataError, match="CEUS has 10 frames"):
        check_case(case)
    write_case_files(d, "y", mask_shape=(T, H, W + 1))
    case = PairedCase("y", "y", 0, d / "y_bus.npy", d / "y_ceus.npy", d / "y_mask.npy")
    with pytest.raises(DataError, match=r"y_mask\.npy: mask shape \(12, 32, 49\) does not match BUS"):
        load_case(case)
    with pytest.raises(DataError, match="mask shape"):
        check_case(case)


def test_clip_bad_inputs(tmp_path):
    # unreadable video
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x01not a video" * 50)
    with pytest.raises(DataError, match=r"broken\.mp4: unreadable video"):
        read_clip(tmp_path / "broken.mp4")
    # empty clips in every format
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: empty clip"):
        read_clip(tmp_path / "empty")
    np.save(tmp_path / "empty.npy", np.zeros((0, H, W), np.uint8))
    with pytest.raises(DataError, match=r"empty\.npy: empty clip \(0 frames\)"):
        read_clip(tmp_path / "empty.npy")
    with h5py.File(tmp_path / "e.h5", "w") as f:
        f["frames"] = np.zeros((0, H, W), np.uint8)
        f["other"] = np.zeros((2, H, W), np.uint8)
        f.create_group("grp")
    with pytest.raises(DataError, match=r"e\.h5: empty clip"):
        read_clip(tmp_path / "e.h5")
    with pytest.raises(DataError, match=r"e\.h5:/nokey: missing HDF5 dataset '/nokey'"):
        read_clip(f"{tmp_path / 'e.h5'}:/nokey")
    with pytest.raises(DataError, match="is a group, not a dataset"):
        read_clip(f"{tmp_path / 'e.h5'}:grp")
    # wrong shape / dtype
    np.save(tmp_path / "flat.npy", np.zeros((H, W), np.uint8))
    with pytest.raises(DataError, match=r"flat\.npy: expected frames shaped \(T,H,W\)"):
        read_clip(tmp_path / "flat.npy")
    np.save(tmp_path / "float.npy", np.zeros((2, H, W), np.float32))
    with pytest.raises(DataError, match=r"float\.npy: dtype float32 not supported"):
        read_clip(tmp_path / "float.npy")
    np.save(tmp_path / "wide.npy", np.full((2, H, W), 300, np.int16))
    with pytest.raises(DataError, match=r"wide\.npy: int16 values span 300\.\.300"):
        read_clip(tmp_path / "wide.npy")
    np.savez(tmp_path / "two.npz", a=np.zeros((2, H, W), np.uint8), b=np.zeros((2, H, W), np.uint8))
    with pytest.raises(DataError, match=r"two\.npz: no 'frames' array"):
        read_clip(tmp_path / "two.npz")
    (tmp_path / "junk.npy").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"junk\.npy: not a readable \.npy"):
        read_clip(tmp_path / "junk.npy")
    (tmp_path / "clip.gif").write_bytes(b"GIF")
    with pytest.raises(DataError, match=r"clip\.gif: unsupported clip format"):
        read_clip(tmp_path / "clip.gif")
    with pytest.raises(DataError, match=r"nothere\.mp4: does not exist"):
        read_clip(tmp_path / "nothere.mp4")
    with pytest.raises(DataError, match=r"g\.npy: frame index 99 out of range"):
        np.save(tmp_path / "g.npy", texture_clip())
        read_clip(tmp_path / "g.npy", [99])
    # frame folder with a corrupt image and with mixed sizes
    bad = write_folder(tmp_path / "badimg", ramp_clip(2))
    (bad / "frame3.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"frame3\.png: unreadable frame image"):
        read_clip(bad)
    mixed = write_folder(tmp_path / "mixed", ramp_clip(2))
    Image.fromarray(np.zeros((H + 1, W), np.uint8)).save(mixed / "frame3.png")
    with pytest.raises(DataError, match=r"frame3\.png: frame size"):
        read_clip(mixed)


def test_mask_bad_values_and_annotated(tmp_path):
    m = box_mask()
    m[0, 0, 0] = 2
    np.save(tmp_path / "labels.npy", m)
    with pytest.raises(DataError, match=r"labels\.npy: mask values \{0, 1, 2\} outside \{0,1\} / \{0,255\}"):
        read_mask_clip(tmp_path / "labels.npy")
    np.save(tmp_path / "mixed.npy", box_mask() * 255 + (np.arange(W) == 0).astype(np.uint8))
    with pytest.raises(DataError, match="outside"):
        read_mask_clip(tmp_path / "mixed.npy")
    np.save(tmp_path / "soft.npy", box_mask().astype(np.float32) * 0.5)
    with pytest.raises(DataError, match=r"soft\.npy: mask values \{0, 0\.5\}"):
        read_mask_clip(tmp_path / "soft.npy")
    np.savez(tmp_path / "ann.npz", mask=box_mask(), annotated=np.ones(T - 1, bool))
    with pytest.raises(DataError, match=r"ann\.npz: 'annotated' has shape \(11,\)"):
        read_mask_clip(tmp_path / "ann.npz")
    m, _ = read_mask_clip(np.save(tmp_path / "f.npy", box_mask().astype(np.float64)) or tmp_path / "f.npy")
    np.testing.assert_array_equal(m, box_mask())


# ------------------------------------------------------------------------------------------ AsyCMST importer


def make_asycmst_root(root: Path) -> Path:
    """The authors' layout: videos/{0.ben,1.mal}/{bus,ceus}/<name>.mp4 + train_1/valid_1/test_1.csv."""
    rows = {
        "train_1": [("TT_1", 0), ("TT_2", 1)],
        "valid_1": [("TT_3", 0)],
        "test_1": [("TT_4", 1), ("TT_1", 0)],
    }
    seen = set()
    for split, cases in rows.items():
        out = []
        for case, label in cases:
            cls = "0.ben" if label == 0 else "1.mal"
            bus, ceus = f"{case}_CEUS_busvid.mp4", f"{case}_CEUS_ceusvid.mp4"
            if case not in seen:
                seen.add(case)
                for mod, name in (("bus", bus), ("ceus", ceus)):
                    (root / "videos" / cls / mod).mkdir(parents=True, exist_ok=True)
                    write_video(root / "videos" / cls / mod / name, ramp_clip(4, 16, 16))
                    frames_dir = root / "images" / cls / mod / name[:-4]
                    write_folder(frames_dir, ramp_clip(4, 16, 16), [f"{i:05d}" for i in range(4)], ".jpg")
            out.append({"id": case, "bus_vid": bus, "ceus_vid": ceus, "label": label})
        write_csv(root / f"{split}.csv", out, ["id", "bus_vid", "ceus_vid", "label"])
    return root


def test_import_asycmst_layout(tmp_path):
    root = make_asycmst_root(tmp_path / "XJTU-MMUS")
    out = import_asycmst_layout(root, tmp_path / "out" / "manifest.csv")
    assert out == tmp_path / "out" / "manifest.csv"
    assert not list((tmp_path / "out").glob(".*partial*"))  # written atomically, no leftovers
    with open(out) as fh:
        rows = list(csv.DictReader(fh))
    assert [r["case_id"] for r in rows] == ["TT_1", "TT_2", "TT_3", "TT_4"]
    assert rows[0]["bus"] == "../XJTU-MMUS/videos/0.ben/bus/TT_1_CEUS_busvid.mp4"  # relative to the manifest
    assert rows[0]["source_splits"] == "test_1 train_1"
    cases = read_manifest(out)
    assert [c.label for c in cases] == [0, 1, 0, 1]
    assert all(c.patient_id == c.case_id for c in cases)
    bus, ceus, mask, _ = load_case(cases[1])
    assert bus.shape == ceus.shape == (4, 16, 16) and mask is None
    # the extracted-frames variant reads the jpg folders in name order
    img = import_asycmst_layout(root, tmp_path / "img.csv", source="images")
    bus = read_clip(read_manifest(img)[0].bus)
    assert np.abs(bus.astype(int) - ramp_clip(4, 16, 16)).max() <= 3


def test_import_asycmst_bad_inputs(tmp_path):
    root = make_asycmst_root(tmp_path / "r")
    (root / "videos/1.mal/bus/TT_2_CEUS_busvid.mp4").unlink()
    with pytest.raises(DataError, match=r"TT_2_CEUS_busvid\.mp4: does not exist \(split train_1\.csv, row 3"):
        import_asycmst_layout(root, tmp_path / "m.csv")
    assert not (tmp_path / "m.csv").exists()
    write_csv(
        root / "train_1.csv", [{"id": "TT_1", "bus_vid": "a", "ceus_vid": "b"}], ["id", "bus_vid", "ceus_vid"]
    )
    with pytest.raises(DataError, match=r"train_1\.csv: missing column\(s\) label"):
        import_asycmst_layout(root, tmp_path / "m.csv")
    write_csv(
        root / "train_1.csv",
        [{"id": "TT_1", "bus_vid": "a", "ceus_vid": "b", "label": "x"}],
        ["id", "bus_vid", "ceus_vid", "label"],
    )
    with pytest.raises(DataError, match=r"train_1\.csv: row 2 \(case 'TT_1'\): label 'x' is not 0/1"):
        import_asycmst_layout(root, tmp_path / "m.csv")
    with pytest.raises(DataError, match="no split CSVs"):
        (tmp_path / "bare" / "videos").mkdir(parents=True)
        import_asycmst_layout(tmp_path / "bare", tmp_path / "m.csv")


def test_manifest_h5_spec_and_write_round_trip(tmp_path):
    with h5py.File(tmp_path / "all.h5", "w") as f:
        f["/bus/c1"] = texture_clip(seed=1)
        f["/ceus/c1"] = texture_clip(seed=2)
        f["/mask/c1"] = box_mask() * 255
        f["/mask/annotated"] = np.arange(T) % 2 == 0
    rows = [
        {
            "case_id": "c1",
            "label": "1.0",
            "bus": "all.h5:/bus/c1",
            "ceus": "all.h5:/ceus/c1",
            "bus_mask": "all.h5:/mask/c1",
        }
    ]
    (case,) = read_manifest(write_csv(tmp_path / "m.csv", rows, COLS))
    assert case.label == 1 and str(case.bus).endswith("all.h5:/bus/c1")
    bus, ceus, mask, ann = load_case(case)
    np.testing.assert_array_equal(ceus, texture_clip(seed=2))
    np.testing.assert_array_equal(mask, box_mask())
    assert ann.sum() == T // 2
    out = write_manifest([case], tmp_path / "sub" / "copy.csv")
    with open(out) as fh:
        assert next(csv.DictReader(fh))["bus"] == "../all.h5:/bus/c1"
    assert read_manifest(out) == [case]
    bad = [{**rows[0], "ceus": "gone.h5:/ceus/c1"}]
    with pytest.raises(DataError, match=r"gone\.h5:/ceus/c1: does not exist"):
        read_manifest(write_csv(tmp_path / "bad.csv", bad, COLS))


def test_video_without_video_stream(tmp_path):
    with av.open(str(tmp_path / "audio.mp4"), "w") as c:
        s = c.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for p in [*s.encode(frame), *s.encode()]:
            c.mux(p)
    with pytest.raises(DataError, match=r"audio\.mp4: no video stream"):
        read_clip(tmp_path / "audio.mp4")
    with pytest.raises(DataError, match=r"audio\.mp4: no video stream"):
        clip_shape(tmp_path / "audio.mp4")
