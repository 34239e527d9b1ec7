"""The still-image label model: carcinoma subtype first, then descriptors from subtype-conditional tables.

The CSASN set (``stills.py`` writes it): benign, papillary (PTC), follicular (FTC) and medullary (MTC)
carcinoma, the rare ones rare (FTC and MTC :data:`RARE_SHARE` each of all nodules, PTC the rest of the malignant
share).  Counts per subtype are exact (largest remainder of ``share * n``), the order random.  Each nodule's
descriptors are then drawn from the tables below, *given its subtype*: the TI-RADS descriptors (composition,
echogenicity, margin, echogenic foci, taller-than-wide; ``tirads.py`` vocabulary) and cues the TI-RADS points do
not carry but the image shows (a halo, size, roundness, texture heterogeneity).  The CSASN summary is silent on
appearance; each table row says which cue it encodes, from the usual reviews of thyroid carcinoma sonography
("literature": PTC hypoechoic with microcalcifications, irregular margin, taller-than-wide; FTC solid,
iso/hypoechoic, smooth, often a halo, larger, hard to tell from a follicular adenoma; MTC hypoechoic, solid,
coarse calcifications, round to oval).  Numbers are chosen, not measured: the cue directions follow the
literature, the sizes of the effects are set so that TI-RADS alone is a real competitor and the image cues add.

**Ceiling.**  Because every table is known, the generator's exact class posterior is computable:
``P(subtype | everything drawn)`` = prior x the product of the descriptor likelihoods (the draws below are
independent given the subtype, except where composition forces echogenicity and margin; :func:`log_joint`
mirrors :func:`plan_stills` term by term).  ``truth.csv`` carries it per case (``p_benign``, ``p_PTC``,
``p_FTC``, ``p_MTC``) and, for malignant vs benign, its log-odds ``risk = log P(malignant | .) / P(benign | .)``
(the "Bayes ceiling" row of ``usnodule report --truth``).  ``tirads_risk`` and ``tirads_p_*`` are the same
posterior given the TI-RADS descriptors alone (composition, echogenicity, margin, foci, taller-than-wide as a
yes/no; the "TI-RADS oracle" row), ``hidden_risk = risk - tirads_risk``.  For the multi-class case the ceiling
is this posterior: its argmax is the Bayes classifier (lowest expected error), argmax of ``p_s / share_s`` the
best rule for balanced accuracy, its per-class columns score the one-vs-rest AUROCs, and no model of the pixels can do better in expectation, since the image is rendered from
exactly these draws plus noise that does not depend on the subtype.  It is an upper bound, not a promise: the
image blurs some cues (speckle hides a faint halo, the depth scale is not drawn so absolute size shows only for
small nodules), so a perfect model of the pixels sits somewhat below it.
"""

from __future__ import annotations

import bisect
import itertools
import math

import numpy as np
from scipy.special import betaln, ndtr

from datamodules.synth.labels import LOCATIONS, NoduleSpec, _patients
from datamodules.synth.tirads import acr_level, tirads_points

SUBTYPES = ("benign", "PTC", "FTC", "MTC")
MALIGNANT = SUBTYPES[1:]
RARE_SHARE = 0.05  # FTC and MTC each, of all nodules (the request; FTC ~10-15% and MTC 1-2% of carcinomas)
DEFAULT_MALIGNANT = 0.4  # malignant share of the demo set (all three carcinomas together)

