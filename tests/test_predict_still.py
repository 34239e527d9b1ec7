"""``usnodule predict-still``: both still-image systems on new images give the fold's test-step probabilities
(manifest rows, image files, a DICOM tissue region), and refuse a missing file, a checkpoint of the wrong kind,
of another fold, or a classifier trained on another TransUNet's masks with one line, leaving no CSV."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import h5py
import lightning.pytorch as L
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from skimage.draw import ellipse

from datamodules.still_data import StillDataModule
from datamodules.still_masks import TwoStageDataModule
from lightning_modules.csasn_stage import CSASNStage
from lightning_modules.roi_stage import RoiClassifierStage
from stages.cli import main as usnodule
from tests.us_dicom import us_region, write_us_dicom

ROOT = Path(__file__).resolve().parents[1]
SUBTYPES = ["benign", "PTC", "FTC", "MTC"]


@pytest.fixture(scope="module")
def stills(tmp_path_factory) -> dict[str, Path]:
    """18 gray 40x40 stills (benign / PTC / FTC / MTC = 9 / 3 / 3 / 3), ellipses of varied size and place with
    drawn masks, 3 folds stratified by subtype."""
    root = tmp_path_factory.mktemp("stills")
    rng = np.random.default_rng(1)
    rows = []
    for i, sub in enumerate(["benign"] * 9 + ["PTC", "FTC", "MTC"] * 3):
        img = rng.integers(90, 150, (40, 40)).astype(np.uint8)
        mask = np.zeros((40, 40), np.uint8)
        r, c = rng.integers(12, 28, 2)
        mask[ellipse(r, c, rng.integers(4, 11), rng.integers(4, 11), shape=(40, 40))] = 1
        img[mask > 0] = rng.integers(30, 90)
        Image.fromarray(img).save(root / f"img{i}.png")
        Image.fromarray(mask * 255).save(root / f"img{i}_mask.png")
        rows.append([f"c{i}", f"img{i}.png", f"img{i}_mask.png", int(sub != "benign"), f"p{i}", sub])
    with open(root / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows([["case_id", "image", "mask", "label", "patient_id", "subtype"], *rows])
    usnodule(
        [
            "split",
            str(root / "manifest.csv"),
            "-k",
            "3",
            "--stratify",
            "subtype",
            "--out",
            str(root / "splits.json"),
        ]
    )
    return {"root": root, "manifest": root / "manifest.csv", "splits": root / "splits.json"}


def _fit(conf: str, ckpt: Path, stills: dict, *extra: str) -> Path:
    from stages.fit import main

    main(
        [
            "fit",
            "-c",
            str(ROOT / conf),
            f"--data.init_args.manifest={stills['manifest']}",
            f"--data.init_args.splits={stills['splits']}",
            "--data.init_args.fold=0",
            "--data.init_args.batch_size=4",
            "--data.init_args.img_size=32",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={ckpt.parent / ckpt.stem}",
            f"--ckpt_out={ckpt}",
            *extra,
        ]
    )
    return ckpt


@pytest.fixture(scope="module")
def fitted(stills, tmp_path_factory) -> dict[str, Path]:
    """Fold 0 of both systems, in the Makefile's folders: twostage/fold0/{transunet.ckpt, still_masks.h5,
    roi_resnet18.ckpt} and csasn/fold0/csasn.ckpt (one short epoch each, random init)."""
    from stages.still_masks import predict_still_masks

    runs = tmp_path_factory.mktemp("runs")
    ts, cs = runs / "twostage" / "fold0", runs / "csasn" / "fold0"
    seg = _fit("conf/demo/transunet.yaml", ts / "transunet.ckpt", stills, "--model.init_args.img_size=32")
    masks, _ = predict_still_masks(
        manifest=stills["manifest"], splits=stills["splits"], fold=0, seg=seg, out=ts / "still_masks.h5"
    )
    _fit(
        "conf/demo/roi_resnet18.yaml",
        ts / "roi_resnet18.ckpt",
        stills,
        f"--data.init_args.predicted_masks={masks}",
        "--model.init_args.backbone=test_resnet",
    )
    _fit(
        "conf/demo/csasn.yaml",
        cs / "csasn.ckpt",
        stills,
        "--model.init_args.img_size=32",
        "--model.init_args.fusion_dim=8",
        "--model.init_args.hidden_dim=16",
        "--model.init_args.reduction=2",
        "--data.init_args.roi_square=true",  # predict-still must crop the square as the data module does
    )
    return {"twostage": ts, "csasn": cs, "masks": masks}


def _test_step(stage, dm, root: Path) -> None:
    """The fold's test step, as ``lightning fit ... test_after_fit`` / ``trainer.test`` runs it."""
    trainer = L.Trainer(
        logger=False, enable_progress_bar=False, enable_checkpointing=False, default_root_dir=root
    )
    trainer.test(stage, datamodule=dm, verbose=False)


def _init(data: dict) -> dict:
    """A checkpoint's saved data settings as the data module's init args (LightningCLI adds ``_class_path``)."""
    return {k: v for k, v in data.items() if not k.startswith("_")}


