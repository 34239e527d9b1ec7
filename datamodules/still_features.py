"""Hand-crafted features of a still image's nodule: the mask's shape, and the pixels' intensity and texture inside
it.  The input of the two non-deep baselines: the two-stage paper's shape forest (``usnodule shape-forest``:
:data:`FEATURES`, shape only) and CSASN's feature forest (``usnodule feature-forest``: shape + :data:`PIXEL_FEATURES`).

Shape (:func:`shape_features`; scikit-image ``regionprops`` of the mask's largest connected component,
8-connectivity; pixels as the unit): the table in :mod:`stages.shape_forest`.

Intensity and texture (:func:`pixel_features`, on the gray ``uint8`` image at its own size; the numbers are
ours -- neither paper defines a hand-crafted baseline for subtypes):

=====================  =====================================================================================
``int_mean``, ``int_std``      gray values inside the mask (all of its pixels, every component)
``int_p10`` ... ``int_p99``    their 10th, 25th, 50th, 75th, 90th and 99th percentiles (p99: bright foci,
                               microcalcifications)
``ring_mean``          gray mean of the ring around the mask: dilated by ``max(2, round(0.15 sqrt(A)))`` px
                       (15% of a disc's radius-ish scale), minus the mask, inside the image
``ring_contrast``      ``int_mean - ring_mean`` (echogenicity relative to the surrounding tissue:
                       hypoechoic < 0; the image's gain cancels)
``rim_contrast``       mean of the mask's inner rim (the mask minus its erosion by the same radius) minus the
                       mean of the rest of the mask (a dark halo at the margin < 0); NaN when the erosion is
                       empty
``glcm_contrast``, ``glcm_homogeneity``, ``glcm_energy``, ``glcm_correlation``, ``glcm_dissimilarity``
                       scikit-image ``graycomatrix`` / ``graycoprops`` of the pixels inside the mask only
                       (:func:`glcm_features`): gray levels in fixed bins of :data:`GLCM_BIN` (absolute, as
                       pyradiomics' fixed bin width; 16 levels), distances 1 and 2 px, angles 0, 45, 90 and
                       135 degrees, symmetric, averaged over the 8 matrices
=====================  =====================================================================================

An empty mask gives NaN for every pixel feature (the forests impute them with the training median).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "FEATURES",
    "PIXEL_FEATURES",
    "shape_features",
    "pixel_features",
    "glcm_features",
    "feature_matrix",
]

FEATURES = (
    "area",
    "area_frac",
    "perimeter",
    "circularity",
    "compactness",
    "aspect_ratio",
    "taller_than_wide",
    "solidity",
    "convexity",
    "eccentricity",
    "extent",
    "equivalent_diameter",
    "n_components",
    "empty",
)
PERCENTILES = (10, 25, 50, 75, 90, 99)
GLCM_PROPS = ("contrast", "homogeneity", "energy", "correlation", "dissimilarity")
PIXEL_FEATURES = (
    "int_mean",
    "int_std",
    *(f"int_p{q}" for q in PERCENTILES),
    "ring_mean",
    "ring_contrast",
    "rim_contrast",
    *(f"glcm_{p}" for p in GLCM_PROPS),
)
GLCM_BIN = 16  # gray values per level: 256 / 16 = 16 levels
GLCM_DISTANCES = (1, 2)
GLCM_ANGLES = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)


def shape_features(mask: np.ndarray) -> dict[str, float]:
    """The shape features (:data:`FEATURES`, table in :mod:`stages.shape_forest`) of one (H, W) mask
    (non-zero = nodule)."""
    from skimage.measure import label, perimeter_crofton, regionprops

    mask = np.asarray(mask) > 0
    labels = label(mask, connectivity=2)
    n = int(labels.max())
    out = dict.fromkeys(FEATURES, float("nan"))
    out.update(n_components=float(n), empty=float(n == 0))
    if n == 0:
        return out
    region = max(regionprops(labels), key=lambda r: r.area)
    a, p = float(region.area), float(region.perimeter_crofton)
    y0, x0, y1, x1 = region.bbox
    minor = float(region.axis_minor_length)
    hull_p = float(perimeter_crofton(region.image_convex))
    out.update(
        area=a,
        area_frac=a / mask.size,
        perimeter=p,
        circularity=4 * np.pi * a / p**2 if p > 0 else float("nan"),
        compactness=p**2 / a,
        aspect_ratio=float(region.axis_major_length) / minor if minor > 0 else float("nan"),
        taller_than_wide=(y1 - y0) / (x1 - x0),
        solidity=float(region.solidity),
        convexity=hull_p / p if p > 0 else float("nan"),
        eccentricity=float(region.eccentricity),
        extent=float(region.extent),
        equivalent_diameter=float(region.equivalent_diameter_area),
    )
    return out


def glcm_features(image: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """GLCM properties of the pixels inside ``mask`` only: level 0 marks the outside, the gray values inside
    take levels 1..16 (fixed bins of :data:`GLCM_BIN`), and the co-occurrences that involve level 0 (pairs
    that leave the mask) are dropped before the matrices are normalised."""
    from skimage.feature import graycomatrix, graycoprops

    out = {f"glcm_{p}": float("nan") for p in GLCM_PROPS}
    inside = np.asarray(mask) > 0
    if not inside.any():
        return out
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    levels = 256 // GLCM_BIN
    q = np.where(inside[box], np.asarray(image)[box].astype(np.int32) // GLCM_BIN + 1, 0).astype(np.uint8)
    counts = graycomatrix(q, GLCM_DISTANCES, GLCM_ANGLES, levels=levels + 1, symmetric=True)[1:, 1:]
    counts = counts.astype(float)
    total = counts.sum(axis=(0, 1), keepdims=True)
    keep = total[0, 0] > 0  # (distances, angles) with at least one pair inside the mask
    if not keep.any():
        return out
    p = counts[:, :, keep][:, :, :, None] / total[0, 0][keep][None, None, :, None]
    with np.errstate(invalid="ignore", divide="ignore"):  # correlation of a flat region: 0/0
        for prop in GLCM_PROPS:
            v = graycoprops(p, prop)
            out[f"glcm_{prop}"] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
    return out


def pixel_features(image: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """The intensity and texture features (:data:`PIXEL_FEATURES`, module doc) of the gray ``image`` inside
    ``mask`` (both (H, W), same size)."""
    from scipy import ndimage

    image, inside = np.asarray(image), np.asarray(mask) > 0
    if image.shape != inside.shape:
        raise ValueError(f"image {image.shape} and mask {inside.shape} differ in size")
    out = dict.fromkeys(PIXEL_FEATURES, float("nan"))
    if not inside.any():
        return out
    values = image[inside].astype(float)
    out.update(int_mean=float(values.mean()), int_std=float(values.std()))
    out.update(
        {f"int_p{q}": float(v) for q, v in zip(PERCENTILES, np.percentile(values, PERCENTILES), strict=True)}
    )
    radius = max(2, int(round(0.15 * np.sqrt(inside.sum()))))
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    disc = yy**2 + xx**2 <= radius**2
    ring = ndimage.binary_dilation(inside, structure=disc) & ~inside
    if ring.any():
        out["ring_mean"] = float(image[ring].mean())
        out["ring_contrast"] = out["int_mean"] - out["ring_mean"]
    core = ndimage.binary_erosion(inside, structure=disc)
    rim = inside & ~core
    if core.any() and rim.any():
        out["rim_contrast"] = float(image[rim].mean() - image[core].mean())
    out.update(glcm_features(image, inside))
    return out


def feature_matrix(masks: Sequence[np.ndarray], images: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """``(n, len(FEATURES))`` shape features of ``masks``, or with ``images`` ``(n, len(FEATURES) +
    len(PIXEL_FEATURES))`` shape then pixel features; float, NaN where undefined."""
    if images is None:
        return np.array([[shape_features(m)[k] for k in FEATURES] for m in masks], dtype=float)
    if len(images) != len(masks):
        raise ValueError(f"{len(images)} images for {len(masks)} masks")
    rows = []
    for img, m in zip(images, masks, strict=True):
        s, p = shape_features(m), pixel_features(img, m)
        rows.append([s[k] for k in FEATURES] + [p[k] for k in PIXEL_FEATURES])
    return np.array(rows, dtype=float).reshape(len(rows), len(FEATURES) + len(PIXEL_FEATURES))
