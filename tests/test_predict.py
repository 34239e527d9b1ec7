"""``usnodule predict`` on clips written from the synthetic Stanford set, with tiny checkpoints trained here.

The checkpoints come from the demo configs trained for two steps (as tests/test_chain.py does). The reference
probability is the head run on the ``usnodule embeddings --boxes predicted`` export of the same nodule: the
demo ViT was trained on annotated-mask boxes, but a new clip has no annotation, so the predictor crops around
the MSU-Net masks, and that is what the export computes with ``--boxes predicted`` (the same code path;
agreement to float rounding, since the export batches other nodules' stacks alongside).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, UltrasoundMultiFrameImageStorage, generate_uid

from datamodules.embeddings import group_name
from datamodules.stanford import StanfordCine
from stages.cli import main as usnodule
from stages.fit import main as fit
from tests.commands import argv

ROOT = Path(__file__).resolve().parents[1]


def _fit(stage: str, fold: Path, *args: str) -> Path:
    out = fold / f"{stage}.ckpt"
    conf = ROOT / "conf" / "demo" / f"{'head' if stage.startswith('head') else stage}.yaml"
    fit(
        [
            "fit",
            "-c",
            str(conf),
            *args,
            "--data.init_args.fold=0",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--trainer.num_sanity_val_steps=0",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={fold / stage}",
            f"--ckpt_out={out}",
        ]
    )
    return out


def write_dicom(frames: np.ndarray, path: Path) -> Path:
    """A multi-frame MONOCHROME2 8-bit ultrasound DICOM, as a scanner exports a cine clip."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = UltrasoundMultiFrameImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = "US"
    ds.set_pixel_data(frames, "MONOCHROME2", 8)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Tiny synthetic set, its four fold-0 checkpoints, masks.h5 and a predicted-box embeddings export."""
    root = tmp_path_factory.mktemp("predict")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        usnodule(argv("synth", out="data", nodules=9, frames=8, size=48, cases=1, prevalence=0.4, seed=5))
        h5 = root / "data" / "stanford" / "dataset.hdf5"
        usnodule(["split", str(h5), "-k", "3"])
        splits = h5.with_name("splits.json")
        fold = root / "runs" / "fold0"
        data = [f"--data.init_args.h5={h5}", f"--data.init_args.splits={splits}"]
        _fit("vit", fold, *data)
        seg = _fit("seg", fold, *data)
        masks = fold / "masks.h5"
        usnodule(["masks", "--cine", str(h5), "--seg", str(seg), "--out", str(masks), "--device", "cpu"])
        maskcnn = _fit("maskcnn", fold, *data, f"--data.init_args.masks_h5={masks}")
        emb = fold / "embeddings.h5"
        usnodule(
            argv(
                "embeddings",
                cine=h5,
                masks=masks,
                vit=fold / "vit.ckpt",
                maskcnn=maskcnn,
                out=emb,
                accelerator="cpu",
                boxes="predicted",
            )
        )
        _fit("head_stact", fold, f"--data.init_args.path={emb}", f"--data.init_args.splits={splits}")
    return {"root": root, "h5": h5, "fold": fold, "emb": emb}


def _clip(chain) -> tuple[str, np.ndarray]:
    """A nodule whose frame count leaves a remainder (exercises the dropped trailing frames)."""
    cine = StanfordCine(chain["h5"])
    nod = next((n for n in cine.nodules if n.n_frames % 3), cine.nodules[0])
    return nod.annot_id, cine.frames(nod.annot_id, np.arange(nod.n_frames))


def _reference(chain, annot_id: str) -> tuple[float, float]:
    """Head probability and ViT avepool of the nodule from the ``usnodule embeddings`` export."""
    from lightning_modules.head_stage import HeadStage

    with h5py.File(chain["emb"]) as f:
        g = f[group_name(annot_id)]
        image, seg, image_prob = g["image"][()], g["seg"][()], g["image_prob"][()]
    head, _ = HeadStage.from_checkpoint(chain["fold"] / "head_stact.ckpt")
    with torch.inference_mode():
        logits = head(
            torch.from_numpy(image)[None],
            torch.from_numpy(seg)[None],
            torch.ones(1, len(image), dtype=torch.bool),
        )
    return float(head.malignant_prob(logits)[0]), float(image_prob.mean())


def test_dicom_and_npy_match_the_embeddings_path(chain, tmp_path):
    annot_id, frames = _clip(chain)
    npy = tmp_path / "clip.npy"
    np.save(npy, frames)
    dcm = write_dicom(frames, tmp_path / "clip.dcm")
    fold = chain["fold"]
    out = tmp_path / "predictions.csv"
    usnodule(["predict", str(dcm), str(npy), "--fold-dir", str(fold), "--out", str(out), "--device", "cpu"])
    table = pd.read_csv(out)
    assert list(table.columns) == [
        "clip",
        "n_frames",
        "n_stacks",
        "frames_with_mask",
        "prob_malignant",
        "pred",
        "prob_avepool",
    ]
    assert table["n_frames"].tolist() == [len(frames)] * 2
    assert table["n_stacks"].tolist() == [len(frames) // 3] * 2  # trailing remainder dropped
    # DICOM and .npy hold the same pixels: the same probability, bit for bit.
    assert table["prob_malignant"][0] == table["prob_malignant"][1]
    prob, avepool = _reference(chain, annot_id)
    assert table["prob_malignant"][0] == pytest.approx(prob, abs=1e-5)
    assert table["prob_avepool"][0] == pytest.approx(avepool, abs=1e-5)
    assert table["pred"][0] == int(table["prob_malignant"][0] >= 0.5)

    # Explicit checkpoints give the same as --fold-dir; a 2-frame clip still gives one stack.
    short = tmp_path / "short.npy"
    np.save(short, frames[:2])
    out2 = tmp_path / "p2.csv"
    usnodule(
        argv(
            "predict",
            npy,
            short,
            seg=fold / "seg.ckpt",
            vit=fold / "vit.ckpt",
            maskcnn=fold / "maskcnn.ckpt",
            head=fold / "head_stact.ckpt",
            out=out2,
            device="cpu",
            threshold=0,
        )
    )
    t2 = pd.read_csv(out2)
    assert t2["prob_malignant"][0] == table["prob_malignant"][1]
    assert t2["n_stacks"][1] == 1 and t2["pred"].tolist() == [1, 1]


def test_roi_and_mask_stacks_match_training_code(chain, tmp_path):
    """Stacks cut by the predictor equal the training code's for non-trivial masks.

    The tiny MSU-Net above predicts empty masks (full-frame ROI fallback), so here the annotated masks stand in
    for predictions, with the first stack's masks blanked (clip union-box fallback): the predictor's embeddings
    of the clip equal ``usnodule embeddings --boxes predicted`` given those masks as ``masks.h5``.
    """
    from stages.predict import clip_data, embed, load_predictor, resolve_checkpoints

    annot_id, frames = _clip(chain)
    cine = StanfordCine(chain["h5"])
    masks = cine.masks(annot_id, np.arange(len(frames)))
    masks[:3] = 0
    masks_h5 = tmp_path / "masks.h5"
    with h5py.File(chain["h5"]) as src, h5py.File(masks_h5, "w") as f:
        f["annot_id"], f["frame_num"] = src["annot_id"][()], src["frame_num"][()]
        m = (src["mask"][()] > 0).astype(np.uint8)
        m[cine.by_id[annot_id].rows[:3]] = 0
        f["mask"] = m
    emb = tmp_path / "emb.h5"
    fold = chain["fold"]
    usnodule(
        argv(
            "embeddings",
            cine=chain["h5"],
            masks=masks_h5,
            vit=fold / "vit.ckpt",
            maskcnn=fold / "maskcnn.ckpt",
            out=emb,
            accelerator="cpu",
            boxes="predicted",
        )
    )
    p = load_predictor(resolve_checkpoints(fold_dir=fold), "cpu")
    clip, clip_masks = clip_data("clip", frames, masks)
    got = embed(p, clip, clip_masks)
    with h5py.File(emb) as f:
        g = f[group_name(annot_id)]
        for key in ("image", "seg", "image_prob"):
            np.testing.assert_allclose(got[key].numpy(), g[key][()], atol=1e-5)
    # The test means something: real boxes smaller than the frame, and the first stack on the fallback box.
    from datamodules.stacks import build_dataset

    ds = build_dataset(clip, clip_masks, p.vit_data, p.mask_data, p.img_size, p.mask_size, True).image
    boxes = [ds.roi("clip", pos) for _, _, pos in ds.index]
    assert boxes[0] == ds.roi("clip", np.arange(len(frames))) != (0, 0, *frames.shape[1:])
    assert all(b != (0, 0, *frames.shape[1:]) for b in boxes)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_inputs_exit_2_and_write_nothing(chain, tmp_path, capsys):
    _, frames = _clip(chain)
    good = tmp_path / "good.npy"
    np.save(good, frames)
    out = tmp_path / "predictions.csv"
    fold = chain["fold"]

    with pytest.raises(SystemExit) as e:
        usnodule(argv("predict", good, fold_dir=fold, head=tmp_path / "nothere.ckpt", out=out, device="cpu"))
    assert e.value.code == 2 and "nothere.ckpt" in _one_error_line(capsys)

    # A corrupt DICOM after a good clip: exit 2 naming it, and no CSV (not even a partial one).
    bad = tmp_path / "broken.dcm"
    data = write_dicom(frames, tmp_path / "whole.dcm").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(SystemExit) as e:
        usnodule(
            ["predict", str(good), str(bad), "--fold-dir", str(fold), "--out", str(out), "--device", "cpu"]
        )
    assert e.value.code == 2 and "broken.dcm" in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.dcm", "good.npy", "whole.dcm"]
