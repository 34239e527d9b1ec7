"""The sets on disk: the Stanford layout (``dataset.hdf5`` + ``metadata.csv``), the paired layout (.npy clips
+ ``manifest.csv``), each with the generator's ``truth.csv`` (``labels.py``) and the marker (``ownership.py``),
each folder written atomically.

The Stanford layout has the awkward facts of the real set (``_layout``, ``_metadata_rows``): HDF5 rows
grouped by nodule in shuffled order, some nodules split around a neighbour, one stored in string order of
``frame_num``, and blank metadata cells.  Speed: HDF5 chunks (one frame each, deflate level 1 with zlib's
run-length strategy, 4x faster than the default strategy at the same ratio on speckle) are compressed where
they are rendered (optionally in worker processes) and written with ``write_direct_chunk``.
"""

from __future__ import annotations

import csv
import multiprocessing as mp
import os
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import h5py
import numpy as np

from datamodules.atomic import atomic_path
from datamodules.synth.bmode import render_cine
from datamodules.synth.ceus import render_paired
from datamodules.synth.labels import (
    PAIRED_TRUTH_COLUMNS,
    TRUTH_COLUMNS,
    NoduleSpec,
    plan_paired,
    plan_stanford,
    truth_rows,
)
from datamodules.synth.ownership import _write_marker, check_target
from datamodules.synth.stills import synthesize_stills
from datamodules.synth.subtypes import DEFAULT_MALIGNANT

# The folders `synthesize` can write, in the order it writes them.
LAYOUTS = ("stanford", "paired", "stills")

METADATA_COLUMNS = (
    "annot_id", "age", "sex", "location", "size_x", "size_y", "size_z",
    "ti-rads_composition", "ti-rads_echogenicity", "ti-rads_shape", "ti-rads_margin",
    "ti-rads_echogenicfoci", "ti-rads_level", "histopath_diagnosis", "patient_id",
)  # fmt: skip
# Columns that may be blank (never the id, label or patient columns a reader groups by).
BLANKABLE = METADATA_COLUMNS[1:13]
MANIFEST_COLUMNS = ("case_id", "patient_id", "label", "bus", "ceus", "bus_mask")


def _compress(frames: np.ndarray) -> list[tuple[int, bytes]]:
    """Each frame as an HDF5 gzip chunk: (filter_mask, zlib stream) for ``write_direct_chunk``.

    Level 1 with the run-length strategy: HDF5's deflate filter inflates any zlib stream, and on speckle RLE
    matches the default strategy's ratio (~0.86) at a quarter of the time; on masks it is the best of all.
    """
    out = []
    for a in frames:
        z = zlib.compressobj(1, zlib.DEFLATED, 15, 8, zlib.Z_RLE)
        out.append((0, z.compress(a.tobytes()) + z.flush()))
    return out


def _render_chunks(args: tuple[NoduleSpec, int]) -> tuple[list, list]:
    spec, size = args
    img, mask = render_cine(spec, size)
    return _compress(img), _compress(mask)


def _layout(specs: list[NoduleSpec], rng: np.random.Generator) -> tuple[list[np.ndarray], int]:
    """HDF5 row of every frame of every nodule: nodules in shuffled order, some split around a neighbour
    (rows of A, then B, then the rest of A), and one nodule stored in string order of frame_num."""
    n = len(specs)
    order = [int(i) for i in rng.permutation(n)]
    segments: list[tuple[int, np.ndarray]] = []
    split = {order[i] for i in range(n - 1) if len(specs[order[i]].frame_nums) >= 4 and rng.random() < 0.06}
    if n >= 2 and not split:
        cand = [order[i] for i in range(n - 1) if len(specs[order[i]].frame_nums) >= 2]
        split = {cand[0]} if cand else set()
    pending: tuple[int, np.ndarray] | None = None
    for j in order:
        idx = np.arange(len(specs[j].frame_nums))
        if j in split and pending is None:
            cut = len(idx) // 2
            segments.append((j, idx[:cut]))
            pending = (j, idx[cut:])
            continue
        split.discard(j)
        segments.append((j, idx))
        if pending is not None:
            segments.append(pending)
            pending = None
    if pending is not None:
        segments.append(pending)
    rows = [np.empty(len(s.frame_nums), np.int64) for s in specs]
    lexi = next((j for j in order if j not in split and len(specs[j].frame_nums) >= 10), None)
    r = 0
    for j, idx in segments:
        if j == lexi:  # stored as a string sort would order them: b'10' before b'9'
            idx = idx[np.argsort([str(v) for v in specs[j].frame_nums[idx]], kind="stable")]
        rows[j][idx] = np.arange(r, r + len(idx))
        r += len(idx)
    return rows, r


