"""Annotation noise for the AsyCMST label-noise study (paper Sec. 4.7, Fig. 11-12): flipped diagnosis labels and
perturbed nodule contours, applied to *training* annotations only.

Labels (Fig. 11a): :func:`flip_indices` flips ``round(fraction x n_c)`` labels of each class ``c`` (benign ->
malignant and malignant -> benign in the same proportion, "stratified"), drawn by a seeded generator from the
class's cases sorted by id, so the draw does not depend on manifest order and the same seed flips the same cases
at every fraction's own count.

Contours (Fig. 11b): the paper shrinks or expands every contour uniformly by 15% and shifts each control point
inward or outward by 0-15%.  Here the amount is in pixels of the drawn mask (the annotation's own grid, before
any crop or resize), which is what an annotator's pen error is measured in:

- ``dilate`` / ``erode`` by ``px``: every pixel within ``px`` (Euclidean) of the mask is added / every mask
  pixel within ``px`` of the background is removed (exact distance transform, OpenCV); a disk of radius ``R``
  becomes one of radius ``R + px`` / ``R - px``.  Erosion never removes a nodule entirely: when nothing would
  be left, its deepest pixels are kept (an annotator does not draw an empty contour around a visible nodule).
- ``jitter`` by ``px``: each outer contour gets ``JITTER_POINTS`` control points evenly spaced along it, each
  moved along the ray from the component's centroid by an offset drawn uniformly from ``[-px, px]``; offsets
  between control points are interpolated linearly along the contour and the moved polygon is filled.  The
  contour stays one closed curve, so a nodule stays one blob (holes are not kept: drawn nodules have none).

On the demo's paired set (64 px frames) a nodule's equivalent radius is ~11 px, so the paper's 15% is ~1.7 px;
the sweep's 2 and 4 px are about 18% and 36%.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import cv2
import numpy as np

MASK_NOISE = ("dilate", "erode", "jitter")
JITTER_POINTS = 16  # control points per contour: a drawn outline of a small nodule has about this many clicks


def flip_indices(labels: Sequence[int], ids: Sequence[str], fraction: float, seed: int) -> np.ndarray:
    """Positions (into ``labels``) of the labels to flip: ``round(fraction x n_c)`` per class ``c`` (half up),
    drawn with ``numpy.random.default_rng([seed, c])`` from that class's positions in ``ids`` order."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    labels, ids = np.asarray(labels, int), np.asarray(ids, str)
    out = []
    for c in (0, 1):
        members = np.flatnonzero(labels == c)
        members = members[np.argsort(ids[members], kind="stable")]
        n = int(np.floor(fraction * len(members) + 0.5))
        out.append(np.random.default_rng([seed, c]).choice(members, n, replace=False))
    return np.sort(np.concatenate(out)).astype(np.int64)


def dilate(mask: np.ndarray, px: float) -> np.ndarray:
    """``(H, W)`` {0,1} mask grown by ``px`` pixels (every pixel within Euclidean distance ``px`` of it)."""
    mask = (np.asarray(mask) > 0).astype(np.uint8)
    if px <= 0 or not mask.any():
        return mask
    dist = cv2.distanceTransform(1 - mask, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return (dist <= px).astype(np.uint8)


def erode(mask: np.ndarray, px: float) -> np.ndarray:
    """``(H, W)`` {0,1} mask shrunk by ``px`` pixels (mask pixels farther than ``px`` from the background);
    never empty when the input was not: then the deepest pixels are kept."""
    mask = (np.asarray(mask) > 0).astype(np.uint8)
    if px <= 0 or not mask.any():
        return mask
    # the frame's edge counts as background, as it does for a nodule drawn up to the edge
    padded = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    out = dist > px
    if not out.any():
        out = dist >= dist.max()
    return out.astype(np.uint8)


def jitter(mask: np.ndarray, px: float, rng: np.random.Generator, points: int = JITTER_POINTS) -> np.ndarray:
    """``(H, W)`` {0,1} mask whose outer contours' control points moved radially by ``U(-px, px)`` each (see the
    module docstring)."""
    mask = (np.asarray(mask) > 0).astype(np.uint8)
    if px <= 0 or not mask.any():
        return mask
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    out = np.zeros_like(mask)
    for contour in contours:
        pts = contour[:, 0, :].astype(np.float64)  # (L, 2) as (x, y), boundary pixel centres in order
        k = min(points, len(pts))
        ctrl = rng.uniform(-px, px, k)
        if len(pts) < 3:  # a one- or two-pixel nodule has no direction to move along: kept as drawn
            cv2.fillPoly(out, [contour], 1)
            continue
        pos = np.arange(len(pts)) * k / len(pts)  # each boundary pixel's place between the control points
        i0 = np.floor(pos).astype(int) % k
        frac = pos - np.floor(pos)
        offset = ctrl[i0] * (1 - frac) + ctrl[(i0 + 1) % k] * frac
        ray = pts - pts.mean(axis=0)
        norm = np.linalg.norm(ray, axis=1, keepdims=True)
        ray = np.divide(ray, norm, out=np.zeros_like(ray), where=norm > 0)
        moved = np.round(pts + ray * offset[:, None]).astype(np.int32)
        cv2.fillPoly(out, [moved[:, None, :]], 1)
    return out


def case_rng(seed: int, case_id: str, frame: int) -> np.random.Generator:
    """The generator of one annotated frame: fixed by (seed, case id, frame number), so a case's noisy
    annotation is the same in every epoch, worker and process (annotation noise is a property of the data)."""
    return np.random.default_rng([seed, zlib.crc32(case_id.encode()), int(frame)])


def perturb_masks(
    masks: np.ndarray,
    valid: np.ndarray,
    mode: str,
    px: float,
    *,
    seed: int,
    case_id: str,
    frames: Sequence[int],
) -> np.ndarray:
    """``(T, H, W)`` masks with each annotated (``valid``) frame perturbed by ``mode`` (:data:`MASK_NOISE`) and
    ``px``; ``frames`` are the clip's frame numbers of the T masks (seeding ``jitter`` per frame)."""
    if mode not in MASK_NOISE:
        raise ValueError(f"mask noise must be one of {MASK_NOISE}, got {mode!r}")
    out = np.array(masks, dtype=np.uint8, copy=True)
    for t in np.flatnonzero(np.asarray(valid, bool)):
        if mode == "dilate":
            out[t] = dilate(out[t], px)
        elif mode == "erode":
            out[t] = erode(out[t], px)
        else:
            out[t] = jitter(out[t], px, case_rng(seed, case_id, frames[t]))
    return out
