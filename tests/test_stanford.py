import multiprocessing as mp
import pickle

import h5py
import numpy as np
import pandas as pd
import pytest

from datamodules.errors import DataError
from datamodules.stanford import StanfordCine, bbox_from_mask, parse_level
from tests.stanford_files import frame_value, write_stanford

IDS = ["12_", "7_", "129_", "3_", "45_"]


@pytest.fixture
def h5(tmp_path):
    return write_stanford(tmp_path / "cine")


def test_groups_interleaved_rows_and_orders_frames_by_number(h5):
    ds = StanfordCine(h5)
    assert [n.annot_id for n in ds.nodules] == sorted(IDS)
    n7 = ds.by_id["7_"]
    assert n7.frame_nums.tolist() == [2, 4, 7, 8, 13, 14]  # gaps kept, starts at 2
    frames = ds.frames("7_", range(n7.n_frames))
    assert frames[:, 0, 0].tolist() == [frame_value(IDS.index("7_"), f) for f in n7.frame_nums]
    n45 = ds.by_id["45_"]
    assert n45.frame_nums.tolist() == [20, 30, 40, 41, 42, 43]
    assert ds.frames("45_", [5, 0, 5])[:, 0, 0].tolist() == [frame_value(4, 43), frame_value(4, 20)] * 1 + [
        frame_value(4, 43)
    ]


def test_rows_of_every_nodule_are_its_own(h5):
    ds = StanfordCine(h5)
    with h5py.File(h5) as f:
        ids = [v.decode() for v in f["annot_id"][()]]
    for n in ds.nodules:
        assert {ids[r] for r in n.rows} == {n.annot_id}
    assert sum(n.n_frames for n in ds.nodules) == len(ids)


def test_metadata_labels_tirads_and_blanks(h5):
    ds = StanfordCine(h5)
    n = ds.by_id["12_"]
    assert n.label == 1 and n.patient_id == "12_"  # no patient column: the nodule is its own group
    assert n.tirads["echogenicfoci"] == 4  # foci can be a sum of points
    assert n.tirads_level == 4.0
    assert np.isnan(ds.by_id["129_"].tirads["margin"])
    assert ds.labels().tolist() == [1, 1, 0, 0, 0]  # sorted ids: 129_, 12_, 3_, 45_, 7_


def test_patient_column_is_used_when_present(tmp_path):
    h5 = write_stanford(tmp_path, patients={"12_": "p1", "7_": "p1", "129_": "p2", "3_": "p3", "45_": ""})
    ds = StanfordCine(h5)
    assert ds.by_id["7_"].patient_id == "p1" == ds.by_id["12_"].patient_id
    assert ds.by_id["45_"].patient_id == "45_"  # blank patient id falls back to the nodule


def test_masks_are_binary_and_boxes_match(h5):
    ds = StanfordCine(h5)
    m = ds.masks("7_", [0, 2])  # frame 2 (even: visible), frame 7 (odd: out of view)
    assert set(np.unique(m)) <= {0, 1}
    assert m[1].sum() == 0 and ds.bbox("7_", 2) is None
    y, x = 3 + 2 % 5, 4 + 2 % 7
    assert ds.bbox("7_", 0) == (y, x, y + 6, x + 9)
    box = (1, 2, 10, 20)
    assert ds.frames("7_", [1], box=box).shape == (1, 9, 18)


def test_bbox_from_mask_is_end_exclusive():
    m = np.zeros((10, 10), np.uint8)
    m[2:5, 3:8] = 1
    assert bbox_from_mask(m) == (2, 3, 5, 8)
    assert bbox_from_mask(np.zeros((4, 4), np.uint8)) is None


def test_parse_level():
    assert parse_level("TR3") == 3 and parse_level(" tr5 ") == 5 and parse_level(2) == 2
    assert np.isnan(parse_level(None)) and np.isnan(parse_level(float("nan"))) and np.isnan(parse_level(""))


def _read_in_child(ds, q):
    q.put(ds.frames("3_", [0])[0, 0, 0].item())


def test_pickles_without_handle_and_reads_in_another_process(h5):
    ds = StanfordCine(h5)
    ds.frames("3_", [0])  # opens the handle in this process
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._h5._handle is None
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_read_in_child, args=(ds, q))
    p.start()
    p.join(30)
    assert q.get(timeout=5) == frame_value(IDS.index("3_"), 1)


# --------------------------------------------------------------------------- bad input: one clear line each
def _rewrite(h5, key, data):
    with h5py.File(h5, "a") as f:
        del f[key]
        f[key] = data


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        StanfordCine(tmp_path / "nope.hdf5")


def test_not_hdf5(tmp_path):
    p = tmp_path / "dataset.hdf5"
    p.write_text("hello")
    with pytest.raises(DataError, match="dataset.hdf5: not a readable HDF5"):
        StanfordCine(p)


