"""Contact sheet of a synthesized folder (``usnodule synth --preview``)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import h5py
import numpy as np

from datamodules.atomic import atomic_path
from datamodules.synth.subtypes import SUBTYPES


def _tile(img: np.ndarray, mask: np.ndarray | None, px: int, color: tuple[int, int, int]) -> np.ndarray:
    """(px, px, 3) uint8 tile: the frame (nearest-neighbour resized) with the mask outline drawn in."""
    iy = np.arange(px) * img.shape[0] // px
    ix = np.arange(px) * img.shape[1] // px
    g = img[iy][:, ix]
    out = np.repeat(g[:, :, None], 3, axis=2)
    if mask is not None:
        m = mask[iy][:, ix] > 0
        inner = m.copy()
        inner[1:-1, 1:-1] = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
        out[m & ~inner] = color
    return out


def _still_rows(man: Path, px: int, n: int) -> list[tuple[str, list[np.ndarray]]]:
    """One row per subtype of the still-image set (its first ``n`` stills, mask outline in green)."""
    if not man.exists():
        return []
    from PIL import Image

    with open(man, newline="") as fh:
        cases = list(csv.DictReader(fh))
    rows = []
    present = {r["subtype"] for r in cases}
    for sub in [s for s in SUBTYPES if s in present] + sorted(present - set(SUBTYPES)):
        pick = [r for r in cases if r["subtype"] == sub]
        tiles = [_tile(np.asarray(Image.open(man.parent / r["image"])), np.asarray(Image.open(man.parent / r["mask"])),
                       px, (0, 255, 0)) for r in pick[:n]]  # fmt: skip
        rows.append((f"stills: {sub} ({len(pick)} of {len(cases)})", tiles))
    return rows


def preview(
    root: str | os.PathLike, png: str | os.PathLike | None = None, *, n_clips: int = 4, n_frames: int = 6
) -> Path:
    """Contact sheet of what ``synthesize`` made: a few Stanford clips (frames across the sweep with the mask
    outline), paired BUS and CEUS frames, CEUS time-intensity curves inside the mask (benign blue,
    malignant red) and, when there is a still-image set, a row of stills per subtype.  One mosaic image rather than an axes per frame keeps it fast."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(root)
    png = Path(png) if png is not None else root / "preview.png"
    px, gap = 128, 4
    rows: list[tuple[str, list[np.ndarray]]] = []  # (title, tiles)
    h5 = root / "stanford" / "dataset.hdf5"
    if h5.exists():
        with open(root / "stanford" / "metadata.csv", newline="") as fh:
            meta = {r["annot_id"]: r for r in csv.DictReader(fh)}
        with h5py.File(h5, "r") as f:
            ids = f["annot_id"][:]
            fns = np.array([int(v) for v in f["frame_num"][:]])
            uniq = sorted({v.decode() for v in ids}, key=lambda a: (meta[a]["histopath_diagnosis"] != "1", a))
            chosen = uniq[:1] + uniq[1:][-(n_clips - 1) :] if n_clips > 1 else uniq[:1]
            for a in chosen:
                r = np.flatnonzero(ids == a.encode())
                r = r[np.argsort(fns[r])]
                pick = r[np.linspace(0, len(r) - 1, min(n_frames, len(r))).round().astype(int)]
                m = meta[a]
                lab = "malignant" if m["histopath_diagnosis"] == "1" else "benign"
                tiles = [_tile(f["image"][i], f["mask"][i], px, (0, 255, 0)) for i in pick]
                rows.append((f"Stanford layout {a}: {lab}, {m['ti-rads_level'] or 'TR?'}", tiles))
    curves = []
    man = root / "paired" / "manifest.csv"
    if man.exists():
        with open(man, newline="") as fh:
            cases = list(csv.DictReader(fh))[:12]
        for j, r in enumerate(cases):
            ceus, mk = np.load(man.parent / r["ceus"]), np.load(man.parent / r["bus_mask"])
            curves.append((r["label"] == "1", (ceus * mk).sum((1, 2)) / np.maximum(mk.sum((1, 2)), 1)))
            if j < 2:
                bus = np.load(man.parent / r["bus"])
                pick = np.linspace(0, len(bus) - 1, min(n_frames, len(bus))).round().astype(int)
                lab = "malignant" if r["label"] == "1" else "benign"
                green, yellow = (0, 255, 0), (255, 220, 0)
                name = f"paired {r['case_id']}"
                rows.append((f"{name} BUS ({lab})", [_tile(bus[i], mk[i], px, green) for i in pick]))
                rows.append((f"{name} CEUS", [_tile(ceus[i], mk[i], px, yellow) for i in pick]))
    rows += _still_rows(root / "stills" / "manifest.csv", px, n_frames)
    if not rows:
        raise FileNotFoundError(f"{root}: nothing synthesized there")
    row_h = px + gap + 14  # room for a title above each row
    sheet = np.full((len(rows) * row_h, n_frames * (px + gap), 3), 255, np.uint8)
    for k, (_, tiles) in enumerate(rows):
        for j, tile in enumerate(tiles):
            y, x = k * row_h + 14, j * (px + gap)
            sheet[y : y + px, x : x + px] = tile
    h_in = sheet.shape[0] / 100 + (1.6 if curves else 0.0)
    fig = plt.figure(figsize=(sheet.shape[1] / 100, h_in), dpi=100)
    top = fig.add_axes((0, (1.6 / h_in) if curves else 0.0, 1, sheet.shape[0] / 100 / h_in))
    top.imshow(sheet, interpolation="nearest")
    top.axis("off")
    for k, (title, _) in enumerate(rows):
        top.text(2, k * row_h + 11, title, fontsize=7)
    if curves:
        ax = fig.add_axes((0.07, 0.25 / h_in, 0.9, 1.15 / h_in))
        for malignant, c in curves:
            ax.plot(c, color="tab:red" if malignant else "tab:blue", lw=0.8)
        ax.set_title("CEUS time-intensity in the nodule (red malignant, blue benign)", fontsize=7)
        ax.set_xlabel("frame", fontsize=6)
        ax.tick_params(labelsize=6)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return png
