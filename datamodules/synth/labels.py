"""The label model: every nodule and paired case, drawn before any pixel (descriptors, hidden signals, label).

* Nodule descriptors that map one-to-one onto ACR TI-RADS points (``tirads.py``), demographics, frame numbers.
* Labels from a risk model of those descriptors plus two signals metadata.csv does not carry: texture
  heterogeneity inside the nodule, and a shape change along the sweep (lobulation that appears mid-sweep and
  an aspect ratio that turns across frames; ``nodule.py`` draws both), so image + mask models can beat
  TI-RADS alone (STACT-Time Table 2 has TI-RADS at AUC 0.84 against 0.91 for image + segmentation).  Paired
  cases add the CEUS pattern, time-to-peak and wash-out, and one term of the pair: whether the CEUS perfusion
  defect lies under the B-mode hypoechoic focus (``concordance``; :func:`plan_paired` says why), with the
  paired set's own weights (``PAIRED_*``, ``CONCORDANCE_WEIGHT``).  Prevalence is set exactly by taking the
  top ``round(q n)`` of risk + logistic noise (same as solving for the logistic intercept).
* Ground truth beside the data: each layout folder also gets ``truth.csv`` (``stanford/truth.csv`` keyed by
  ``annot_id``, ``paired/truth.csv`` by ``case_id``; see :data:`TRUTH_COLUMNS`) with the clean risk (the
  log-odds before the logistic noise, up to the intercept that sets the prevalence), its two parts and the
  hidden signals.  ``tirads_risk`` is what the metadata carries: the TI-RADS descriptor points *and* the age
  term (age is a metadata.csv column, so a model of the metadata can learn it; paired cases: times
  ``PAIRED_TIRADS_SCALE``); ``hidden_risk`` is everything else: heterogeneity and shape change, and for paired
  cases the CEUS pattern, time-to-peak and wash-out terms and the concordance term (paired clips have no shape
  change; the column is 0; ``focus_angle``, ``defect_angle`` and ``concordance`` are their own columns).  ``risk = tirads_risk + hidden_risk`` (to
  rounding), ``label`` = the label in metadata.csv / manifest.csv.  No reader, training stage or datamodule
  opens truth.csv (the Stanford reader opens ``metadata.csv`` by name, the paired reader the manifest it is
  given); only ``usnodule report --truth`` reads it, for its reference rows (Bayes ceiling, TI-RADS oracle).
  On the demo's Stanford set (Makefile ``SYNTH_ARGS``, seed 0) the clean risk ranks the labels at AUROC
  0.97 (mean over 5 folds), ``tirads_risk`` alone 0.72 (paired set, pooled over its 5 test folds, seeds 0 / 1
  / 2: 0.969 / 0.970 / 0.970 and 0.752 / 0.762 / 0.727).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from scipy.special import ndtr, ndtri

from datamodules.synth.tirads import acr_level, tirads_points

# What the draws pick from (the TI-RADS descriptor vocabularies are the keys of the tables in tirads.py).
LOCATIONS = ("Right lobe", "Left lobe", "Isthmus")
CEUS_PATTERNS = ("homogeneous", "ring", "heterogeneous", "hypo")
# Generator ground truth (module docstring): no reader opens these files, only ``usnodule report --truth``.
TRUTH_COLUMNS = ("annot_id", "risk", "tirads_risk", "hidden_risk", "heterogeneity", "shape_change", "label")
PAIRED_TRUTH_COLUMNS = ("case_id", "risk", "tirads_risk", "hidden_risk", "heterogeneity", "shape_change",
                        "pattern", "ttp", "washout", "focus_angle", "defect_angle", "concordance",
                        "label")  # fmt: skip

# Risk model (log-odds, before the intercept that sets the prevalence).  Metadata part: weights of the TI-RADS
# points and of age; hidden part: weights of the image-only signals and, for paired cases, of CEUS.
POINT_WEIGHTS = {"composition": 0.6, "echogenicity": 0.7, "shape": 0.5, "margin": 0.65, "echogenicfoci": 0.4}
AGE_WEIGHT, AGE_CENTER = -0.03, 56
# Per unit of heterogeneity and of shape change (was 4.5, then 7): the hidden part outweighs the metadata part
# (heterogeneity alone ranks the demo's labels at AUROC 0.84, the TI-RADS part at 0.72, seed 0) while the TI-RADS
# oracle stays >= 0.70, a real competitor.  At 7 the demo's image encoder reached 0.69-0.72 against a TI-RADS
# forest of 0.67: the learning demo's target (>= 0.80 and >= forest + 0.08) needs the image-only signals to carry
# more of the label than 240 training nodules let a small CNN recover (BENCHMARKS.md "Demo recipe, round 2").
HIDDEN_WEIGHT = 11.0
# The paired set's own weights (labels of paired cases only; the Stanford and still sets never read them).  With
# the Stanford set's weights (TI-RADS part x 1, heterogeneity 11) the paired TI-RADS oracle was 0.702 / 0.701 /
# 0.678 on the demo's seeds 0 / 1 / 2, under the 0.70 the learning demo keeps the TI-RADS forest at:
# heterogeneity and the CEUS terms left the metadata too little of the label.  Lowering them instead (paired
# heterogeneity 5, CEUS weights halved: oracle 0.75 / 0.75 / 0.73) took AsyCMST to 0.756 pooled on seed 0,
# under its 0.80 target: at 32 px the model reads heterogeneity and CEUS far better than the TI-RADS
# descriptors.  So the metadata part is scaled up (the same as lowering every other term *and* the logistic
# noise by 1.7) and the hidden weights stay: oracle 0.752 / 0.762 / 0.727, ceiling 0.969 / 0.970 / 0.970 with
# the concordance term below.  Chosen on the plans alone (the oracle is a property of the draw, no model and no
# test fold decided it) and one AsyCMST run on seed 0; BENCHMARKS.md "Paired set, round 5".
PAIRED_TIRADS_SCALE = 1.7
PAIRED_HIDDEN_WEIGHT = 11.0
CEUS_PATTERN_WEIGHT = {"homogeneous": 0.0, "ring": -1.5, "heterogeneous": 1.5, "hypo": 1.5}
TTP_WEIGHT, TTP_CENTER = -14.0, 0.32
WASHOUT_WEIGHT, WASHOUT_CENTER = 1.4, 2.2
# Cross-modal concordance (paired cases): every paired nodule has one markedly hypoechoic focus in B-mode and one
# perfusion defect in CEUS, each at its own angle around the nodule's centre (``nodule.py`` draws both).  Either
# alone says nothing: both are always there, their angles uniform.  The risk rises when the defect lies under the
# focus (concordance 1) and not when it lies on the far side (0): not a sum of a B-mode and a CEUS feature, but
# the spatial correspondence AsyCMST's asymmetric attention is built for (BUS tokens query the CEUS tokens at
# their own position, CEUS tokens the BUS tokens of their frame; see :func:`plan_paired`).  Not hidden from a
# single stream altogether: the CEUS display's faint B-mode leak-through (``bmode.py``) shows the focus too, so a
# CEUS stream can learn it alone, more slowly (BENCHMARKS.md "Paired set, round 5").  Weight 3 of a binary-like
# term: alone it ranks the labels at AUROC 0.59-0.63 (heterogeneity 0.84-0.85), the ceiling without it 0.95.
CONCORDANCE_WEIGHT = 3.0
CONCORDANT_SHARE = 0.5  # share of cases whose defect lies under the focus
ANGLE_SPREAD = 0.35  # radians: std of the defect's angle around the focus (or around the opposite side)


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
    # Set by the still-image set (``stills.py``) only; the cine and paired plans keep these defaults, so their
    # bytes do not change.  ``halo``: None lets ``nodule.py`` draw it (70% of smooth iso/hyperechoic nodules),
    # True/False is a drawn descriptor.  ``still``: one frame through the nodule's centre, every echogenic
    # focus in that plane (``bmode.render_still``).
    halo: bool | None = None
    still: bool = False

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
    focus_angle: float = 0.0  # B-mode hypoechoic focus: angle around the nodule centre (radians, image axes)
    defect_angle: float = math.pi  # CEUS perfusion defect: its angle, same axes

    @property
    def patient_id(self) -> str:
        return self.nodule.patient_id

    @property
    def tirads_risk(self) -> float:
        """The part of the risk the metadata carries, at the paired set's scale (:data:`PAIRED_TIRADS_SCALE`)."""
        return PAIRED_TIRADS_SCALE * self.nodule.tirads_risk

    @property
    def concordance(self) -> float:
        """1 when the CEUS defect lies under the B-mode focus, 0 on the far side: ``(1 + cos(defect - focus))/2``."""
        return _concordance(self.focus_angle, self.defect_angle)

    @property
    def hidden_risk(self) -> float:
        """Risk from everything the manifest does not carry: heterogeneity, CEUS pattern and timing, and the
        concordance of the CEUS defect with the B-mode focus (paired weights)."""
        return _paired_hidden_risk(self.nodule.heterogeneity, self.pattern, self.ttp, self.washout,
                                   self.concordance)  # fmt: skip


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