def _blank_cells(rng: np.random.Generator, n: int) -> set[tuple[int, str]]:
    k = max(2, int(round(0.015 * n * len(BLANKABLE)))) if n >= 4 else 0
    cells = set()
    while len(cells) < k:
        cells.add((int(rng.integers(n)), BLANKABLE[int(rng.integers(len(BLANKABLE)))]))
    return cells


def _metadata_rows(specs: list[NoduleSpec], rng: np.random.Generator) -> list[dict[str, str]]:
    blank = _blank_cells(rng, len(specs))
    rows = []
    for i in rng.permutation(len(specs)):
        s = specs[int(i)]
        p = s.points
        row = {
            "annot_id": s.annot_id, "age": str(s.age), "sex": s.sex, "location": s.location,
            "size_x": f"{s.size_cm[0]:.1f}", "size_y": f"{s.size_cm[1]:.1f}", "size_z": f"{s.size_cm[2]:.1f}",
            "ti-rads_composition": str(p["composition"]), "ti-rads_echogenicity": str(p["echogenicity"]),
            "ti-rads_shape": str(p["shape"]), "ti-rads_margin": str(p["margin"]),
            "ti-rads_echogenicfoci": str(p["echogenicfoci"]), "ti-rads_level": f"TR{s.level}",
            "histopath_diagnosis": str(s.label), "patient_id": s.patient_id,
        }  # fmt: skip
        for j, col in blank:
            if j == int(i):
                row[col] = ""
        rows.append(row)
    return rows


def _default_workers(n_pixels: int) -> int:
    """Two render processes for big sets when a second core is actually idle (the bytes are the same either
    way; on a saturated machine extra processes only add start-up and copying)."""
    cpus = os.cpu_count() or 1
    if n_pixels < 50_000_000 or cpus < 2 or os.getloadavg()[0] > cpus - 1.0:
        return 0
    return 2


