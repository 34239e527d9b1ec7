"""The synthetic still-image set with carcinoma subtypes (``usnodule synth --stills``): the manifest reads, the
subtypes are as frequent as asked, their cues are in the descriptors and the pixels, truth.csv agrees with the
manifest and is read by the report, the ceiling beats the TI-RADS oracle, and the cine layouts do not change."""

import csv
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from datamodules import synth
from datamodules.errors import DataError
from datamodules.stills import read_manifest, read_still, read_still_mask
from datamodules.synth import subtypes
from stages.cli import main
from stages.report import read_truth, reference_predictions

N = 240  # a few hundred tiny images: 144 benign, 72 PTC, 12 FTC, 12 MTC at the default shares


@pytest.fixture(scope="module")
def stills(tmp_path_factory) -> Path:
    return synth.synthesize_stills(tmp_path_factory.mktemp("stills") / "stills", n_stills=N, size=64, seed=5)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_manifest_reads_as_a_still_manifest_with_subtypes(stills):
    cases = read_manifest(stills / "manifest.csv")
    assert len(cases) == N and len({c.case_id for c in cases}) == N
    assert {c.subtype for c in cases} == set(synth.SUBTYPES)
    assert all(c.label == int(c.subtype != "benign") for c in cases)
    for c in cases[:20]:
        img, mask = read_still(c.image), read_still_mask(c.mask)
        assert img.shape == mask.shape == (64, 64) and img.dtype == np.uint8
        assert mask.sum() > 20  # the frame goes through the nodule's centre: never an empty mask
    assert set(np.unique(np.asarray(Image.open(cases[0].mask)))) == {0, 255}
    assert json.loads((stills / synth.MARKER).read_text())["layout"] == "stills"


def test_subtype_frequencies_are_the_targets(stills):
    counts = Counter(r["subtype"] for r in _rows(stills / "manifest.csv"))
    assert counts == {"benign": 144, "PTC": 72, "FTC": 12, "MTC": 12}
    # The malignant share is a parameter; FTC and MTC stay ~5% each, and never exceed a third of the malignant.
    assert synth.subtype_shares(0.5) == pytest.approx({"benign": 0.5, "PTC": 0.4, "FTC": 0.05, "MTC": 0.05})
    assert synth.subtype_shares(0.09)["FTC"] == pytest.approx(0.03)
    plan = synth.plan_stills(333, malignant=0.5, seed=2)
    got = Counter(s for _, s, _ in plan)
    assert got["benign"] + got["PTC"] + got["FTC"] + got["MTC"] == 333
    assert abs(got["FTC"] - 16.65) <= 1 and abs(got["MTC"] - 16.65) <= 1 and abs(got["benign"] - 166.5) <= 1


def test_tables_are_distributions():
    for table in (subtypes.COMPOSITION_TABLE, subtypes.ECHO_TABLE, subtypes.MARGIN_TABLE):
        for s in synth.SUBTYPES:
            assert sum(table[s]) == pytest.approx(1.0) and min(table[s]) > 0


