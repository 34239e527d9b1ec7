"""Random fields for the B-mode renderer: smooth noise, a cheap bilinear resize, and speckle.

Speckle is log-Rayleigh (the envelope of a blurred complex Gaussian, i.e. fully developed speckle with a
finite PSF): in the display (log-compressed) domain multiplicative speckle becomes additive.  For speed each
process precomputes a pool of fields (:data:`SPECKLE_POOL`), and clips take random crops and flips of them.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy.ndimage import gaussian_filter1d

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
