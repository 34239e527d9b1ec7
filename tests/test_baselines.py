"""``usnodule baselines`` (stages/baselines.py): TI-RADS forest, CineCNN-AvePool, CineCNN-Trans, head predictions."""

from __future__ import annotations

import argparse
import json

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from datamodules.errors import DataError
from datamodules.stanford import StanfordCine
from lightning_modules.calibration import fit_platt, prob_to_margin
from stages import baselines
from stages.baselines import run_baselines, tirads_features
from tests.commands import argv
from tests.stanford_files import write_stanford

FOLDS = [
    {"fold": 0, "train": ["12_", "7_", "45_"], "val": ["3_"], "test": ["129_"]},
    {"fold": 1, "train": ["129_", "3_", "45_"], "val": ["7_"], "test": ["12_"]},
    {"fold": 2, "train": ["12_", "129_", "3_"], "val": ["45_"], "test": ["7_"]},
]
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
        want = np.where(
            np.isnan(raw), np.nanmedian(raw, axis=0), raw
        )  # blanks -> median of the train part only
        np.testing.assert_array_equal(x, want)
        assert y.tolist() == [LABELS[i] for i in fold["train"]]
        pred = pd.read_csv(runs / f"fold{fold['fold']}" / "predictions_tirads.csv", dtype={"annot_id": str})
        assert pred["annot_id"].tolist() == fold["test"] and list(pred.columns) == [
            "annot_id",
            "label",
            "prob",
        ]
        assert pred["prob"].between(0, 1).all()
        # the validation part, for the report's operating threshold: its own ids, from the same forest
        val = pd.read_csv(
            runs / f"fold{fold['fold']}" / "val_predictions_tirads.csv", dtype={"annot_id": str}
        )
        assert val["annot_id"].tolist() == fold["val"] and val["label"].tolist() == [
            LABELS[i] for i in fold["val"]
        ]


def test_tirads_column_missing_from_metadata_is_said_not_silently_zero(setup, capsys):
    h5, splits, runs = setup
    meta = h5.parent / "metadata.csv"
    pd.read_csv(meta, dtype={"annot_id": str}).drop(columns="ti-rads_margin").to_csv(meta, index=False)
    run_baselines(cine=h5, splits=splits, runs=runs, methods=["tirads"], n_estimators=5, log=lambda *_: None)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 3 and all("ti-rads_margin blank for every training nodule" in w for w in warnings)


def test_avepool_and_stack_predictions_from_embeddings(setup):
    _, splits, runs = setup
    run_baselines(cine=None, splits=splits, runs=runs, methods=["avepool"], log=lambda *_: None)
    for fold in FOLDS:
        val = pd.read_csv(
            runs / f"fold{fold['fold']}" / "val_predictions_cinecnn_avepool.csv", dtype={"annot_id": str}
        )
        assert val["annot_id"].tolist() == fold["val"]
    pred = pd.read_csv(runs / "fold2" / "predictions_cinecnn_avepool.csv", dtype={"annot_id": str})
    assert pred.to_dict("records") == [{"annot_id": "7_", "label": 0, "prob": pytest.approx(0.5)}]
    stack = pd.read_csv(runs / "fold2" / "stack_predictions_vit.csv", dtype={"annot_id": str})
    assert list(stack.columns) == ["annot_id", "stack", "label", "prob"]
    assert stack["prob"].round(3).tolist() == [0.2, 0.8]
    assert (runs / "fold0" / "stack_predictions_seg.csv").exists()


def _head_ckpt(path, variant, *, fold, embeddings, splits, seed=0):
    """A HeadStage checkpoint as `lightning fit` leaves it: weights, init args and the data it was fitted on."""
    import lightning
    import torch

    from lightning_modules.head_stage import HeadStage

    torch.manual_seed(seed)
    head = HeadStage(variant=variant, dim=16, num_heads=2)
    data = {"path": str(embeddings), "splits": str(splits), "fold": fold, "batch_size": 16}
    torch.save(
        {
            "state_dict": head.state_dict(),
            "hyper_parameters": dict(head.hparams),
            "datamodule_hyper_parameters": data,
            "pytorch-lightning_version": lightning.__version__,
        },
        path,
    )
    return head.eval()


