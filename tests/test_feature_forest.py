"""CSASN's non-deep baseline (``usnodule feature-forest``): the pixel features by their formulas (GLCM inside the
mask only), a forest that never sees a validation or test case, prediction files both reports read, and the
Makefile wiring (the forest in ``make csasn``'s report; ``make twostage`` on the subtype still set by default)."""

from __future__ import annotations

import csv
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from skimage.draw import disk, ellipse

from datamodules.still_features import FEATURES, PIXEL_FEATURES, feature_matrix, pixel_features
from stages import feature_forest as ff
from stages.cli import main as usnodule

ROOT = Path(__file__).resolve().parents[1]
SUBTYPES = ["benign", "PTC", "FTC", "MTC"]


# ---------------------------------------------------------------------------------------------- features
def test_pixel_features_by_their_formulas():
    img = np.full((60, 60), 150, np.uint8)
    mask = np.zeros((60, 60), np.uint8)
    mask[disk((30, 30), 12, shape=mask.shape)] = 1
    img[mask > 0] = 50
    f = pixel_features(img, mask)
    assert f["int_mean"] == 50 and f["int_std"] == 0 and f["int_p99"] == 50
    assert f["ring_mean"] == 150 and f["ring_contrast"] == -100  # hypoechoic: darker than its surroundings
    assert f["rim_contrast"] == 0
    assert f["glcm_contrast"] == 0 and f["glcm_homogeneity"] == 1 and f["glcm_energy"] == 1

    # a dark halo 3 px wide (the rim width at this area: max(2, round(0.15 sqrt(A))) = 3) inside the margin
    core = np.zeros_like(mask)
    core[disk((30, 30), 9, shape=mask.shape)] = 1
    halo = img.copy()
    halo[(mask > 0) & (core == 0)] = 20
    assert pixel_features(halo, mask)["rim_contrast"] == pytest.approx(20 - 50, abs=3)

    # a checkerboard of levels 3 and 7 (gray 40, 104; bins of 16) inside the mask, 255 outside: distance 1 at 0
    # and 90 degrees sees the level step (4^2 = 16), the diagonals and distance 2 see equal levels, so the mean
    # contrast over the 8 matrices is 16 * 2 / 8 = 4 -- only if the pairs leaving the mask are dropped
    yy, xx = np.mgrid[:60, :60]
    board = np.where((yy + xx) % 2 == 0, 40, 104).astype(np.uint8)
    square = np.zeros((60, 60), np.uint8)
    square[10:50, 10:50] = 1
    board[square == 0] = 255
    g = pixel_features(board, square)
    assert g["glcm_contrast"] == pytest.approx(4.0)
    assert g["glcm_dissimilarity"] == pytest.approx(4 * 2 / 8)
    assert g["int_mean"] == pytest.approx(72) and g["int_p10"] == 40 and g["int_p90"] == 104

    empty = pixel_features(img, np.zeros_like(mask))
    assert all(np.isnan(v) for v in empty.values())
    x = feature_matrix([mask, np.zeros_like(mask)], [img, img])
    assert x.shape == (2, len(FEATURES) + len(PIXEL_FEATURES)) and np.isnan(x[1, len(FEATURES) :]).all()


