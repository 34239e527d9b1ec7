"""AsyCMST label-noise study (Sec. 4.7): flipped training labels and perturbed training masks, formula by formula,
and through PairedVideoDataModule (training part only; validation and test untouched)."""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest
from scipy import ndimage

from datamodules.errors import OptionError
from datamodules.paired import read_manifest
from datamodules.paired_video import PairedVideoDataModule
from datamodules.perturb import dilate, erode, flip_indices, jitter, perturb_masks
from tests.test_paired_video import write_paired_set


def disk(radius: float, size: int = 64, centre: tuple[int, int] = (32, 32)) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) <= radius**2).astype(np.uint8)


def eq_radius(mask: np.ndarray) -> float:
    return float(np.sqrt(mask.sum() / np.pi))


def blob(seed: int = 0, size: int = 48) -> np.ndarray:
    """An irregular nodule: a thresholded smooth random field, largest component."""
    field = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal((size, size)), 5)
    lab, n = ndimage.label(field > np.percentile(field, 70))
    big = np.argmax(np.bincount(lab.ravel())[1:]) + 1
    return (lab == big).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- labels
def test_flip_counts_are_the_fraction_of_each_class():
    labels = [0] * 60 + [1] * 40
    ids = [f"c{i:03d}" for i in range(100)]
    for fraction, n0, n1 in ((0.0, 0, 0), (0.1, 6, 4), (0.25, 15, 10), (1.0, 60, 40)):
        flip = flip_indices(labels, ids, fraction, seed=0)
        assert len(set(flip)) == len(flip)
        assert (np.asarray(labels)[flip] == 0).sum() == n0 and (np.asarray(labels)[flip] == 1).sum() == n1


def test_flip_is_seeded_and_does_not_depend_on_order():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 50).tolist()
    ids = [f"c{i}" for i in range(50)]
    a = flip_indices(labels, ids, 0.2, seed=3)
    assert np.array_equal(a, flip_indices(labels, ids, 0.2, seed=3))
    assert not np.array_equal(a, flip_indices(labels, ids, 0.2, seed=4))
    perm = rng.permutation(50)
    b = flip_indices([labels[i] for i in perm], [ids[i] for i in perm], 0.2, seed=3)
    assert sorted(ids[perm[i]] for i in b) == sorted(ids[i] for i in a)
    with pytest.raises(ValueError):
        flip_indices(labels, ids, 1.5, seed=0)


def test_datamodule_flips_training_labels_only_and_records_it(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    manifest, splits = write_paired_set(tmp_path, n=24, frames=4, size=32)
    truth = {c.case_id: c.label for c in read_manifest(manifest)}
    clean = PairedVideoDataModule(manifest, splits=splits, fold=0, frames=2, size=16)
    clean.setup("fit")
    noisy = PairedVideoDataModule(
        manifest, splits=splits, fold=0, frames=2, size=16, label_noise=0.5, noise_seed=1
    )
    noisy.setup("fit")
    assert noisy.hparams.label_noise == 0.5 and noisy.hparams.noise_seed == 1  # saved with the run
    train = noisy.datasets["train"].cases
    changed = sorted(c.case_id for c in train if c.label != truth[c.case_id])
    assert changed == noisy.flipped
    n0 = sum(truth[c.case_id] == 0 for c in train)
    n1 = len(train) - n0
    assert sum(truth[i] == 0 for i in changed) == int(np.floor(0.5 * n0 + 0.5))
    assert sum(truth[i] == 1 for i in changed) == int(np.floor(0.5 * n1 + 0.5))
    for part in ("val", "test", "predict"):  # clean labels wherever the model is selected or scored
        assert all(c.label == truth[c.case_id] for c in noisy.datasets[part].cases)
        assert [c.case_id for c in noisy.datasets[part].cases] == [
            c.case_id for c in clean.datasets[part].cases
        ]
    assert all(int(noisy.datasets["train"][i]["label"]) == c.label for i, c in enumerate(train))  # items too
    assert f"Label noise 0.5: flipped {sum(truth[i] == 0 for i in changed)} of {n0} benign" in caplog.text


def test_bad_noise_options_are_one_line_option_errors(tmp_path):
    manifest, splits = write_paired_set(tmp_path, n=6, frames=2, size=16)
    for kwargs, name in (
        ({"label_noise": 1.2}, "label_noise"),
        ({"mask_noise": "blur"}, "mask_noise"),
        ({"mask_noise_px": -1}, "mask_noise_px"),
        ({"test_splits": splits}, "test_splits"),
    ):
        with pytest.raises(OptionError, match=name):
            PairedVideoDataModule(manifest, splits=splits, fold=0, **kwargs)


# ---------------------------------------------------------------------------------------------- contours
@pytest.mark.parametrize("px", [1, 2, 4])
def test_dilate_and_erode_move_a_disk_boundary_by_px(px):
    d = disk(12)
    r = eq_radius(d)
    grown, shrunk = dilate(d, px), erode(d, px)
    assert abs(eq_radius(grown) - (r + px)) < 0.5 and abs(eq_radius(shrunk) - (r - px)) < 0.5
    assert (grown >= d).all() and (shrunk <= d).all()  # nested: only grows / only shrinks


def test_dilate_and_erode_match_an_independent_distance_transform():
    m = blob()
    outside = ndimage.distance_transform_edt(1 - m)  # distance to the nearest mask pixel
    inside = ndimage.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]  # to the nearest background / edge
    for px in (1.0, 2.5, 3.0):
        assert np.array_equal(dilate(m, px), (outside <= px).astype(np.uint8))
        assert np.array_equal(erode(m, px), (inside > px).astype(np.uint8))


