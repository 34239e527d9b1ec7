"""``report.html`` of ``usnodule report`` (datamodules/report_html.py): structure read back with html.parser."""

from __future__ import annotations

import base64
import io
from html.parser import HTMLParser

import h5py
import numpy as np
import pandas as pd
from PIL import Image

from datamodules.report_html import markdown_to_html
from datamodules.stanford import StanfordCine
from stages.cli import main as usnodule
from tests.commands import argv


class Page(HTMLParser):
    """Tables (rows of cell texts), every <img> src, and the gallery's figures (their data-* attributes and
    whether they hold an image)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.images: list[str] = []
        self.figures: list[dict] = []
        self._cell: list[str] | None = None
        self._figure: dict | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(a["src"])
            if self._figure is not None:
                self._figure["img"] = a["src"]
        elif tag == "figure" and "data-error" in a:
            self._figure = {**a, "img": None}
            self.figures.append(self._figure)

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "figure":
            self._figure = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def decode(src: str) -> Image.Image:
    assert src.startswith("data:image/png;base64,")  # embedded, nothing to fetch
    img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    img.load()
    return img


def runs_on_synth(root):
    """A tiny synthetic cine set, a fold masks.h5 per fold (the drawn masks, shifted: 'predicted') and
    two methods' test predictions over 3 folds of its nodules."""
    usnodule(argv("synth", out=root / "data", nodules=9, frames=6, size=32, cases=1, prevalence=0.4, seed=3))
    h5 = root / "data" / "stanford" / "dataset.hdf5"
    cine = StanfordCine(h5)
    rng = np.random.default_rng(0)
    ids = [n.annot_id for n in cine.nodules]
    labels = dict(zip(ids, cine.labels(), strict=True))
    with h5py.File(h5) as f:
        masks = (f["mask"][()] > 0).astype(np.uint8)
        cols = {k: f[k][()] for k in ("annot_id", "frame_num")}
    for k in range(3):
        d = root / "runs" / f"fold{k}"
        d.mkdir(parents=True)
        with h5py.File(d / "masks.h5", "w") as f:
            f["mask"] = np.roll(masks, k, axis=2)
            for key, v in cols.items():
                f[key] = v
        fold_ids = ids[k::3]
        for m in ("stact", "tirads"):
            y = np.array([labels[i] for i in fold_ids])
            prob = np.clip(y * 0.4 + 0.3 + rng.normal(0, 0.3, len(y)), 0, 1).round(4)
            pd.DataFrame({"annot_id": fold_ids, "label": y, "prob": prob}).to_csv(
                d / f"predictions_{m}.csv", index=False
            )
    return h5, root / "runs"


def test_report_html_tables_plots_and_gallery_sorted_by_error(tmp_path, capsys):
    h5, runs = runs_on_synth(tmp_path)
    out = tmp_path / "report"
    usnodule(argv("report", runs=runs, out=out, n_boot=20, title="STACT-Time", cine=h5))
    assert "report.html" in capsys.readouterr().out
    page = Page()
    page.feed((out / "report.html").read_text())
    # the tables of results.md, same numbers
    heads = [t[0] for t in page.tables]
    assert [
        "Method",
        "Nodule ACC",
        "Nodule Precision",
        "Nodule Recall",
        "Nodule F1",
        "Nodule AUROC",
        "folds",
    ] in heads
    table = page.tables[
        heads.index(
            [
                "Method",
                "Nodule ACC",
                "Nodule Precision",
                "Nodule Recall",
                "Nodule F1",
                "Nodule AUROC",
                "folds",
            ]
        )
    ]
    assert [r[0] for r in table[1:]] == ["TI-RADS", "STACT-Time"]
    assert "| " + " | ".join(table[2]) + " |" in (out / "results.md").read_text()
    assert any(h[:2] == ["Method", "Brier"] for h in heads)  # calibration table
    # every image is an embedded PNG: the two plots (as written) and one tile per nodule
    decoded = [decode(s) for s in page.images]
    roc = Image.open(out / "roc.png")
    assert any(d.size == roc.size for d in decoded[:2])
    # the gallery: STACT-Time's 9 test nodules, worst error first, each with its crop tile
    errors = [float(f["data-error"]) for f in page.figures]
    assert len(errors) == 9 and errors == sorted(errors, reverse=True)
    preds = pd.read_csv(out / "predictions.csv").query("method == 'stact'")
    want = (preds["label"] - preds["prob"]).abs().sort_values(ascending=False).to_numpy()
    np.testing.assert_allclose(errors, want, atol=1e-5)
    for f in page.figures:
        assert f["img"] is not None
        tile = decode(f["img"])
        assert tile.height == 128 and tile.width > 128  # crop | crop + masks
        row = preds[preds["annot_id"].astype(str) == f["data-annot-id"]].iloc[0]
        assert int(f["data-label"]) == row["label"] and abs(float(f["data-prob"]) - row["prob"]) < 1e-5
        assert ("wrong" in f["class"]) == (int(row["prob"] >= 0.5) != row["label"])


def test_report_html_without_frames_and_gallery_size(tmp_path):
    h5, runs = runs_on_synth(tmp_path)
    out = tmp_path / "report"
    usnodule(argv("report", runs=runs, out=out, n_boot=20, gallery=4))  # no --cine, no embeddings.h5
    text = (out / "report.html").read_text()
    page = Page()
    page.feed(text)
    assert len(page.figures) == 4 and all(f["img"] is None for f in page.figures)
    assert "No crops" in text and len(page.images) == 2  # ROC + calibration only


def test_masks_of_another_file_leave_that_fold_without_crops(tmp_path, capsys):
    h5, runs = runs_on_synth(tmp_path)
    with h5py.File(runs / "fold1" / "masks.h5", "r+") as f:
        del f["mask"]
        f["mask"] = np.zeros((3, 8, 8), np.uint8)  # not this cine file's masks
    out = tmp_path / "report"
    usnodule(argv("report", runs=runs, out=out, n_boot=20, cine=h5))
    assert "warning: report.html: no crops for fold 1" in capsys.readouterr().err
    page = Page()
    page.feed((out / "report.html").read_text())
    assert {f["data-fold"] for f in page.figures if f["img"] is None} == {"1"}
    assert sum(f["img"] is not None for f in page.figures) == 6


def test_markdown_subset():
    html = markdown_to_html("# T\n\nA *b* **c** `d` <e>\n\n| x | y |\n|---|---|\n| 1 | 2 |\n\n- one\n- two\n")
    assert "<h2>T</h2>" in html and "<em>b</em>" in html and "<strong>c</strong>" in html
    assert "<code>d</code>" in html and "&lt;e&gt;" in html
    assert "<tr><th>x</th><th>y</th></tr>" in html and "<tr><td>1</td><td>2</td></tr>" in html
    assert "<ul><li>one</li><li>two</li></ul>" in html