# --------------------------------------------------------------------------------------------- the tables
# Composition: cystic, spongiform, mixed, solid.
COMPOSITIONS = ("cystic", "spongiform", "mixed", "solid")
COMPOSITION_TABLE = {
    "benign": (0.05, 0.07, 0.25, 0.63),  # cystic and spongiform nodules are almost always benign (ACR 2017)
    "PTC": (0.005, 0.005, 0.07, 0.92),  # PTC: solid in ~90% (literature)
    "FTC": (0.005, 0.005, 0.12, 0.87),  # FTC: solid, sometimes with cystic change (literature)
    "MTC": (0.005, 0.005, 0.05, 0.94),  # MTC: solid (literature)
}
# Echogenicity of a solid or mixed nodule (cystic -> anechoic, spongiform -> isoechoic, as in labels.py).
ECHOES = ("hyperechoic", "isoechoic", "hypoechoic", "very hypoechoic")
ECHO_TABLE = {
    "benign": (0.10, 0.50, 0.35, 0.05),  # benign: mostly iso/hyperechoic (literature)
    "PTC": (0.03, 0.20, 0.55, 0.22),  # PTC: hypoechoic, often markedly (literature)
    "FTC": (0.08, 0.50, 0.38, 0.04),  # FTC: iso- or hypoechoic, close to a follicular adenoma (literature)
    "MTC": (0.03, 0.20, 0.62, 0.15),  # MTC: hypoechoic (literature)
}
# Margin of a solid or mixed nodule (cystic and spongiform nodules are smooth).
MARGINS = ("smooth", "ill-defined", "lobulated", "irregular", "extrathyroidal")
MARGIN_TABLE = {
    "benign": (0.70, 0.18, 0.07, 0.045, 0.005),  # benign: smooth, circumscribed (literature)
    "PTC": (
        0.40,
        0.17,
        0.20,
        0.18,
        0.05,
    ),  # PTC: irregular / lobulated, extension beyond the capsule (literature)
    "FTC": (0.795, 0.12, 0.05, 0.03, 0.005),  # FTC: smooth, well defined (literature)
    "MTC": (0.55, 0.17, 0.14, 0.12, 0.02),  # MTC: circumscribed or irregular, about half each (literature)
}
# Echogenic foci of a solid or mixed nodule: independent yes/no per kind (they can co-occur; ACR sums them).
FOCI_TABLE = {  # punctate (microcalcifications), macro (coarse), rim (peripheral)
    "benign": (0.07, 0.10, 0.04),  # benign: foci uncommon (literature)
    "PTC": (
        0.40,
        0.12,
        0.03,
    ),  # PTC: microcalcifications (psammoma bodies), the most specific cue (literature)
    "FTC": (0.07, 0.07, 0.03),  # FTC: calcification uncommon (literature)
    "MTC": (0.12, 0.45, 0.03),  # MTC: coarse calcifications (amyloid deposits) (literature)
}
FOCI_KINDS = ("punctate", "macro", "rim")
# Comet-tail artefacts of a cystic nodule (colloid; never a carcinoma cue).
COMET_TABLE = {"benign": 0.4, "PTC": 0.05, "FTC": 0.05, "MTC": 0.05}  # colloid comet tails: benign (ACR 2017)
# Taller-than-wide: probability of the taller component of log(AP / transverse) (the TI-RADS shape point is
# AP > transverse, so a round MTC drawn from the "wide" component can also come out slightly taller).
TALLER_TABLE = {
    "benign": 0.06,  # benign: wider than tall (literature)
    "PTC": 0.25,  # PTC: taller-than-wide more often than any other (literature)
    "FTC": 0.05,  # FTC: wider than tall, like an adenoma (literature)
    "MTC": 0.06,  # MTC: round to oval (literature; its "wide" component is near 1, below)
}
TALLER_LOG_ASPECT = (0.16, 0.07)  # mean, sd of log(AP / transverse) of the taller component
WIDE_LOG_ASPECT = {
    "benign": (-0.28, 0.12),  # benign: oval, wider than tall (literature)
    "PTC": (-0.25, 0.12),  # PTC: as benign when not taller (literature silent)
    "FTC": (-0.25, 0.10),  # FTC: oval (literature)
    "MTC": (-0.10, 0.06),  # MTC: round (literature)
}
# Not TI-RADS points, visible in the image.
HALO_TABLE = {
    "benign": 0.30,  # benign: a thin regular halo is common in adenomas / hyperplastic nodules (literature)
    "PTC": 0.05,  # PTC: halo rare (literature)
    "FTC": 0.55,  # FTC: often a (thick, sometimes irregular) halo (literature)
    "MTC": 0.05,  # MTC: halo rare (literature)
}
SIZE_TABLE = {  # median cm, sd of log size (lognormal largest transverse diameter)
    "benign": (1.9, 0.40),  # benign: as the cine generator (labels.py)
    "PTC": (1.6, 0.40),  # PTC: often small (microcarcinomas) (literature)
    "FTC": (2.6, 0.40),  # FTC: larger at diagnosis, often > 3-4 cm (literature)
    "MTC": (1.9, 0.40),  # MTC: no size cue (literature silent)
}
HETEROGENEITY_TABLE = {  # Beta(a, b) of the texture heterogeneity (nodule.py draws it as coarse blotches)
    "benign": (2.2, 4.5),  # benign: homogeneous (literature)
    "PTC": (4.0, 3.0),  # PTC: heterogeneous echotexture (literature)
    "FTC": (3.2, 3.6),  # FTC: subtly heterogeneous, the cue that separates it from adenomas (literature)
    "MTC": (4.0, 3.0),  # MTC: heterogeneous (literature)
}

