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
STAGES = ["vit.ckpt", "seg.ckpt", "masks.h5", "maskcnn.ckpt", "embeddings.h5", "head_stact.ckpt"]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")


def _tree(tmp: Path) -> dict:
    files = [tmp / "data" / "dataset.hdf5", tmp / "data" / "splits.json", tmp / "stamp"]
    files += [tmp / "conf" / f"{s}.yaml" for s in ("vit", "seg", "maskcnn", "head")]
    files += [tmp / "runs" / "fold0" / s for s in STAGES]
    t = time.time() - 1000
    for i, f in enumerate(files):  # each file newer than everything before it: all up to date
        f.parent.mkdir(parents=True, exist_ok=True)
        f.touch()
        os.utime(f, (t + i, t + i))
    os.utime(tmp / "stamp", None)  # the install stamp must be newer than pyproject.toml (order-only for the rest)
    return {"DATA": tmp / "data", "CONF": tmp / "conf", "RUNS": tmp / "runs", "STAMP": tmp / "stamp",
            "FOLDS": 1, "HEAD_VARIANTS": "stact"}


def _dry(target: str, vars: dict) -> list[str]:
    out = subprocess.run(["make", "-n", "-C", str(ROOT), target, *(f"{k}={v}" for k, v in vars.items())],
                         capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line.strip() and not line.startswith("make")]


def _bump(path: Path) -> None:
    os.utime(path, None)  # now: newer than every output


def test_nothing_changed_does_nothing(tmp_path):
    v = _tree(tmp_path)
    assert _dry("embeddings", v) == []
    assert _dry("train-head", v) == []


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
