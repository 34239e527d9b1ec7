"""A PNG montage per BUS + CEUS pair: the frames AsyCMST saw and the cross-modal attention each stream paid the
other (``usnodule predict-pair --overlay``).

Layout: one column per sampled frame, after a first column of context.  For each modality, a row of the model's
input frames (after the ROI crop and resize, enlarged without smoothing; the first column shows the middle
sampled frame whole, with the crop box in yellow), then, for each attention direction whose *keys* are that
modality, a row with the attention those key tokens received from the other stream's queries
(:func:`lightning_modules.asycmst_predict.received_attention`) over the same frames: one square per token of
the ``grid x grid`` token grid (nearest, not smoothed: the model sees nothing finer), in multiples of the
uniform share ``1 / (T N)``, one colour scale per row spanning the row's range (the legend in the first column)
so frames can be compared, and above each frame its share of the row's attention.  With the paper's streams
(upper = CEUS, lower = BUS) and ``strategy: asymmetric``, the BUS row shows where in each BUS frame the CEUS
queries of that frame looked (Eq. 10, spatial: every frame's share is 1 / T by construction), the CEUS row
which CEUS frames the BUS queries at each position looked at (Eq. 8, temporal).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from datamodules.atomic import atomic_path

MODALITY = {"bus": "BUS", "ceus": "CEUS"}
PANEL = 128  # pixels per panel (at least; a multiple of the token grid so every token is a whole square)
GAP, BAND = 6, 18  # pixels between panels, and above each row for its labels


def key_stream(direction: str, streams: tuple[str, str]) -> tuple[str, str]:
    """``(query modality, key modality)`` of ``c_to_b`` (upper queries, lower keys) or ``b_to_c``."""
    upper, lower = streams
    return (upper, lower) if direction == "c_to_b" else (lower, upper)


def _gray_rgb(img: np.ndarray, side: int) -> np.ndarray:
    """``(h, w)`` in [0, 1] -> ``(side, side, 3)`` float RGB, nearest (the pixels the model saw, enlarged)."""
    return np.repeat(
        cv2.resize(img.astype(np.float32), (side, side), interpolation=cv2.INTER_NEAREST)[..., None], 3, -1
    )


def _fit(img: np.ndarray, side: int) -> tuple[np.ndarray, float, int, int]:
    """A whole frame ``(H, W)`` uint8 letterboxed into ``(side, side, 3)`` RGB; returns it, the scale and the
    offsets (x, y) for drawing the crop box on it."""
    h, w = img.shape
    scale = side / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    out = np.zeros((side, side, 3), np.float32)
    y0, x0 = (side - nh) // 2, (side - nw) // 2
    small = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    out[y0 : y0 + nh, x0 : x0 + nw] = small[..., None]
    return out, scale, x0, y0


def save_montage(
    path: Path,
    *,
    title: str,
    frames: dict[str, np.ndarray],
    full: dict[str, np.ndarray],
    box: tuple[int, int, int, int] | None,
    indices: np.ndarray,
    attention: dict[str, np.ndarray],
    streams: tuple[str, str],
) -> Path:
    """Write the montage to ``path`` atomically.

    The panels are put together as one image with numpy / OpenCV and drawn with its labels as one matplotlib
    image (a grid of matplotlib axes took seconds per pair, mostly laying out ticks).

    Args:
        title: the figure's title (case, probability, crop).
        frames: ``{"bus", "ceus"}`` -> ``(T, S, S)`` in [0, 1], the model's input frames.
        full: ``{"bus", "ceus"}`` -> ``(H, W)`` uint8, the middle sampled frame before cropping.
        box: the crop ``(y0, y1, x0, x1)`` on ``full``; ``None`` = whole frame.
        indices: ``(T,)`` the sampled frame positions in the clip.
        attention: direction -> ``(T, g, g)`` attention received by the key stream's tokens (empty: no
            cross-modal attention in the model).
        streams: the model's ``(upper, lower)`` modalities.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = len(indices)
    grid = next(iter(attention.values())).shape[-1] if attention else 1
    side = grid * -(-PANEL // grid)
    cmap = matplotlib.colormaps["inferno"]
    rows: list[tuple[str, str | None]] = []  # (modality, direction or None for the frames)
    for modality in ("bus", "ceus"):
        rows.append((modality, None))
        rows += [(modality, d) for d in attention if key_stream(d, streams)[1] == modality]
    height, width = len(rows) * (BAND + side + GAP), (t + 1) * (side + GAP) + GAP
    canvas = np.ones((height, width, 3), np.float32)
    labels: list[tuple[float, float, str, str]] = []  # (x, y, text, align)

    def put(r: int, c: int, panel: np.ndarray, label: str) -> None:
        y, x = r * (BAND + side + GAP) + BAND, GAP + c * (side + GAP)
        canvas[y : y + side, x : x + side] = panel
        labels.append((x + side / 2, y - 4, label, "center"))

    for r, (modality, direction) in enumerate(rows):
        name = MODALITY[modality]
        if direction is None:
            whole, scale, x0, y0 = _fit(full[modality], side)
            if box is not None:  # the crop, in yellow, on the letterboxed whole frame
                by0, by1, bx0, bx1 = box
                corner = (x0 + round(bx0 * scale), y0 + round(by0 * scale))
                cv2.rectangle(
                    whole, corner, (x0 + round(bx1 * scale) - 1, y0 + round(by1 * scale) - 1), (1, 1, 0), 1
                )
            put(r, 0, whole, f"{name} whole frame" + ("" if box is None else " + crop"))
            for j in range(t):
                put(r, j + 1, _gray_rgb(frames[modality][j], side), f"{name} frame {int(indices[j])}")
            continue
        # x uniform: 1 = the share every key token would get if attention were spread evenly over the T x N
        # keys; the colour scale spans the row's range, so small differences show
        received = attention[direction]
        heat = received * received.size
        share = received.reshape(t, -1).sum(-1)
        query = MODALITY[key_stream(direction, streams)[0]]
        low, high = float(heat.min()), float(heat.max())
        scaled = (heat - low) / max(high - low, 1e-12)
        bar = np.repeat(cmap(np.linspace(1, 0, side))[:, None, :3], side // 4, 1)
        legend = np.ones((side, side, 3), np.float32)
        legend[:, : side // 4] = bar
        put(r, 0, legend, f"{query} -> {name} attention")
        y = r * (BAND + side + GAP) + BAND
        labels += [
            (GAP + side // 4 + 4, y + 8, f"{high:.2f}x uniform", "left"),
            (GAP + side // 4 + 4, y + side - 4, f"{low:.2f}x uniform", "left"),
        ]
        for j in range(t):
            colour = cmap(cv2.resize(scaled[j], (side, side), interpolation=cv2.INTER_NEAREST))[..., :3]
            panel = 0.5 * _gray_rgb(frames[modality][j], side) + 0.5 * colour
            put(r, j + 1, panel, f"{share[j]:.0%} of {query}->{name}")
    if not attention:
        title += "\nno cross-modal attention in this model (strategy: none)"
    top = 14 * (title.count("\n") + 1) + 8
    fig = plt.figure(figsize=(width / 100, (height + top) / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, height / (height + top)))
    ax.imshow(np.clip(canvas, 0, 1), interpolation="nearest")
    ax.set_axis_off()
    for x, y, text, align in labels:
        ax.text(x, y, text, ha=align, va="bottom" if align == "center" else "center", fontsize=7)
    fig.text(0.5, 1 - 4 / (height + top), title, ha="center", va="top", fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path
