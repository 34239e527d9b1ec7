"""PairedVideoDataModule: frame sampling, one augmentation draw for every frame, splits, errors at setup."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.errors import DataError
from datamodules.folds import make_folds, write_splits
from datamodules.paired import PairedCase, write_manifest
from datamodules.paired_video import (
    PairedVideoDataModule,
    PairedVideoDataset,
    ratio_split,
    roi_box,
    sample_indices,
)


def write_paired_set(
    root: Path, *, n: int = 8, frames: int = 6, size: int = 64, seed: int = 0, splits: bool = True
) -> tuple[Path, Path | None]:
    """A small separable BUS/CEUS set: a disk nodule in BUS (mask = disk); its CEUS perfusion rises over time
    (so frame order is learnable) and is bright for malignant, faint for benign cases.  Odd cases share a
    patient with the case before them.  Returns (manifest, splits.json or None)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    cases = []
    for i in range(n):
        label = i % 2
        cy, cx = rng.integers(size // 3, 2 * size // 3, 2)
        disk = ((yy - cy) ** 2 + (xx - cx) ** 2) < (size // 6) ** 2
        bus = rng.integers(20, 60, (frames, size, size)).astype(np.uint8)
        bus[:, disk] = 150
        ramp = np.linspace(0.3, 1.0, frames)[:, None, None]
        peak = 230 if label else 70
        ceus = rng.integers(0, 30, (frames, size, size)).astype(np.uint8)
        ceus = np.where(disk[None], (ramp * peak).astype(np.uint8), ceus).astype(np.uint8)
        mask = np.repeat(disk[None], frames, 0).astype(np.uint8)
        paths = {}
        for kind, arr in (("bus", bus), ("ceus", ceus), ("bus_mask", mask)):
            (root / kind).mkdir(parents=True, exist_ok=True)
            paths[kind] = root / kind / f"c{i}.npy"
            np.save(paths[kind], arr)
        cases.append(PairedCase(f"c{i}", f"p{i // 2}", label, paths["bus"], paths["ceus"], paths["bus_mask"]))
    manifest = write_manifest(cases, root / "manifest.csv")
    if not splits:
        return manifest, None
    doc = make_folds([c.case_id for c in cases], [c.label for c in cases], [c.patient_id for c in cases], k=3)
    return manifest, write_splits(doc, root / "splits.json")


@pytest.fixture(scope="module")
def paired(tmp_path_factory) -> tuple[Path, Path]:
    return write_paired_set(tmp_path_factory.mktemp("paired"))


def test_sample_indices_uniform():
    assert sample_indices(31, 4).tolist() == [0, 10, 20, 30]
    assert sample_indices(3, 5).tolist() == [0, 0, 1, 2, 2]  # short clips repeat frames, order kept


def test_batch_layout(paired):
    manifest, splits = paired
    dm = PairedVideoDataModule(manifest, splits=splits, fold=0, frames=4, size=32, batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["bus"].shape == (2, 4, 3, 32, 32) and batch["bus"].dtype == torch.float32
    assert batch["ceus"].shape == (2, 4, 3, 32, 32)
    assert batch["mask"].shape == (2, 4, 1, 32, 32)
    assert batch["mask_valid"].dtype == torch.bool and batch["mask_valid"].all()
    assert set(batch["mask"].unique().tolist()) <= {0.0, 1.0}
    assert batch["label"].dtype == torch.long and batch["index"].shape == (2,)
    # gray -> 3 identical channels, ImageNet-normalised (so channels differ by the per-channel mean/std)
    raw = batch["bus"][:, :, 0] * 0.229 + 0.485
    torch.testing.assert_close(batch["bus"][:, :, 1] * 0.224 + 0.456, raw)
    # folds: grouped by patient, disjoint
    ids = {p: {c.patient_id for c in dm.datasets[p].cases} for p in ("train", "val", "test")}
    assert (
        not (ids["train"] & ids["test"])
        and not (ids["train"] & ids["val"])
        and not (ids["val"] & ids["test"])
    )


def test_same_augmentation_for_every_frame_and_both_modalities(tmp_path):
    """BUS and CEUS frames all show one asymmetric pattern and the mask is that pattern: after augmentation
    every frame of both modalities must still be identical, and the mask must still sit on the pattern."""
    size, t = 48, 5
    img = np.full((size, size), 40, np.uint8)
    img[8:30, 10:20] = 220
    img[8:14, 10:40] = 220  # an L shape: flips and rotations are visible
    clip = np.repeat(img[None], t, 0)
    mask = (clip > 128).astype(np.uint8)
    for name, arr in (("b", clip), ("c", clip), ("m", mask)):
        np.save(tmp_path / f"{name}.npy", arr)
    case = PairedCase("x", "x", 1, tmp_path / "b.npy", tmp_path / "c.npy", tmp_path / "m.npy")
    ds = PairedVideoDataset([case], [t], frames=t, size=32, augment=True)
    plain = PairedVideoDataset([case], [t], frames=t, size=32, augment=False)[0]["bus"][0]
    changed = 0
    for seed in range(6):
        torch.manual_seed(seed)
        item = ds[0]
        frames = torch.cat([item["bus"], item["ceus"]])  # (2T, 3, H, W)
        assert torch.equal(frames, frames[:1].expand_as(frames))
        m = item["mask"][:, 0]
        assert torch.equal(m, m[:1].expand_as(m))
        x = item["bus"][0, 0]
        bright = x > (x.max() + x.min()) / 2
        agree = (bright == m[0].bool()).float().mean().item()
        assert agree > 0.95, agree
        changed += not torch.allclose(item["bus"][0], plain)
    assert changed >= 3  # the augmentation really does something


def test_roi_box_square_around_the_drawn_masks():
    mask = np.zeros((3, 40, 60), np.uint8)
    mask[0, 10:20, 30:36] = 1  # 10 x 6 box
    valid = np.array([True, False, True])
    assert roi_box(mask, valid, 1.0) == (10, 20, 28, 38)  # side 10, centred on the box
    assert roi_box(mask, valid, 2.0) == (5, 25, 23, 43)
    y0, y1, x0, x1 = roi_box(mask, valid, 10.0)  # larger than the frame: the shorter side, shifted inside
    assert (y1 - y0, x1 - x0) == (40, 40) and y0 == 0 and 0 <= x0 and x1 <= 60
    assert roi_box(mask, np.array([False, True, False]), 1.5) is None  # only undrawn / empty frames
    assert roi_box(np.zeros_like(mask), np.ones(3, bool), 1.5) is None


def test_roi_crop_and_cache(paired):
    """With ``roi`` the nodule (a disk of diameter size/3) fills the crop; ``cache`` serves repeated reads from
    memory, and only for deterministic (un-augmented) samples."""
    manifest, splits = paired
    dm = PairedVideoDataModule(manifest, splits=splits, fold=0, frames=3, size=32, augment=True, cache=True,
                               roi=1.5)  # fmt: skip
    dm.setup("fit")
    test = dm.datasets["test"]
    item = test[0]
    frac = item["mask"].mean().item()
    assert 0.25 < frac < 0.5  # pi/4 / 1.5^2 = 0.35 of the crop, against ~0.09 of the whole frame
    assert test[0] is item  # cached
    assert dm.datasets["train"]._cache is None  # augmented: never cached
    with pytest.raises(ValueError, match="roi"):
        PairedVideoDataset(test.cases, test.n_frames, frames=3, size=32, augment=False, roi=0.5)


def test_ratio_split_groups_patients():
    cases = [PairedCase(f"c{i}", f"p{i // 2}", i % 2, Path("b"), Path("c")) for i in range(40)]
    parts = ratio_split(cases, (5, 2, 3), seed=1)
    sizes = {p: len(v) for p, v in parts.items()}
    assert sizes == {"train": 20, "val": 8, "test": 12}
    pats = {p: {c.patient_id for c in v} for p, v in parts.items()}
    assert not (pats["train"] & pats["val"]) and not (pats["train"] & pats["test"])
    assert ratio_split(cases, (5, 2, 3), seed=1) == parts  # reproducible


def test_no_splits_file_uses_ratio(tmp_path):
    manifest, _ = write_paired_set(tmp_path, n=10, splits=False)
    dm = PairedVideoDataModule(manifest, frames=3, size=32, batch_size=2)
    dm.setup("fit")
    assert sum(len(dm.datasets[p]) for p in ("train", "val", "test")) == 10
    assert len(dm.datasets["predict"]) == len(dm.datasets["test"])


def test_bad_inputs_raise_data_error_at_setup(tmp_path, paired):
    manifest, _ = write_paired_set(tmp_path, n=4, splits=False)
    np.save(tmp_path / "ceus" / "c2.npy", np.zeros((3, 64, 64), np.uint8))  # 3 frames vs BUS 6
    with pytest.raises(DataError, match="c2.npy"):
        PairedVideoDataModule(manifest, frames=3, size=32).setup("fit")
    (tmp_path / "bus" / "c1.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError, match="c1.npy"):
        PairedVideoDataModule(manifest, frames=3, size=32).setup("fit")
    other_manifest, splits = paired
    with pytest.raises(DataError, match="not in manifest"):
        PairedVideoDataModule(manifest, splits=splits, fold=0).setup("fit")