def synthesize_stanford(
    out_dir: str | os.PathLike,
    *,
    n_nodules: int = 192,
    frames: int = 90,
    size: int = 256,
    prevalence: float = 0.09,
    seed: int = 0,
    vary_frames: bool = True,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    label_noise: float = 1.0,
    overwrite: bool = False,
) -> Path:
    """Write ``out_dir/dataset.hdf5`` + ``metadata.csv`` in the Stanford AIMI cine-clip layout (returned), and
    the generator's ``truth.csv`` beside them (``labels.py``; no reader opens it).

    ``frames`` is the mean clip length (``vary_frames=False``: every clip exactly that long).  Frames are
    chunked one per chunk and gzip-1 compressed.  ``workers`` > 1 renders in that many processes (same bytes
    as ``workers=0``); None picks 2 for big sets when a core is idle.  ``progress(done, total)`` is called
    after each nodule.  The directory is written under a temporary name and renamed when complete, with a
    :data:`MARKER` file; an existing non-empty ``out_dir`` without one is refused unless ``overwrite``
    (:func:`check_target`).
    """
    check_target(out_dir, "stanford", overwrite)
    specs = plan_stanford(n_nodules, frames, prevalence, seed, vary_frames, label_noise)
    rng = np.random.default_rng([seed, 0x1A7])
    rows, n_rows = _layout(specs, rng)
    meta = _metadata_rows(specs, rng)
    ids = np.empty(n_rows, dtype=object)
    fns = np.empty(n_rows, dtype=object)
    for s, r in zip(specs, rows, strict=True):
        ids[r] = s.annot_id.encode()
        fns[r] = [str(v).encode() for v in s.frame_nums]
    if workers is None:
        workers = _default_workers(n_rows * size * size)
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        with h5py.File(tmp / "dataset.hdf5", "w") as f:
            f.create_dataset("annot_id", data=np.array(ids.tolist(), dtype=f"S{max(map(len, ids))}"))
            f.create_dataset("frame_num", data=np.array(fns.tolist(), dtype=f"S{max(map(len, fns))}"))
            kw = dict(shape=(n_rows, size, size), dtype=np.uint8, chunks=(1, size, size), compression="gzip",
                      compression_opts=1)  # fmt: skip
            dimg, dmask = f.create_dataset("image", **kw), f.create_dataset("mask", **kw)
            jobs = [(s, size) for s in specs]
            pool = mp.get_context("spawn").Pool(workers) if workers > 1 else None
            try:
                results = pool.imap(_render_chunks, jobs) if pool else map(_render_chunks, jobs)
                for j, (ci, cm) in enumerate(results):
                    for r, (fi, bi), (fm, bm) in zip(rows[j], ci, cm, strict=True):
                        dimg.id.write_direct_chunk((int(r), 0, 0), bi, fi)
                        dmask.id.write_direct_chunk((int(r), 0, 0), bm, fm)
                    if progress is not None:
                        progress(j + 1, len(specs))
            finally:
                if pool is not None:
                    pool.terminate()
                    pool.join()
        _write_csv(tmp / "metadata.csv", METADATA_COLUMNS, meta)
        _write_csv(tmp / "truth.csv", TRUTH_COLUMNS, truth_rows(specs))
        _write_marker(tmp, "stanford", n_nodules=n_nodules, frames=frames, size=size, prevalence=prevalence,
                      seed=seed, vary_frames=vary_frames, label_noise=label_noise)  # fmt: skip
    return out_dir


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict[str, str]]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)


def synthesize_paired(
    out_dir: str | os.PathLike,
    *,
    n_cases: int = 48,
    frames: int = 32,
    size: int = 128,
    prevalence: float = 0.45,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    label_noise: float = 1.0,
    overwrite: bool = False,
) -> Path:
    """Write the paired BUS/CEUS layout under ``out_dir``: ``manifest.csv`` + ``bus/``, ``ceus/``,
    ``bus_mask/`` .npy clips (T, H, W) uint8 (mask in {0, 1}); paths in the manifest are relative to it.
    Also ``truth.csv`` (``labels.py``; no reader opens it) and the :data:`MARKER`.  Written atomically; an
    existing non-empty ``out_dir`` synth did not write is refused unless ``overwrite`` (:func:`check_target`)."""
    check_target(out_dir, "paired", overwrite)
    cases = plan_paired(n_cases, frames, prevalence, seed, label_noise)
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        for sub in ("bus", "ceus", "bus_mask"):
            (tmp / sub).mkdir(parents=True)
        rows = []
        for j, case in enumerate(cases):
            bus, ceus, mask = render_paired(case, size)
            for sub, arr in (("bus", bus), ("ceus", ceus), ("bus_mask", mask)):
                np.save(tmp / sub / f"{case.case_id}.npy", arr)
            rows.append({"case_id": case.case_id, "patient_id": case.patient_id, "label": str(case.label),
                         "bus": f"bus/{case.case_id}.npy", "ceus": f"ceus/{case.case_id}.npy",
                         "bus_mask": f"bus_mask/{case.case_id}.npy"})  # fmt: skip
            if progress is not None:
                progress(j + 1, len(cases))
        _write_csv(tmp / "manifest.csv", MANIFEST_COLUMNS, rows)
        _write_csv(tmp / "truth.csv", PAIRED_TRUTH_COLUMNS, truth_rows(cases))
        _write_marker(tmp, "paired", n_cases=n_cases, frames=frames, size=size, prevalence=prevalence, seed=seed,
                      label_noise=label_noise)  # fmt: skip
    return out_dir