def test_cue_statistics_per_subtype(stills):
    """Descriptor cues on a larger plan (no pixels), pixel cues on the rendered set."""
    plan = synth.plan_stills(3000, seed=9)
    by = {s: [d for _, t, d in plan if t == s] for s in synth.SUBTYPES}

    def share(s, pred):
        return np.mean([pred(d) for d in by[s]])

    hypo = lambda d: d["echogenicity"] in ("hypoechoic", "very hypoechoic")  # noqa: E731
    assert (
        share("PTC", hypo) > share("benign", hypo) + 0.3 and share("MTC", hypo) > share("benign", hypo) + 0.3
    )
    punct = lambda d: "punctate" in d["foci"]  # noqa: E731
    macro = lambda d: "macro" in d["foci"]  # noqa: E731
    assert share("PTC", punct) > 3 * max(share(s, punct) for s in ("benign", "FTC", "MTC"))
    assert share("MTC", macro) > 3 * max(share(s, macro) for s in ("benign", "FTC", "PTC"))
    rough = lambda d: d["margin"] in ("lobulated", "irregular", "extrathyroidal")  # noqa: E731
    assert share("PTC", rough) > 2 * share("benign", rough) and share("FTC", rough) < share("PTC", rough) / 2
    taller = lambda d: d["log_aspect"] > 0  # noqa: E731
    assert share("PTC", taller) > 2.5 * max(share(s, taller) for s in ("benign", "FTC"))
    halo = lambda d: d["halo"]  # noqa: E731
    assert share("FTC", halo) > share("benign", halo) > share("PTC", halo)
    solid = lambda d: d["composition"] == "solid"  # noqa: E731
    assert min(share(s, solid) for s in ("PTC", "FTC", "MTC")) > share("benign", solid) + 0.1
    # MTC round: its wider-than-tall nodules are closer to 1; FTC larger.
    wide = {s: np.median([d["log_aspect"] for d in by[s] if d["log_aspect"] < 0]) for s in synth.SUBTYPES}
    assert wide["MTC"] > wide["benign"] + 0.1
    assert np.median([d["size"] for d in by["FTC"]]) > 1.2 * np.median([d["size"] for d in by["benign"]])
    het = {s: np.mean([d["heterogeneity"] for d in by[s]]) for s in synth.SUBTYPES}
    assert het["benign"] < het["FTC"] < het["PTC"]

    # Pixels: solid PTC and MTC nodules are darker than solid benign ones; MTC (macro) and PTC (punctate) have
    # more bright echogenic pixels inside the mask.
    truth = {r["case_id"]: r for r in _rows(stills / "truth.csv")}
    med, bright = {}, {}
    for r in _rows(stills / "manifest.csv"):
        img = np.asarray(Image.open(stills / r["image"])).astype(np.float32)
        v = img[np.asarray(Image.open(stills / r["mask"])) > 0]
        if truth[r["case_id"]]["composition"] == "solid":
            med.setdefault(r["subtype"], []).append(np.median(v))
        bright.setdefault(r["subtype"], []).append(np.mean(v > 230))
    assert np.mean(med["PTC"]) < np.mean(med["benign"]) - 5
    assert np.mean(med["MTC"]) < np.mean(med["benign"]) - 5
    assert np.mean(bright["PTC"] + bright["MTC"]) > 1.5 * np.mean(bright["benign"])


def test_truth_rows_agree_with_the_manifest_and_the_report_reads_them(stills):
    man = _rows(stills / "manifest.csv")
    truth = _rows(stills / "truth.csv")
    assert tuple(truth[0]) == synth.STILL_TRUTH_COLUMNS
    assert [r["case_id"] for r in truth] == [r["case_id"] for r in man]
    for m, t in zip(man, truth, strict=True):
        assert (t["label"], t["subtype"], t["patient_id"]) == (m["label"], m["subtype"], m["patient_id"])
        p = {s: float(t[f"p_{s}"]) for s in synth.SUBTYPES}
        assert sum(p.values()) == pytest.approx(1.0, abs=1e-4)
        assert sum(float(t[f"tirads_p_{s}"]) for s in synth.SUBTYPES) == pytest.approx(1.0, abs=1e-4)
        if min(p["benign"], 1 - p["benign"]) > 1e-3:  # 6 decimals: log-odds only checkable away from 0 / 1
            assert float(t["risk"]) == pytest.approx(math.log((1 - p["benign"]) / p["benign"]), abs=1e-2)
        assert float(t["hidden_risk"]) == pytest.approx(float(t["risk"]) - float(t["tirads_risk"]), abs=1e-5)
    # `usnodule report --truth` reads it as it is (id column case_id, risk, tirads_risk, label).
    df = read_truth(stills / "truth.csv")
    assert len(df) == N and df.index.name == "case_id"
    preds = pd.DataFrame({"method": "csasn", "fold": [i % 5 for i in range(N)],
                          "annot_id": [r["case_id"] for r in man], "label": [int(r["label"]) for r in man],
                          "prob": 0.5})  # fmt: skip
    refs = reference_predictions(preds, stills / "truth.csv")
    assert set(refs["method"]) == {"bayes_ceiling", "tirads_oracle"} and len(refs) == 2 * N
    bad = preds.assign(label=1 - preds["label"])
    with pytest.raises(DataError, match="label differs"):
        reference_predictions(bad, stills / "truth.csv")


