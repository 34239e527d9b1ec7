"""The predicted nodule's size in mm, from its masks over a clip and the pixel spacing.

Choices (the STACT-Time paper reports no size; these are ours):

* The nodule is the largest 8-connected component of each frame's predicted mask (stray specks of the
  segmentation do not stretch it), measured on the frame where that component is largest (most pixels; the
  first such frame on a tie) -- a sweep passes through the nodule, and its largest cross-section is the one a
  sonographer would caliper.
* ``width_mm`` / ``height_mm``: its bounding box, edge to edge (pixels x spacing).  ``max_extent_mm``: the
  longest segment between two points of its pixel area (corners of its pixels, through the convex hull), so it
  is never below the width or the height.  Anisotropic spacing (``dy != dx``) is applied before measuring.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["NoduleSize", "largest_component", "nodule_size"]


@dataclass(frozen=True)
class NoduleSize:
    """``frame``: position in the clip of the measured frame; sizes in mm (None when the spacing is unknown)."""

    frame: int
    width_px: int
    height_px: int
    width_mm: float | None
    height_mm: float | None
    max_extent_mm: float | None


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Boolean mask of the largest 8-connected component of ``mask`` (H, W) (all False when empty)."""
    from scipy import ndimage

    labels, n = ndimage.label(mask > 0, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return np.zeros(mask.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)


def _max_extent(component: np.ndarray, dy: float, dx: float) -> float:
    """Longest distance between two corners of the component's pixels, in the units of ``dy``/``dx``."""
    from scipy.spatial import ConvexHull

    ys, xs = np.nonzero(component)
    corners = np.concatenate(
        [np.stack([(xs + cx) * dx, (ys + cy) * dy], axis=1) for cy in (0, 1) for cx in (0, 1)]
    )
    corners = np.unique(corners, axis=0)
    hull = corners[ConvexHull(corners).vertices]  # 4+ points, never collinear: pixel corners span a square
    d = hull[:, None, :] - hull[None, :, :]
    return float(np.sqrt((d**2).sum(-1)).max())


def nodule_size(masks: np.ndarray, spacing_mm: tuple[float, float] | None) -> NoduleSize | None:
    """Size of the predicted nodule in ``masks`` (T, H, W) with pixel spacing ``(dy, dx)`` mm (None: unknown,
    pixel sizes only). None when no frame has a mask."""
    best, best_area, best_frame = None, 0, -1
    for t in range(len(masks)):
        if not masks[t].any():
            continue
        comp = largest_component(masks[t])
        area = int(comp.sum())
        if area > best_area:
            best, best_area, best_frame = comp, area, t
    if best is None:
        return None
    rows, cols = np.flatnonzero(best.any(axis=1)), np.flatnonzero(best.any(axis=0))
    h, w = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
    if spacing_mm is None:
        return NoduleSize(best_frame, w, h, None, None, None)
    dy, dx = spacing_mm
    return NoduleSize(best_frame, w, h, w * dx, h * dy, _max_extent(best, dy, dx))