STILL_TRUTH_COLUMNS = (
    "case_id", "patient_id", "subtype", "label", "risk", "tirads_risk", "hidden_risk",
    *(f"p_{s}" for s in SUBTYPES), *(f"tirads_p_{s}" for s in SUBTYPES),
    "composition", "echogenicity", "margin", "foci", "taller", "halo", "size_cm", "aspect", "heterogeneity",
    "tirads_points", "tirads_level",
)  # fmt: skip


def subtype_shares(malignant: float = DEFAULT_MALIGNANT, rare: float = RARE_SHARE) -> dict[str, float]:
    """Share of each subtype: FTC and MTC ``rare`` each (at most a third of the malignant share each), PTC the
    rest of ``malignant``, benign ``1 - malignant``."""
    if not 0.0 <= malignant <= 1.0:
        raise ValueError(f"malignant share must be in [0, 1], got {malignant}")
    r = min(rare, malignant / 3)
    return {"benign": 1.0 - malignant, "PTC": malignant - 2 * r, "FTC": r, "MTC": r}


def _counts(shares: dict[str, float], n: int) -> dict[str, int]:
    """Largest-remainder rounding of ``share * n`` (sums to n)."""
    raw = {s: q * n for s, q in shares.items()}
    k = {s: int(math.floor(v)) for s, v in raw.items()}
    for s in sorted(raw, key=lambda s: (k[s] - raw[s], SUBTYPES.index(s)))[: n - sum(k.values())]:
        k[s] += 1
    return k


def _pick(rng: np.random.Generator, values: tuple[str, ...], probs: tuple[float, ...]) -> str:
    """One category by inverse CDF of a uniform draw (tables sum to 1)."""
    return values[min(bisect.bisect_right(list(itertools.accumulate(probs)), rng.random()), len(values) - 1)]


def _draw(rng: np.random.Generator, s: str) -> dict:
    """One nodule's descriptors given its subtype ``s`` (the order of draws is fixed: same seed, same set)."""
    comp = _pick(rng, COMPOSITIONS, COMPOSITION_TABLE[s])
    if comp == "cystic":
        echo, margin = "anechoic", "smooth"
        foci = ("comet-tail",) if rng.random() < COMET_TABLE[s] else ()
    elif comp == "spongiform":
        echo, margin, foci = "isoechoic", "smooth", ()
    else:
        echo = _pick(rng, ECHOES, ECHO_TABLE[s])
        margin = _pick(rng, MARGINS, MARGIN_TABLE[s])
        foci = tuple(k for k, p in zip(FOCI_KINDS, FOCI_TABLE[s], strict=True) if rng.random() < p)
    mu, sd = TALLER_LOG_ASPECT if rng.random() < TALLER_TABLE[s] else WIDE_LOG_ASPECT[s]
    log_aspect = rng.normal(mu, sd)
    med, lsd = SIZE_TABLE[s]
    size = float(np.exp(rng.normal(math.log(med), lsd)))
    halo = bool(rng.random() < HALO_TABLE[s])
    het = float(rng.beta(*HETEROGENEITY_TABLE[s]))
    return dict(composition=comp, echogenicity=echo, margin=margin, foci=foci, log_aspect=float(log_aspect),
                size=size, halo=halo, heterogeneity=het)  # fmt: skip


