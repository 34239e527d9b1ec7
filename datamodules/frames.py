"""Frame helpers shared by every clip reader: RGB -> gray, and the order of frame files in a folder.

They live apart from :mod:`datamodules.clips` so that :mod:`datamodules.dicom` can use them without importing
the clip reader that dispatches to it (which would be an import cycle).
"""

from __future__ import annotations

import re

import numpy as np

__all__ = ["rgb_to_gray", "natural_key"]


def rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    """``(...,3)`` uint8 RGB -> ``(...)`` uint8 gray, ITU-R BT.601 luma 0.299 R + 0.587 G + 0.114 B, rounded.

    Integer arithmetic (as PIL's ``convert("L")``) so large clips need no float copy.
    """
    rgb = np.asarray(rgb)
    if rgb.shape[-1] != 3:
        raise ValueError(f"expected a trailing RGB axis of 3, got shape {rgb.shape}")
    r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
    return ((r * 299 + g * 587 + b * 114 + 500) // 1000).astype(np.uint8)


def natural_key(name: str) -> tuple:
    """Sort key that orders embedded numbers numerically: ``frame2`` < ``frame10``; ties broken by the name."""
    parts = re.split(r"(\d+)", name.lower())
    # re.split puts text at even and digit runs at odd positions, so parts of two keys always compare like with like.
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), name
