"""``report.html`` of ``usnodule report``: one self-contained page (every image embedded as base64 PNG).

What it holds: the tables of ``results.md`` (converted from it, so the two never disagree), ``roc.png`` and
``calibration.png``, and a gallery of the test nodules of the paper's method (STACT-Time, else AsyCMST, else
the first) sorted by error ``|label - prob|``, worst first, so a reader sees which nodules fail: per nodule
the id, fold, label, probability and, when the cine frames can be found, the ROI crop of the frame with the
largest predicted nodule and the same crop with the fold's predicted mask (red) and the drawn mask (green
outline) over it.

Where the crops come from, per fold: ``--cine dataset.hdf5`` (else the ``cine`` path recorded in the fold's
``embeddings.h5``) and the fold's predicted masks ``<runs>/fold<k>/masks.h5`` (else the ``masks`` path recorded
in ``embeddings.h5``).  Without them (AsyCMST runs, a report made elsewhere) the gallery shows the numbers
only and says why.  It lives here rather than in ``stages/`` because command modules import no other one
(tests/test_imports.py) and the gallery is a reader of frames and masks; ``stages/report.py`` passes what it
computed.
"""

from __future__ import annotations

import base64
import html
import io
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from datamodules.errors import DataError

GALLERY_SIZE = 100  # nodules shown by default (the largest errors)
TILE = 128  # px, height of each gallery panel

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:.8em 0;font-size:14px}th,td{border:1px solid #ccc;padding:3px 8px}
th{background:#f0f0f0}td:not(:first-child){text-align:right;font-variant-numeric:tabular-nums}
.plots{display:flex;flex-wrap:wrap;gap:1em}.plots figure{margin:0;flex:1 1 480px}.plots img{width:100%;max-width:600px}
.gallery{display:flex;flex-wrap:wrap;gap:10px}
.nodule{margin:0;border:3px solid #ccc;padding:4px;font-size:12px;background:#fafafa}
.nodule.wrong{border-color:#d33}.nodule figcaption{line-height:1.3}.note{color:#666}
"""


# ---------------------------------------------------------------------------------------------- markdown
def _inline(text: str) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"(?<![*\w])\*([^*]+)\*(?![*\w])", r"<em>\1</em>", text)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def markdown_to_html(text: str) -> str:
    """The subset of Markdown ``results.md`` uses: ``#`` headings, pipe tables, paragraphs, bullet lists,
    ``**bold**``, ``*italic*``, code spans.  Hand-written: the project has no Markdown library and needs none
    for these few forms."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif m := re.match(r"^(#{1,6})\s+(.*)", line):
            n = min(len(m.group(1)) + 1, 6)  # the page's <h1> is the title
            out.append(f"<h{n}>{_inline(m.group(2))}</h{n}>")
            i += 1
        elif line.lstrip().startswith("|"):
            block = []
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                block.append(lines[i])
                i += 1
            rows = [_cells(r) for r in block if not re.fullmatch(r"\|?[\s:|-]+\|?", r.strip())]
            head, body = rows[0], rows[1:]
            out.append("<table>")
            out.append("<tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in body]
            out.append("</table>")
        elif re.match(r"^\s*[-*]\s+", line):
            items = []
            while i < len(lines) and re.match(r"^\s*[-*]\s+", lines[i]):
                items.append(re.sub(r"^\s*[-*]\s+", "", lines[i]))
                i += 1
            out.append("<ul>" + "".join(f"<li>{_inline(t)}</li>" for t in items) + "</ul>")
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not re.match(r"^(#|\s*\||\s*[-*]\s)", lines[i]):
                para.append(lines[i])
                i += 1
            out.append(f"<p>{_inline(' '.join(para))}</p>")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- images
def png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


@dataclass
class CropSource:
    """Where one fold's frames and predicted masks are: the cine HDF5 and the fold's ``masks.h5`` (or None)."""

    cine: Path
    masks: Path | None


def crop_sources(runs: str | os.PathLike, cine: str | os.PathLike | None = None) -> dict[int, CropSource]:
    """Per fold of ``runs``: ``--cine`` or the fold's embeddings' ``cine`` attribute; ``fold<k>/masks.h5`` or
    the embeddings' ``masks`` attribute.  Folds with no readable cine file are left out."""
    import h5py

    found: dict[int, CropSource] = {}
    for d in sorted(Path(runs).glob("fold*")):
        m = re.fullmatch(r"fold(\d+)", d.name)
        if not m or not d.is_dir():
            continue
        attrs: dict = {}
        if (d / "embeddings.h5").is_file():
            try:
                with h5py.File(d / "embeddings.h5", "r") as f:
                    attrs = {k: str(v) for k, v in f.attrs.items() if k in ("cine", "masks")}
            except OSError:
                attrs = {}
        c = Path(cine) if cine is not None else Path(attrs["cine"]) if attrs.get("cine") else None
        masks = (
            d / "masks.h5"
            if (d / "masks.h5").is_file()
            else Path(attrs["masks"])
            if attrs.get("masks")
            else None
        )
        if c is not None and c.is_file():
            found[int(m.group(1))] = CropSource(c, masks if masks is not None and masks.is_file() else None)
    return found


def _box(mask: np.ndarray, shape: tuple[int, int], grow: float = 0.5) -> tuple[int, int, int, int]:
    """Square box around the mask's pixels, its side 1 + ``grow`` times the mask box's longer side (the full
    frame when the mask is empty), clipped to the frame."""
    h, w = shape
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return 0, 0, h, w
    cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
    side = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) * (1 + grow)
    side = max(side, 16)
    y0, x0 = int(max(0, cy - side / 2)), int(max(0, cx - side / 2))
    return y0, x0, int(min(h, cy + side / 2)), int(min(w, cx + side / 2))


def _outline(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:-1, 1:-1] = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    return mask & ~inner


def nodule_tile(frame: np.ndarray, predicted: np.ndarray | None, drawn: np.ndarray | None) -> bytes:
    """PNG of two panels: the ROI crop of ``frame`` (H, W uint8) around the predicted nodule (else the drawn
    one), and the same crop with the predicted mask tinted red and the drawn mask's outline in green."""
    from PIL import Image

    around = predicted if predicted is not None and predicted.any() else drawn
    y0, x0, y1, x1 = _box(around if around is not None else np.zeros_like(frame), frame.shape)
    crop = frame[y0:y1, x0:x1]
    gray = np.repeat(crop[..., None], 3, axis=2).astype(np.float32)
    over = gray.copy()
    if predicted is not None:
        p = predicted[y0:y1, x0:x1] > 0
        over[p] = 0.55 * over[p] + 0.45 * np.array([230, 40, 40])
    if drawn is not None:
        over[_outline(drawn[y0:y1, x0:x1] > 0)] = (40, 220, 60)
    panels = []
    for img in (gray, over):
        im = Image.fromarray(img.clip(0, 255).astype(np.uint8))
        scale = TILE / im.height
        panels.append(np.asarray(im.resize((max(1, round(im.width * scale)), TILE), Image.NEAREST)))
    gap = np.full((TILE, 4, 3), 255, np.uint8)
    return _png(np.concatenate([panels[0], gap, panels[1]], axis=1))


def _frame_and_masks(cine, predicted, annot_id: str, samples: int = 9):
    """The frame (of up to ``samples`` evenly spaced ones) with the largest predicted mask (drawn if no
    predicted masks), with its predicted and drawn masks."""
    n = cine.by_id[annot_id].n_frames
    pos = np.unique(np.linspace(0, n - 1, min(n, samples)).round().astype(int))
    drawn = cine.masks(annot_id, pos)
    pred = predicted.masks(annot_id, pos) if predicted is not None else None
    area = (pred if pred is not None else drawn).reshape(len(pos), -1).sum(1)
    i = int(np.argmax(area)) if area.any() else len(pos) // 2
    frame = cine.frames(annot_id, pos[i : i + 1])[0]
    return frame, None if pred is None else pred[i], drawn[i]


def gallery_tiles(rows: pd.DataFrame, sources: dict[int, CropSource]) -> dict[tuple[int, str], bytes]:
    """``(fold, annot_id) -> PNG`` for the rows whose fold has a crop source and whose id the cine file holds."""
    from datamodules.stacks import PredictedMasks
    from datamodules.stanford import StanfordCine

    tiles: dict[tuple[int, str], bytes] = {}
    opened: dict[Path, StanfordCine] = {}
    for fold, group in rows.groupby("fold"):
        src = sources.get(int(fold))
        if src is None:
            continue
        try:  # the gallery is optional: frames or masks that do not fit leave this fold without crops
            cine = opened.setdefault(src.cine, StanfordCine(src.cine))
            predicted = PredictedMasks(src.masks, cine) if src.masks is not None else None
        except DataError as e:
            print(f"warning: report.html: no crops for fold {int(fold)}: {e}", file=sys.stderr)
            continue
        for annot_id in group["annot_id"].astype(str):
            if annot_id in cine.by_id:
                tiles[(int(fold), annot_id)] = nodule_tile(*_frame_and_masks(cine, predicted, annot_id))
    return tiles


# ---------------------------------------------------------------------------------------------- page
def gallery_html(
    preds: pd.DataFrame, method: str, name: str, sources: dict[int, CropSource], size: int = GALLERY_SIZE
) -> str:
    rows = preds[preds["method"] == method].copy()
    rows["error"] = (rows["label"] - rows["prob"]).abs()
    rows = rows.sort_values(["error", "fold", "annot_id"], ascending=[False, True, True], kind="stable")
    total = len(rows)
    rows = rows.head(size) if size >= 0 else rows
    tiles = gallery_tiles(rows, sources) if sources and len(rows) else {}
    wrong = int(((rows["prob"] >= 0.5).astype(int) != rows["label"]).sum())
    parts = [
        f"<h2>Test nodules by error: {html.escape(name)}</h2>",
        f'<p class="note">{len(rows)} of {total} test nodules, sorted by |label - probability|, worst first; '
        f"red frame = wrong at threshold 0.5 ({wrong} shown). Left: ROI crop of the frame with the largest "
        "predicted nodule; right: predicted mask (red) and drawn mask (green outline).</p>",
    ]
    if not tiles:
        parts.append(
            '<p class="note">No crops: no cine file found for these folds (give <code>--cine dataset.hdf5</code>; '
            "the fold's <code>masks.h5</code> or <code>embeddings.h5</code> in the runs folder tells the rest).</p>"
        )
    parts.append('<div class="gallery">')
    for r in rows.itertuples(index=False):
        label = "malignant" if int(r.label) else "benign"
        cls = "nodule wrong" if int(r.prob >= 0.5) != int(r.label) else "nodule"
        tile = tiles.get((int(r.fold), str(r.annot_id)))
        img = f'<img src="{png_data_uri(tile)}" alt="{html.escape(str(r.annot_id))}">' if tile else ""
        parts.append(
            f'<figure class="{cls}" data-annot-id="{html.escape(str(r.annot_id))}" data-fold="{int(r.fold)}" '
            f'data-label="{int(r.label)}" data-prob="{r.prob:.6g}" data-error="{r.error:.6g}">{img}'
            f"<figcaption><b>{html.escape(str(r.annot_id))}</b> fold {int(r.fold)}<br>{label}, "
            f"p = {r.prob:.3f}, error {r.error:.3f}</figcaption></figure>"
        )
    parts.append("</div>")
    return "\n".join(parts)


def write_html(
    out: str | os.PathLike,
    *,
    title: str,
    results_md: str,
    images: dict[str, Path],
    preds: pd.DataFrame,
    method: str,
    method_name: str,
    sources: dict[int, CropSource],
    gallery_size: int = GALLERY_SIZE,
) -> Path:
    """Write ``out/report.html`` (atomically) and return its path."""
    from datamodules.atomic import atomic_path

    out = Path(out)
    plots = "".join(
        f'<figure><img src="{png_data_uri(p.read_bytes())}" alt="{html.escape(alt)}"></figure>'
        for alt, p in images.items()
        if p.is_file()
    )
    body = [
        f"<h1>{html.escape(title)}</h1>",
        markdown_to_html(results_md),
        '<h2>ROC and calibration</h2><div class="plots">' + plots + "</div>",
        gallery_html(preds, method, method_name, sources, gallery_size),
    ]
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
    with atomic_path(out / "report.html") as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out / "report.html"
