"""The tissue around the nodule, and how probe and tissue move.

* B-mode physics in the display (log-compressed) domain: a tissue echo map (skin, subcutaneous fat, strap
  muscles, thyroid with capsule, trachea with air shadow and reverberation, carotid with posterior
  enhancement, prevertebral muscle) in gray levels, minus a depth attenuation left over after an imperfect TGC
  curve (:func:`_gain`); ``fields.py``'s speckle is added to it frame by frame.
* A probe sweep (elevation ``z``) through the nodule (:func:`_motion`; stationary for paired clips).  Tissue
  drifts laterally and moves with breathing; speckle moves with the tissue and decorrelates along the sweep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter1d

from datamodules.synth.fields import _resize, _smooth_noise
from datamodules.synth.labels import NoduleSpec


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
