"""3-stack instances, ROI crops, predicted-mask reading and the fold datamodules (datamodules/stacks.py)."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from datamodules.errors import DataError
from datamodules.stacks import (
    FrameDataModule,
    FrameDataset,
    PredictedMasks,
    StackDataModule,
    StackDataset,
    grow_box,
    stack_positions,
)
from datamodules.stanford import StanfordCine
from tests.stanford_files import frame_value, write_stanford

IDS = [
    "12_",
    "7_",
    "129_",
    "3_",
    "45_",
]  # write_stanford's nodule numbering (pixel value = number*50 + frame)


@pytest.fixture()
def h5(tmp_path):
    return write_stanford(tmp_path / "stanford")


def set_masks(h5_path, annot_id, boxes):
    """Replace the annotated masks of one nodule, frame position by position (None = empty mask)."""
    cine = StanfordCine(h5_path)
    rows = cine.by_id[annot_id].rows
    with h5py.File(h5_path, "r+") as f:
        for row, box in zip(rows, boxes, strict=True):
            m = np.zeros(f["mask"].shape[1:], np.uint8)
            if box is not None:
                y0, x0, y1, x1 = box
                m[y0:y1, x0:x1] = 255
            f["mask"][int(row)] = m


def write_predicted(h5_path, out, *, shape=None, shuffle=False):
    """masks.h5 in the `usnodule masks` layout, holding the annotated masks (optionally broken)."""
    with h5py.File(h5_path, "r") as src, h5py.File(out, "w") as f:
        mask = (src["mask"][()] > 0).astype(np.uint8)
        ids = src["annot_id"][()]
        if shuffle:
            ids = ids[::-1]
        f["annot_id"], f["frame_num"] = ids, src["frame_num"][()]
        f["mask"] = mask if shape is None else np.zeros(shape, np.uint8)
    return out


def test_stack_positions_drop_remainder_and_pad_short():
    assert [p.tolist() for p in stack_positions(7)] == [[0, 1, 2], [3, 4, 5]]  # frame 6 dropped
    assert [p.tolist() for p in stack_positions(2)] == [[0, 1, 1]]  # short nodule: last frame repeated
    assert stack_positions(0) == []


def test_spread_stacks_span_the_sweep_with_the_same_frames_and_count():
    assert [p.tolist() for p in stack_positions(7, "spread")] == [[0, 2, 4], [1, 3, 5]]  # frame 6 dropped
    assert [p.tolist() for p in stack_positions(9, "spread")] == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    assert [p.tolist() for p in stack_positions(2, "spread")] == [[0, 1, 1]]
    for n in range(0, 40):
        adjacent, spread = stack_positions(n), stack_positions(n, "spread")
        assert len(spread) == len(adjacent)
        used = sorted(np.concatenate(spread).tolist()) if spread else []
        assert used == (sorted(np.concatenate(adjacent).tolist()) if adjacent else [])
    with pytest.raises(ValueError, match="stack frames"):
        stack_positions(9, "strided")


def test_spread_mask_stacks_hold_frames_a_third_of_the_sweep_apart(h5, tmp_path):
    cine = StanfordCine(h5)
    pred = write_predicted(h5, tmp_path / "masks.h5")
    spread = StackDataset(cine, ["7_"], kind="mask", masks_h5=pred, img_size=8, stack_frames="spread")
    adjacent = StackDataset(cine, ["7_"], kind="mask", masks_h5=pred, img_size=8)
    assert len(spread) == len(adjacent) == 2 and spread.settings()["stack_frames"] == "spread"
    masks = PredictedMasks(pred, cine).masks("7_", np.arange(6))
    for i, frames in enumerate(([0, 2, 4], [1, 3, 5])):
        assert np.array_equal(spread.read(i), masks[frames])
        assert int(spread[i]["stack"]) == i
    assert spread.settings() != adjacent.settings()  # a feature cache keyed on the settings tells them apart
    with pytest.raises(ValueError, match="stack_frames"):
        StackDataset(cine, ["7_"], kind="mask", masks_h5=pred, stack_frames="strided")


def test_export_pairs_an_adjacent_image_branch_with_a_spread_mask_branch(h5, tmp_path):
    from datamodules.stacks import build_dataset

    cine = StanfordCine(h5)
    pred = PredictedMasks(write_predicted(h5, tmp_path / "masks.h5"), cine)
    ds = build_dataset(cine, pred, {}, {"stack_frames": "spread"}, 8, 8)
    assert ds.image.stack_frames == "adjacent" and ds.mask.stack_frames == "spread"
    assert len(ds.image) == len(ds.mask) and ds.n_stacks == ds.mask.n_stacks
    j = ds.nodule_ids.index("7_")
    i = [k for k, (n, _, _) in enumerate(ds.image.index) if n == j]
    assert [ds.image.index[k][2].tolist() for k in i] == [[0, 1, 2], [3, 4, 5]]
    assert [ds.mask.index[k][2].tolist() for k in i] == [[0, 2, 4], [1, 3, 5]]
    assert int(ds[i[1]]["stack"]) == 1 and ds[i[1]]["mask"].shape == (3, 8, 8)


def test_stack_frames_option_is_checked_by_the_datamodule(h5, tmp_path):
    from datamodules.errors import OptionError

    with pytest.raises(OptionError, match="stack_frames"):
        StackDataModule(str(h5), str(tmp_path / "splits.json"), stack_frames="strided")


def test_stacks_never_mix_nodules_and_follow_frame_order(h5):
    cine = StanfordCine(h5)
    ds = StackDataset(cine, None, kind="image", img_size=8)
    assert ds.nodule_ids == sorted(IDS)
    assert ds.n_stacks == [cine.by_id[n].n_frames // 3 for n in ds.nodule_ids]
    seen = set()
    for i in range(len(ds)):
        j, s, pos = ds.index[i]
        nid = ds.nodule_ids[j]
        x = ds.read(i)
        nums = cine.by_id[nid].frame_nums[pos]
        # Each channel is one frame of this nodule, adjacent frames in frame_num order.
        want = [frame_value(IDS.index(nid), f) for f in nums]
        assert [int(np.unique(c)[0]) for c in x] == want
        assert list(pos) == list(range(3 * s, 3 * s + 3))
        item = ds[i]
        assert item["image"].shape == (3, 8, 8)
        assert (
            int(item["nodule"]) == j
            and int(item["stack"]) == s
            and int(item["label"]) == cine.by_id[nid].label
        )
        seen.add((nid, s))
    assert len(seen) == len(ds)


def test_roi_is_union_box_plus_buffer(h5):
    # 3_ has 3 frames; boxes (y0, x0, y1, x1) end-exclusive, one frame empty.
    set_masks(h5, "3_", [(10, 10, 14, 15), None, (12, 8, 16, 12)])
    ds = StackDataset(StanfordCine(h5), ["3_"], img_size=8, buffer=5)
    assert ds.roi("3_", np.arange(3)) == (10 - 5, 8 - 5, 16 + 5, 15 + 5)
    assert ds.read(0).shape == (3, 16 + 5 - 5, 15 + 5 - 3)


def test_roi_is_clipped_at_the_image_border(h5):
    set_masks(h5, "3_", [(0, 0, 3, 4), (20, 28, 24, 32), None])  # touches top-left and bottom-right corners
    ds = StackDataset(StanfordCine(h5), ["3_"], img_size=8, buffer=5)
    assert ds.roi("3_", np.arange(3)) == (0, 0, 24, 32)
    ds.cine.close()
    set_masks(h5, "3_", [(2, 27, 6, 31), None, None])  # right edge: 31 + 5 > 32
    ds = StackDataset(StanfordCine(h5), ["3_"], img_size=8, buffer=5)
    assert ds.roi("3_", np.arange(3)) == (0, 22, 11, 32)
    assert grow_box((1, 1, 2, 2), 5, (24, 32)) == (0, 0, 7, 7)


def test_empty_stack_falls_back_to_nodule_box_then_full_frame(h5):
    # 7_ has 6 frames: stack 0 empty, stack 1 has two boxes -> stack 0 uses the nodule's union box.
    set_masks(h5, "7_", [None, None, None, (5, 6, 9, 10), None, (8, 4, 12, 8)])
    set_masks(h5, "3_", [None, None, None])
    ds = StackDataset(StanfordCine(h5), ["7_", "3_"], img_size=8, buffer=2)
    assert ds.roi("7_", np.arange(3)) == (3, 2, 14, 12)
    assert ds.roi("7_", np.arange(3, 6)) == (3, 2, 14, 12)
    assert ds.roi("3_", np.arange(3)) == (0, 0, 24, 32)  # no mask anywhere: full frame


def test_predicted_boxes_and_mask_stacks(h5, tmp_path):
    set_masks(h5, "3_", [(10, 10, 14, 15), None, (12, 8, 16, 12)])
    pred = write_predicted(h5, tmp_path / "masks.h5")
    cine = StanfordCine(h5)
    ds = StackDataset(cine, ["3_"], masks_h5=pred, use_predicted_boxes=True, img_size=8)
    assert ds.roi("3_", np.arange(3)) == (5, 3, 21, 20)
    masks = StackDataset(cine, None, kind="mask", masks_h5=pred, img_size=(12, 16))
    item = masks[masks.nodule_ids.index("3_")]  # one stack per nodule up to 45_
    assert item["image"].shape == (3, 12, 16)  # full frame, resized
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    assert float(item["image"][1].max()) == 0.0 and float(item["image"][0].max()) > 0.5


@pytest.mark.parametrize("problem", ["missing", "shape", "order", "not_h5"])
def test_bad_masks_h5_is_one_line_data_error(h5, tmp_path, problem):
    cine = StanfordCine(h5)
    path = tmp_path / "masks.h5"
    if problem == "shape":
        write_predicted(h5, path, shape=(3, 4, 5))
    elif problem == "order":
        write_predicted(h5, path, shuffle=True)
    elif problem == "not_h5":
        path.write_text("not hdf5")
    with pytest.raises(DataError) as e:
        PredictedMasks(path, cine)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataError):
        StackDataset(cine, None, kind="mask", masks_h5=None)


def test_frame_dataset_uses_every_frame_including_empty_masks(h5):
    cine = StanfordCine(h5)
    ds = FrameDataset(cine, ["12_", "7_"], size=(12, 16))
    assert len(ds) == 3 + 6
    empties = sum(float(ds[i]["mask"].max()) == 0.0 for i in range(len(ds)))
    assert empties > 0  # odd frame_nums have no nodule in view
    item = ds[0]
    assert item["image"].shape == (1, 12, 16) and set(item["mask"].unique().tolist()) <= {0.0, 1.0}


def write_splits(path, folds):
    doc = {"k": len(folds), "seed": 0, "folds": [{"fold": k, **f} for k, f in enumerate(folds)]}
    path.write_text(json.dumps(doc))
    return path


def test_fold_datamodule_never_returns_test_nodules_in_train_or_val(h5, tmp_path):
    splits = write_splits(
        tmp_path / "splits.json",
        [
            {"train": ["12_", "7_", "45_"], "val": ["3_"], "test": ["129_"]},
            {"train": ["129_", "3_", "45_"], "val": ["7_"], "test": ["12_"]},
        ],
    )
    pred = write_predicted(h5, tmp_path / "masks.h5")
    for fold, kind in ((0, "image"), (1, "mask")):
        dm = StackDataModule(
            str(h5), str(splits), fold=fold, kind=kind, masks_h5=str(pred), img_size=8, batch_size=2
        )
        dm.setup("fit")
        dm.setup("test")
        dm.setup("predict")
        test = set(dm.datasets["test"].nodule_ids)
        for part in ("train", "val"):
            ids = {
                dm.datasets[part].nodule_ids[int(j)]
                for b in getattr(dm, f"{part}_dataloader")()
                for j in b["nodule"]
            }
            assert ids and not ids & test
        assert len(dm.datasets["predict"]) == sum(StanfordCine(h5).by_id[n].n_frames // 3 for n in IDS)
        batch = next(iter(dm.train_dataloader()))
        assert batch["image"].shape[1:] == (3, 8, 8) and batch["label"].dtype.is_floating_point is False
    fm = FrameDataModule(str(h5), str(splits), fold=0, size=8, batch_size=4)
    fm.setup("fit")
    assert set(fm.datasets["train"].nodule_ids) == {"12_", "7_", "45_"}
    assert next(iter(fm.val_dataloader()))["mask"].shape[1:] == (1, 8, 8)


def test_augmentation_follows_the_torch_seed(h5):
    """Albumentations has its own RNG: unless reseeded from torch, two fits with one seed augment differently."""
    import albumentations as A
    import torch

    cine = StanfordCine(h5)
    # the toy frames are flat: a brightness change, not a flip, shows that an augmentation happened
    aug = A.Compose([A.RandomBrightnessContrast(brightness_limit=0.3, contrast_limit=0.0, p=0.5)])
    images = StackDataset(cine, IDS, kind="image", img_size=8, transform=aug)
    frames = FrameDataset(cine, IDS, size=(8, 8), transform=aug)
    plain = [StackDataset(cine, IDS, kind="image", img_size=8)[i]["image"] for i in range(len(images))]

    def epoch(seed):
        torch.manual_seed(seed)
        return (
            [images[i]["image"] for i in range(len(images))],
            [frames[i]["image"] for i in range(len(frames))],
        )

    first, again, other = epoch(0), epoch(0), epoch(1)
    for a, b in zip(first, again, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    flipped = [not torch.equal(x, y) for x, y in zip(first[0], plain, strict=True)]
    assert any(flipped) and not all(flipped)  # augmenting, at random
    assert any(not torch.equal(x, y) for x, y in zip(first[0] + first[1], other[0] + other[1], strict=True))