def synthesize(
    out_dir: str | os.PathLike,
    *,
    n_nodules: int = 192,
    frames: int = 90,
    size: int = 256,
    n_cases: int = 48,
    paired_frames: int | None = None,
    paired_size: int | None = None,
    prevalence: float | None = None,
    seed: int = 0,
    workers: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    label_noise: float = 1.0,
    paired_prevalence: float | None = None,
    overwrite: bool = False,
    n_stills: int = 0,
    stills_size: int | None = None,
    stills_malignant: float | None = None,
    only: Sequence[str] | None = None,
) -> Path:
    """Both layouts: ``out_dir/stanford`` (Stanford cine clips) and ``out_dir/paired`` (BUS/CEUS).

    ``prevalence`` None keeps each layout's default (0.09 like Stanford, 0.45 like the AsyCMST thyroid set);
    a number sets both (``paired_prevalence`` overrides it for the paired set).  Paired clips default to
    min(frames, 32) frames of min(size, 128) pixels.  Each
    sub-directory is written atomically (a failure leaves no half directory).  Both targets are checked
    (:func:`check_target`) before either is written, so a refusal touches nothing; ``overwrite`` replaces
    folders synth did not write.  ``n_stills`` > 0 also writes ``out_dir/stills`` (``stills.py``: still images
    with carcinoma subtypes, ``stills_size`` pixels, default min(size, 128); ``stills_malignant`` the malignant
    share, default ``subtypes.DEFAULT_MALIGNANT``), after the other two, which it does not change.
    ``only`` (a subset of ``LAYOUTS``) writes just those folders, the same bytes as a full call (each layout
    draws from its own seeded streams), so a Makefile can start on one set while the next is rendered.
    """
    out_dir = Path(out_dir)
    wanted = ("stanford", "paired", *(("stills",) if n_stills else ())) if only is None else tuple(only)
    unknown = sorted(set(wanted) - set(LAYOUTS))
    if unknown:
        raise ValueError(f"unknown layout(s) {unknown}; choose from {list(LAYOUTS)}")
    if "stills" in wanted and not n_stills:
        raise ValueError("the stills layout needs n_stills >= 1")
    for layout in wanted:
        check_target(out_dir / layout, layout, overwrite)
    cb = (lambda name: lambda d, n: progress(name, d, n)) if progress else (lambda name: None)
    if "stanford" in wanted:
        synthesize_stanford(out_dir / "stanford", n_nodules=n_nodules, frames=frames, size=size,
                            prevalence=0.09 if prevalence is None else prevalence, seed=seed, workers=workers,
                            progress=cb("stanford"), label_noise=label_noise, overwrite=overwrite)  # fmt: skip
    if "paired" in wanted:
        synthesize_paired(out_dir / "paired", n_cases=n_cases, frames=paired_frames or min(frames, 32),
                          size=paired_size or min(size, 128),
                          prevalence=next(q for q in (paired_prevalence, prevalence, 0.45) if q is not None),
                          seed=seed, progress=cb("paired"), label_noise=label_noise, overwrite=overwrite)  # fmt: skip
    if "stills" in wanted:
        synthesize_stills(out_dir / "stills", n_stills=n_stills, size=stills_size or min(size, 128),
                          malignant=DEFAULT_MALIGNANT if stills_malignant is None else stills_malignant,
                          seed=seed, progress=cb("stills"), overwrite=overwrite)  # fmt: skip
    return out_dir
