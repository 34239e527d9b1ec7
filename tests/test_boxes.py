"""Per-frame boxes computed once (datamodules/boxes.py, issue 14 item 2): the same boxes and crops as the
per-item path that reads the stack's masks, on every branch of the ROI rule."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from datamodules import boxes
from datamodules.errors import DataError
from datamodules.stacks import PredictedMasks, StackDataset
from datamodules.stanford import StanfordCine, bbox_from_mask
from tests.stanford_files import write_stanford
from tests.test_stacks import set_masks, write_predicted


@pytest.fixture()
def h5(tmp_path):
    path = write_stanford(tmp_path / "stanford", shape=(40, 56), extra=3)
    # every branch of the rule: a stack with one empty mask, a stack with all three empty (nodule fallback),
    # a nodule whose masks are all empty (full frame), boxes touching the border (clipping), a 1-pixel box
    set_masks(path, "7_", [(3, 4, 10, 12), None, (20, 30, 40, 56), None, None, None])
    set_masks(path, "45_", [None] * 6)
    set_masks(path, "3_", [(0, 0, 1, 1), (39, 55, 40, 56), (5, 5, 6, 9)])
    return path


def _pairs(cine, **kw):
    cached = StackDataset(cine, None, img_size=8, **kw)
    plain = StackDataset(cine, None, img_size=8, box_cache=False, **kw)
    return cached, plain


def test_tight_boxes_equal_bbox_from_mask():
    rng = np.random.default_rng(0)
    masks = (rng.random((50, 13, 17)) < rng.random((50, 1, 1)) ** 8).astype(np.uint8)
    masks[::7] = 0
    got = boxes.tight_boxes(masks)
    for m, b in zip(masks, got, strict=True):
        want = bbox_from_mask(m)
        assert (tuple(b) if b[0] >= 0 else None) == want


@pytest.mark.parametrize("buffer", [0, 5])
def test_cached_boxes_and_crops_equal_the_per_item_path(h5, buffer):
    cine = StanfordCine(h5)
    cached, plain = _pairs(cine, buffer=buffer)
    assert cached._boxes is not None and plain._boxes is None
    for nid in cine.by_id:
        assert cached.nodule_box(nid) == plain.nodule_box(nid)
    for i in range(len(plain)):
        j, _, pos = plain.index[i]
        nid = plain.nodule_ids[j]
        assert cached.roi(nid, pos) == plain.roi(nid, pos), (nid, pos)
        np.testing.assert_array_equal(cached.read(i), plain.read(i))
        np.testing.assert_array_equal(cached[i]["image"].numpy(), plain[i]["image"].numpy())
    assert cached.roi("45_", np.arange(3)) == (0, 0, 40, 56)  # all empty: full frame


def test_predicted_boxes_and_mask_roi_equal_the_per_item_path(h5, tmp_path):
    cine = StanfordCine(h5)
    pred = PredictedMasks(write_predicted(h5, tmp_path / "masks.h5"), cine)
    for kw in (
        dict(kind="image", masks_h5=pred, use_predicted_boxes=True),
        dict(kind="mask", masks_h5=pred, mask_roi=True),
        dict(kind="mask", masks_h5=pred, mask_roi=True, use_predicted_boxes=True),
    ):
        cached, plain = _pairs(cine, **kw)
        for i in range(len(plain)):
            np.testing.assert_array_equal(cached.read(i), plain.read(i))


def test_in_memory_clip_gets_its_own_boxes():
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 255, (7, 20, 24), dtype=np.uint8)
    masks = np.zeros_like(frames)
    masks[1, 3:9, 4:15] = 255
    masks[5, 10:20, 0:3] = 1
    cine = StanfordCine.from_arrays("clip", frames, masks)
    cached, plain = _pairs(cine)
    for i in range(len(plain)):
        np.testing.assert_array_equal(cached.read(i), plain.read(i))


def test_one_pass_per_file_shared_by_datasets_and_redone_when_the_file_changes(h5):
    boxes.clear()
    cine = StanfordCine(h5)
    first = StackDataset(cine, ["7_", "12_"], img_size=8)
    second = StackDataset(StanfordCine(h5), None, img_size=8)
    assert first._boxes is second._boxes and first._boxes.done.all()
    set_masks(h5, "12_", [(1, 1, 2, 2)] * 3)  # rewritten in place: new mtime / size, new table
    third = StackDataset(StanfordCine(h5), None, img_size=8)
    assert third._boxes is not first._boxes
    assert third.nodule_box("12_") == (1, 1, 2, 2)


def test_bad_mask_values_raise_the_readers_error_at_construction(h5):
    cine = StanfordCine(h5)
    with h5py.File(h5, "r+") as f:
        f["mask"][int(cine.by_id["129_"].rows[1]), 0, 0] = 7
    with pytest.raises(DataError, match="mask values of nodule '129_'") as e:
        StackDataset(StanfordCine(h5), None, img_size=8)
    assert str(h5) in str(e.value) and "\n" not in str(e.value)