def _lse(xs: list[float]) -> float:
    """log(sum(exp(xs))) of a few finite numbers (scipy's logsumexp costs 0.5 ms a call)."""
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def _norm_logpdf(x: float, mu: float, sd: float) -> float:
    return -0.5 * ((x - mu) / sd) ** 2 - math.log(sd * math.sqrt(2 * math.pi))


def log_joint(d: dict, *, tirads_only: bool = False) -> dict[str, float]:
    """``log P(descriptors | subtype)`` for each subtype (no prior), term by term as :func:`_draw` draws them.
    ``tirads_only``: only the TI-RADS descriptors, with taller-than-wide as a yes/no (AP > transverse)."""
    out = {}
    for s in SUBTYPES:
        comp = d["composition"]
        lp = math.log(COMPOSITION_TABLE[s][COMPOSITIONS.index(comp)])
        if comp == "cystic":
            pc = COMET_TABLE[s]
            lp += math.log(pc if "comet-tail" in d["foci"] else 1 - pc)
        elif comp != "spongiform":
            lp += math.log(ECHO_TABLE[s][ECHOES.index(d["echogenicity"])])
            lp += math.log(MARGIN_TABLE[s][MARGINS.index(d["margin"])])
            for k, p in zip(FOCI_KINDS, FOCI_TABLE[s], strict=True):
                lp += math.log(p if k in d["foci"] else 1 - p)
        pt = TALLER_TABLE[s]
        wide = WIDE_LOG_ASPECT[s]
        if tirads_only:
            # P(AP > transverse) = P(log aspect > 0) under the two-component mixture.
            p_tall = pt * ndtr(TALLER_LOG_ASPECT[0] / TALLER_LOG_ASPECT[1]) + (1 - pt) * ndtr(
                wide[0] / wide[1]
            )
            lp += math.log(p_tall if d["log_aspect"] > 0 else 1 - p_tall)
        else:
            x = d["log_aspect"]
            lp += _lse([math.log(pt) + _norm_logpdf(x, *TALLER_LOG_ASPECT),
                        math.log(1 - pt) + _norm_logpdf(x, *wide)])  # fmt: skip
            med, lsd = SIZE_TABLE[s]
            lp += _norm_logpdf(math.log(d["size"]), math.log(med), lsd)  # the Jacobian 1/size cancels
            ph = HALO_TABLE[s]
            lp += math.log(ph if d["halo"] else 1 - ph)
            a, b = HETEROGENEITY_TABLE[s]
            h = d["heterogeneity"]
            lp += (a - 1) * math.log(h) + (b - 1) * math.log1p(-h) - float(betaln(a, b))
        out[s] = lp
    return out


def posterior(d: dict, shares: dict[str, float], *, tirads_only: bool = False) -> dict[str, float]:
    """The generator's exact ``P(subtype | descriptors)`` (prior = the subtype shares)."""
    lj = log_joint(d, tirads_only=tirads_only)
    logs = {s: math.log(shares[s]) + lj[s] for s in SUBTYPES if shares[s] > 0}
    total = _lse(list(logs.values()))
    return {s: math.exp(logs[s] - total) if s in logs else 0.0 for s in SUBTYPES}


def _log_odds(d: dict, shares: dict[str, float], tirads_only: bool) -> float:
    """log P(malignant | .) / P(benign | .) under the generator's model (finite: every table entry is > 0)."""
    lj = log_joint(d, tirads_only=tirads_only)
    mal = [math.log(shares[s]) + lj[s] for s in MALIGNANT if shares[s] > 0]
    if not mal or shares["benign"] <= 0:
        return 0.0
    return _lse(mal) - (math.log(shares["benign"]) + lj["benign"])


