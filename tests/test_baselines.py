"""``usnodule baselines`` (stages/baselines.py): TI-RADS forest, CineCNN-AvePool, CineCNN-Trans, head predictions."""

from __future__ import annotations

import argparse
import json

import h5py
import numpy as np
import pandas as pd
import pytest

from datamodules.errors import DataError
from datamodules.stanford import StanfordCine
from stages import baselines
from stages.baselines import run_baselines, tirads_features
from tests.stanford_files import write_stanford

FOLDS = [{"fold": 0, "train": ["12_", "7_", "45_"], "val": ["3_"], "test": ["129_"]},
         {"fold": 1, "train": ["129_", "3_", "45_"], "val": ["7_"], "test": ["12_"]},
         {"fold": 2, "train": ["12_", "129_", "3_"], "val": ["45_"], "test": ["7_"]}]
LABELS = {"12_": 1, "7_": 0, "129_": 1, "3_": 0, "45_": 0}
STACKS = {"12_": 1, "7_": 2, "129_": 1, "3_": 1, "45_": 2}


@pytest.fixture()
def setup(tmp_path):
    h5 = write_stanford(tmp_path / "stanford")
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"k": 3, "seed": 0, "folds": FOLDS}))
    runs = tmp_path / "runs"
    rng = np.random.default_rng(0)
    for k in range(3):
        (runs / f"fold{k}").mkdir(parents=True)
        with h5py.File(runs / f"fold{k}" / "embeddings.h5", "w") as f:
            for nid, s in STACKS.items():
                g = f.create_group(nid)
                g["image"] = rng.normal(size=(s, 16)).astype(np.float32)
                g["seg"] = rng.normal(size=(s, 16)).astype(np.float32)
                g["image_prob"] = np.linspace(0.2, 0.8, s).astype(np.float32)
                g["seg_prob"] = np.full(s, 0.3, np.float32)
                g.attrs["label"], g.attrs["annot_id"] = LABELS[nid], nid
    return h5, splits, runs


def test_tirads_forest_fits_only_on_train_nodules(setup, monkeypatch):
    h5, splits, runs = setup
    fitted = []

    class Spy(baselines.RandomForestClassifier):
        def fit(self, x, y, sample_weight=None):
            fitted.append((np.array(x), np.array(y)))
            return super().fit(x, y, sample_weight)

    monkeypatch.setattr(baselines, "RandomForestClassifier", Spy)
    run_baselines(cine=h5, splits=splits, runs=runs, methods=["tirads"], n_estimators=5, log=lambda *_: None)
    cine = StanfordCine(h5)
    assert len(fitted) == 3
    for fold, (x, y) in zip(FOLDS, fitted, strict=True):
        raw = tirads_features(cine, fold["train"])
        want = np.where(np.isnan(raw), np.nanmedian(raw, axis=0), raw)  # blanks -> median of the train part only
        np.testing.assert_array_equal(x, want)
        assert y.tolist() == [LABELS[i] for i in fold["train"]]
        pred = pd.read_csv(runs / f"fold{fold['fold']}" / "predictions_tirads.csv", dtype={"annot_id": str})
        assert pred["annot_id"].tolist() == fold["test"] and list(pred.columns) == ["annot_id", "label", "prob"]
        assert pred["prob"].between(0, 1).all()


def test_avepool_and_stack_predictions_from_embeddings(setup):
    _, splits, runs = setup
    run_baselines(cine=None, splits=splits, runs=runs, methods=["avepool"], log=lambda *_: None)
    pred = pd.read_csv(runs / "fold2" / "predictions_cinecnn_avepool.csv", dtype={"annot_id": str})
    assert pred.to_dict("records") == [{"annot_id": "7_", "label": 0, "prob": pytest.approx(0.5)}]
    stack = pd.read_csv(runs / "fold2" / "stack_predictions_vit.csv", dtype={"annot_id": str})
    assert list(stack.columns) == ["annot_id", "stack", "label", "prob"]
    assert stack["prob"].round(3).tolist() == [0.2, 0.8]
    assert (runs / "fold0" / "stack_predictions_seg.csv").exists()


def test_cine_transformer_and_head_checkpoint_predictions(setup, tmp_path):
    import lightning
    import torch

    from lightning_modules.head_stage import HeadStage

    _, splits, runs = setup
    head = HeadStage(variant="stact", dim=16, num_heads=2)
    for k in range(3):
        torch.save({"state_dict": head.state_dict(), "hyper_parameters": dict(head.hparams),
                    "pytorch-lightning_version": lightning.__version__}, runs / f"fold{k}" / "head.ckpt")
    run_baselines(cine=None, splits=splits, runs=runs, methods=["cinetrans"], folds=[0], trans_epochs=2,
                  heads={"stact": "{runs}/fold{fold}/head.ckpt"}, log=lambda *_: None)
    for name in ("cinecnn_trans", "stact"):
        pred = pd.read_csv(runs / "fold0" / f"predictions_{name}.csv", dtype={"annot_id": str})
        assert pred["annot_id"].tolist() == ["129_"] and pred["prob"].between(0, 1).all()
    assert not (runs / "fold1" / "predictions_cinecnn_trans.csv").exists()


def test_bad_inputs_and_cli(setup, tmp_path):
    h5, splits, runs = setup
    with pytest.raises(DataError, match="needs --cine"):
        run_baselines(cine=None, splits=splits, runs=runs, methods=["tirads"])
    with pytest.raises(DataError, match="does not exist"):
        run_baselines(cine=None, splits=splits, runs=runs, methods=["avepool"],
                      embeddings=str(tmp_path / "missing{fold}.h5"))
    parser = argparse.ArgumentParser()
    baselines.add_parser(parser.add_subparsers())
    args = parser.parse_args(["baselines", "--cine", str(h5), "--splits", str(splits), "--runs", str(runs),
                              "--methods", "tirads", "--n-estimators", "3", "--folds", "1",
                              "--head", "stact={runs}/fold{fold}/head.ckpt"])
    assert args.head == [("stact", "{runs}/fold{fold}/head.ckpt")] and args.folds == [1]