# ---------------------------------------------------------------------------------------------- forest
def subtype_stills(root: Path, rows_override: dict | None = None) -> Path:
    """24 stills 40x40 (12 benign, 4 each PTC / FTC / MTC) whose nodules differ by subtype (dark / bright /
    large / elongated), drawn masks, one patient each."""
    rng = np.random.default_rng(0)
    rows = []
    for i, sub in enumerate(["benign"] * 12 + ["PTC", "FTC", "MTC"] * 4):
        img = rng.integers(100, 140, (40, 40)).astype(np.uint8)
        mask = np.zeros((40, 40), np.uint8)
        ry, rx = {"benign": (6, 6), "PTC": (8, 4), "FTC": (11, 11), "MTC": (5, 9)}[sub]
        mask[ellipse(20, 20, ry + rng.integers(0, 2), rx + rng.integers(0, 2), shape=(40, 40))] = 1
        img[mask > 0] = {"benign": 120, "PTC": 40, "FTC": 110, "MTC": 70}[sub] + rng.integers(-5, 5)
        Image.fromarray(img).save(root / f"img{i}.png")
        Image.fromarray(mask * 255).save(root / f"img{i}_mask.png")
        rows.append([f"c{i}", f"img{i}.png", f"img{i}_mask.png", int(sub != "benign"), f"p{i}", sub])
    for i, sub in (rows_override or {}).items():
        rows[i][3], rows[i][5] = int(sub != "benign"), sub
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        csv.writer(f).writerows([["case_id", "image", "mask", "label", "patient_id", "subtype"], *rows])
    return manifest