def _predict(tmp_path: Path, *args: str) -> pd.DataFrame:
    out = tmp_path / "pred.csv"
    usnodule(["predict-still", *args, "--out", str(out)])
    return pd.read_csv(out, dtype={"case_id": str}).set_index("case_id")


# ---------------------------------------------------------------------------------------------- same numbers
def test_twostage_gives_the_test_steps_probabilities_and_masks(stills, fitted, tmp_path, capsys):
    table = _predict(
        tmp_path,
        "--system",
        "twostage",
        "--fold-dir",
        str(fitted["twostage"]),
        "--manifest",
        str(stills["manifest"]),
    )
    assert len(table) == 18 and set(table["fold"]) == {0} and set(table["system"]) == {"twostage"}
    # the in-sample warning: the manifest is the fold's own data, 2/3 of it training or validation
    err = [x for x in capsys.readouterr().err.splitlines() if "in-sample" in x]
    assert len(err) == 1 and err[0].startswith("warning: 12 of 18 image(s)")

    stage, data = RoiClassifierStage.from_checkpoint(fitted["twostage"] / "roi_resnet18.ckpt")
    dm = TwoStageDataModule(**{**_init(data), "batch_size": 5})
    _test_step(stage, dm, tmp_path)
    scores = stage.test_nodule.scores
    ids = [dm.datasets["test"].cases[int(i)].case_id for i in scores["nodule"]]
    assert len(ids) == 6
    np.testing.assert_allclose(table.loc[ids, "prob_malignant"], scores["prob"].numpy(), atol=1e-5)
    # the masks are the ones `usnodule still-masks` wrote, which the classifier was trained and tested on
    with h5py.File(fitted["masks"], "r") as f:
        for cid in table.index:
            assert table.loc[cid, "mask_px"] == int(f[cid][()].sum())
    assert set(table["roi"]) <= {"predicted", "empty"}


def test_csasn_gives_the_test_steps_probabilities_from_manifest_and_files(stills, fitted, tmp_path, capsys):
    table = _predict(
        tmp_path,
        "--system",
        "csasn",
        "--fold-dir",
        str(fitted["csasn"]),
        "--manifest",
        str(stills["manifest"]),
    )
    stage, data = CSASNStage.from_checkpoint(fitted["csasn"] / "csasn.ckpt")
    dm = StillDataModule(**{**_init(data), "batch_size": 4})
    _test_step(stage, dm, tmp_path)
    ids = [dm.datasets["test"].cases[int(i)].case_id for i in stage.test_cases.scores["nodule"]]
    np.testing.assert_allclose(
        table.loc[ids, "prob_malignant"], stage.test_cases.scores["prob"].numpy(), atol=1e-5
    )
    p = table.loc[ids, [f"p_{s}" for s in SUBTYPES]].to_numpy()
    np.testing.assert_allclose(p, stage.test_subtypes.scores["prob"].numpy(), atol=1e-5)
    assert (table["roi"] == "annotated").all() and list(table.loc[ids, "subtype"]) == [
        c.subtype for c in dm.datasets["test"].cases
    ]
    assert (
        table["pred_subtype"]
        == [SUBTYPES[i] for i in table[[f"p_{s}" for s in SUBTYPES]].to_numpy().argmax(1)]
    ).all()

    # the same images as files with their masks: the same numbers; without masks: whole images, said so
    root, pick = stills["root"], ids[:3]
    imgs = [str(root / f"img{c[1:]}.png") for c in pick]
    masks = [str(root / f"img{c[1:]}_mask.png") for c in pick]
    capsys.readouterr()
    files = _predict(
        tmp_path, "--system", "csasn", "--fold-dir", str(fitted["csasn"]), *imgs, "--masks", *masks
    )
    np.testing.assert_allclose(files["prob_malignant"], table.loc[pick, "prob_malignant"], atol=1e-5)
    assert list(files.index) == [f"img{c[1:]}" for c in pick] and files["label"].isna().all()
    bare = _predict(tmp_path, "--system", "csasn", "--csasn", str(fitted["csasn"] / "csasn.ckpt"), *imgs)
    assert (bare["roi"] == "missing").all()
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning")]
    assert len(err) == 1 and "3 of 3 image(s) predicted whole" in err[0]


def test_dicom_tissue_region_is_cut_out_and_measured(stills, fitted, tmp_path):
    png = stills["root"] / "img4.png"
    frame = np.full((70, 90), 255, np.uint8)
    frame[:, :5] = 0  # clutter outside the region
    frame[12:52, 30:70] = np.asarray(Image.open(png))
    dcm = write_us_dicom(
        frame[None], tmp_path / "scan.dcm", [us_region(30, 12, 69, 51, delta_cm=(0.02, 0.01))]
    )
    fold = ["--fold-dir", str(fitted["twostage"])]
    got = _predict(tmp_path, "--system", "twostage", *fold, str(dcm), str(png))
    region, whole = got.loc["scan_region1"], got.loc["img4"]
    assert region["region"] == "1" and whole["region"] == "whole image"
    assert region["prob_malignant"] == pytest.approx(whole["prob_malignant"], abs=1e-5)
    assert region["mask_px"] == whole["mask_px"]
    if whole["mask_px"]:  # sizes in mm from the region's spacing (dx 0.2 mm, dy 0.1 mm)
        assert region["width_mm"] == pytest.approx(region["width_px"] * 0.2)
        assert region["height_mm"] == pytest.approx(region["height_px"] * 0.1)
        x0, y0, x1, y1 = map(int, whole["mask_box"].split())
        assert region["mask_box"] == f"{x0 + 30} {y0 + 12} {x1 + 30} {y1 + 12}"  # in the file's pixels
    assert np.isnan(whole["width_mm"]) and whole["spacing"] == "unknown"


