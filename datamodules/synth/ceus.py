"""Paired BUS/CEUS clips: gamma-variate time-intensity curves (wash-in, peak, wash-out) for parenchyma and
nodule, enhancement patterns (homogeneous, ring, heterogeneous, hypo; their maps are drawn with the nodule in
``nodule.py``), bubble speckle that changes every frame, aligned frame by frame with a stationary-probe BUS clip
of the same nodule and its mask (both composed in ``bmode.py``), with the case's B-mode hypoechoic focus and CEUS
perfusion defect at their drawn angles (``nodule.py``; whether they coincide is part of the label, ``labels.py``).
"""

from __future__ import annotations

import numpy as np

from datamodules.synth.bmode import _render
from datamodules.synth.labels import CaseSpec


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

    bus, mask, ceus = _render(
        case.nodule,
        size,
        stationary=True,
        pattern=case.pattern,
        ceus_curve=curves,
        angles=(case.focus_angle, case.defect_angle),
    )
    return bus, ceus, (mask > 0).astype(np.uint8)
