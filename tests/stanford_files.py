"""Writes small files in the exact Stanford AIMI layout, with the quirks of the real one."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd

HEADER = [
    "annot_id",
    "age",
    "sex",
    "location",
    "size_x",
    "size_y",
    "size_z",
    "ti-rads_composition",
    "ti-rads_echogenicity",
    "ti-rads_shape",
    "ti-rads_margin",
    "ti-rads_echogenicfoci",
    "ti-rads_level",
    "histopath_diagnosis",
]


def write_stanford(
    root: Path, *, shape=(24, 32), frames=None, labels=None, patients=None, extra=0, seed=0
) -> Path:
    """Five nodules; rows of '7_' are split around '12_', frame_nums have gaps and start above 1.

    Pixel value of each image row encodes (nodule number, frame_num) so tests can check the order.
    ``extra`` appends that many plain nodules ``"1000_"``, ... with alternating labels (1, 0, 1, ...).
    Returns the HDF5 path; metadata.csv is written beside it.
    """
    rng = np.random.default_rng(seed)
    frames = dict(
        frames
        or {
            "12_": [5, 6, 9],
            "7_": [2, 4, 7, 8, 13, 14],
            "129_": [11, 12, 15, 16],
            "3_": [1, 2, 3],
            "45_": [20, 30, 40, 41, 42, 43],
        }
    )
    labels = dict(labels or {"12_": 1, "7_": 0, "129_": 1, "3_": 0, "45_": 0})
    for j in range(extra):
        frames[f"{1000 + j}_"] = [3, 4, 5]
        labels[f"{1000 + j}_"] = int(j % 2 == 0)
    ids = list(frames)
    # Row order: 7_ part 1, all of 12_, 7_ part 2 (interleaved), then the rest unsorted by id and frame.
    order = [("7_", f) for f in frames["7_"][3:]] + [("12_", f) for f in frames["12_"][::-1]]
    order += [("7_", f) for f in frames["7_"][:3]]
    for nid in ids[2:][::-1]:
        fs = list(frames[nid])
        rng.shuffle(fs)
        order += [(nid, f) for f in fs]
    n = len(order)
    image = np.zeros((n, *shape), np.uint8)
    mask = np.zeros((n, *shape), np.uint8)
    for r, (nid, f) in enumerate(order):
        image[r] = (ids.index(nid) * 50 + f) % 256
        if f % 2 == 0 or nid == "129_":  # some frames have the nodule out of view (empty mask)
            y, x = 3 + f % 5, 4 + f % 7
            mask[r, y : y + 6, x : x + 9] = 255
    root.mkdir(parents=True, exist_ok=True)
    path = root / "dataset.hdf5"
    with h5py.File(path, "w") as h:
        h["annot_id"] = np.array([nid.encode() for nid, _ in order])
        h["frame_num"] = np.array([str(f).encode() for _, f in order])
        h.create_dataset("image", data=image, chunks=(1, *shape), compression="gzip")
        h.create_dataset("mask", data=mask, chunks=(1, *shape), compression="gzip")
    rows = []
    for i, nid in enumerate(ids):
        rows.append(
            {
                "annot_id": nid,
                "age": 40 + i,
                "sex": "F",
                "location": "right",
                "size_x": 1.0,
                "size_y": 1.2,
                "size_z": 0.8,
                "ti-rads_composition": 2,
                "ti-rads_echogenicity": 2,
                "ti-rads_shape": 0,
                "ti-rads_margin": 0,
                "ti-rads_echogenicfoci": 4 if i == 0 else 0,
                "ti-rads_level": "TR4",
                "histopath_diagnosis": labels[nid],
            }
        )
    meta = pd.DataFrame(rows, columns=HEADER)
    meta.loc[2, "ti-rads_margin"] = None  # a blank, as in the real file
    meta.loc[3, "age"] = None
    if patients:
        meta["patient_id"] = [patients.get(i, i) for i in ids]
    meta.to_csv(root / "metadata.csv", index=False)
    return path


def frame_value(nodule_number: int, frame_num: int) -> int:
    return (nodule_number * 50 + frame_num) % 256
