"""Synthetic thyroid ultrasound: the embedded default data set (Stanford cine-clip layout + paired BUS/CEUS).

Nothing here is from a paper; it is a simulator written by hand because no library makes B-mode cine sweeps
with TI-RADS ground truth.  What it imitates, and why:

* B-mode physics in the display (log-compressed) domain, where multiplicative speckle becomes additive: a
  log-Rayleigh speckle field (envelope of a blurred complex Gaussian, i.e. fully developed speckle with a
  finite PSF) added to a tissue echo map (skin, subcutaneous fat, strap muscles, thyroid with capsule, trachea
  with air shadow and reverberation, carotid with posterior enhancement, prevertebral muscle), minus a depth
  attenuation left over after an imperfect TGC curve.
* A probe sweep (elevation ``z``) through an ellipsoidal nodule: the cross-section scales with
  ``sqrt(1 - z^2)``, so it grows then shrinks and, for about half the nodules, the clip starts and/or ends
  outside the nodule (empty masks there).  Tissue drifts laterally and moves with breathing; speckle moves
  with the tissue and decorrelates along the sweep.
* Nodule descriptors that map one-to-one onto ACR TI-RADS points (composition with anechoic cystic parts,
  echogenicity, taller-than-wide, margin, echogenic foci that can sum), the level by the ACR rule.
* Labels from a risk model of those descriptors plus two signals metadata.csv does not carry: texture
  heterogeneity inside the nodule, and a shape change along the sweep (lobulation that appears mid-sweep and
  an aspect ratio that turns across frames), so image + mask models can beat TI-RADS alone (STACT-Time
  Table 2 has TI-RADS at AUC 0.84 against 0.91 for image + segmentation).  Prevalence is set exactly by
  taking the top ``round(q n)`` of risk + logistic noise (same as solving for the logistic intercept).
* Ground truth beside the data: each layout folder also gets ``truth.csv`` (``stanford/truth.csv`` keyed by
  ``annot_id``, ``paired/truth.csv`` by ``case_id``; see :data:`TRUTH_COLUMNS`) with the clean risk (the
  log-odds before the logistic noise, up to the intercept that sets the prevalence), its two parts and the
  hidden signals.  ``tirads_risk`` is what the metadata carries: the TI-RADS descriptor points *and* the age
  term (age is a metadata.csv column, so a model of the metadata can learn it); ``hidden_risk`` is everything
  else: heterogeneity and shape change, and for paired cases also the CEUS pattern, time-to-peak and wash-out
  terms (paired clips have no shape change; the column is 0).  ``risk = tirads_risk + hidden_risk`` (to
  rounding), ``label`` = the label in metadata.csv / manifest.csv.  No reader, training stage or datamodule
  opens truth.csv (the Stanford reader opens ``metadata.csv`` by name, the paired reader the manifest it is
  given); only ``usnodule report --truth`` reads it, for its reference rows (Bayes ceiling, TI-RADS oracle).
  On the demo's Stanford set (Makefile ``SYNTH_ARGS``, seed 0) the clean risk ranks the labels at AUROC
  0.94 (mean over 5 folds), ``tirads_risk`` alone 0.77.
* Paired CEUS clips: gamma-variate time-intensity curves (wash-in, peak, wash-out) for parenchyma and nodule,
  enhancement patterns (homogeneous, ring, heterogeneous, hypo), bubble speckle that changes every frame,
  aligned frame by frame with a stationary-probe BUS clip of the same nodule and its mask.

Speed: frames are composed in int16 gray levels (5x faster than float32 here), the nodule is drawn only in a
box around its current cross-section, speckle comes from a per-process pool of precomputed fields, and HDF5
chunks (one frame each, deflate level 1 with zlib's run-length strategy, 4x faster than the default strategy
at the same ratio on speckle) are compressed where they are rendered (optionally in worker processes) and
written with ``write_direct_chunk``.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import multiprocessing as mp
import os
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
from scipy.ndimage import gaussian_filter1d
from scipy.special import ndtr, ndtri

from datamodules.atomic import atomic_path
from datamodules.errors import DataError

# ---------------------------------------------------------------------------------------------- TI-RADS
# ACR TI-RADS points (Tessler et al., JACR 2017).
COMPOSITION = {"cystic": 0, "spongiform": 0, "mixed": 1, "solid": 2}
ECHOGENICITY = {"anechoic": 0, "hyperechoic": 1, "isoechoic": 1, "hypoechoic": 2, "very hypoechoic": 3}
MARGIN = {"smooth": 0, "ill-defined": 0, "lobulated": 2, "irregular": 2, "extrathyroidal": 3}
FOCI = {"comet-tail": 0, "macro": 1, "rim": 2, "punctate": 3}
SHAPE_TALLER = 3
LOCATIONS = ("Right lobe", "Left lobe", "Isthmus")
CEUS_PATTERNS = ("homogeneous", "ring", "heterogeneous", "hypo")
# Visibility of the hidden signals (gray levels / relative radius at full strength).  They set how easily a
# model can *see* a signal, not how much it weighs in the label (the risk model's weights do that), so the
# ceiling in truth.csv does not move with them.  Heterogeneity was 26 (std of the blotches at h = 1): a CNN
# regressing h from 32-64 px crops reached Spearman 0.49-0.55 (fold 0, 400 nodules), 0.66 at 55 and 0.71 at
# 80 (BENCHMARKS.md, "Demo recipe"): it stands out of the speckle as a "heterogeneous echotexture" does.
HETEROGENEITY_GRAY = 80.0
# Shape change along the sweep at shape_change = 1: aspect-ratio turn and mid-sweep lobulation, as fractions
# of the radius (were 0.28 and 0.38; raised so that a mask CNN at 32-48 px sees them).
SHAPE_ASPECT = 0.45
SHAPE_LOBES = 0.55

METADATA_COLUMNS = (
    "annot_id", "age", "sex", "location", "size_x", "size_y", "size_z",
    "ti-rads_composition", "ti-rads_echogenicity", "ti-rads_shape", "ti-rads_margin",
    "ti-rads_echogenicfoci", "ti-rads_level", "histopath_diagnosis", "patient_id",
)  # fmt: skip
# Columns that may be blank (never the id, label or patient columns a reader groups by).
BLANKABLE = METADATA_COLUMNS[1:13]
MANIFEST_COLUMNS = ("case_id", "patient_id", "label", "bus", "ceus", "bus_mask")
# Generator ground truth (module docstring): no reader opens these files, only ``usnodule report --truth``.
TRUTH_COLUMNS = ("annot_id", "risk", "tirads_risk", "hidden_risk", "heterogeneity", "shape_change", "label")
PAIRED_TRUTH_COLUMNS = ("case_id", "risk", "tirads_risk", "hidden_risk", "heterogeneity", "shape_change",
                        "pattern", "ttp", "washout", "label")  # fmt: skip

# Risk model (log-odds, before the intercept that sets the prevalence).  Metadata part: weights of the TI-RADS
# points and of age; hidden part: weights of the image-only signals and, for paired cases, of CEUS.
POINT_WEIGHTS = {"composition": 0.6, "echogenicity": 0.7, "shape": 0.5, "margin": 0.65, "echogenicfoci": 0.4}
AGE_WEIGHT, AGE_CENTER = -0.03, 56
# Per unit of heterogeneity and of shape change (was 4.5): the hidden part now outweighs the metadata part
# (AUROC 0.89 vs 0.78 on the demo plan) while the TI-RADS oracle stays >= 0.70, a real competitor.
HIDDEN_WEIGHT = 7.0
CEUS_PATTERN_WEIGHT = {"homogeneous": 0.0, "ring": -1.5, "heterogeneous": 1.5, "hypo": 1.5}
TTP_WEIGHT, TTP_CENTER = -14.0, 0.32
WASHOUT_WEIGHT, WASHOUT_CENTER = 1.4, 2.2


def tirads_points(
    composition: str, echogenicity: str, taller: bool, margin: str, foci: Iterable[str]
) -> dict[str, int]:
    """ACR TI-RADS points of each descriptor (the metadata.csv ``ti-rads_*`` columns)."""
    return {
        "composition": COMPOSITION[composition],
        "echogenicity": ECHOGENICITY[echogenicity],
        "shape": SHAPE_TALLER if taller else 0,
        "margin": MARGIN[margin],
        "echogenicfoci": sum(FOCI[f] for f in foci),
    }


def acr_level(points: int) -> int:
    """ACR TI-RADS level from the points total: 0 -> TR1, 2 -> TR2, 3 -> TR3, 4-6 -> TR4, >= 7 -> TR5.

    A total of 1 (only possible for a spongiform, iso-echoic nodule, which ACR says gets no further points)
    is TR1.
    """
    if points <= 1:
        return 1
    if points <= 3:
        return points
    return 4 if points <= 6 else 5


@dataclass(frozen=True)
class NoduleSpec:
    """Everything about one nodule that is drawn before rendering (labels need no pixels)."""

    annot_id: str
    patient_id: str
    age: int
    sex: str
    location: str
    size_cm: tuple[float, float, float]  # (x lateral, y antero-posterior, z along the sweep)
    composition: str
    echogenicity: str
    margin: str
    foci: tuple[str, ...]
    heterogeneity: float  # hidden: texture heterogeneity in [0, 1]
    shape_change: float  # hidden: shape change along the sweep in [0, 1]
    risk: float  # clean risk (log-odds before the noise; paired: with the CEUS terms), as in truth.csv
    noisy_risk: float  # risk + logistic noise: the label is 1 for the top round(q n) of these
    label: int
    frame_nums: np.ndarray = field(repr=False)
    seed: int = 0
    pool_seed: int = 0

    @property
    def taller(self) -> bool:
        return self.size_cm[1] > self.size_cm[0]

    @property
    def points(self) -> dict[str, int]:
        return tirads_points(self.composition, self.echogenicity, self.taller, self.margin, self.foci)

    @property
    def tirads_risk(self) -> float:
        """The part of the risk the metadata carries (TI-RADS points and age)."""
        return _metadata_risk(self.points, self.age)

    @property
    def hidden_risk(self) -> float:
        """The part of the B-mode risk from the image-only signals (heterogeneity, shape change)."""
        return _hidden_bmode_risk(self.heterogeneity, self.shape_change)

    @property
    def level(self) -> int:
        return acr_level(sum(self.points.values()))


@dataclass(frozen=True)
class CaseSpec:
    """One paired BUS/CEUS case: the B-mode nodule plus its contrast behaviour."""

    case_id: str
    nodule: NoduleSpec
    pattern: str  # CEUS enhancement pattern, one of CEUS_PATTERNS
    ttp: float  # nodule time to peak, as a fraction of the clip
    washout: float  # gamma-variate alpha: larger = faster wash-out
    label: int

    @property
    def patient_id(self) -> str:
        return self.nodule.patient_id

    @property
    def hidden_risk(self) -> float:
        """Risk from everything the manifest does not carry: B-mode hidden signals + CEUS pattern and timing."""
        return self.nodule.hidden_risk + _ceus_risk(self.pattern, self.ttp, self.washout)


# ---------------------------------------------------------------------------------------------- sampling
def _ordinal(rng: np.random.Generator, latent: np.ndarray, probs: Iterable[float], rho: float) -> np.ndarray:
    """Ordered categories with the given marginal probabilities, correlated (``rho``) with a latent factor."""
    cuts = ndtri(np.cumsum(list(probs))[:-1])
    v = rho * latent + math.sqrt(1 - rho**2) * rng.standard_normal(latent.shape)
    return np.searchsorted(cuts, v)


def _top_q(
    rng: np.random.Generator, risk: np.ndarray, prevalence: float, label_noise: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Labels = the top ``round(q n)`` of risk + logistic noise, i.e. a logistic model whose intercept is
    solved so the realised prevalence is exactly q (at least one of each class when n >= 2 and 0 < q < 1).
    ``label_noise`` scales the logistic noise (1: the logistic model; smaller: labels follow the risk more
    closely, e.g. for tests that must see a model learn); the same draws either way."""
    n = len(risk)
    noisy = risk + label_noise * rng.logistic(size=n)
    k = int(round(prevalence * n))
    if 0 < prevalence < 1 and n >= 2:
        k = min(max(k, 1), n - 1)
    label = np.zeros(n, dtype=np.int64)
    label[np.argsort(-noisy, kind="stable")[:k]] = 1
    return label, noisy