def test_missing_key(h5):
    with h5py.File(h5, "a") as f:
        del f["mask"]
    with pytest.raises(DataError, match="missing dataset 'mask'"):
        StanfordCine(h5)
    assert StanfordCine(h5, require_mask=False).has_mask is False


def test_shape_and_dtype_mismatch(h5):
    with h5py.File(h5) as f:
        n = len(f["annot_id"])
        image = f["image"][()]
    _rewrite(h5, "mask", np.zeros((n, 5, 5), np.uint8))
    with pytest.raises(DataError, match="'mask' shape"):
        StanfordCine(h5)
    _rewrite(h5, "mask", np.zeros(image.shape, np.uint8))
    _rewrite(h5, "image", image.astype(np.float32))
    with pytest.raises(DataError, match="'image' must be uint8"):
        StanfordCine(h5)


def test_frame_num_not_integer(h5):
    with h5py.File(h5) as f:
        nums = f["frame_num"][()]
    nums[3] = b"x1"
    _rewrite(h5, "frame_num", nums)
    with pytest.raises(DataError, match="frame_num.*not an integer"):
        StanfordCine(h5)


def test_repeated_frame_of_a_nodule_is_refused_naming_both_rows(h5):
    with h5py.File(h5) as f:
        ids, nums = f["annot_id"][()], f["frame_num"][()]
    j = next(i for i in range(1, len(ids)) if ids[i] == ids[0])  # another row of the first row's nodule
    nums[j] = nums[0]
    _rewrite(h5, "frame_num", nums)
    with pytest.raises(
        DataError, match=rf"annot_id '{ids[0].decode().strip()}' frame_num .* appears twice \(rows"
    ):
        StanfordCine(h5)


def test_labels_not_binary(h5):
    meta = pd.read_csv(h5.with_name("metadata.csv"), dtype={"annot_id": str})
    meta.loc[1, "histopath_diagnosis"] = 2
    meta.to_csv(h5.with_name("metadata.csv"), index=False)
    with pytest.raises(
        DataError, match=r"metadata.csv: histopath_diagnosis must be 0 or 1, got '2' for annot_id '7_'"
    ):
        StanfordCine(h5)


def test_metadata_ids_missing_either_way(h5):
    path = h5.with_name("metadata.csv")
    meta = pd.read_csv(path, dtype={"annot_id": str})
    meta.iloc[:-1].to_csv(path, index=False)
    with pytest.raises(DataError, match="have no metadata row"):
        StanfordCine(h5)
    extra = pd.concat([meta, meta.iloc[[0]].assign(annot_id="999_")])
    extra.to_csv(path, index=False)
    with pytest.raises(DataError, match="dataset.hdf5: 1 annot_id.*have no frames.*999_"):
        StanfordCine(h5)


def test_mask_values_outside_binary(h5):
    with h5py.File(h5, "a") as f:
        rows = StanfordCine(h5).by_id["3_"].rows
        f["mask"][int(rows[0]), 0, 0] = 7
    ds = StanfordCine(h5)
    with pytest.raises(DataError, match="mask values of nodule '3_'"):
        ds.masks("3_", [0])


def test_from_arrays_is_a_one_nodule_cine_over_memory():
    """``usnodule predict`` holds a new clip this way: the accessors of the stack datasets read the arrays."""
    from datamodules.stacks import PredictedMasks

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (5, 16, 20), dtype=np.uint8)
    masks = np.zeros_like(frames)
    masks[1, 4:9, 6:12] = 1
    ds = StanfordCine.from_arrays("clip", frames, masks)
    assert [n.annot_id for n in ds.nodules] == ["clip"] and ds.labels().tolist() == [-1]
    assert ds.image_shape == (16, 20) and ds.has_mask and ds.groups() == ["clip"]
    np.testing.assert_array_equal(ds.frames("clip", [4, 0, 4]), frames[[4, 0, 4]])
    np.testing.assert_array_equal(ds.frames("clip", [1], box=(4, 6, 9, 12)), frames[1:2, 4:9, 6:12])
    assert ds.bbox("clip", 1) == (4, 6, 9, 12) and ds.bbox("clip", 0) is None
    pred = PredictedMasks.from_arrays(masks, ds)
    np.testing.assert_array_equal(pred.masks("clip", [1, 2]), masks[[1, 2]])
    assert pickle.loads(pickle.dumps(ds)).frames("clip", [2]).tolist() == frames[[2]].tolist()
    with pytest.raises(DataError, match="no 'mask' dataset"):
        StanfordCine.from_arrays("bare", frames).masks("bare", [0])
    with pytest.raises(DataError, match=r"clip: masks shape \(4, 16, 20\)"):
        PredictedMasks.from_arrays(masks[:4], ds)
    with pytest.raises(DataError, match="differs from frames shape"):
        StanfordCine.from_arrays("clip", frames, masks[:, :8])