def test_size_columns_of_a_predicted_mask():
    from stages.predict_still import _size_columns

    mask = np.zeros((50, 60), np.uint8)
    mask[10:30, 20:50] = 1  # 30 wide, 20 deep
    mask[40:42, 2:4] = 1  # a speck: in the pixel count and the box, not in the nodule's size
    got = _size_columns(mask, (0.1, 0.2), offset=(5, 7))
    assert got["mask_px"] == 600 + 4 and got["mask_box"] == "9 15 57 47"  # x0 y0 x1 y1 in file pixels
    assert (got["width_px"], got["height_px"]) == (30, 20)
    assert got["width_mm"] == pytest.approx(30 * 0.2) and got["height_mm"] == pytest.approx(20 * 0.1)
    assert got["max_extent_mm"] == pytest.approx(np.hypot(6, 2)) and got["spacing"] == "0.2 x 0.1 mm/px"
    empty = _size_columns(np.zeros((5, 5), np.uint8), None)
    assert empty["mask_px"] == 0 and empty["mask_box"] == "" and empty["width_mm"] is None


# ---------------------------------------------------------------------------------------------- errors
def _fails(args: list[str], capsys, out: Path, *needles: str) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        usnodule(["predict-still", *args, "--out", str(out)])
    assert e.value.code == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    for n in needles:
        assert n in err[0], err[0]
    assert not out.exists()
    return err[0]


def test_one_line_errors_leave_no_csv(stills, fitted, tmp_path, capsys):
    ts, cs, out = fitted["twostage"], fitted["csasn"], tmp_path / "p.csv"
    png = str(stills["root"] / "img0.png")
    _fails(
        ["--system", "twostage", "--fold-dir", str(ts), str(tmp_path / "nope.png")],
        capsys,
        out,
        "nope.png",
        "does not exist",
    )
    (tmp_path / "notes.txt").write_text("hello")
    _fails(
        ["--system", "csasn", "--fold-dir", str(cs), str(tmp_path / "notes.txt")],
        capsys,
        out,
        "unsupported still-image format",
    )
    # checkpoints of the wrong kind or system
    _fails(
        ["--system", "csasn", "--csasn", str(ts / "transunet.ckpt"), png],
        capsys,
        out,
        "is a TransUNetStage checkpoint, but --csasn needs a CSASNStage one",
    )
    _fails(
        ["--system", "twostage", "--fold-dir", str(cs), png],
        capsys,
        out,
        "transunet.ckpt",
        "checkpoint not found",
    )
    _fails(
        ["--system", "twostage", "--transunet", str(cs / "csasn.ckpt"), "--roi-classifier", str(ts / "roi_resnet18.ckpt"), png],
        capsys, out, "is a CSASNStage checkpoint",
    )  # fmt: skip
    _fails(
        ["--system", "csasn", "--fold-dir", str(cs), "--transunet", str(ts / "transunet.ckpt"), png],
        capsys,
        out,
        "--transunet is not a checkpoint of --system csasn",
    )
    # fold mismatch: --fold, and a fold<k> folder holding fold 0's checkpoints
    _fails(
        ["--system", "csasn", "--fold-dir", str(cs), "--fold", "1", png],
        capsys,
        out,
        "of fold 0, but --fold asks for fold 1",
    )
    moved = tmp_path / "fold2"
    shutil.copytree(ts, moved)
    _fails(["--system", "twostage", "--fold-dir", str(moved), png], capsys, out, "fold2 is fold 2")
    # a classifier trained on the masks of another TransUNet than the one given
    ckpt = torch.load(ts / "transunet.ckpt", map_location="cpu", weights_only=False)
    name = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
    ckpt["state_dict"][name] = ckpt["state_dict"][name] + 1
    torch.save(ckpt, tmp_path / "other_transunet.ckpt")
    _fails(
        ["--system", "twostage", "--fold-dir", str(ts), "--transunet", str(tmp_path / "other_transunet.ckpt"), png],
        capsys, out, "made by another TransUNet checkpoint",
    )  # fmt: skip
    _fails(
        ["--system", "csasn", "--fold-dir", str(cs), png, "--masks", png, png],
        capsys,
        out,
        "--masks names 2 mask(s) for 1 image(s)",
    )
    _fails(["--system", "csasn", "--fold-dir", str(cs)], capsys, out, "give either image files or --manifest")
