"""Issue 12: what CSASN sees -- a contact sheet of the network's inputs per subtype for one fold.

For a few training cases of each subtype (benign, PTC, FTC, MTC) of one fold of the still set, one row of tiles:
the whole still with the drawn outline and the ROI box (green / yellow), then the network's input channels as
``StillDataModule`` builds them for the given data settings (the image crop resized to ``img_size``; the mask
channel when ``mask_channel`` is on), without augmentation, with the generator's cues from ``truth.csv`` in the
row's title (foci, halo, margin, echogenicity, aspect): is a PTC's punctate focus, an FTC's halo, an MTC's coarse
focus and its shadow still there after the crop and resize?

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/csasn_inputs.py OUT.png [--conf conf/demo/csasn.yaml]
        [--fold 0] [--n 4] [-- DATA_OVERRIDES e.g. img_size=96 roi_margin=0.25]

The data settings are the config's ``data.init_args`` with ``key=value`` overrides (YAML values).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import yaml

SUBTYPES = ("benign", "PTC", "FTC", "MTC")


def gray(t) -> np.ndarray:
    """A (S, S) float channel rescaled to uint8 over its own range (normalisation undone for display)."""
    a = t.numpy().astype(np.float64)
    lo, hi = a.min(), a.max()
    return np.zeros(a.shape, np.uint8) if hi <= lo else ((a - lo) / (hi - lo) * 255).astype(np.uint8)


def big(a: np.ndarray, px: int) -> np.ndarray:
    """Nearest-neighbour resize of a (H, W[, 3]) uint8 tile to px x px (pixels stay visible)."""
    iy = np.arange(px) * a.shape[0] // px
    ix = np.arange(px) * a.shape[1] // px
    a = a[iy][:, ix]
    return np.repeat(a[:, :, None], 3, axis=2) if a.ndim == 2 else a


def whole(image: np.ndarray, mask: np.ndarray, box) -> np.ndarray:
    """The still with the drawn outline (green) and the ROI box (yellow)."""
    out = np.repeat(image[:, :, None], 3, axis=2).copy()
    m = mask > 0
    inner = m.copy()
    inner[1:-1, 1:-1] = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    out[m & ~inner] = (0, 255, 0)
    if box is not None:
        y0, x0, y1, x1 = box
        y1, x1 = y1 - 1, x1 - 1
        out[y0, x0 : x1 + 1] = out[y1, x0 : x1 + 1] = (255, 220, 0)
        out[y0 : y1 + 1, x0] = out[y0 : y1 + 1, x1] = (255, 220, 0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--conf", default="conf/demo/csasn.yaml")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--n", type=int, default=4, help="cases per subtype")
    p.add_argument("--px", type=int, default=160, help="tile side on the sheet")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    a = p.parse_args(argv[:cut])
    overrides = dict(kv.split("=", 1) for kv in argv[cut + 1 :])

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from datamodules.still_data import StillDataModule

    conf = yaml.safe_load(Path(a.conf).read_text())
    data = dict(conf["data"]["init_args"])
    data.update({k: yaml.safe_load(v) for k, v in overrides.items()})
    mask_channel = bool(data.pop("mask_channel", conf["model"]["init_args"].get("mask_channel", False)))
    dm = StillDataModule(**{**data, "fold": a.fold, "augment": False})
    dm.setup("fit")
    ds = dm.datasets["train"]
    truth = pd.read_csv(Path(data["manifest"]).parent / "truth.csv", dtype={"case_id": str}).set_index(
        "case_id"
    )
    rows = []
    for s in SUBTYPES:
        picks = [i for i, k in enumerate(ds.subtype_index) if ds.subtypes[k] == s]
        # the cases that carry their subtype's cue first (foci for PTC / MTC, a halo for FTC)
        cue = {"PTC": "punctate", "MTC": "macro"}.get(s)

        def has_cue(i, s=s, cue=cue):
            t = truth.loc[ds.cases[i].case_id]
            return bool(t["halo"]) if s == "FTC" else (cue is not None and cue in str(t["foci"]))

        picks = sorted(picks, key=lambda i: not has_cue(i))[: a.n]
        for i in picks:
            image, mask, _, box = ds.read(i)
            item = ds[i]
            tiles = [big(whole(image, mask, box), a.px), big(gray(item["image"][0]), a.px)]
            if mask_channel:
                tiles.append(big((item["mask"][0].numpy() * 255).astype(np.uint8), a.px))
            t = truth.loc[ds.cases[i].case_id]
            foci = t["foci"] if isinstance(t["foci"], str) else "none"
            title = (
                f"{s} {ds.cases[i].case_id}: foci {foci}, halo {int(t['halo'])}, {t['margin']}, "
                f"{t['echogenicity']}, aspect {t['aspect']:.2f}, {t['size_cm']:.1f} cm"
            )
            rows.append((title, tiles))
    gap, head = 4, 14
    ncol = max(len(t) for _, t in rows)
    cols = 2  # two cases side by side
    cell_w = ncol * (a.px + gap) + 3 * gap
    nrow = (len(rows) + cols - 1) // cols
    sheet = np.full((nrow * (a.px + gap + head), cols * cell_w, 3), 255, np.uint8)
    for k, (_, tiles) in enumerate(rows):
        r, c = divmod(k, cols)
        for j, tile in enumerate(tiles):
            y, x = r * (a.px + gap + head) + head, c * cell_w + j * (a.px + gap)
            sheet[y : y + a.px, x : x + a.px] = tile
    fig = plt.figure(figsize=(sheet.shape[1] / 100, sheet.shape[0] / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(sheet, interpolation="nearest")
    ax.axis("off")
    for k, (title, _) in enumerate(rows):
        r, c = divmod(k, cols)
        ax.text(c * cell_w + 2, r * (a.px + gap + head) + 11, title, fontsize=7)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=100)
    print(
        f"{a.out}: {len(rows)} cases, fold {a.fold}, data {data.get('img_size')} px, roi {data.get('roi')}, "
        f"margin {data.get('roi_margin')}, square {data.get('roi_square')}, mask channel {mask_channel}"
    )


if __name__ == "__main__":
    main()
