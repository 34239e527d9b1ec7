"""Two-stage framework (TransUNet -> ROI -> ResNet-18, shape-feature forest): nets, loss, features, the
train-only forest, predicted-mask provenance and one tiny end-to-end pass through every stage."""

from __future__ import annotations

import csv
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage.draw import disk, ellipse

from datamodules.errors import DataError
from lightning_modules.nets.transunet import TransUNet
from lightning_modules.transunet_stage import dice_ce_loss
from stages import shape_forest as sf

TINY = {"hybrid": {}, "img_size": 32, "in_chans": 1, "head_channels": 16, "decoder_channels": (16, 8, 8, 8)}


# ------------------------------------------------------------------------------------------------ TransUNet
@pytest.mark.parametrize("hw", [(32, 32), (33, 47), (17, 61)])
def test_transunet_any_size_gives_full_size_logits(hw):
    net = TransUNet(**TINY)
    assert net.stride == 16 and net.skip_chs[-1] == 0  # 1/8, 1/4, 1/2 skips, the full-size block without
    y = net(torch.randn(2, 1, *hw))
    assert y.shape == (2, 2, *hw)
    assert torch.isfinite(y).all()


def test_transunet_gradients_reach_encoder_and_decoder():
    net = TransUNet(**TINY)
    net(torch.randn(2, 1, 32, 32))[:, 1].mean().backward()
    cnn = net.vit.patch_embed.backbone
    for name, p in {
        "cnn stem": cnn.stem.conv.weight,
        "cnn stage": next(cnn.stages[0].parameters()),
        "patch projection": net.vit.patch_embed.proj.weight,
        "position embedding": net.vit.pos_embed,
        "vit block": net.vit.blocks[0].attn.qkv.weight,
        "decoder": net.blocks[0].conv[0][0].weight,
        "last decoder block": net.blocks[-1].conv[0][0].weight,
        "head": net.head.weight,
    }.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_transunet_refuses_a_plain_vit():
    with pytest.raises(ValueError, match="not a timm hybrid"):
        TransUNet(backbone="test_vit", img_size=32)


def test_dice_ce_loss_is_its_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 5, 7, generator=g)
    mask = (torch.rand(2, 1, 5, 7, generator=g) > 0.6).float()
    got = dice_ce_loss(logits, mask, ce_weight=0.3, dice_weight=0.7)
    # by hand: CE = mean over pixels of -log softmax at the true class; Dice per class over the whole batch
    p = logits.softmax(1)
    t = torch.stack([1 - mask[:, 0], mask[:, 0]], 1)
    ce = -(t * p.log()).sum(1).mean()
    dice = 0.0
    for c in range(2):
        inter = (p[:, c] * t[:, c]).sum()
        dice += 1 - (2 * inter + 1e-5) / ((p[:, c] ** 2).sum() + (t[:, c] ** 2).sum() + 1e-5)
    dice = dice / 2
    assert torch.allclose(got["ce"], ce, atol=1e-6)
    assert torch.allclose(got["dice"], dice, atol=1e-6)
    assert torch.allclose(got["loss"], 0.3 * ce + 0.7 * dice, atol=1e-6)
    assert torch.allclose(got["ce"], F.cross_entropy(logits, mask[:, 0].long()))


# ------------------------------------------------------------------------------------------------ features
def _draw(shape_fn, *args, size=200) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    m[shape_fn(*args, shape=(size, size))] = 1
    return m


