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
    files += [tmp / "runs" / "fold0" / s for s in STAGES] + [tmp / "runs" / "predictions.done"]
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
    assert len(cmds) == 3  # the fold's CineCNN-Trans fit, then the predictions (and their stamp)
    fit, predict = cmds[0], cmds[1]
    assert "--name head_cine_trans --fold 0" in fit and "lightning fit -c" in fit and "cinetrans.yaml" in fit
    assert (
        "--data.init_args.fold=0" in fit and "--data.init_args.path=" in fit and "fold0/embeddings.h5" in fit
    )
    assert "--seed_everything=5" in fit  # SEED + fold, the seed it had inside `usnodule baselines`
    assert fit.endswith("--ckpt_out=" + str(tmp_path / "runs" / "fold0" / "head_cine_trans.ckpt"))
    assert "usnodule baselines" in predict and "--cinetrans {runs}/fold{fold}/head_cine_trans.ckpt" in predict
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
