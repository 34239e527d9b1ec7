"""B-mode clips, frame by frame: scene (``scene.py``) + nodule cross-section (``nodule.py``) + speckle
(``fields.py``).

Speed: frames are composed in int16 gray levels (5x faster than float32 here), the nodule is drawn only in a
box around its current cross-section, and speckle comes from a per-process pool of precomputed fields.  The
same loop composes a paired clip's CEUS frames from the curves ``ceus.py`` passes in.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from datamodules.synth.fields import _speckle, _speckle_pool
from datamodules.synth.labels import NoduleSpec
from datamodules.synth.nodule import _frame_nodule, _nodule
from datamodules.synth.scene import _gain, _motion, _scene


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


def render_still(spec: NoduleSpec, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """One B-mode frame through the centre of the nodule (its largest cross-section): image (H, W) uint8 and
    mask (H, W) uint8 in {0, 255}.  ``spec.still`` must be set (one frame number, foci in the plane); the
    scene, gain, speckle and nodule fields are the cine renderer's, with a stationary probe."""
    if not spec.still or len(spec.frame_nums) != 1:
        raise ValueError("render_still needs a spec with still=True and one frame number")
    img, mask, _ = _render(spec, size, stationary=True, pattern=None, ceus_curve=None)
    return img[0], mask[0]


def _render(
    spec: NoduleSpec,
    size: int,
    *,
    stationary: bool,
    pattern: str | None,
    ceus_curve: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]] | None,
    angles: tuple[float, float] | None = None,
):
    rng = np.random.default_rng(spec.seed)
    scene = _scene(spec, size, rng)
    mot = _motion(spec, scene, rng, stationary)
    if spec.still:
        mot.z[:] = 0.0  # the plane through the centre: the largest cross-section
    nod = _nodule(spec, scene, rng, pattern, angles)
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
    # whose speckle changes every frame (bubbles flow), plus a faint B-mode leak-through.  The perfusion map's
    # texture can dip a hair below 0 (1 + 0.15 x smooth noise); no bubbles there, not a NaN (was cast to 0 or junk).
    e = 180.0 * np.sqrt(np.maximum(ceus, 0.0))
    for t in range(t_n):
        sl = (slice(int(mot.dy[t]), int(mot.dy[t]) + size), slice(int(mot.dx[t]), int(mot.dx[t]) + size))
        e[t] += np.minimum(e[t], 50.0) / 50.0 * ceus_fields[t][sl]
    e += 0.1 * img
    return image, mask, np.clip(e, 0, 255).astype(np.uint8)
