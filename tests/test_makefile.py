"""The Makefile's targets are files with their inputs as prerequisites: reruns do only what changed.

Runs ``make -n`` (print, don't run) on a scratch tree of empty files with ordered modification times.
"""

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = [
    "vit.ckpt",
    "seg.ckpt",
    "masks.h5",
    "maskcnn.ckpt",
    "embeddings.h5",
    "head_stact.ckpt",
    "head_cine_trans.ckpt",
]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")


def _tree(tmp: Path) -> dict:
    files = [tmp / "data" / "dataset.hdf5", tmp / "data" / "splits.json", tmp / "stamp"]
    files += [tmp / "conf" / f"{s}.yaml" for s in ("vit", "seg", "maskcnn", "head", "cinetrans")]
    files += [tmp / "runs" / ".roi"]  # the ROI the runs were made with (the Makefile's default)
    files += [tmp / "runs" / "fold0" / s for s in STAGES]
    files += [tmp / "runs" / "fold0" / "predictions.done", tmp / "runs" / "predictions.done"]
    t = time.time() - 1000
    for i, f in enumerate(files):  # each file newer than everything before it: all up to date
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("predicted\n" if f.name == ".roi" else "")
        os.utime(f, (t + i, t + i))
    os.utime(
        tmp / "stamp", None
    )  # the install stamp must be newer than pyproject.toml (order-only for the rest)
    return {
        "DATA": tmp / "data",
        "CONF": tmp / "conf",
        "RUNS": tmp / "runs",
        "STAMP": tmp / "stamp",
        "FOLDS": 1,
        "HEAD_VARIANTS": "stact",
    }


def _dry(target: str, vars: dict) -> list[str]:
    out = subprocess.run(
        ["make", "-n", "-C", str(ROOT), target, *(f"{k}={v}" for k, v in vars.items())],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line for line in out.splitlines() if line.strip() and not line.startswith("make")]


def _bump(path: Path) -> None:
    os.utime(path, None)  # now: newer than every output


def test_nothing_changed_does_nothing(tmp_path):
    v = _tree(tmp_path)
    assert _dry("embeddings", v) == []
    assert _dry("train-head", v) == []
    assert _dry("predictions", v) == []


def test_a_changed_config_reruns_what_depends_on_it(tmp_path):
    v = _tree(tmp_path)
    _bump(tmp_path / "conf" / "head.yaml")
    cmds = _dry("train-head", v)
    assert len(cmds) == 1 and "fit -c" in cmds[0] and "head.yaml" in cmds[0]
    _bump(tmp_path / "conf" / "maskcnn.yaml")
    cmds = " ".join(_dry("train-head", v))
    assert "maskcnn.yaml" in cmds and "usnodule embeddings" in cmds and "head.yaml" in cmds
    assert "vit.yaml" not in cmds and "seg.yaml" not in cmds and "usnodule masks" not in cmds


def test_new_splits_rerun_every_fit(tmp_path):
    v = _tree(tmp_path)
    _bump(tmp_path / "data" / "splits.json")
    cmds = " ".join(_dry("train-head", v))
    for stage in ("vit", "seg", "maskcnn", "head"):
        assert f"{stage}.yaml" in cmds


def _commands(lines: list[str]) -> list[str]:
    """One string per recipe command (``make -n`` prints a continued line as several)."""
    out, cur = [], ""
    for line in lines:
        cur += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            out.append(cur.strip())
            cur = ""
    return out


def test_cinetrans_is_fitted_per_fold_by_lightning_fit_and_baselines_only_predict(tmp_path):
    v = _tree(tmp_path)
    _bump(tmp_path / "conf" / "cinetrans.yaml")
    cmds = _commands(_dry("predictions", {**v, "SEED": 5}))
    # the fold's CineCNN-Trans fit, then that fold's predictions (and its stamp), then the all-folds stamp
    assert len(cmds) == 4
    fit, predict = cmds[0], cmds[1]
    assert "--name head_cine_trans --fold 0" in fit and "lightning fit -c" in fit and "cinetrans.yaml" in fit
    assert (
        "--data.init_args.fold=0" in fit and "--data.init_args.path=" in fit and "fold0/embeddings.h5" in fit
    )
    assert "--seed_everything=5" in fit  # SEED + fold, the seed it had inside `usnodule baselines`
    assert fit.endswith("--ckpt_out=" + str(tmp_path / "runs" / "fold0" / "head_cine_trans.ckpt"))
    assert "usnodule baselines" in predict and "--cinetrans {runs}/fold{fold}/head_cine_trans.ckpt" in predict
    assert "--folds 0 " in predict  # one step per fold: -j runs the folds' predictions side by side
    assert "--trans-" not in predict and "lightning fit" not in predict  # it only predicts
    # Without cinetrans among the baselines, nothing fits it.
    _bump(tmp_path / "runs" / "fold0" / "embeddings.h5")
    cmds = _commands(_dry("predictions", {**v, "BASELINES": "tirads,avepool"}))
    assert any("head.yaml" in c for c in cmds) and not any("cinetrans.yaml" in c for c in cmds)


