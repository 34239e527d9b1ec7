"""The nodule: its fields on a patch around the centre (:func:`_nodule`), its cross-section in one frame
(:func:`_frame_nodule`).

A probe sweep through an ellipsoidal nodule: the cross-section scales with ``sqrt(1 - z^2)``, so it grows then
shrinks and, for about half the nodules, the clip starts and/or ends outside the nodule (empty masks there).
The descriptors ``labels.py`` drew are drawn here in gray levels (cystic parts, echogenicity, margin, halo,
calcifications with their shadows, comet tails), so are the hidden signals (heterogeneity blotches, a shape
change along the sweep) and, for a paired case, the map of its CEUS enhancement pattern.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from datamodules.synth.fields import _smooth_noise
from datamodules.synth.labels import NoduleSpec
from datamodules.synth.scene import _Motion, _Scene

# Visibility of the hidden signals (gray levels / relative radius at full strength).  They set how easily a
# model can *see* a signal, not how much it weighs in the label (the risk model's weights do that), so the
# ceiling in truth.csv does not move with them.  Heterogeneity was 26 (std of the blotches at h = 1): a CNN
# regressing h from 32-64 px crops reached Spearman 0.49-0.55 (fold 0, 400 nodules), 0.66 at 55 and 0.71 at
# 80 (BENCHMARKS.md, "Demo recipe"): it stands out of the speckle as a "heterogeneous echotexture" does.  At
# 160 the demo's image encoder (test_byobnet, 32 px, 240 training nodules) ranks the test nodules at pooled
# AUROC 0.799 against 0.757 at 80 (hidden weight 11, BENCHMARKS.md "Demo recipe, round 2").
HETEROGENEITY_GRAY = 160.0
# Shape change along the sweep at shape_change = 1: aspect-ratio turn and mid-sweep lobulation, as fractions
# of the radius (were 0.28 and 0.38, then 0.45 and 0.55; raised so that a mask CNN at 32 px sees them: on drawn
# masks, sweep-spanning stacks, its validation AUROC goes 0.696 -> 0.744 from 0.45/0.55 to 0.7/0.8, BENCHMARKS.md
# "Demo recipe, round 5").  Visibility only: the label's risk and the ceiling do not change.
SHAPE_ASPECT = 0.7
SHAPE_LOBES = 0.8
# Paired cases only (``labels.plan_paired``): the B-mode hypoechoic focus and the CEUS perfusion defect, soft
# discs of radius FOCUS_RADIUS whose centres lie FOCUS_OFFSET out from the nodule's centre at their drawn angles
# (normalised units: 1 = the nodule's semi-axis), so each covers about a third of the nodule's cross-section,
# reaching its rim: at the demo's 32 px crop mostly one or two of AsyCMST's 2 x 2 tokens.  The focus replaces the
# echo level (and the heterogeneity blotches) with FOCUS_GRAY, darker than any solid echogenicity; the defect
# leaves that part of the nodule unenhanced (DEFECT_DEPTH 1).  Fluid spaces keep their own look on top.  Sizes
# from a planted check (BENCHMARKS.md "Paired set, round 5"): at radius 0.42, offset 0.45, gray 30 and depth
# 0.85 AsyCMST learned a label of concordance alone to 0.54 in the demo's 2 epochs (fold 0), at these to 0.61.
FOCUS_OFFSET = 0.5
FOCUS_RADIUS = 0.55
FOCUS_GRAY = 20.0
DEFECT_DEPTH = 1.0


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


def _disc(rho: np.ndarray, theta: np.ndarray, angle: float) -> np.ndarray:
    """Soft disc (1 inside, 0 outside, 0.1 normalised units of edge) of radius FOCUS_RADIUS at FOCUS_OFFSET
    from the centre in direction ``angle``."""
    du = rho * np.cos(theta) - FOCUS_OFFSET * math.cos(angle)
    dv = rho * np.sin(theta) - FOCUS_OFFSET * math.sin(angle)
    return np.clip((FOCUS_RADIUS - np.sqrt(du * du + dv * dv)) / 0.1 + 0.5, 0.0, 1.0).astype(np.float32)


def _nodule(
    spec: NoduleSpec,
    scene: _Scene,
    rng: np.random.Generator,
    pattern: str | None,
    angles: tuple[float, float] | None = None,
) -> _Nodule:
    """``angles``: (B-mode focus, CEUS defect) of a paired case, or None (no focus, no defect).  They draw no
    random numbers, so every other field is the same with or without them."""
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
    zs = 0.1 if spec.still else 1.0  # a still shows the plane z = 0: its foci lie (almost) in it
    for kind in spec.foci:
        if kind == "punctate":
            for _ in range(int(rng.integers(4, 12))):
                r, th = 0.75 * math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi)
                foci.append((r * math.sin(th), r * math.cos(th), zs * rng.uniform(-0.8, 0.8), 1.0, 0.0))
        elif kind == "macro":
            for _ in range(int(rng.integers(1, 3))):
                r, th = 0.5 * math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi)
                foci.append((r * math.sin(th), r * math.cos(th), zs * rng.uniform(-0.5, 0.5),
                             max(2.0, 0.15 * min(a0, b0)), 1.0))  # fmt: skip
        elif kind == "comet-tail":
            for _ in range(2):
                foci.append(
                    (rng.uniform(-0.8, -0.5), rng.uniform(-0.4, 0.4), zs * rng.uniform(-0.6, 0.6), 1.0, 2.0)
                )
    if spec.halo is None:
        halo = (
            spec.margin == "smooth"
            and spec.echogenicity in ("isoechoic", "hyperechoic")
            and rng.random() < 0.7
        )
    else:
        halo = spec.halo

    ceus = np.ones(shape, np.float32)
    if pattern == "ring":
        ceus = np.where(rho > 0.72, 1.3, 0.35).astype(np.float32)
    elif pattern == "heterogeneous":
        ceus = np.clip(0.65 + 0.55 * _smooth_noise(rng, shape, scale), 0.05, 1.4).astype(np.float32)
    elif pattern == "hypo":
        ceus = np.full(shape, 0.45, np.float32) + 0.08 * _smooth_noise(rng, shape, scale)
    elif pattern == "homogeneous":
        ceus = np.full(shape, 1.15, np.float32) + 0.05 * _smooth_noise(rng, shape, scale)
    if angles is not None:
        focus = _disc(rho, theta, angles[0])
        solid = solid + focus * (FOCUS_GRAY - solid)
        het1, het2 = het1 * (1.0 - focus), het2 * (1.0 - focus)
        ceus = ceus * (1.0 - DEFECT_DEPTH * _disc(rho, theta, angles[1]))
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