def test_shape_features_against_hand_computed_values():
    d = sf.shape_features(_draw(disk, (100, 100), 40))
    assert d["circularity"] == pytest.approx(1.0, abs=0.03)
    assert d["aspect_ratio"] == pytest.approx(1.0, abs=0.01) and d["eccentricity"] < 0.05
    assert d["area"] == pytest.approx(np.pi * 40**2, rel=0.01)
    assert d["perimeter"] == pytest.approx(2 * np.pi * 40, rel=0.01)
    assert d["extent"] == pytest.approx(np.pi / 4, abs=0.02)  # disc in its square box
    assert d["solidity"] > 0.97 and d["convexity"] == pytest.approx(1.0, abs=0.02)
    assert d["compactness"] == pytest.approx(4 * np.pi / d["circularity"])

    e = sf.shape_features(_draw(ellipse, 100, 100, 20, 40))  # 40 px semi-axis across, 20 px deep: 2:1, wide
    assert e["aspect_ratio"] == pytest.approx(2.0, abs=0.03)
    assert e["eccentricity"] == pytest.approx(np.sqrt(1 - 0.25), abs=0.01)
    assert e["taller_than_wide"] == pytest.approx(0.5, abs=0.02)

    r = np.zeros((200, 200), np.uint8)
    r[60:140, 80:120] = 1  # 80 deep x 40 wide rectangle: taller than wide
    rect = sf.shape_features(r)
    assert rect["taller_than_wide"] == 2.0 and rect["extent"] == 1.0 and rect["solidity"] == 1.0
    assert rect["aspect_ratio"] == pytest.approx(2.0, abs=0.01)
    assert rect["area"] == 3200 and rect["area_frac"] == pytest.approx(3200 / 40000)

    two = r.copy()
    two[5:10, 5:10] = 1
    assert sf.shape_features(two)["n_components"] == 2 and sf.shape_features(two)["area"] == 3200  # largest

    empty = sf.shape_features(np.zeros((20, 20), np.uint8))
    assert empty["empty"] == 1 and np.isnan(empty["circularity"])


# ------------------------------------------------------------------------------------------------ tiny set
@pytest.fixture(scope="module")
def stills(tmp_path_factory) -> dict[str, Path]:
    """15 gray 40x40 stills (5 malignant, elongated and darker), drawn masks, 3 patient-free folds."""
    from stages.cli import main

    root = tmp_path_factory.mktemp("stills")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(15):
        label = int(i % 3 == 0)
        img = rng.integers(90, 140, (40, 40)).astype(np.uint8)
        mask = np.zeros((40, 40), np.uint8)
        r, c = rng.integers(14, 26, 2)
        mask[ellipse(r, c, 10 if label else 6, 5 if label else 7, shape=(40, 40))] = 1
        img[mask > 0] = 40 if label else 70
        Image.fromarray(img).save(root / f"img{i}.png")
        Image.fromarray(mask * 255).save(root / f"img{i}_mask.png")
        rows.append([f"c{i}", f"img{i}.png", f"img{i}_mask.png", label, f"p{i}"])
    with open(root / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows([["case_id", "image", "mask", "label", "patient_id"], *rows])
    main(["split", str(root / "manifest.csv"), "-k", "3", "--out", str(root / "splits.json")])
    return {"root": root, "manifest": root / "manifest.csv", "splits": root / "splits.json"}


def test_forest_is_fitted_on_the_training_part_only(stills, tmp_path, monkeypatch):
    from datamodules.folds import load_fold
    from datamodules.stills import read_manifest, read_still_mask

    seen = []
    real = sf.shape_forest

    def spy(x_train, y_train, x_eval, **kw):
        seen.append((np.array(x_train), list(y_train), len(x_eval)))
        return real(x_train, y_train, x_eval, **kw)

    monkeypatch.setattr(sf, "shape_forest", spy)
    written = sf.run_shape_forest(
        manifest=stills["manifest"],
        splits=stills["splits"],
        runs=tmp_path,
        source="annotated",
        n_estimators=20,
    )
    cases = {c.case_id: c for c in read_manifest(stills["manifest"])}
    for k, (x_train, _, n_eval) in enumerate(seen):
        part = load_fold(stills["splits"], k)
        # exactly the training cases' features, in order: no test or validation row reached the fit
        want = sf.feature_matrix([read_still_mask(cases[i].mask) for i in part["train"]])
        np.testing.assert_array_equal(x_train, want)
        assert n_eval == len(part["test"]) + len(part["val"])
        test = pd.read_csv(tmp_path / f"fold{k}" / "predictions_shape_forest.csv")
        assert sorted(test["annot_id"]) == sorted(part["test"])
        assert not set(test["annot_id"]) & set(part["train"])
    assert len(written) == 6


# ------------------------------------------------------------------------------------------------ end to end
def _fit(conf: str, root: Path, stills: dict, *extra: str) -> Path:
    from stages.fit import main

    ckpt = root / "model.ckpt"
    main(
        [
            "fit",
            "-c",
            conf,
            f"--data.init_args.manifest={stills['manifest']}",
            f"--data.init_args.splits={stills['splits']}",
            "--data.init_args.fold=0",
            "--data.init_args.batch_size=4",
            "--data.init_args.img_size=32",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={root}",
            f"--ckpt_out={ckpt}",
            *extra,
        ]
    )
    assert ckpt.is_file()
    return ckpt


@pytest.fixture(scope="module")
def fitted(stills, tmp_path_factory):
    """Fold 0: a one-epoch TransUNet and its predicted masks of every still."""
    from stages.still_masks import predict_still_masks

    root = tmp_path_factory.mktemp("ts")
    seg = _fit("conf/demo/transunet.yaml", root / "transunet", stills, "--model.init_args.img_size=32")
    masks, summary = predict_still_masks(
        manifest=stills["manifest"], splits=stills["splits"], fold=0, seg=seg, out=root / "still_masks.h5"
    )
    return {"root": root, "seg": seg, "masks": masks, "summary": summary}


def test_predicted_masks_file_is_readable_and_records_provenance(stills, fitted):
    from datamodules.files import file_digest
    from datamodules.still_data import PredictedStillMasks

    assert fitted["summary"]["cases"] == 15
    with h5py.File(fitted["masks"], "r") as f:
        assert f.attrs["fold"] == 0
        assert f.attrs["manifest_sha256"] == file_digest(stills["manifest"])
        assert f.attrs["checkpoint_sha256"] == file_digest(fitted["seg"])
        assert len(f.keys()) == 15
    pred = PredictedStillMasks(fitted["masks"])
    pred.check([f"c{i}" for i in range(15)])
    m = pred.mask("c3", (40, 40))
    assert m.shape == (40, 40) and set(np.unique(m)) <= {0, 1}


def test_mismatched_fold_is_a_one_line_error(stills, fitted, tmp_path, capsys):
    from datamodules.still_masks import TwoStageDataModule, check_still_masks
    from stages.cli import main

    with pytest.raises(DataError, match="of fold 0, not fold 1") as e:
        check_still_masks(fitted["masks"], fold=1, manifest=stills["manifest"], splits=stills["splits"])
    assert "\n" not in str(e.value)
    dm = TwoStageDataModule(
        manifest=stills["manifest"],
        splits=stills["splits"],
        fold=1,
        roi="predicted",
        predicted_masks=fitted["masks"],
    )
    with pytest.raises(DataError, match="not fold 1"):
        dm.setup("fit")
    other = tmp_path / "manifest.csv"
    other.write_text(stills["manifest"].read_text() + "\n")
    with pytest.raises(DataError, match="made for manifest"):
        check_still_masks(fitted["masks"], fold=0, manifest=other)
    # the command line: a checkpoint of fold 0 asked for fold 2's masks
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "still-masks",
                "--manifest",
                str(stills["manifest"]),
                "--splits",
                str(stills["splits"]),
                "--fold",
                "2",
                "--seg",
                str(fitted["seg"]),
                "--out",
                str(tmp_path / "m.h5"),
            ]
        )
    assert exit_.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "fitted on fold 0, not fold 2" in err[0]
    assert not (tmp_path / "m.h5").exists()