def _patients(rng: np.random.Generator, n: int, p_pair: float, prefix: str) -> list[str]:
    """Patient ids for n nodules; about ``p_pair`` of them share a patient with the next (two nodules)."""
    ids, k, i = [], 0, 0
    forced = n >= 4  # make sure at least one patient has two nodules
    while i < n:
        k += 1
        pair = i + 1 < n and (rng.random() < p_pair or (forced and i == n // 2))
        ids += [f"{prefix}{k:04d}"] * (2 if pair else 1)
        forced = forced and not pair
        i += 2 if pair else 1
    return ids


def _sample_nodules(
    rng: np.random.Generator,
    n: int,
    pool_seed: int,
    prefix: str,
    id_fmt: str,
    frame_counts: np.ndarray,
    frame_gaps: bool,
) -> list[dict]:
    """Descriptors, demographics and hidden signals of n nodules (no label yet)."""
    latent = rng.standard_normal(n)  # one "suspiciousness" factor shared by the descriptors
    comp = _ordinal(rng, latent, (0.015, 0.02, 0.27, 0.695), 0.45)
    echo = _ordinal(rng, latent, (0.10, 0.36, 0.44, 0.10), 0.55)
    margin = _ordinal(rng, latent, (0.50, 0.25, 0.10, 0.11, 0.04), 0.5)
    punct = _ordinal(rng, latent, (0.80, 0.20), 0.5)
    taller = _ordinal(rng, latent, (0.88, 0.12), 0.45)
    # Hidden signals: weakly tied to the latent factor, so they carry information TI-RADS does not.
    het = ndtr(0.3 * latent + 0.95 * rng.standard_normal(n))
    shp = ndtr(0.3 * latent + 0.95 * rng.standard_normal(n))
    patients = _patients(rng, n, 0.13, prefix)
    numbers = rng.choice(np.arange(1, 4 * n + 60), size=n, replace=False)
    out = []
    for i in range(n):
        c = ("cystic", "spongiform", "mixed", "solid")[comp[i]]
        if c == "cystic":
            e, m, foci = "anechoic", "smooth", ("comet-tail",) if rng.random() < 0.4 else ()
        elif c == "spongiform":
            e, m, foci = "isoechoic", "smooth", ()
        else:
            e = ("hyperechoic", "isoechoic", "hypoechoic", "very hypoechoic")[echo[i]]
            m = ("smooth", "ill-defined", "lobulated", "irregular", "extrathyroidal")[margin[i]]
            foci = tuple(f for f, p in (("macro", 0.14), ("rim", 0.05)) if rng.random() < p)
            foci += ("punctate",) if punct[i] else ()
        # Size (cm): lognormal around 2 cm; taller-than-wide means AP > transverse.
        d = float(np.clip(rng.lognormal(math.log(1.9), 0.4), 0.6, 5.0))
        w = d * rng.uniform(0.85, 1.15)
        h = w * (rng.uniform(1.08, 1.35) if taller[i] else rng.uniform(0.6, 0.95))
        z = d * rng.uniform(0.9, 1.6)
        pid = patients[i]
        same = i > 0 and patients[i - 1] == pid
        age = out[-1]["age"] if same else int(np.clip(rng.normal(56, 14), 18, 90))
        sex = out[-1]["sex"] if same else ("F" if rng.random() < 0.83 else "M")
        out.append(dict(
            annot_id=id_fmt.format(int(numbers[i])), patient_id=pid, age=age, sex=sex,
            location=LOCATIONS[int(rng.choice(3, p=(0.56, 0.375, 0.065)))],
            size_cm=(round(w, 1), round(h, 1), round(z, 1)), composition=c, echogenicity=e, margin=m,
            foci=foci, heterogeneity=float(het[i]), shape_change=float(shp[i]),
            frame_nums=_frame_nums(rng, int(frame_counts[i]), frame_gaps),
            seed=int(rng.integers(2**62)), pool_seed=pool_seed,
        ))  # fmt: skip
    return out


def _frame_nums(rng: np.random.Generator, n: int, gaps: bool) -> np.ndarray:
    """Stored frame numbers: start anywhere in 1..40, mostly consecutive with a few gaps (dropped frames)."""
    if not gaps:
        return np.arange(n, dtype=np.int64)
    step = rng.choice([1, 2, 3, 5], size=n, p=(0.9, 0.06, 0.03, 0.01))
    step[0] = rng.integers(1, 41)
    return np.cumsum(step).astype(np.int64)


def _metadata_risk(p: dict[str, int], age: float) -> float:
    """Risk part the metadata carries: weighted TI-RADS points plus the age term."""
    w = POINT_WEIGHTS
    return (w["composition"] * p["composition"] + w["echogenicity"] * p["echogenicity"] + w["shape"] * p["shape"]
            + w["margin"] * p["margin"] + w["echogenicfoci"] * p["echogenicfoci"]
            + AGE_WEIGHT * (age - AGE_CENTER))  # fmt: skip


def _hidden_bmode_risk(heterogeneity: float, shape_change: float) -> float:
    """Risk part from the B-mode signals metadata.csv does not carry."""
    return HIDDEN_WEIGHT * heterogeneity + HIDDEN_WEIGHT * shape_change


def _ceus_risk(pattern: str, ttp: float, washout: float) -> float:
    """Risk part from CEUS: enhancement pattern, earlier peak and faster wash-out."""
    return (CEUS_PATTERN_WEIGHT[pattern] + TTP_WEIGHT * (ttp - TTP_CENTER)
            + WASHOUT_WEIGHT * (washout - WASHOUT_CENTER))  # fmt: skip


def _descriptor_points(d: dict) -> dict[str, int]:
    return tirads_points(d["composition"], d["echogenicity"], d["size_cm"][1] > d["size_cm"][0], d["margin"],
                         d["foci"])  # fmt: skip


def _tirads_risk(d: dict) -> float:
    """Malignancy risk (log-odds scale, before the intercept) of one nodule's descriptors + hidden signals."""
    return _metadata_risk(_descriptor_points(d), d["age"]) + _hidden_bmode_risk(
        d["heterogeneity"], d["shape_change"]
    )


def plan_stanford(
    n_nodules: int = 192,
    frames: int = 90,
    prevalence: float = 0.09,
    seed: int = 0,
    vary_frames: bool = True,
    label_noise: float = 1.0,
) -> list[NoduleSpec]:
    """Draw every nodule of the Stanford-layout set (descriptors, hidden signals, label, frame numbers).

    Cheap: no pixels.  ``frames`` is the mean clip length; with ``vary_frames`` lengths follow a gamma
    distribution (the real set has 90.7 +- 56 frames, STACT-Time Table 1), at least 3 frames.
    """
    _check_prevalence(prevalence)
    rng = np.random.default_rng([seed, 0x57A])
    if vary_frames:
        counts = np.clip(np.round(rng.gamma(3.0, frames / 3.0, n_nodules)), 3, 4 * max(frames, 3))
    else:
        counts = np.full(n_nodules, max(frames, 1))
    rows = _sample_nodules(rng, n_nodules, seed, "P", "{}_", counts.astype(int), frame_gaps=True)
    risk = np.array([_tirads_risk(d) for d in rows])
    label, noisy = _top_q(rng, risk, prevalence, label_noise)
    return [
        NoduleSpec(**d, risk=float(r), noisy_risk=float(v), label=int(y))
        for d, r, v, y in zip(rows, risk, noisy, label, strict=True)
    ]


def plan_paired(
    n_cases: int = 48, frames: int = 32, prevalence: float = 0.45, seed: int = 0, label_noise: float = 1.0
) -> list[CaseSpec]:
    """Draw every paired case: B-mode descriptors, CEUS pattern and curve timing, and the label.

    The label model uses features visible in both modalities: B-mode descriptors and heterogeneity, CEUS
    pattern (heterogeneous / hypo-enhancement raise risk, ring lowers it), earlier peak and faster wash-out.
    Default prevalence 0.45 is the AsyCMST thyroid set (1304 / 2910 malignant, Table 1).
    """
    _check_prevalence(prevalence)
    rng = np.random.default_rng([seed, 0xCE05])
    rows = _sample_nodules(rng, n_cases, seed + 1, "Q", "C{:04d}", np.full(n_cases, frames), frame_gaps=False)
    latent = rng.standard_normal(n_cases)
    pattern = rng.choice(4, size=n_cases, p=(0.35, 0.2, 0.25, 0.2))
    ttp = np.clip(0.32 - 0.06 * latent + 0.04 * rng.standard_normal(n_cases), 0.14, 0.5)
    washout = np.clip(2.2 + 0.6 * latent + 0.4 * rng.standard_normal(n_cases), 0.9, 4.5)
    risk = np.array(
        [
            _tirads_risk({**d, "shape_change": 0.0}) + _ceus_risk(CEUS_PATTERNS[p], t, a)
            for d, p, t, a in zip(rows, pattern, ttp, washout, strict=True)
        ]
    )
    label, noisy = _top_q(rng, risk, prevalence, label_noise)
    return [
        CaseSpec(case_id=d["annot_id"],
                 nodule=NoduleSpec(**{**d, "shape_change": 0.0}, risk=float(r), noisy_risk=float(v),
                                   label=int(y)),
                 pattern=CEUS_PATTERNS[p], ttp=float(t), washout=float(a), label=int(y))
        for d, p, t, a, r, v, y in zip(rows, pattern, ttp, washout, risk, noisy, label, strict=True)
    ]  # fmt: skip


def truth_rows(specs: list[NoduleSpec] | list[CaseSpec]) -> list[dict[str, str]]:
    """The ``truth.csv`` rows of Stanford nodules or paired cases (columns :data:`TRUTH_COLUMNS` /
    :data:`PAIRED_TRUTH_COLUMNS`; numbers with 6 decimals)."""
    rows = []
    for s in specs:
        n = s.nodule if isinstance(s, CaseSpec) else s
        row = {"risk": n.risk, "tirads_risk": n.tirads_risk, "hidden_risk": s.hidden_risk,
               "heterogeneity": n.heterogeneity, "shape_change": n.shape_change}  # fmt: skip
        if isinstance(s, CaseSpec):
            row.update(ttp=s.ttp, washout=s.washout)
        row = {k: f"{v:.6f}" for k, v in row.items()}
        if isinstance(s, CaseSpec):
            row.update(case_id=s.case_id, pattern=s.pattern)
        else:
            row["annot_id"] = s.annot_id
        row["label"] = str(s.label)
        rows.append(row)
    return rows


def _check_prevalence(q: float) -> None:
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"prevalence must be in [0, 1], got {q}")


# ---------------------------------------------------------------------------------------------- fields
SPECKLE_POOL = 8  # precomputed log-speckle fields per process


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field with blobs of about ``scale`` pixels."""
    lo = (max(2, int(math.ceil(shape[0] / scale)) + 2), max(2, int(math.ceil(shape[1] / scale)) + 2))
    a = rng.standard_normal(lo).astype(np.float32)
    a = _resize(a, shape)
    a -= a.mean()
    return a / (a.std() + 1e-6)


def _resize(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a 2-D array (cheap: two gathers per axis)."""
    out = a
    for axis, n in enumerate(shape):
        m = out.shape[axis]
        x = np.linspace(0, m - 1, n, dtype=np.float32)
        i0 = np.minimum(x.astype(np.int64), m - 2) if m > 1 else np.zeros(n, np.int64)
        f = (x - i0).astype(np.float32)
        a0 = np.take(out, i0, axis=axis)
        a1 = np.take(out, np.minimum(i0 + 1, m - 1), axis=axis)
        f = f[:, None] if axis == 0 else f[None, :]
        out = a0 + (a1 - a0) * f
    return out.astype(np.float32)


@functools.lru_cache(maxsize=2)
def _speckle_pool(seed: int, n: int) -> np.ndarray:
    """(SPECKLE_POOL, 2n, 2n) int16 log-compressed speckle in gray levels (std ~22, mean 0).

    Fully developed speckle: envelope of a complex Gaussian blurred by an anisotropic PSF (finer axially than
    laterally); 20 log10 of a Rayleigh envelope has a std of 5.6 dB, shown here with 4 gray levels per dB.
    """
    rng = np.random.default_rng([seed, 0x5BEC])
    sy, sx = 1.0 * n / 290, 1.8 * n / 290
    out = np.empty((SPECKLE_POOL, 2 * n, 2 * n), np.int16)
    for k in range(SPECKLE_POOL):
        re = rng.standard_normal((2 * n, 2 * n), dtype=np.float32)
        im = rng.standard_normal((2 * n, 2 * n), dtype=np.float32)
        for a in (re, im):
            a[...] = gaussian_filter1d(gaussian_filter1d(a, max(sy, 0.5), axis=0), max(sx, 0.6), axis=1)
        env2 = re * re + im * im
        db = 10.0 * np.log10(env2 / env2.mean() + 1e-6)
        db -= db.mean()
        out[k] = np.clip(np.round(db * 4.0), -127, 127)
    return out


# ---------------------------------------------------------------------------------------------- scene
@dataclass
class _Scene:
    """One nodule's tissue canvas (larger than the frame by ``pad`` for motion) and its nodule geometry."""

    size: int
    pad: int
    bg: np.ndarray  # (C, C) int16 mean echo level in gray units, tissue coordinates
    perf: np.ndarray  # (C, C) float32 CEUS parenchymal perfusion (0 where nothing enhances)
    artery: np.ndarray  # (C, C) float32 CEUS carotid lumen
    cy: int  # nodule centre in canvas pixels
    cx: int
    a0: float  # lateral semi-axis, pixels
    b0: float  # axial semi-axis, pixels
    px_per_cm: float


def _scene(spec: NoduleSpec, size: int, rng: np.random.Generator) -> _Scene:
    """Tissue layers of a transverse thyroid view with the nodule's lobe; echo levels in display gray."""
    pad = max(4, int(round(0.07 * size)))
    c = size + 2 * pad
    sx_cm, sy_cm, _ = spec.size_cm
    fov = max(4.0, 2.3 * max(sx_cm, sy_cm))  # the sonographer sets depth so the nodule fits
    ppc = size / fov
    y = (np.arange(c, dtype=np.float32) - pad)[:, None] / ppc  # depth in cm, frame coordinates
    xs = np.arange(c, dtype=np.float32)

    def curve(depth_cm: float, wob: float) -> np.ndarray:
        return depth_cm + wob * _smooth_noise(rng, (1, c), c / 3)[0] + 0.02 * math.sin(rng.uniform(0, 6))

    skin = curve(0.12, 0.01)
    fat = curve(0.35 + rng.uniform(-0.05, 0.15), 0.04)
    muscle = fat + 0.3 + rng.uniform(0.0, 0.2)
    thick = max(1.6, sy_cm + 0.6 + rng.uniform(0, 0.4))
    # The lobe is a lens: its surfaces curve towards each other laterally (x in cm from the lobe centre).
    width = size / ppc
    lobe = ((xs - pad) / ppc - width * rng.uniform(0.45, 0.6)) / (0.62 * width)
    thy_top = muscle + 0.05 + 0.35 * lobe**2
    thy_bot = muscle + 0.05 + thick - 0.8 * thick * lobe**4 + 0.15 * _smooth_noise(rng, (1, c), c / 2)[0]

    bg = np.full((c, c), 60.0, np.float32)  # deep tissue
    tex = _smooth_noise(rng, (c, c), 3.0 * size / 256)  # fine echotexture
    streak = _resize(_smooth_noise(rng, (c, max(4, c // 8)), 1.0), (c, c))  # muscle fibres: lateral streaks
    bg += 8.0 * tex
    thyroid = (y >= thy_top) & (y < thy_bot)
    musc = (y >= fat) & (y < muscle)
    bg = np.where(thyroid, 132.0 + 6.0 * tex, bg)
    bg = np.where(musc, 80.0 + 14.0 * streak, bg)
    bg = np.where((y >= skin) & (y < fat), 70.0 + 30.0 * np.maximum(streak - 0.8, 0), bg)  # fat with septa
    bg = np.where(y < skin, 180.0, bg)
    bg = np.where(y >= thy_bot + 0.05, 78.0 + 12.0 * streak, bg)  # longus colli / prevertebral
    bg = np.where(y >= thy_bot + 0.9, 50.0 + 10.0 * streak, bg)
    # Capsule: a bright line on both thyroid surfaces.
    lw = 0.03
    bg += 45.0 * np.exp(-(((y - thy_top) / lw) ** 2)) + 35.0 * np.exp(-(((y - thy_bot) / lw) ** 2))

    perf = np.where(thyroid, 1.0 + 0.15 * tex, np.where(musc, 0.3, 0.12)).astype(np.float32)
    # Trachea on the medial side (image right for the right lobe in a transverse view), carotid lateral.
    medial = {"Right lobe": 1, "Left lobe": -1, "Isthmus": 0}[spec.location]
    xx = (xs[None, :] - pad) / ppc  # lateral cm
    if medial == 0:
        # Isthmus: the nodule sits in the thin band of thyroid in front of the trachea.
        tx, ty = width / 2 + rng.uniform(-0.3, 0.3), float(thy_top.min()) + sy_cm + 0.6 + 0.9
    else:
        tx = width * (0.5 + medial * 0.62) + rng.uniform(-0.2, 0.2)
        ty = float(thy_top.mean()) + 1.0
    tr = 0.9
    dxt = xx - tx
    arc = ty - np.sqrt(np.maximum(tr * tr - dxt * dxt, 0.0))  # anterior tracheal wall
    over = np.abs(dxt) < tr
    below = over & (y > arc + 0.04)
    # Cartilage ring (hypoechoic), bright air-mucosa line, then reverberation bands fading into shadow.
    reverb = 55.0 * np.exp(-(y - arc) * 1.2) * (np.cos((y - arc) * 2 * math.pi / 0.22) > 0.5)
    bg = np.where(over & (y > arc - 0.18) & (y <= arc - 0.04), 45.0, bg)
    bg = np.where(over & (np.abs(y - arc) <= 0.04), 200.0, bg)
    bg = np.where(below, 15.0 + reverb, bg)
    perf = np.where(over & (y > arc - 0.18), 0.0, perf)
    artery = np.zeros((c, c), np.float32)
    if medial != 0:
        cxa = width * (0.5 - medial * 0.42) + rng.uniform(-0.2, 0.2)
        cya = float((thy_top.mean() + thy_bot.mean()) / 2)
        ra = 0.33 + rng.uniform(-0.05, 0.08)
        da = np.sqrt((xx - cxa) ** 2 + (y - cya) ** 2)
        enh = (np.abs(xx - cxa) < ra * 0.9) & (y > cya + ra)
        bg = np.where(enh, bg + 25.0, bg)  # posterior acoustic enhancement behind fluid
        bg = np.where(np.abs(da - ra) < 0.05, 175.0, np.where(da < ra, -60.0, bg))
        artery = (da < ra).astype(np.float32)
        perf = np.where(da < ra + 0.05, 0.0, perf)

    # Nodule geometry: somewhere laterally inside the lobe, inside the thyroid in depth.
    a0 = 0.5 * sx_cm * ppc
    b0 = 0.5 * sy_cm * ppc
    cx = int(round(pad + size * rng.uniform(0.38, 0.62) + (0 if medial else 0)))
    top = float(thy_top[cx])
    if spec.margin == "extrathyroidal":
        cyc = top + 0.6 * sy_cm / 2  # the nodule breaks through the capsule
    else:
        cyc = top + 0.2 + sy_cm / 2 + rng.uniform(0, 0.2)
    cy = int(round(pad + cyc * ppc))
    return _Scene(size, pad, np.round(bg).astype(np.int16), perf, artery, cy, cx, a0, b0, ppc)


def _gain(size: int, rng: np.random.Generator, fov_px_per_cm: float) -> np.ndarray:
    """(H, 1) int16 gain: depth attenuation not fully undone by the TGC sliders, plus slider ripple."""
    depth = np.arange(size, dtype=np.float32) / fov_px_per_cm
    knots = rng.normal(0.0, 4.0, 8).astype(np.float32)
    tgc = np.interp(np.linspace(0, 7, size), np.arange(8), knots).astype(np.float32)
    g = -rng.uniform(12.0, 28.0) * depth / depth[-1] + tgc + 10.0 * np.exp(-depth / 0.25) * rng.uniform(0, 1)
    return np.round(g).astype(np.int16)[:, None]


@dataclass
class _Motion:
    dy: np.ndarray  # (T,) int: tissue offset of each frame inside the canvas (0..2 pad)
    dx: np.ndarray
    z: np.ndarray  # (T,) sweep position in units of the nodule's semi-axis along the sweep
    tau: np.ndarray  # (T,) speckle decorrelation coordinate (one unit = fully new speckle)


def _motion(spec: NoduleSpec, scene: _Scene, rng: np.random.Generator, stationary: bool) -> _Motion:
    """Probe sweep, lateral drift and breathing, all as functions of the stored frame numbers (real time)."""
    fn = spec.frame_nums.astype(np.float64)
    t = len(fn)
    span = max(fn[-1] - fn[0], 1.0)
    p = (fn - fn[0]) / span
    period = rng.uniform(40.0, 75.0)  # frames per breath (~4 s at 10-20 fps)
    phase = rng.uniform(0, 2 * math.pi)
    amp = scene.pad * rng.uniform(0.15, 0.35)
    breath = np.sin(2 * math.pi * fn / period + phase)
    walk = np.cumsum(rng.standard_normal(t)) / math.sqrt(max(t, 1))
    walk = gaussian_filter1d(walk, 3.0) if t > 1 else walk
    drift = scene.pad * (0.25 if stationary else 0.55) * walk / max(np.abs(walk).max(), 1.0)
    dy = np.clip(np.round(scene.pad + amp * breath), 0, 2 * scene.pad).astype(int)
    dx = np.clip(np.round(scene.pad + drift + 0.3 * amp * breath), 0, 2 * scene.pad).astype(int)
    if stationary:
        z0 = rng.uniform(-0.25, 0.25)
        z = z0 + 0.04 * breath
        tau = 0.01 * (fn - fn[0]) + 0.05 * (breath + 1.0)
    else:
        za, zb = -rng.uniform(0.55, 1.35), rng.uniform(0.55, 1.35)
        if rng.random() < 0.5:
            za, zb = zb, za
        warp = p + 0.05 * np.sin(2 * math.pi * p * rng.uniform(1, 3) + rng.uniform(0, 6))  # uneven hand speed
        z = za + (zb - za) * warp + 0.03 * breath
        tau = np.abs(z - z[0]) / 0.3
    return _Motion(dy, dx, z, tau)


def _polar(a0: float, b0: float, ext: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Normalised radius and angle on a patch covering ``ext`` semi-axes around the centre."""
    hy, hx = int(math.ceil(ext * b0)) + 2, int(math.ceil(ext * a0)) + 2
    v = (np.arange(-hy, hy + 1, dtype=np.float32) / b0)[:, None]
    u = (np.arange(-hx, hx + 1, dtype=np.float32) / a0)[None, :]
    rho = np.sqrt(u * u + v * v)
    theta = np.arctan2(v, u)
    return rho, theta, np.broadcast_to(v, rho.shape), hy, hx


@dataclass
class _Nodule:
    """Per-nodule fields on a patch around the centre; per-frame work crops them to the current size."""

    rho: np.ndarray
    hy: int
    hx: int
    static: np.ndarray  # 1 + persistent lobulation (margin descriptor)
    static_max: float
    aspect: np.ndarray  # cos 2 theta: aspect-ratio change along the sweep (hidden)
    lobes: np.ndarray  # lobulation that appears mid-sweep (hidden)
    solid: np.ndarray  # absolute echo level of the solid part (gray)
    het1: np.ndarray  # heterogeneity blotches (hidden signal); two fields blended along the sweep
    het2: np.ndarray
    fluid1: np.ndarray | None
    fluid2: np.ndarray | None
    fluid_thr: float
    rim: np.ndarray | None  # angular weight of a rim calcification
    foci: list[tuple[float, float, float, float, float]]  # (v, u, z, radius px, kind 0 punctate / 1 macro)
    edge: float  # soft-margin width, normalised units
    halo: bool
    tilt: float  # lateral centre shift per unit z (oblique nodule axis), pixels
    ceus: np.ndarray  # CEUS enhancement map of the nodule (relative to its curve)
    ext: float


def _nodule(spec: NoduleSpec, scene: _Scene, rng: np.random.Generator, pattern: str | None) -> _Nodule:
    a0, b0 = scene.a0, scene.b0
    mr = {"lobulated": 0.16, "irregular": 0.14, "extrathyroidal": 0.16}.get(spec.margin, 0.0)
    g = spec.shape_change
    # Persistent lobulation (k = 3..6) and spiculation (k = 7..14): (k, amplitude, phase).
    harmonics = [(k, mr * rng.uniform(0.3, 1.0) / 2, rng.uniform(0, 6.3)) for k in (3, 4, 5, 6) if mr]
    if spec.margin in ("irregular", "extrathyroidal"):
        harmonics += [(k, 0.035 * rng.uniform(0.3, 1.0), rng.uniform(0, 6.3)) for k in range(7, 15)]
    edge_px = {"ill-defined": 0.3 * min(a0, b0)}.get(spec.margin, 1.5)
    # Patch large enough for the biggest boundary any frame can have (see _frame_nodule).
    ext = (
        1.0 + sum(a for _, a, _ in harmonics) + (SHAPE_ASPECT + SHAPE_LOBES) * g + edge_px / min(a0, b0) + 0.2
    )
    rho, theta, v, hy, hx = _polar(a0, b0, ext)
    static = np.ones_like(rho)
    for k, amp, ph in harmonics:
        static += amp * np.cos(k * theta + ph)
    aspect = np.cos(2 * theta + rng.uniform(-0.3, 0.3))
    lobes = np.zeros_like(rho)
    for k in (3, 4, 5):
        lobes += rng.uniform(0.5, 1.0) * np.cos(k * theta + rng.uniform(0, 6.3))
    lobes /= max(float(np.abs(lobes).max()), 1e-3)

    shape = rho.shape
    level = {"anechoic": -80.0, "hyperechoic": 160.0, "isoechoic": 134.0, "hypoechoic": 96.0,
             "very hypoechoic": 60.0}[spec.echogenicity]  # fmt: skip
    scale = max(3.0, 0.3 * min(a0, b0))
    h = spec.heterogeneity
    # Heterogeneity: coarse blotches inside the nodule (hidden signal), on top of a fine texture.
    solid = level + 5.0 * _smooth_noise(rng, shape, max(2.0, scale / 3))
    het1 = HETEROGENEITY_GRAY * h * _smooth_noise(rng, shape, scale)
    het2 = HETEROGENEITY_GRAY * h * _smooth_noise(rng, shape, scale)
    fluid1 = fluid2 = None
    thr = 0.0
    if spec.composition in ("mixed", "cystic", "spongiform"):
        fs = {"mixed": 0.35, "cystic": 0.5, "spongiform": 0.12}[spec.composition] * min(a0, b0)
        fluid1 = _smooth_noise(rng, shape, max(3.0, fs))
        fluid2 = _smooth_noise(rng, shape, max(3.0, fs))
        if spec.composition == "cystic":
            solid = np.full(shape, 120.0, np.float32) + 10.0 * _smooth_noise(rng, shape, 3.0)
            # Mostly fluid: a small solid part near one wall.
            bias = 1.6 * np.clip(1.0 - np.hypot(*np.broadcast_arrays(np.cos(theta) * rho - 0.6, v)), 0, 1)
            fluid1, fluid2 = -fluid1 * 0.3 + 1.2 - bias, -fluid2 * 0.3 + 1.2 - bias
            thr = 0.0
        elif spec.composition == "mixed":
            thr = rng.uniform(0.2, 0.8)  # 20-40 % fluid
        else:
            thr = -0.1  # spongiform: about half small cystic spaces
    rim = None
    if "rim" in spec.foci:
        th0 = rng.uniform(-math.pi, 0.0)  # anterior part of the wall
        rim = np.clip((np.cos(theta - th0) - math.cos(1.2)) / 0.15, 0, 1)
    foci = []
    for kind in spec.foci:
        if kind == "punctate":
            for _ in range(int(rng.integers(4, 12))):
                r, th = 0.75 * math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi)
                foci.append((r * math.sin(th), r * math.cos(th), rng.uniform(-0.8, 0.8), 1.0, 0.0))
        elif kind == "macro":
            for _ in range(int(rng.integers(1, 3))):
                r, th = 0.5 * math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi)
                foci.append((r * math.sin(th), r * math.cos(th), rng.uniform(-0.5, 0.5),
                             max(2.0, 0.15 * min(a0, b0)), 1.0))  # fmt: skip
        elif kind == "comet-tail":
            for _ in range(2):
                foci.append(
                    (rng.uniform(-0.8, -0.5), rng.uniform(-0.4, 0.4), rng.uniform(-0.6, 0.6), 1.0, 2.0)
                )
    halo = (
        spec.margin == "smooth" and spec.echogenicity in ("isoechoic", "hyperechoic") and rng.random() < 0.7
    )

    ceus = np.ones(shape, np.float32)
    if pattern == "ring":
        ceus = np.where(rho > 0.72, 1.3, 0.35).astype(np.float32)
    elif pattern == "heterogeneous":
        ceus = np.clip(0.65 + 0.55 * _smooth_noise(rng, shape, scale), 0.05, 1.4).astype(np.float32)
    elif pattern == "hypo":
        ceus = np.full(shape, 0.45, np.float32) + 0.08 * _smooth_noise(rng, shape, scale)
    elif pattern == "homogeneous":
        ceus = np.full(shape, 1.15, np.float32) + 0.05 * _smooth_noise(rng, shape, scale)
    if fluid1 is not None:
        ceus = np.where(fluid1 > thr + 0.1, 0.0, ceus).astype(np.float32)  # fluid never enhances
    return _Nodule(
        rho=rho, hy=hy, hx=hx, static=static.astype(np.float32), static_max=float(static.max()),
        aspect=aspect.astype(np.float32),
        lobes=lobes.astype(np.float32), solid=solid.astype(np.float32), het1=het1, het2=het2,
        fluid1=fluid1, fluid2=fluid2, fluid_thr=thr, rim=rim, foci=foci, edge=edge_px / min(a0, b0),
        halo=halo, tilt=rng.uniform(-0.25, 0.25) * a0, ceus=ceus, ext=ext,
    )  # fmt: skip


@dataclass
class _FrameNodule:
    """The nodule in one frame: a box in frame coordinates and fields on it."""

    y0: int
    x0: int
    inside: np.ndarray  # bool
    weight: np.ndarray  # float32 soft membership (edge blur)
    delta: np.ndarray  # float32 echo change to add to the background (gray)
    ceus: np.ndarray  # float32 CEUS enhancement map
    post: np.ndarray | None  # (w,) float32 posterior enhancement (+) / shadow (-) below the box


def _frame_nodule(
    nod: _Nodule, scene: _Scene, mot: _Motion, t: int, frame_bg: np.ndarray, g: float, zg: float
) -> _FrameNodule | None:
    """Cross-section of the ellipsoid at sweep position z_t, or None when the plane misses the nodule."""
    z = float(mot.z[t])
    s = math.sqrt(max(0.0, 1.0 - z * z))
    if s <= 0.0:
        return None
    a_t = g * SHAPE_ASPECT * math.tanh((z - zg) / 0.35)  # aspect turns across the sweep
    b_t = g * SHAPE_LOBES * math.exp(-(((z - zg) / 0.3) ** 2))  # lobulation only mid-sweep
    r = s * (nod.static_max + abs(a_t) + b_t) + nod.edge + 0.08
    ry = min(nod.hy, int(math.ceil(r * scene.b0)) + 2)
    rx = min(nod.hx, int(math.ceil(r * scene.a0)) + 2)
    # Patch centre in frame coordinates (the nodule moves with the tissue; oblique axis shifts it with z).
    fy = scene.cy - int(mot.dy[t])
    fx = scene.cx + int(round(nod.tilt * z)) - int(mot.dx[t])
    y0, y1 = max(fy - ry, 0), min(fy + ry + 1, scene.size)
    x0, x1 = max(fx - rx, 0), min(fx + rx + 1, scene.size)
    if y0 >= y1 or x0 >= x1:
        return None
    py = slice(nod.hy + y0 - fy, nod.hy + y1 - fy)
    px = slice(nod.hx + x0 - fx, nod.hx + x1 - fx)
    rho = nod.rho[py, px]
    bound = nod.static[py, px] + a_t * nod.aspect[py, px] + b_t * nod.lobes[py, px]
    bound *= s
    d = bound - rho
    inside = d > 0
    w = np.clip(0.5 + d / nod.edge, 0.0, 1.0)
    phi = (z + 1.0) * math.pi / 4  # internal structure morphs through the nodule
    cz, sz = math.cos(phi), math.sin(phi)
    level = nod.solid[py, px] + cz * nod.het1[py, px]
    level += sz * nod.het2[py, px]
    post = enh = None
    if nod.fluid1 is not None:
        fl = cz * nod.fluid1[py, px] + sz * nod.fluid2[py, px]
        fluid = np.clip((fl - nod.fluid_thr) / 0.12, 0.0, 1.0)
        fluid *= w
        level += fluid * (-90.0 - level)
        # Posterior acoustic enhancement, growing with the fluid path length above each pixel.
        gain = 25.0 / (0.1 * scene.size)
        post = np.minimum(fluid.sum(axis=0) * gain, 30.0)
        enh = np.minimum(np.cumsum(fluid, axis=0) * gain, 30.0)
    delta = w * (level - frame_bg[y0:y1, x0:x1])
    if enh is not None:
        delta += enh * (1.0 - w)
    if nod.halo:
        delta += -45.0 * np.clip(1.0 - np.abs(d + 0.06) / 0.05, 0.0, 1.0)
    bright = shade = None
    if nod.rim is not None:  # eggshell calcification: a bright arc on the wall, shadowing what lies behind
        shade = nod.rim[py, px] * np.clip(1.0 - np.abs(d) / 0.1, 0.0, 1.0)
        delta += 140.0 * shade
    for v, u, zf, rad, kind in nod.foci:
        if abs(z - zf) > (0.12 if kind == 0 else 0.3):
            continue
        cyf, cxf = fy + v * scene.b0 - y0, fx + u * scene.a0 - x0
        yy = np.arange(y1 - y0, dtype=np.float32)[:, None] - cyf
        xx = np.arange(x1 - x0, dtype=np.float32)[None, :] - cxf
        rr = (s if kind == 1 else 1.0) * rad
        blob = np.exp(-(yy * yy + xx * xx) / (2 * rr * rr)).astype(np.float32)
        if kind == 2:  # comet tail: a short bright reverberation tail below the focus
            blob = np.maximum(blob, np.exp(-xx * xx / 2) * (yy > 0) * np.exp(-np.maximum(yy, 0) / 4))
        bright = blob if bright is None else np.maximum(bright, blob)
        if kind == 1:
            shade = blob if shade is None else np.maximum(shade, blob)
    if bright is not None:
        delta += 140.0 * bright * inside
    if shade is not None:  # acoustic shadow behind macro / rim calcification
        delta -= 70.0 * (np.maximum.accumulate(shade, axis=0) - shade)
        col = -70.0 * shade.max(axis=0)
        post = col if post is None else post + col
    return _FrameNodule(y0, x0, inside, w, delta, nod.ceus[py, px], post)


# ---------------------------------------------------------------------------------------------- rendering
def _speckle(pool: np.ndarray, rng: np.random.Generator, c: int, n: int) -> list[np.ndarray]:
    """n speckle fields of size (c, c): random crops and flips of pool fields."""
    out = []
    for _ in range(n):
        k = int(rng.integers(len(pool)))
        oy, ox = (int(v) for v in rng.integers(0, pool.shape[1] - c + 1, 2))
        f = pool[k, oy : oy + c, ox : ox + c]
        if rng.random() < 0.5:
            f = f[:, ::-1]
        out.append(f)
    return out


def sweep_positions(spec: NoduleSpec, size: int = 256, stationary: bool = False) -> np.ndarray:
    """Sweep position of each frame of ``render_cine(spec, size)``, in units of the nodule's semi-axis along
    the sweep: frames with ``|z| >= 1`` miss the nodule (empty mask)."""
    rng = np.random.default_rng(spec.seed)
    scene = _scene(spec, size, rng)
    return _motion(spec, scene, rng, stationary).z


def render_cine(spec: NoduleSpec, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """B-mode sweep through one nodule: image (T, H, W) uint8 and mask (T, H, W) uint8 in {0, 255}."""
    img, mask, _ = _render(spec, size, stationary=False, pattern=None, ceus_curve=None)
    return img, mask


def _render(
    spec: NoduleSpec,
    size: int,
    *,
    stationary: bool,
    pattern: str | None,
    ceus_curve: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]] | None,
):
    rng = np.random.default_rng(spec.seed)
    scene = _scene(spec, size, rng)
    mot = _motion(spec, scene, rng, stationary)
    nod = _nodule(spec, scene, rng, pattern)
    gain = _gain(size, rng, scene.px_per_cm)
    c = scene.bg.shape[0]
    pool = _speckle_pool(spec.pool_seed, c)
    n_fields = int(math.floor(float(mot.tau.max()))) + 2
    fields = _speckle(pool, rng, c, n_fields)
    zg = rng.uniform(-0.35, 0.35)
    t_n = len(spec.frame_nums)
    img = np.empty((t_n, size, size), np.int16)
    mask = np.zeros((t_n, size, size), np.uint8)
    tmp = np.empty((size, size), np.int16)
    ceus = None
    if ceus_curve is not None:
        ceus = np.empty((t_n, size, size), np.float32)
        par_c, nod_c, art_c = ceus_curve(np.arange(t_n) / max(t_n - 1, 1))
        ceus_fields = _speckle(pool, rng, c, t_n)
    for t in range(t_n):
        sl = (slice(int(mot.dy[t]), int(mot.dy[t]) + size), slice(int(mot.dx[t]), int(mot.dx[t]) + size))
        f = img[t]
        np.add(scene.bg[sl], gain, out=f)
        fn = _frame_nodule(nod, scene, mot, t, f, spec.shape_change, zg)
        if fn is not None:
            h, w = fn.inside.shape
            box = (slice(fn.y0, fn.y0 + h), slice(fn.x0, fn.x0 + w))
            np.add(f[box], fn.delta, out=f[box], casting="unsafe")
            mask[t][box][fn.inside] = 255
            if fn.post is not None:
                below = f[fn.y0 + h :, fn.x0 : fn.x0 + w]
                fade = np.exp(-np.arange(below.shape[0], dtype=np.float32) / (0.6 * size))[:, None]
                np.add(below, fn.post[None, :] * fade, out=below, casting="unsafe")
        # Speckle: chain of fields, each cross-faded into the next (cos/sin keeps the variance constant).
        i = int(math.floor(float(mot.tau[t])))
        ph = (float(mot.tau[t]) - i) * math.pi / 2
        ca, sa = int(round(128 * math.cos(ph))), int(round(128 * math.sin(ph)))
        np.multiply(fields[i][sl], ca, out=tmp)
        np.right_shift(tmp, 7, out=tmp)
        f += tmp
        if sa:
            np.multiply(fields[i + 1][sl], sa, out=tmp)
            np.right_shift(tmp, 7, out=tmp)
            f += tmp
        if ceus is not None:
            e = ceus[t]
            np.multiply(scene.perf[sl], par_c[t], out=e)
            e += scene.artery[sl] * art_c[t]
            if fn is not None:
                eb = e[box]
                eb += fn.weight * (fn.ceus * nod_c[t] - eb)
    np.clip(img, 0, 255, out=img)
    image = img.astype(np.uint8)
    if ceus is None:
        return image, mask, None
    # CEUS display: tissue mostly cancelled (low mechanical index), compressed (square root) bubble signal
    # whose speckle changes every frame (bubbles flow), plus a faint B-mode leak-through.
    e = 180.0 * np.sqrt(ceus)
    for t in range(t_n):
        sl = (slice(int(mot.dy[t]), int(mot.dy[t]) + size), slice(int(mot.dx[t]), int(mot.dx[t]) + size))
        e[t] += np.minimum(e[t], 50.0) / 50.0 * ceus_fields[t][sl]
    e += 0.1 * img
    return image, mask, np.clip(e, 0, 255).astype(np.uint8)


def gamma_variate(t: np.ndarray, t0: float, tp: float, alpha: float) -> np.ndarray:
    """Time-intensity curve ``((t - t0)/tp)^alpha exp(alpha (1 - (t - t0)/tp))``: 0 before arrival t0, peak 1
    at ``t0 + tp``, wash-out faster for larger alpha (the usual CEUS bolus model)."""
    x = np.clip((t - t0) / tp, 0.0, None)
    with np.errstate(divide="ignore"):
        return np.where(x > 0, x**alpha * np.exp(alpha * (1.0 - x)), 0.0)


def render_paired(case: CaseSpec, size: int = 128) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BUS (T, H, W) uint8, CEUS (T, H, W) uint8 and BUS mask (T, H, W) uint8 in {0, 1}, frame-aligned."""
    rng = np.random.default_rng([case.nodule.seed, 0xCE])
    t0 = rng.uniform(0.06, 0.1)
    par_tp = rng.uniform(0.18, 0.26)
    art_tp = 0.08

    def curves(t: np.ndarray):
        par = 0.9 * gamma_variate(t, t0, par_tp, 1.6)
        nod = gamma_variate(t, t0 + 0.02, case.ttp - 0.02, case.washout)
        art = 1.5 * gamma_variate(t, t0 - 0.03, art_tp, 1.3)
        return par, nod, art

    bus, mask, ceus = _render(case.nodule, size, stationary=True, pattern=case.pattern, ceus_curve=curves)
    return bus, ceus, (mask > 0).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- ownership
# Written into every folder synth generates.  Its presence is how a rerun knows the folder is its own earlier
# output and may be replaced; any other non-empty folder is the user's and is refused (DataError) unless the
# caller says ``overwrite``.  JSON with the layout, version and generator arguments, so a person who finds it
# knows what made the folder.
MARKER = ".usnodule-synth"
# What synth wrote before it wrote the marker, with the truth.csv header only the generator writes: recognised
# as its own too, so `make data` still regenerates a data/synth made by an older version.
_LEGACY = {
    "stanford": ({"dataset.hdf5", "metadata.csv", "truth.csv"}, TRUTH_COLUMNS),
    "paired": ({"manifest.csv", "truth.csv", "bus", "ceus", "bus_mask"}, PAIRED_TRUTH_COLUMNS),
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("usnodule")
    except PackageNotFoundError:
        return "unknown"


def _write_marker(folder: Path, layout: str, **params) -> None:
    doc = {"written_by": "usnodule synth", "version": _version(), "layout": layout, "params": params}
    (folder / MARKER).write_text(json.dumps(doc, indent=1, default=str) + "\n")


def _synth_wrote(folder: Path, layout: str) -> bool:
    """Whether ``folder`` is synth's own output: it has the marker, or it is exactly an older synth output
    (the same names and the generator's truth.csv header)."""
    if (folder / MARKER).is_file():
        return True
    names, columns = _LEGACY[layout]
    try:
        with open(folder / "truth.csv", newline="") as fh:
            header = fh.readline().strip()
    except OSError:
        return False
    return {p.name for p in folder.iterdir()} == names and header == ",".join(columns)


def check_target(out_dir: str | os.PathLike, layout: str, overwrite: bool = False) -> None:
    """Raise :class:`DataError` unless synth may write the ``layout`` folder ``out_dir``: it is missing, empty,
    synth's own earlier output (:func:`_synth_wrote`), or ``overwrite`` is set.

    Writing replaces the whole folder, so without this check ``usnodule synth --out DIR`` deleted whatever a
    user kept in ``DIR/stanford`` or ``DIR/paired``.  Refusing is the default because the loss cannot be
    undone and the fix (another ``--out``, or ``--overwrite``) is one flag away.  A path that is a file or a
    symlink is refused even with ``overwrite``: a folder cannot be renamed onto it, and following the link
    would replace a folder somewhere else.
    """
    out_dir = Path(out_dir)
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise DataError(
            out_dir, "exists and is not a folder; synth writes a folder there, pick another --out"
        )
    if overwrite or not out_dir.exists() or not any(out_dir.iterdir()) or _synth_wrote(out_dir, layout):
        return
    raise DataError(
        out_dir,
        f"not empty and not written by `usnodule synth` (no {MARKER}); refusing to replace it: "
        "move your files away, pick another --out, or pass --overwrite",
    )


# ---------------------------------------------------------------------------------------------- writers
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
    the generator's ``truth.csv`` beside them (module docstring; no reader opens it).

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
    Also ``truth.csv`` (module docstring; no reader opens it) and the :data:`MARKER`.  Written atomically; an
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
) -> Path:
    """Both layouts: ``out_dir/stanford`` (Stanford cine clips) and ``out_dir/paired`` (BUS/CEUS).

    ``prevalence`` None keeps each layout's default (0.09 like Stanford, 0.45 like the AsyCMST thyroid set);
    a number sets both (``paired_prevalence`` overrides it for the paired set).  Paired clips default to
    min(frames, 32) frames of min(size, 128) pixels.  Each
    sub-directory is written atomically (a failure leaves no half directory).  Both targets are checked
    (:func:`check_target`) before either is written, so a refusal touches nothing; ``overwrite`` replaces
    folders synth did not write.
    """
    out_dir = Path(out_dir)
    for layout in ("stanford", "paired"):
        check_target(out_dir / layout, layout, overwrite)
    cb = (lambda name: lambda d, n: progress(name, d, n)) if progress else (lambda name: None)
    synthesize_stanford(out_dir / "stanford", n_nodules=n_nodules, frames=frames, size=size,
                        prevalence=0.09 if prevalence is None else prevalence, seed=seed, workers=workers,
                        progress=cb("stanford"), label_noise=label_noise, overwrite=overwrite)  # fmt: skip
    synthesize_paired(out_dir / "paired", n_cases=n_cases, frames=paired_frames or min(frames, 32),
                      size=paired_size or min(size, 128),
                      prevalence=next(q for q in (paired_prevalence, prevalence, 0.45) if q is not None),
                      seed=seed, progress=cb("paired"), label_noise=label_noise, overwrite=overwrite)  # fmt: skip
    return out_dir


# ---------------------------------------------------------------------------------------------- preview
def _tile(img: np.ndarray, mask: np.ndarray | None, px: int, color: tuple[int, int, int]) -> np.ndarray:
    """(px, px, 3) uint8 tile: the frame (nearest-neighbour resized) with the mask outline drawn in."""
    iy = np.arange(px) * img.shape[0] // px
    ix = np.arange(px) * img.shape[1] // px
    g = img[iy][:, ix]
    out = np.repeat(g[:, :, None], 3, axis=2)
    if mask is not None:
        m = mask[iy][:, ix] > 0
        inner = m.copy()
        inner[1:-1, 1:-1] = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
        out[m & ~inner] = color
    return out


def preview(
    root: str | os.PathLike, png: str | os.PathLike | None = None, *, n_clips: int = 4, n_frames: int = 6
) -> Path:
    """Contact sheet of what ``synthesize`` made: a few Stanford clips (frames across the sweep with the mask
    outline), paired BUS and CEUS frames, and CEUS time-intensity curves inside the mask (benign blue,
    malignant red).  One mosaic image rather than an axes per frame keeps it fast."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(root)
    png = Path(png) if png is not None else root / "preview.png"
    px, gap = 128, 4
    rows: list[tuple[str, list[np.ndarray]]] = []  # (title, tiles)
    h5 = root / "stanford" / "dataset.hdf5"
    if h5.exists():
        with open(root / "stanford" / "metadata.csv", newline="") as fh:
            meta = {r["annot_id"]: r for r in csv.DictReader(fh)}
        with h5py.File(h5, "r") as f:
            ids = f["annot_id"][:]
            fns = np.array([int(v) for v in f["frame_num"][:]])
            uniq = sorted({v.decode() for v in ids}, key=lambda a: (meta[a]["histopath_diagnosis"] != "1", a))
            chosen = uniq[:1] + uniq[1:][-(n_clips - 1) :] if n_clips > 1 else uniq[:1]
            for a in chosen:
                r = np.flatnonzero(ids == a.encode())
                r = r[np.argsort(fns[r])]
                pick = r[np.linspace(0, len(r) - 1, min(n_frames, len(r))).round().astype(int)]
                m = meta[a]
                lab = "malignant" if m["histopath_diagnosis"] == "1" else "benign"
                tiles = [_tile(f["image"][i], f["mask"][i], px, (0, 255, 0)) for i in pick]
                rows.append((f"Stanford layout {a}: {lab}, {m['ti-rads_level'] or 'TR?'}", tiles))
    curves = []
    man = root / "paired" / "manifest.csv"
    if man.exists():
        with open(man, newline="") as fh:
            cases = list(csv.DictReader(fh))[:12]
        for j, r in enumerate(cases):
            ceus, mk = np.load(man.parent / r["ceus"]), np.load(man.parent / r["bus_mask"])
            curves.append((r["label"] == "1", (ceus * mk).sum((1, 2)) / np.maximum(mk.sum((1, 2)), 1)))
            if j < 2:
                bus = np.load(man.parent / r["bus"])
                pick = np.linspace(0, len(bus) - 1, min(n_frames, len(bus))).round().astype(int)
                lab = "malignant" if r["label"] == "1" else "benign"
                green, yellow = (0, 255, 0), (255, 220, 0)
                name = f"paired {r['case_id']}"
                rows.append((f"{name} BUS ({lab})", [_tile(bus[i], mk[i], px, green) for i in pick]))
                rows.append((f"{name} CEUS", [_tile(ceus[i], mk[i], px, yellow) for i in pick]))
    if not rows:
        raise FileNotFoundError(f"{root}: nothing synthesized there")
    row_h = px + gap + 14  # room for a title above each row
    sheet = np.full((len(rows) * row_h, n_frames * (px + gap), 3), 255, np.uint8)
    for k, (_, tiles) in enumerate(rows):
        for j, tile in enumerate(tiles):
            y, x = k * row_h + 14, j * (px + gap)
            sheet[y : y + px, x : x + px] = tile
    h_in = sheet.shape[0] / 100 + (1.6 if curves else 0.0)
    fig = plt.figure(figsize=(sheet.shape[1] / 100, h_in), dpi=100)
    top = fig.add_axes((0, (1.6 / h_in) if curves else 0.0, 1, sheet.shape[0] / 100 / h_in))
    top.imshow(sheet, interpolation="nearest")
    top.axis("off")
    for k, (title, _) in enumerate(rows):
        top.text(2, k * row_h + 11, title, fontsize=7)
    if curves:
        ax = fig.add_axes((0.07, 0.25 / h_in, 0.9, 1.15 / h_in))
        for malignant, c in curves:
            ax.plot(c, color="tab:red" if malignant else "tab:blue", lw=0.8)
        ax.set_title("CEUS time-intensity in the nodule (red malignant, blue benign)", fontsize=7)
        ax.set_xlabel("frame", fontsize=6)
        ax.tick_params(labelsize=6)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return png


__all__ = [
    "CaseSpec", "MARKER", "NoduleSpec", "PAIRED_TRUTH_COLUMNS", "TRUTH_COLUMNS", "acr_level", "check_target", "gamma_variate",
    "plan_paired", "plan_stanford", "preview", "render_cine", "render_paired", "sweep_positions", "synthesize",
    "synthesize_paired", "synthesize_stanford", "tirads_points", "truth_rows",
]  # fmt: skip