def test_cine_transformer_and_head_checkpoint_predictions(setup, monkeypatch):
    import lightning.pytorch as L

    from datamodules.embeddings import EmbeddingDataset

    _, splits, runs = setup
    heads = {}
    for k in range(3):
        emb = runs / f"fold{k}" / "embeddings.h5"
        _head_ckpt(runs / f"fold{k}" / "head.ckpt", "stact", fold=k, embeddings=emb, splits=splits)
        heads[k] = _head_ckpt(
            runs / f"fold{k}" / "head_cine_trans.ckpt",
            "cine_trans",
            fold=k,
            embeddings=emb,
            splits=splits,
            seed=k + 1,
        )

    def no_training(*_, **__):
        raise AssertionError("usnodule baselines must only predict")

    monkeypatch.setattr(L.Trainer, "fit", no_training)
    run_baselines(
        cine=None,
        splits=splits,
        runs=runs,
        methods=["cinetrans"],
        folds=[0],
        heads={"stact": "{runs}/fold{fold}/head.ckpt"},
        log=lambda *_: None,
    )
    for name in ("cinecnn_trans", "stact"):
        pred = pd.read_csv(runs / "fold0" / f"predictions_{name}.csv", dtype={"annot_id": str})
        assert pred["annot_id"].tolist() == ["129_"] and pred["prob"].between(0, 1).all()
        val = pd.read_csv(runs / "fold0" / f"val_predictions_{name}.csv", dtype={"annot_id": str})
        assert val["annot_id"].tolist() == ["3_"]  # fold 0's validation nodule, never a test one
    # The CineCNN-Trans predictions are those of the fold's checkpoint, exactly.
    want = baselines.predict_head(heads[0], EmbeddingDataset(runs / "fold0" / "embeddings.h5", ["129_"]))
    pred = pd.read_csv(runs / "fold0" / "predictions_cinecnn_trans.csv", dtype={"annot_id": str})
    np.testing.assert_allclose(pred["prob"], want["prob"], atol=1e-6)  # the CSV keeps 6 decimals
    assert not (runs / "fold1" / "predictions_cinecnn_trans.csv").exists()


def test_cinetrans_checkpoint_of_the_wrong_fold_or_data_is_one_line_error(setup, tmp_path, capsys):
    from stages.cli import main as usnodule

    _, splits, runs = setup
    emb0, ckpt0 = runs / "fold0" / "embeddings.h5", runs / "fold0" / "head_cine_trans.ckpt"

    def predict(**kw):
        run_baselines(
            cine=None, splits=splits, runs=runs, methods=["cinetrans"], folds=[0], log=lambda *_: None, **kw
        )

    with pytest.raises(DataError, match="only predicts: fit it first"):  # no fit behind it: never trains one
        predict()
    assert not (runs / "fold0" / "predictions_cinecnn_trans.csv").exists()
    _head_ckpt(ckpt0, "cine_trans", fold=1, embeddings=runs / "fold1" / "embeddings.h5", splits=splits)
    with pytest.raises(DataError, match="fitted on fold 1, not fold 0"):
        predict()
    _head_ckpt(ckpt0, "cine_trans", fold=0, embeddings=runs / "fold1" / "embeddings.h5", splits=splits)
    with pytest.raises(DataError, match="was fitted on .*fold1/embeddings.h5, not .*fold0/embeddings.h5"):
        predict()
    other = tmp_path / "other_splits.json"
    other.write_text(splits.read_text())
    _head_ckpt(ckpt0, "cine_trans", fold=0, embeddings=emb0, splits=other)
    with pytest.raises(DataError, match="other_splits.json, not"):
        predict()
    _head_ckpt(ckpt0, "stact", fold=0, embeddings=emb0, splits=splits)
    with pytest.raises(DataError, match="head_stact checkpoint, expected variant 'cine_trans'"):
        predict()
    _head_ckpt(ckpt0, "cine_trans", fold=0, embeddings=emb0, splits=splits)
    import torch

    ckpt = torch.load(ckpt0, weights_only=False)
    del ckpt["datamodule_hyper_parameters"]
    torch.save(ckpt, tmp_path / "bare.ckpt")
    with pytest.raises(DataError, match="records no training fold"):
        predict(cinetrans=str(tmp_path / "bare.ckpt"))
    # The same checks hold for --head checkpoints, and the CLI prints one line.
    with pytest.raises(SystemExit) as e:
        usnodule(
            argv(
                "baselines",
                splits=splits,
                runs=runs,
                folds=1,
                methods="",
                head="stact={runs}/fold0/head_cine_trans.ckpt",
            )
        )
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and err.endswith("was fitted on fold 0, not fold 1")
    predict()  # the fold's own checkpoint
    assert (runs / "fold0" / "predictions_cinecnn_trans.csv").exists()