def test_roi_classifier_shape_forest_and_report_end_to_end(stills, fitted, tmp_path):
    from stages.report import report
    from stages.roi_predict import roi_predict

    runs = tmp_path / "runs"
    ckpt = _fit(
        "conf/demo/roi_resnet18.yaml",
        tmp_path / "roi",
        stills,
        f"--data.init_args.predicted_masks={fitted['masks']}",
        "--model.init_args.backbone=test_resnet",
    )
    r = roi_predict(ckpt=ckpt, splits=stills["splits"], fold=0, out_dir=runs / "fold0")
    assert 0 <= r["test_f1"] <= 1
    test = pd.read_csv(runs / "fold0" / "predictions_twostage.csv")
    assert list(test.columns) == ["annot_id", "label", "prob"] and test["prob"].between(0, 1).all()
    sf.run_shape_forest(
        manifest=stills["manifest"],
        splits=stills["splits"],
        runs=runs,
        masks=str(fitted["masks"]),
        folds=[0],
        n_estimators=10,
    )
    table = report(runs, tmp_path / "report", n_boot=20, show=False, title="Two-stage", first="f1")
    assert set(table["method"]) == {"twostage", "shape_forest"}
    md = (tmp_path / "report" / "results.md").read_text()
    assert "| Method | Nodule F1 | Nodule ACC" in md and "Two-stage (TransUNet -> ResNet-18)" in md
