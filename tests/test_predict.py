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
from tests.us_dicom import burned_in, us_region, write_us_dicom

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
        "region",
        "n_frames",
        "n_stacks",
        "frames_with_mask",
        "prob_malignant",
        "pred",
        "prob_avepool",
        "crop_box",
        "spacing",
        "nodule_frame",
        "width_mm",
        "height_mm",
        "max_extent_mm",
    ]
    # No Sequence of Ultrasound Regions (and no DICOM): the whole frame, and the CSV says so.
    h, w = frames.shape[1:]
    assert table["region"].tolist() == ["whole frame"] * 2
    assert table["crop_box"].tolist() == [f"0 0 {w} {h}"] * 2
    assert table["spacing"].tolist() == ["unknown"] * 2
    assert table[["width_mm", "height_mm", "max_extent_mm"]].isna().all().all()
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


# ------------------------------------------------------------------------------------ ultrasound regions
def _scanner_files(chain, tmp_path) -> dict[str, Path]:
    """The clip as .npy, its mirror image as .npy, and scanner-like DICOMs holding them among burned-in
    clutter: one region (the clip), two regions side by side (clip | mirror), and a region that overflows."""
    _, frames = _clip(chain)
    mirror = np.ascontiguousarray(frames[:, :, ::-1])
    t, h, w = frames.shape
    np.save(tmp_path / "clip.npy", frames)
    np.save(tmp_path / "mirror.npy", mirror)
    one = burned_in(frames, (h + 30, w + 50), (20, 30), seed=1)
    two = burned_in(frames, (h + 12, 2 * w + 14), (6, 3), seed=2)
    two[:, 6 : 6 + h, w + 10 : 2 * w + 10] = mirror
    return {
        "clip": tmp_path / "clip.npy",
        "mirror": tmp_path / "mirror.npy",
        "one": write_us_dicom(
            one,
            tmp_path / "one.dcm",
            [
                us_region(0, 0, w + 49, 11, spatial_format=5, data_type=0),
                us_region(30, 20, 30 + w - 1, 20 + h - 1),
            ],
        ),
        "two": write_us_dicom(
            two,
            tmp_path / "two.dcm",
            [
                us_region(3, 6, 3 + w - 1, 6 + h - 1, delta_cm=(0.01, 0.01)),
                us_region(w + 10, 6, 2 * w + 9, 6 + h - 1, delta_cm=(0.02, 0.01)),
            ],
        ),
        "outside": write_us_dicom(
            two, tmp_path / "outside.dcm", [us_region(w + 10, 6, 2 * w + 14, 6 + h - 1)]
        ),
    }


def _predict(files, out: Path, fold: Path, *extra: str) -> pd.DataFrame:
    usnodule(
        ["predict", *map(str, files), "--fold-dir", str(fold), "--out", str(out), "--device", "cpu", *extra]
    )
    return pd.read_csv(out, keep_default_na=False, na_values=[""])


def test_regions_are_cropped_and_predicted_one_row_each(chain, tmp_path):
    f = _scanner_files(chain, tmp_path)
    _, frames = _clip(chain)
    t, h, w = frames.shape
    files = [f["clip"], f["mirror"], f["one"], f["two"]]
    table = _predict(files, tmp_path / "p.csv", chain["fold"])
    assert table["clip"].tolist() == [str(p) for p in files[:3]] + [str(f["two"])] * 2
    assert table["region"].astype(str).tolist() == ["whole frame", "whole frame", "2", "1", "2"]
    assert table["crop_box"].tolist() == [
        f"0 0 {w} {h}",
        f"0 0 {w} {h}",
        f"30 20 {30 + w} {20 + h}",
        f"3 6 {3 + w} {6 + h}",
        f"{w + 10} 6 {2 * w + 10} {6 + h}",
    ]
    assert table["spacing"].tolist() == ["unknown"] * 2 + ["0.1 x 0.1 mm/px"] * 2 + ["0.2 x 0.1 mm/px"]
    # The crop is exactly the region's pixels: each region gives the probability of the clip it holds, bit for
    # bit, whatever clutter surrounds it.
    prob = table["prob_malignant"].tolist()
    assert prob[2] == prob[0] and prob[3] == prob[0] and prob[4] == prob[1]
    assert prob[0] != prob[1]  # the two views really differ
    assert (table["n_frames"] == t).all()


def test_size_in_mm_from_the_region_spacing(chain, tmp_path):
    """With --mask-threshold 0 every pixel of the crop is "nodule": its size is the region's size in mm."""
    f = _scanner_files(chain, tmp_path)
    _, frames = _clip(chain)
    t, h, w = frames.shape
    table = _predict([f["clip"], f["two"]], tmp_path / "p.csv", chain["fold"], "--mask-threshold", "0")
    assert table["frames_with_mask"].tolist() == [t] * 3
    assert table["nodule_frame"].tolist() == [1] * 3  # the first of equally large frames
    assert np.isnan(table["width_mm"][0])  # no spacing: no mm
    assert table["width_mm"][1:].tolist() == pytest.approx([w * 0.1, w * 0.2])
    assert table["height_mm"][1:].tolist() == pytest.approx([h * 0.1, h * 0.1])
    assert table["max_extent_mm"][1:].tolist() == pytest.approx(
        [np.hypot(w * 0.1, h * 0.1), np.hypot(w * 0.2, h * 0.1)]
    )