def test_erode_never_removes_a_nodule_and_empty_masks_stay_empty():
    small = disk(2)
    kept = erode(small, 5)
    assert kept.sum() >= 1 and kept[32, 32] == 1
    empty = np.zeros((16, 16), np.uint8)
    for out in (dilate(empty, 3), erode(empty, 3), jitter(empty, 3, np.random.default_rng(0))):
        assert not out.any()


def test_jitter_keeps_one_blob_near_the_contour():
    d = disk(12)
    for seed in range(5):
        j = jitter(d, 3, np.random.default_rng(seed))
        n, _ = cv2.connectedComponents(j)
        assert n - 1 == 1  # still one nodule
        holes = ndimage.binary_fill_holes(j).sum() - j.sum()
        assert holes == 0
        assert not np.array_equal(j, d)
        # every pixel moved at most px (+1 for rounding) from the drawn contour
        assert (j <= dilate(d, 4)).all() and (erode(d, 4) <= j).all()
        iou = (j & d).sum() / (j | d).sum()
        assert 0.6 < iou < 0.99
    assert np.array_equal(jitter(d, 0, np.random.default_rng(0)), d)
    # zero offsets at every control point: the filled contour is the drawn mask
    assert np.array_equal(jitter(d, 1e-9, np.random.default_rng(0)), d)


def test_perturb_masks_only_touches_annotated_frames_and_is_reproducible():
    masks = np.stack([disk(10), disk(11), disk(9)])
    valid = np.array([True, False, True])
    out = perturb_masks(masks, valid, "jitter", 2, seed=0, case_id="c1", frames=[0, 5, 9])
    assert np.array_equal(out[1], masks[1])
    assert not np.array_equal(out[0], masks[0]) and not np.array_equal(out[2], masks[2])
    again = perturb_masks(masks, valid, "jitter", 2, seed=0, case_id="c1", frames=[0, 5, 9])
    assert np.array_equal(out, again)  # the same noisy annotation every epoch
    other = perturb_masks(masks, valid, "jitter", 2, seed=0, case_id="c2", frames=[0, 5, 9])
    assert not np.array_equal(out, other)
    grown = perturb_masks(masks, valid, "dilate", 2, seed=0, case_id="c1", frames=[0, 5, 9])
    assert grown[0].sum() > masks[0].sum() and grown[1].sum() == masks[1].sum()


def test_datamodule_perturbs_training_masks_only(tmp_path):
    manifest, splits = write_paired_set(tmp_path, n=12, frames=3, size=48)
    kw = {"splits": splits, "fold": 0, "frames": 3, "size": 48, "augment": False}
    clean = PairedVideoDataModule(manifest, **kw)
    grown = PairedVideoDataModule(manifest, mask_noise="dilate", mask_noise_px=3, **kw)
    shrunk = PairedVideoDataModule(manifest, mask_noise="erode", mask_noise_px=3, **kw)
    for dm in (clean, grown, shrunk):
        dm.setup("fit")
    assert grown.hparams.mask_noise == "dilate" and grown.hparams.mask_noise_px == 3
    area = {
        name: dm.datasets["train"][0]["mask"].sum().item()
        for name, dm in (("c", clean), ("g", grown), ("s", shrunk))
    }
    assert area["s"] < area["c"] < area["g"]
    # the images are the same: only the segmentation target changed
    assert np.array_equal(
        grown.datasets["train"][0]["bus"].numpy(), clean.datasets["train"][0]["bus"].numpy()
    )
    for part in ("val", "test"):
        a, b = clean.datasets[part][0]["mask"], grown.datasets[part][0]["mask"]
        assert np.array_equal(a.numpy(), b.numpy())