def test_ceiling_is_well_above_chance_and_above_the_tirads_oracle():
    """The generator's exact posterior (no pixels) ranks malignancy far better than chance and better than the
    posterior from the TI-RADS descriptors alone, which is itself a real competitor; it is calibrated."""
    plan = synth.plan_stills(2500, seed=11)
    rows = subtypes.still_truth_rows(plan, synth.DEFAULT_MALIGNANT)
    y = np.array([int(r["label"]) for r in rows])
    ceiling = roc_auc_score(y, [float(r["risk"]) for r in rows])
    oracle = roc_auc_score(y, [float(r["tirads_risk"]) for r in rows])
    assert ceiling > 0.88 and 0.72 < oracle < ceiling - 0.04
    # Multi-class: mean posterior = subtype share (calibration), FTC hardest from TI-RADS alone.
    p = np.array([[float(r[f"p_{s}"]) for s in synth.SUBTYPES] for r in rows])
    assert p.mean(0) == pytest.approx([0.6, 0.3, 0.05, 0.05], abs=0.02)
    sub = np.array([r["subtype"] for r in rows])
    ftc = roc_auc_score(sub == "FTC", [float(r["p_FTC"]) for r in rows])
    ftc_tirads = roc_auc_score(sub == "FTC", [float(r["tirads_p_FTC"]) for r in rows])
    assert ftc > ftc_tirads + 0.05


def test_patients_with_two_nodules_and_split_groups_them(stills, tmp_path, capsys):
    man = _rows(stills / "manifest.csv")
    per = Counter(r["patient_id"] for r in man)
    assert 1 <= sum(v == 2 for v in per.values()) and max(per.values()) == 2
    out = tmp_path / "splits.json"
    main(["split", str(stills / "manifest.csv"), "-k", "5", "--out", str(out)])
    doc = json.loads(out.read_text())
    fold_of = {c: k for k, f in enumerate(doc["folds"]) for c in f["test"]}
    assert set(fold_of) == {r["case_id"] for r in man}
    for pid in (p for p, v in per.items() if v == 2):
        assert len({fold_of[r["case_id"]] for r in man if r["patient_id"] == pid}) == 1


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = _files(synth.synthesize_stills(tmp_path / "a", n_stills=12, size=48, seed=4))
    b = _files(synth.synthesize_stills(tmp_path / "b", n_stills=12, size=48, seed=4))
    c = _files(synth.synthesize_stills(tmp_path / "c", n_stills=12, size=48, seed=5))
    assert a == b
    assert a["images/S0001.png"] != c["images/S0001.png"] and a["truth.csv"] != c["truth.csv"]


def test_refuses_a_foreign_folder_and_replaces_its_own(tmp_path):
    out = tmp_path / "stills"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(DataError, match="refusing"):
        synth.synthesize_stills(out, n_stills=4, size=32)
    assert (out / "mine.txt").read_text() == "keep"
    synth.synthesize_stills(out, n_stills=4, size=32, overwrite=True)
    assert not (out / "mine.txt").exists()
    synth.synthesize_stills(out, n_stills=5, size=32)  # its own output: replaced without --overwrite
    assert len(_rows(out / "manifest.csv")) == 5


def test_render_still_needs_a_still_spec():
    spec, _, _ = synth.plan_stills(3, seed=0)[0]
    img, mask = synth.render_still(spec, 40)
    assert img.shape == mask.shape == (40, 40)
    cine = synth.plan_stanford(2, frames=4, seed=0)[0]
    with pytest.raises(ValueError, match="still"):
        synth.render_still(cine, 40)


def test_cli_stills_and_preview_leave_the_cine_layouts_unchanged(tmp_path, capsys):
    args = ["--nodules", "4", "--frames", "5", "--size", "40", "--cases", "2", "--seed", "2"]
    main(["synth", "--out", str(tmp_path / "plain"), *args])
    main(
        [
            "synth",
            "--out",
            str(tmp_path / "with"),
            *args,
            "--stills",
            "10",
            "--stills-size",
            "48",
            "--preview",
        ]
    )
    assert "stills" in capsys.readouterr().out
    for layout in ("stanford", "paired"):
        assert _files(tmp_path / "plain" / layout) == _files(tmp_path / "with" / layout)
    cases = read_manifest(tmp_path / "with" / "stills" / "manifest.csv")
    assert len(cases) == 10 and read_still(cases[0].image).shape == (48, 48)
    assert (tmp_path / "with" / "preview.png").read_bytes()[:4] == b"\x89PNG"