@pytest.fixture(scope="module")
def stills(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ff")
    manifest = subtype_stills(root)
    splits = root / "splits.json"
    usnodule(["split", str(manifest), "-k", "4", "--stratify", "subtype", "--out", str(splits)])
    return {"root": root, "manifest": manifest, "splits": splits}


def test_forest_sees_only_training_cases(stills, tmp_path, monkeypatch):
    from datamodules.folds import load_fold
    from datamodules.stills import read_manifest, read_still, read_still_mask

    seen = []
    real = ff.subtype_forest

    def spy(x_train, y_train, x_eval, n_classes, **kw):
        seen.append((np.array(x_train), list(y_train), len(x_eval)))
        return real(x_train, y_train, x_eval, n_classes, **kw)

    monkeypatch.setattr(ff, "subtype_forest", spy)
    runs = tmp_path / "runs"
    written = ff.run_feature_forest(
        manifest=stills["manifest"], splits=stills["splits"], runs=runs, n_estimators=30
    )
    assert len(written) == 8 and len(seen) == 4
    cases = {c.case_id: c for c in read_manifest(stills["manifest"])}
    for k, (x_train, y_train, n_eval) in enumerate(seen):
        part = load_fold(stills["splits"], k)
        want = feature_matrix(
            [read_still_mask(cases[i].mask) for i in part["train"]],
            [read_still(cases[i].image) for i in part["train"]],
        )
        np.testing.assert_array_equal(x_train, want)  # the training cases' rows, in order: nothing else
        assert y_train == [SUBTYPES.index(cases[i].subtype) for i in part["train"]]
        assert n_eval == len(part["test"]) + len(part["val"])

    # leakage check from the outside: relabel every validation and test case of fold 0 -- its predictions stay
    # the same to the last digit, while relabelling one of its training cases changes them
    part = load_fold(stills["splits"], 0)
    index = {f"c{i}": i for i in range(24)}

    def fold0(override: dict, name: str) -> pd.DataFrame:
        root = tmp_path / name
        shutil.copytree(stills["root"], root)
        manifest = subtype_stills(root, override)
        ff.run_feature_forest(
            manifest=manifest, splits=stills["splits"], runs=root / "runs", folds=[0], n_estimators=30
        )
        return pd.read_csv(root / "runs" / "fold0" / "predictions_feature_forest.csv")

    swap = {"benign": "PTC", "PTC": "benign", "FTC": "MTC", "MTC": "FTC"}
    held_out = {index[i]: swap[cases[i].subtype] for i in part["test"] + part["val"]}
    base, relabelled = fold0({}, "base"), fold0(held_out, "held_out")
    probs = [f"p_{s}" for s in SUBTYPES]
    np.testing.assert_array_equal(base[probs].to_numpy(), relabelled[probs].to_numpy())
    assert (base["subtype"] != relabelled["subtype"]).all()  # the truth column follows the manifest
    train = {index[i]: swap[cases[i].subtype] for i in part["train"][:4]}
    assert not np.array_equal(base[probs].to_numpy(), fold0(train, "train")[probs].to_numpy())


def test_prediction_files_are_what_both_reports_read(stills, tmp_path, capsys):
    runs = tmp_path / "runs"
    usnodule(["feature-forest", "--manifest", str(stills["manifest"]), "--splits", str(stills["splits"]),
              "--runs", str(runs), "--n-estimators", "30"])  # fmt: skip
    assert capsys.readouterr().out.strip().endswith("RESULT files=8")
    df = pd.read_csv(runs / "fold1" / "predictions_feature_forest.csv")
    assert list(df.columns) == [
        "annot_id",
        "subtype",
        "pred_subtype",
        *(f"p_{s}" for s in SUBTYPES),
        "label",
        "prob",
    ]
    p = df[[f"p_{s}" for s in SUBTYPES]].to_numpy()
    np.testing.assert_allclose(p.sum(axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(df["prob"], 1 - df["p_benign"], atol=1e-5)  # malignant = any carcinoma
    assert (df["pred_subtype"] == [SUBTYPES[j] for j in p.argmax(axis=1)]).all()
    assert (df["label"] == (df["subtype"] != "benign").astype(int)).all()
    assert (runs / "fold1" / "val_predictions_feature_forest.csv").is_file()
    usnodule(["report-multiclass", "--runs", str(runs), "--out", str(tmp_path / "mc")])
    table = pd.read_csv(tmp_path / "mc" / "results_multiclass.csv")
    assert table["method"].tolist() == ["feature_forest"] and table["n_folds"].tolist() == [4]
    # the shapes and gray levels separate the subtypes here: the forest must find them
    assert table["macro_auroc_mean"].iat[0] > 0.8
    usnodule(["report", "--runs", str(runs), "--out", str(tmp_path / "bin"), "--n-boot", "20"])
    assert pd.read_csv(tmp_path / "bin" / "results.csv")["method"].tolist() == ["feature_forest"]


def test_multiclass_report_adds_the_generators_reference_rows(stills, tmp_path, capsys):
    """``report-multiclass --truth``: the ceiling (here the true class with certainty) and the TI-RADS oracle
    (here uniform) scored on the same test images; a truth file of other images is one line."""
    runs = tmp_path / "runs"
    ff.run_feature_forest(manifest=stills["manifest"], splits=stills["splits"], runs=runs, n_estimators=20)
    m = pd.read_csv(stills["manifest"])
    truth = pd.DataFrame({"case_id": m["case_id"], "subtype": m["subtype"]})
    for s in SUBTYPES:
        truth[f"p_{s}"] = (m["subtype"] == s).astype(float)
        truth[f"tirads_p_{s}"] = 0.25
    truth.to_csv(tmp_path / "truth.csv", index=False)
    usnodule(
        [
            "report-multiclass",
            "--runs",
            str(runs),
            "--out",
            str(tmp_path / "rep"),
            "--truth",
            str(tmp_path / "truth.csv"),
        ]
    )
    table = pd.read_csv(tmp_path / "rep" / "results_multiclass.csv").set_index("method")
    assert list(table.index) == ["feature_forest", "bayes_ceiling", "tirads_oracle"]
    assert (
        table.loc["bayes_ceiling", "macro_f1_mean"] == 1
        and table.loc["bayes_ceiling", "macro_auroc_mean"] == 1
    )
    assert (
        table.loc["tirads_oracle", "macro_auroc_mean"] == 0.5 and table.loc["bayes_ceiling", "n_images"] == 24
    )
    md = (tmp_path / "rep" / "results_multiclass.md").read_text()
    assert "## Reference (generator truth)" in md and "| *Bayes ceiling* | 1.00 ± 0.00 |" in md
    truth.assign(case_id="x" + truth["case_id"]).to_csv(tmp_path / "other.csv", index=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        usnodule(
            [
                "report-multiclass",
                "--runs",
                str(runs),
                "--out",
                str(tmp_path / "r2"),
                "--truth",
                str(tmp_path / "other.csv"),
            ]
        )
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "test image id(s) not in it" in err[0]
    assert not (tmp_path / "r2" / "results_multiclass.md").exists()


def test_bad_class_list_is_one_line(stills, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        usnodule(["feature-forest", "--manifest", str(stills["manifest"]), "--splits", str(stills["splits"]),
                  "--runs", str(tmp_path), "--subtypes", "benign,PTC,FTC"])  # fmt: skip
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has subtype 'MTC'" in err[0] and str(stills["manifest"]) in err[0]
    assert not list(tmp_path.rglob("*.csv"))


# ---------------------------------------------------------------------------------------------- make
def _dry(tmp_path: Path, target: str, **var) -> list[str]:
    base = {"FOLDS": 2, "STAMP": tmp_path / "stamp", "RUNS": tmp_path / "runs", "REPORT": tmp_path / "rep",
            "CONF": tmp_path / "conf", "VERBOSE": 1}  # fmt: skip
    cmd = ["make", "-n", "-C", str(ROOT), target, *(f"{k}={v}" for k, v in {**base, **var}.items())]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    out = out.replace("\\\n", " ")  # one line per command (make -n keeps a recipe's continuation lines)
    return [line for line in out.splitlines() if line.strip() and not line.startswith("make")]


@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")
def test_make_csasn_reports_the_forest_beside_csasn(tmp_path):
    (tmp_path / "stills").mkdir()
    (tmp_path / "conf").mkdir()
    for f in ("stills/manifest.csv", "conf/csasn.yaml", "stamp"):
        (tmp_path / f).write_text("")
    var = {"STILLS_MANIFEST": tmp_path / "stills" / "manifest.csv"}
    lines = _dry(tmp_path, "csasn", **var)
    forest = [x for x in lines if "usnodule feature-forest" in x]
    assert len(forest) == 1 and f"--runs {tmp_path}/runs/csasn" in forest[0] and "--folds 0 1" in forest[0]
    assert "--splits " + str(tmp_path / "stills" / "splits_subtype.json") in forest[0]
    report = next(i for i, x in enumerate(lines) if "usnodule report-multiclass" in x)
    assert (
        lines.index(forest[0]) < report and "truth.csv" in lines[report]
    )  # the reference rows when it exists
    # everything made: the forest is not rerun
    for k in range(2):
        p = tmp_path / "runs" / "csasn" / f"fold{k}" / "predictions_csasn.csv"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("")
    (tmp_path / "stills" / "splits_subtype.json").write_text("")
    for p in [*(tmp_path / "runs").rglob("*.csv")]:
        p.touch()
    (tmp_path / "runs" / "csasn" / "feature_forest.done").write_text("")
    assert not any("feature-forest" in x or "lightning fit" in x for x in _dry(tmp_path, "csasn", **var))


@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")
def test_make_twostage_runs_on_the_subtype_still_set_by_default(tmp_path):
    synth = tmp_path / "synth"
    (tmp_path / "conf").mkdir()
    for f in ("conf/transunet.yaml", "conf/roi_resnet18.yaml", "stamp"):
        (tmp_path / f).write_text("")
    lines = _dry(tmp_path, "twostage", SYNTH=synth, FOLDS=1)
    stills = synth / "stills"
    assert any(
        f"usnodule split {stills}/manifest.csv" in x and f"--out {stills}/splits.json" in x for x in lines
    )
    fits = [x for x in lines if "lightning fit" in x]
    assert len(fits) == 2 and all(f"--data.init_args.manifest={stills}/manifest.csv" in x for x in fits)
    assert not any("import-stills" in x for x in lines)  # the cine export is not made
    assert any("usnodule report --runs" in x and f"{stills}/truth.csv" in x for x in lines)  # ceiling rows
    # the cine export stays one variable away
    cine = _dry(tmp_path, "twostage", SYNTH=synth, FOLDS=1, STILLS=synth / "stills_cine")
    assert any("import-stills --layout stanford" in x and f"--out {synth}/stills_cine" in x for x in cine)
    assert any(f"--data.init_args.manifest={synth}/stills_cine/manifest.csv" in x for x in cine)