def _concordance(focus_angle: float, defect_angle: float) -> float:
    return 0.5 * (1.0 + math.cos(defect_angle - focus_angle))


def _paired_hidden_risk(
    heterogeneity: float, pattern: str, ttp: float, washout: float, concordance: float
) -> float:
    """Risk part of a paired case the manifest does not carry (paired weights; no shape change in a still clip)."""
    return (PAIRED_HIDDEN_WEIGHT * heterogeneity + _ceus_risk(pattern, ttp, washout)
            + CONCORDANCE_WEIGHT * concordance)  # fmt: skip


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
    """Draw every paired case: B-mode descriptors, CEUS pattern and curve timing, focus and defect angles, label.

    The label model uses features visible in both modalities: B-mode descriptors and heterogeneity, CEUS
    pattern (heterogeneous / hypo-enhancement raise risk, ring lowers it), earlier peak and faster wash-out, each
    a feature of one modality, and one feature of the pair: whether the CEUS perfusion defect lies under the
    B-mode hypoechoic focus (:data:`CONCORDANCE_WEIGHT`).  Why that one, and why spatial: the sum of per-modality
    terms above is what late fusion (pool each stream, add) already carries, so on such a label AsyCMST with and
    without cross-modal attention tied (BENCHMARKS.md "AsyCMST demo recipe").  The paper's claim is that "BUS
    spatial cues guide CEUS temporal modeling toward lesion-relevant regions" (abstract, Fig. 1): its B->C
    attention lets a BUS token read the CEUS tokens at its own position, so "is the region dark in B-mode also
    unperfused?" is one attention step, while a model that pools each stream before adding them has to recover
    a product of the two angles from the pooled sums, or read both from the CEUS clip alone, where the focus shows
    only through the faint B-mode leak-through.  Clinically the focus stands for a suspicious solid part
    and the defect for necrosis or an infiltrative region; a defect elsewhere in the nodule (degeneration) does
    not add risk.  Angles: the focus uniform around the nodule, the defect at the focus (a share
    :data:`CONCORDANT_SHARE`) or opposite it, give or take :data:`ANGLE_SPREAD`; drawn after every other draw,
    independent of them and of the label's other terms.
    Default prevalence 0.45 is the AsyCMST thyroid set (1304 / 2910 malignant, Table 1).
    """
    _check_prevalence(prevalence)
    rng = np.random.default_rng([seed, 0xCE05])
    rows = _sample_nodules(rng, n_cases, seed + 1, "Q", "C{:04d}", np.full(n_cases, frames), frame_gaps=False)
    latent = rng.standard_normal(n_cases)
    pattern = rng.choice(4, size=n_cases, p=(0.35, 0.2, 0.25, 0.2))
    ttp = np.clip(0.32 - 0.06 * latent + 0.04 * rng.standard_normal(n_cases), 0.14, 0.5)
    washout = np.clip(2.2 + 0.6 * latent + 0.4 * rng.standard_normal(n_cases), 0.9, 4.5)
    focus = rng.uniform(0.0, 2 * math.pi, n_cases)
    away = np.where(rng.random(n_cases) < CONCORDANT_SHARE, 0.0, math.pi)
    defect = np.mod(focus + away + ANGLE_SPREAD * rng.standard_normal(n_cases), 2 * math.pi)
    risk = np.array(
        [
            PAIRED_TIRADS_SCALE * _metadata_risk(_descriptor_points(d), d["age"])
            + _paired_hidden_risk(d["heterogeneity"], CEUS_PATTERNS[p], t, a, _concordance(f, g))
            for d, p, t, a, f, g in zip(rows, pattern, ttp, washout, focus, defect, strict=True)
        ]
    )
    label, noisy = _top_q(rng, risk, prevalence, label_noise)
    return [
        CaseSpec(case_id=d["annot_id"],
                 nodule=NoduleSpec(**{**d, "shape_change": 0.0}, risk=float(r), noisy_risk=float(v),
                                   label=int(y)),
                 pattern=CEUS_PATTERNS[p], ttp=float(t), washout=float(a), label=int(y), focus_angle=float(f),
                 defect_angle=float(g))
        for d, p, t, a, f, g, r, v, y in zip(rows, pattern, ttp, washout, focus, defect, risk, noisy, label,
                                             strict=True)
    ]  # fmt: skip


def truth_rows(specs: list[NoduleSpec] | list[CaseSpec]) -> list[dict[str, str]]:
    """The ``truth.csv`` rows of Stanford nodules or paired cases (columns :data:`TRUTH_COLUMNS` /
    :data:`PAIRED_TRUTH_COLUMNS`; numbers with 6 decimals)."""
    rows = []
    for s in specs:
        n = s.nodule if isinstance(s, CaseSpec) else s
        row = {"risk": n.risk, "tirads_risk": s.tirads_risk, "hidden_risk": s.hidden_risk,
               "heterogeneity": n.heterogeneity, "shape_change": n.shape_change}  # fmt: skip
        if isinstance(s, CaseSpec):
            row.update(ttp=s.ttp, washout=s.washout, focus_angle=s.focus_angle, defect_angle=s.defect_angle,
                       concordance=s.concordance)  # fmt: skip
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