def test_region_outside_the_frame_is_one_error_line(chain, tmp_path, capsys, monkeypatch):
    import stages.predict as predict

    monkeypatch.setattr(predict, "load_predictor", lambda *a, **k: pytest.fail("models were loaded"))
    f = _scanner_files(chain, tmp_path)
    out, pictures = tmp_path / "p.csv", tmp_path / "pictures"
    with pytest.raises(SystemExit) as e:
        _predict([f["clip"], f["outside"]], out, chain["fold"], "--overlay", str(pictures))
    line = _one_error_line(capsys)
    assert e.value.code == 2 and "outside.dcm" in line and "does not fit in the" in line
    assert not out.exists() and not pictures.exists()


def test_failed_clip_leaves_no_overlay_of_the_clips_before_it(chain, tmp_path, capsys):
    f = _scanner_files(chain, tmp_path)
    bad = tmp_path / "flat.npy"
    np.save(bad, np.zeros((16, 16), np.uint8))  # read only after the first clip was predicted and drawn
    out, pictures = tmp_path / "p.csv", tmp_path / "pictures"
    with pytest.raises(SystemExit) as e:
        _predict([f["clip"], bad], out, chain["fold"], "--overlay", str(pictures))
    assert e.value.code == 2 and "flat.npy" in _one_error_line(capsys)
    assert not out.exists() and not pictures.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------------------------ overlays
def test_overlay_pictures_and_unchanged_probabilities(chain, tmp_path):
    import av
    from PIL import Image

    f = _scanner_files(chain, tmp_path)
    _, frames = _clip(chain)
    t, h, w = frames.shape
    files = [f["clip"], f["two"]]
    plain = _predict(files, tmp_path / "plain.csv", chain["fold"])
    pictures = tmp_path / "pictures"
    drawn = _predict(files, tmp_path / "drawn.csv", chain["fold"], "--overlay", str(pictures))
    pd.testing.assert_frame_equal(plain, drawn)  # every column, probabilities bit for bit
    stems = ["clip", "two_region1", "two_region2"]
    assert sorted(p.name for p in pictures.iterdir()) == sorted(
        f"{s}.{x}" for s in stems for x in ("mp4", "png")
    )

    n_stacks = t // 3
    for stem, (fh, fw) in zip(stems, [(h, w), (h + 12, 2 * w + 14), (h + 12, 2 * w + 14)], strict=True):
        with av.open(str(pictures / f"{stem}.mp4")) as v:
            decoded = [fr.to_ndarray(format="rgb24") for fr in v.decode(video=0)]
        scale = -(-256 // max(fh, fw))  # small frames enlarged by an integer factor to >= 256 px
        eh, ew = fh * scale + 2 * 18, fw * scale  # + the self- and cross-attention strip rows
        assert len(decoded) == t and decoded[0].shape == (eh + eh % 2, ew + ew % 2, 3)
        png = np.asarray(Image.open(pictures / f"{stem}.png"))
        tile_h = round(fh * 192 / max(fh, fw)) + 2 * 18
        rows = -(-n_stacks // 6)
        assert png.shape[0] == 46 + rows * (tile_h + 4) + 4 and png.shape[2] == 3

    # A second run into the same folder replaces its files and leaves no temporary behind.
    _predict(files[:1], tmp_path / "again.csv", chain["fold"], "--overlay", str(pictures))
    assert len(list(pictures.iterdir())) == 6
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_head_attention_over_stacks(chain):
    """The strip's numbers: one share per stack for each block of the STACT-Time head, summing to 1."""
    from stages.predict import (
        clip_data,
        embed,
        head_attention,
        head_prob,
        load_predictor,
        resolve_checkpoints,
    )

    _, frames = _clip(chain)
    p = load_predictor(resolve_checkpoints(fold_dir=chain["fold"]), "cpu")
    masks = np.zeros(frames.shape, np.uint8)
    emb = embed(p, *clip_data("clip", frames, masks))
    before = head_prob(p, emb)
    att = head_attention(p, emb)
    assert sorted(att) == ["cross", "self"]
    for v in att.values():
        assert v.shape == (len(frames) // 3,) and v.sum() == pytest.approx(1.0) and (v >= 0).all()
    assert head_prob(p, emb) == before
    # The same numbers as the head's own maps, column-averaged in stack order.
    batch = {
        "image_emb": emb["image"][None],
        "seg_emb": emb["seg"][None],
        "valid": torch.ones(1, len(emb["image"]), dtype=torch.bool),
    }
    maps = p.head.attention_maps(batch)
    np.testing.assert_allclose(att["self"], maps["self"][0].mean(0).numpy(), rtol=1e-6)
    assert emb["roi"].shape == (len(frames) // 3, 4)


def test_overlay_option_and_disk_full_are_one_error_line(chain, tmp_path, capsys, monkeypatch):
    import errno

    import datamodules.overlay as overlay_module
    import stages.predict as predict

    _, frames = _clip(chain)
    clip = tmp_path / "clip.npy"
    np.save(clip, frames)
    (tmp_path / "file.txt").write_text("not a folder")
    with monkeypatch.context() as m:
        m.setattr(predict, "load_predictor", lambda *a, **k: pytest.fail("models were loaded"))
        for bad in (tmp_path / "file.txt", tmp_path / "file.txt" / "sub"):
            with pytest.raises(SystemExit) as e:
                usnodule(argv("predict", clip, fold_dir=chain["fold"], overlay=bad))
            line = _one_error_line(capsys)
            assert e.value.code == 2 and "--overlay" in line and "file.txt" in line

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(overlay_module, "write_png", full)
    out, pictures = tmp_path / "p.csv", tmp_path / "pictures"
    with pytest.raises(SystemExit) as e:
        _predict([clip], out, chain["fold"], "--overlay", str(pictures))
    line = _one_error_line(capsys)
    assert e.value.code == 2 and "pictures" in line and "No space left" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.npy", "file.txt"]