def test_cinetrans_fitted_by_lightning_fit_then_predicted(setup):
    """`lightning fit -c conf/demo/cinetrans.yaml` (as the Makefile runs it) gives the fold's checkpoint: the last
    epoch, seeded, trained on the fold; a refit with the same seed predicts the same numbers."""
    from pathlib import Path

    import torch

    from stages.fit import main as fit

    _, splits, runs = setup
    root = Path(__file__).resolve().parents[1]
    probs = []
    for attempt in range(2):
        out = runs / "fold0" / "head_cine_trans.ckpt"
        fit(
            [
                "fit",
                "-c",
                str(root / "conf" / "demo" / "cinetrans.yaml"),
                "--data.init_args.fold=0",
                f"--data.init_args.path={runs / 'fold0' / 'embeddings.h5'}",
                f"--data.init_args.splits={splits}",
                "--model.init_args.dim=16",
                "--model.init_args.num_heads=2",
                "--seed_everything=0",
                "--trainer.max_epochs=3",
                "--lr_scheduler.init_args.T_max=3",
                "--trainer.logger=false",
                "--trainer.enable_progress_bar=false",
                f"--trainer.default_root_dir={runs / 'fold0' / f'head_cine_trans{attempt}'}",
                f"--ckpt_out={out}",
            ]
        )
        ckpt = torch.load(out, map_location="cpu", weights_only=False)
        assert ckpt["epoch"] == 2 and ckpt["global_step"] == 3  # last of 3 epochs of one 3-nodule batch
        assert (
            ckpt["hyper_parameters"]["variant"] == "cine_trans"
            and ckpt["datamodule_hyper_parameters"]["fold"] == 0
        )
        run_baselines(
            cine=None, splits=splits, runs=runs, methods=["cinetrans"], folds=[0], log=lambda *_: None
        )
        probs.append(pd.read_csv(runs / "fold0" / "predictions_cinecnn_trans.csv")["prob"].tolist())
    assert probs[0] == probs[1]


def test_bad_inputs_and_cli(setup, tmp_path):
    h5, splits, runs = setup
    with pytest.raises(DataError, match="needs --cine"):
        run_baselines(cine=None, splits=splits, runs=runs, methods=["tirads"])
    with pytest.raises(DataError, match="does not exist"):
        run_baselines(
            cine=None,
            splits=splits,
            runs=runs,
            methods=["avepool"],
            embeddings=str(tmp_path / "missing{fold}.h5"),
        )
    parser = argparse.ArgumentParser()
    baselines.add_parser(parser.add_subparsers())
    args = parser.parse_args(
        argv(
            "baselines",
            cine=h5,
            splits=splits,
            runs=runs,
            methods="tirads",
            n_estimators=3,
            folds=1,
            head="stact={runs}/fold{fold}/head.ckpt",
        )
    )
    assert args.head == [("stact", "{runs}/fold{fold}/head.ckpt")] and args.folds == [1]
    assert args.cinetrans == "{runs}/fold{fold}/head_cine_trans.ckpt"
    with pytest.raises(
        SystemExit
    ):  # no training options left: the fit is `lightning fit -c conf/cinetrans.yaml`
        parser.parse_args(["baselines", "--splits", str(splits), "--runs", str(runs), "--trans-epochs", "20"])


def test_baselines_are_platt_scaled_on_their_validation_part_only(tmp_path):
    rng = np.random.default_rng(0)

    def part(n, prefix):  # an overconfident scorer: raw probabilities far above the 30% base rate
        y = (rng.random(n) < 0.3).astype(int)
        p = 1 / (1 + np.exp(-(2.0 + 1.5 * y + rng.normal(size=n))))
        return pd.DataFrame({"annot_id": [f"{prefix}{i}_" for i in range(n)], "label": y, "prob": p})

    preds = {"predictions_": part(60, "t"), "val_predictions_": part(80, "v")}
    raw = {k: v.copy() for k, v in preds.items()}
    baselines.write_parts(tmp_path, "m", preds, calibrate=True)
    val = raw["val_predictions_"]
    a, b = fit_platt(
        prob_to_margin(torch.tensor(val["prob"].to_numpy())), torch.tensor(val["label"].to_numpy())
    )
    for prefix, df in raw.items():
        got = pd.read_csv(tmp_path / f"{prefix}m.csv", dtype={"annot_id": str})
        want = 1 / (1 + np.exp(-(a * np.log(df["prob"] / (1 - df["prob"])) + b)))
        np.testing.assert_allclose(got["prob"], want, rtol=1e-5)
        assert (np.argsort(got["prob"].to_numpy()) == np.argsort(df["prob"].to_numpy())).all()  # same ranking
    assert abs(pd.read_csv(tmp_path / "val_predictions_m.csv")["prob"].mean() - val["label"].mean()) < 0.02
    baselines.write_parts(tmp_path, "m", raw, calibrate=False)  # --no-calibrate: written as scored
    np.testing.assert_allclose(
        pd.read_csv(tmp_path / "predictions_m.csv")["prob"], raw["predictions_"]["prob"], 1e-6
    )