def plan_stills(
    n: int = 600, malignant: float = DEFAULT_MALIGNANT, seed: int = 0, rare: float = RARE_SHARE
) -> list[tuple[NoduleSpec, str, dict]]:
    """Draw every still: (the renderer's spec, subtype, descriptors incl. the cues), cheap (no pixels).

    Subtypes first (exact counts, random order), then each nodule's descriptors from its subtype's tables,
    patients (about 13% of them with two nodules, as the cine generator), demographics for the scene.
    """
    shares = subtype_shares(malignant, rare)
    rng = np.random.default_rng([seed, 0x5711])
    counts = _counts(shares, n)
    subtypes = [s for s in SUBTYPES for _ in range(counts[s])]
    subtypes = [subtypes[int(i)] for i in rng.permutation(n)]
    patients = _patients(rng, n, 0.13, "T")
    out = []
    for i, s in enumerate(subtypes):
        d = _draw(rng, s)
        w = d["size"]
        h = w * math.exp(d["log_aspect"])
        same = i > 0 and patients[i - 1] == patients[i]
        prev = out[-1][0] if same else None
        age = prev.age if prev else int(np.clip(rng.normal(52, 14), 18, 90))
        sex = prev.sex if prev else ("F" if rng.random() < 0.78 else "M")
        risk = _log_odds(d, shares, tirads_only=False)
        spec = NoduleSpec(
            annot_id=f"S{i + 1:04d}", patient_id=patients[i], age=age, sex=sex,
            location=LOCATIONS[int(rng.choice(3, p=(0.56, 0.375, 0.065)))], size_cm=(w, h, w),
            composition=d["composition"], echogenicity=d["echogenicity"], margin=d["margin"], foci=d["foci"],
            heterogeneity=d["heterogeneity"], shape_change=0.0, risk=risk, noisy_risk=risk,
            label=int(s != "benign"), frame_nums=np.zeros(1, np.int64), seed=int(rng.integers(2**62)),
            pool_seed=seed + 2, halo=d["halo"], still=True,
        )  # fmt: skip
        out.append((spec, s, d))
    return out


def still_truth_rows(plan: list[tuple[NoduleSpec, str, dict]], malignant: float, rare: float = RARE_SHARE):
    """The stills' ``truth.csv`` rows (:data:`STILL_TRUTH_COLUMNS`; numbers with 6 decimals)."""
    shares = subtype_shares(malignant, rare)
    rows = []
    for spec, s, d in plan:
        post, tpost = posterior(d, shares), posterior(d, shares, tirads_only=True)
        tr = _log_odds(d, shares, tirads_only=True)
        pts = tirads_points(d["composition"], d["echogenicity"], d["log_aspect"] > 0, d["margin"], d["foci"])
        total = sum(pts.values())
        row = {"case_id": spec.annot_id, "patient_id": spec.patient_id, "subtype": s, "label": str(spec.label),
               "risk": f"{spec.risk:.6f}", "tirads_risk": f"{tr:.6f}", "hidden_risk": f"{spec.risk - tr:.6f}",
               "composition": d["composition"], "echogenicity": d["echogenicity"], "margin": d["margin"],
               "foci": "+".join(d["foci"]), "taller": str(int(d["log_aspect"] > 0)), "halo": str(int(d["halo"])),
               "size_cm": f"{d['size']:.6f}", "aspect": f"{math.exp(d['log_aspect']):.6f}",
               "heterogeneity": f"{d['heterogeneity']:.6f}", "tirads_points": str(total),
               "tirads_level": f"TR{acr_level(total)}"}  # fmt: skip
        row.update({f"p_{k}": f"{v:.6f}" for k, v in post.items()})
        row.update({f"tirads_p_{k}": f"{v:.6f}" for k, v in tpost.items()})
        rows.append(row)
    return rows