def test_changing_the_roi_protocol_reexports_embeddings_and_refits_what_follows(tmp_path):
    v = _tree(tmp_path)
    assert _dry("train-head", v) == []  # same ROI (predicted, the default): nothing to do
    cmds = _dry("train-head", {**v, "ROI": "annotated"})
    text = "\n".join(cmds)
    assert "usnodule embeddings" in text and "--boxes annotated" in text
    assert any("head_stact" in c for c in cmds) and not any("vit.yaml" in c or "seg.yaml" in c for c in cmds)
    bad = subprocess.run(
        ["make", "-n", "-C", str(ROOT), "train-head", "ROI=both"], capture_output=True, text=True
    )
    assert bad.returncode != 0 and "ROI must be predicted or annotated" in bad.stderr


def test_crossfit_fits_two_encoder_pairs_per_fold_on_the_halves_and_switching_back_reexports(tmp_path):
    v = _tree(tmp_path)
    cmds = _commands(_dry("train-head", {**v, "CROSSFIT": 1}))
    text = "\n".join(cmds)
    half = tmp_path / "runs" / "fold0" / "crossfit"
    assert "usnodule crossfit-halves" in text and f"--out {half}" in text and "--fold 0" in text
    for h in ("A", "B"):
        for stage in ("vit", "maskcnn"):
            fit = next(c for c in cmds if f"--ckpt_out={half}/{stage}_{h}.ckpt" in c)
            assert f"{stage}.yaml" in fit and f"--data.init_args.splits={half}/splits_{h}.json" in fit
            assert "--data.init_args.fold=0" in fit and str(tmp_path / "data" / "splits.json") not in fit
    emb = next(c for c in cmds if "usnodule embeddings" in c)
    assert f"--crossfit {half}" in emb and "--vit " not in emb
    assert any("head.yaml" in c for c in cmds) and not any("seg.yaml" in c for c in cmds)
    assert (tmp_path / "runs" / ".crossfit").read_text() == "cross-fitted\n"
    # Back to the default: the in-sample embeddings are exported again (the encoders are not refitted).
    cmds = _commands(_dry("train-head", v))
    assert any("usnodule embeddings" in c and "--vit " in c for c in cmds)
    assert not any("vit.yaml" in c or "/crossfit" in c or "crossfit-halves" in c for c in cmds)
    assert (tmp_path / "runs" / ".crossfit").read_text() == "in-sample\n"


def test_asycmst_report_needs_each_folds_validation_predictions(tmp_path):
    """The report's operating thresholds come from val_predictions_asycmst.csv, written by the same fit as the
    test predictions: a fold without them (a run made before they existed) is fitted again."""
    paired, runs = tmp_path / "paired", tmp_path / "runs"
    files = [
        paired / "manifest.csv",
        paired / "splits.json",
        tmp_path / "conf" / "asycmst.yaml",
        tmp_path / "stamp",
    ]
    files += [runs / "asycmst" / "fold0" / f for f in ("asycmst.ckpt", "predictions_asycmst.csv")]
    t = time.time() - 1000
    for i, f in enumerate(files):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("")
        os.utime(f, (t + i, t + i))
    os.utime(
        tmp_path / "stamp"
    )  # the venv stamp is newer than pyproject.toml (a fresh clone's is minutes old)
    v = {"PAIRED": paired, "CONF": tmp_path / "conf", "RUNS": runs, "STAMP": tmp_path / "stamp", "FOLDS": 1,
         "REPORT": tmp_path / "report"}  # fmt: skip
    cmds = [
        c for c in _commands(_dry("asycmst-report", v)) if not c.startswith("echo")
    ]  # the `cat` of the table
    assert len(cmds) == 2 and "lightning fit" in cmds[0] and "asycmst.yaml" in cmds[0]
    assert "usnodule report" in cmds[1]
    val = runs / "asycmst" / "fold0" / "val_predictions_asycmst.csv"
    val.write_text("")
    os.utime(val, (t + 10, t + 10))
    cmds = [c for c in _commands(_dry("asycmst-report", v)) if not c.startswith("echo")]
    assert len(cmds) == 1 and "usnodule report" in cmds[0] and "--title AsyCMST" in cmds[0]
