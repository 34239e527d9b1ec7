"""Issue 11, "the pieces of a fold belong together": every STACT-Time artefact records its fold and data, and
every consumer refuses pieces of another fold or data set with one line (exit status 2) naming the file and
both values, leaving nothing behind (datamodules/provenance.py).

The checkpoints are random-init tiny stages saved with the data settings ``lightning fit`` records
(``fold``, ``h5``, ``splits``, ``masks_h5``, ``path``); the masks and embeddings files are written by the real
commands.  Also here: ``lightning fit`` Trainer settings the machine cannot run, and a fit that fails after the
Trainer is built printing its error line alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from stages.cli import main as usnodule
from stages.fit import main as fit
from tests.commands import argv
from tests.stanford_files import write_stanford
from tests.test_embeddings import save_ckpt, write_embeddings, write_splits

ROOT = Path(__file__).resolve().parents[1]


def _fails(capsys, call, *words: str) -> str:
    """``call`` exits with status 2 and prints exactly one line on stderr, ``error: ...`` holding ``words``."""
    with pytest.raises(SystemExit) as e:
        call()
    out, err = capsys.readouterr()
    assert e.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in out + err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Fold-0 and fold-1 checkpoints of the tiny Stanford set, and masks.h5 made by each fold's MSU-Net."""
    from lightning_modules.head_stage import HeadStage
    from lightning_modules.maskcnn_stage import MaskCNNStage
    from lightning_modules.seg_stage import SegStage
    from lightning_modules.vit_stage import ViTStage
    from stages.masks import predict_masks

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("provenance")
    h5 = write_stanford(root / "stanford")
    splits = write_splits(h5.with_name("splits.json"))
    doc = json.loads(splits.read_text())
    doc["folds"][0], doc["folds"][1] = doc["folds"][1], doc["folds"][0]
    doc["folds"][0]["fold"], doc["folds"][1]["fold"] = 0, 1
    other_splits = root / "other_splits.json"  # the same ids, other folds: other data
    other_splits.write_text(json.dumps(doc))

    def data(fold, **extra):
        return {"fold": fold, "h5": str(h5), "splits": str(splits), **extra}

    p = {"root": root, "h5": h5, "splits": splits, "other_splits": other_splits}
    seg = SegStage(base=2, depth=2)
    vit = ViTStage(backbone="test_vit", img_size=32)
    maskcnn = MaskCNNStage(channels=(4, 8))
    for k in (0, 1):
        p[f"seg{k}"] = save_ckpt(seg, root / f"seg{k}.ckpt", {"size": 16, **data(k)})
        p[f"masks{k}"] = predict_masks(
            cine=h5, seg=p[f"seg{k}"], out=root / f"masks{k}.h5", batch_size=4, progress=False
        )
        p[f"vit{k}"] = save_ckpt(vit, root / f"vit{k}.ckpt", {"img_size": 32, **data(k)})
        p[f"maskcnn{k}"] = save_ckpt(
            maskcnn, root / f"maskcnn{k}.ckpt", {"img_size": 16, **data(k, masks_h5=str(p[f"masks{k}"]))}
        )
    # A second fold-0 MSU-Net (other weights) and its masks; a ViT fitted with other splits.
    p["seg0b"] = save_ckpt(SegStage(base=2, depth=2), root / "seg0b.ckpt", {"size": 16, **data(0)})
    p["masks0b"] = predict_masks(
        cine=h5, seg=p["seg0b"], out=root / "masks0b.h5", batch_size=4, progress=False
    )
    p["vit_other"] = save_ckpt(
        vit, root / "vit_other.ckpt", {"img_size": 32, **data(0, splits=str(other_splits))}
    )
    p["vit0b"] = save_ckpt(
        ViTStage(backbone="test_vit", img_size=32), root / "vit0b.ckpt", {"img_size": 32, **data(0)}
    )
    # Fold-0 embeddings (fold inferred from the checkpoints: no --fold) and a head fitted on them.
    p["emb0"] = root / "emb0.h5"
    usnodule(
        argv("embeddings", cine=h5, masks=p["masks0"], vit=p["vit0"], maskcnn=p["maskcnn0"], out=p["emb0"],
             splits=splits, batch_size=4, accelerator="cpu")
    )  # fmt: skip
    p["head0"] = save_ckpt(
        HeadStage(), root / "head0.ckpt", {"fold": 0, "path": str(p["emb0"]), "splits": str(splits)}
    )
    return p


def test_masks_and_embeddings_record_fold_data_and_upstream(parts):
    from datamodules.files import file_digest

    with h5py.File(parts["masks1"], "r") as f:
        assert f.attrs["fold"] == 1 and f.attrs["seg_sha256"] == file_digest(parts["seg1"])
        assert f.attrs["splits_sha256"] == file_digest(parts["splits"])
    with h5py.File(parts["emb0"], "r") as f:
        assert f.attrs["fold"] == 0  # from the checkpoints: no --fold was given
        assert f.attrs["splits_sha256"] == file_digest(parts["splits"])
        assert f.attrs["masks_seg_sha256"] == file_digest(parts["seg0"])
        assert f.attrs["vit_sha256"] == file_digest(parts["vit0"])
        assert {g.attrs["part"] for g in f.values()} == {"train", "val", "test"}  # fold 0's parts


# ---------------------------------------------------------------------------------------------- embeddings
def _embeddings(parts, out, **given):
    args = {"cine": parts["h5"], "masks": parts["masks0"], "vit": parts["vit0"], "maskcnn": parts["maskcnn0"]}
    args.update(given)
    return argv("embeddings", **args, out=out, batch_size=4, accelerator="cpu")


EMBEDDING_MISMATCHES = {
    # name: (changed inputs, words of the error line: the file, both values)
    "fold_option": ({"fold": 1, "splits": "splits"}, ["vit0.ckpt", "ViT checkpoint of fold 0", "--fold asks for fold 1"]),
    "maskcnn_of_fold_1": ({"maskcnn": "maskcnn1"}, ["maskcnn1.ckpt", "of fold 1", "vit0.ckpt is of fold 0"]),
    "masks_of_fold_1": ({"masks": "masks1"}, ["masks1.h5", "predicted masks of fold 1", "vit0.ckpt is of fold 0"]),
    "masks_of_fold_1_asked_0": ({"masks": "masks1", "fold": 0}, ["masks1.h5", "of fold 1", "--fold asks for fold 0"]),
    "vit_other_splits": ({"vit": "vit_other", "splits": "splits"}, ["vit_other.ckpt", "other_splits.json", "splits.json"]),
    "masks_of_another_msunet": ({"masks": "masks0b"}, ["maskcnn0.ckpt", "masks0.h5", "another MSU-Net", "masks0b.h5"]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(EMBEDDING_MISMATCHES))
def test_embeddings_refuse_pieces_of_another_fold_or_data(parts, tmp_path, capsys, case):
    changed, words = EMBEDDING_MISMATCHES[case]
    given = {k: (parts[v] if isinstance(v, str) else v) for k, v in changed.items()}
    out = tmp_path / "out" / "embeddings.h5"
    out.parent.mkdir()
    _fails(capsys, lambda: usnodule(_embeddings(parts, out, **given)), *words)
    assert list(out.parent.iterdir()) == []


def test_embeddings_of_another_cine_file_need_no_fold(parts, tmp_path, capsys):
    """Without --fold / --splits, fold-0 networks may embed another data set (external test clips); with
    --fold they claim fold 0 of that file, which they were not fitted on."""
    from stages.masks import predict_masks

    other = write_stanford(tmp_path / "external", seed=3, extra=1)
    masks = predict_masks(
        cine=other, seg=parts["seg0"], out=tmp_path / "masks.h5", batch_size=4, progress=False
    )
    out = tmp_path / "emb.h5"
    usnodule(_embeddings(parts, out, cine=other, masks=masks))
    with h5py.File(out, "r") as f:
        assert f.attrs["fold"] == 0 and len(f) == 6
    capsys.readouterr()
    out.unlink()
    _fails(capsys, lambda: usnodule(_embeddings(parts, out, cine=other, masks=masks, fold=0)),
           "vit0.ckpt", "made with h5", "other data than the h5 given", str(other))  # fmt: skip
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- fits
def test_mask_cnn_data_refuses_masks_of_another_fold(parts):
    from datamodules.errors import DataError
    from datamodules.stacks import StackDataModule

    dm = StackDataModule(
        str(parts["h5"]),
        str(parts["splits"]),
        fold=0,
        kind="mask",
        masks_h5=str(parts["masks1"]),
        img_size=16,
    )
    with pytest.raises(DataError) as e:
        dm.setup("fit")
    assert str(parts["masks1"]) in str(e.value) and "of fold 1" in str(e.value) and "fold 0" in str(e.value)
    StackDataModule(
        str(parts["h5"]),
        str(parts["splits"]),
        fold=1,
        kind="mask",
        masks_h5=str(parts["masks1"]),
        img_size=16,
    ).setup("fit")


def _head_fit(parts, root: Path, fold: int) -> list[str]:
    return [
        "fit", "-c", str(ROOT / "conf" / "demo" / "head.yaml"),
        f"--data.init_args.path={parts['emb0']}", f"--data.init_args.splits={parts['splits']}",
        f"--data.init_args.fold={fold}", "--trainer.max_epochs=1", f"--trainer.default_root_dir={root}",
        f"--ckpt_out={root.parent / 'head.ckpt'}",
    ]  # fmt: skip


def test_head_fit_refuses_embeddings_of_another_fold(parts, tmp_path, capsys):
    run = tmp_path / "fold1" / "head"
    _fails(capsys, lambda: fit(_head_fit(parts, run, 1)), str(parts["emb0"]), "embeddings of fold 0",
           "data.init_args.fold asks for fold 1")  # fmt: skip
    assert list(tmp_path.iterdir()) == []  # no run folder, no resume stamp, no checkpoint


def test_a_fit_that_fails_after_the_trainer_is_built_prints_one_line(parts, tmp_path):
    """In a fresh process, where Lightning prints its start-up lines ("Seed set to", "GPU available", "💡 Tip")
    and W&B its warnings: the data module's error (found in ``setup``, after the Trainer exists) is all there
    is on stderr."""
    run = tmp_path / "fold1" / "head"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-c", "from stages.fit import main; main()", *_head_fit(parts, run, 1)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [done.stderr.strip()] and done.stderr.startswith("error: "), (
        done.stderr
    )
    assert "embeddings of fold 0" in done.stderr and done.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_more_cpu_processes_than_cores_is_one_line(parts, tmp_path, capsys):
    cores = len(os.sched_getaffinity(0))
    devices = max(7, cores + 1)  # the issue's --trainer.devices=7, on this CPU-only machine
    cmd = [*_head_fit(parts, tmp_path / "run", 0), f"--trainer.devices={devices}"]
    _fails(capsys, lambda: fit(cmd), "trainer.devices", f"{devices} processes on CPU", f"{cores} CPU cores")
    assert list(tmp_path.iterdir()) == []


def test_baselines_refuse_embeddings_of_another_fold(parts, tmp_path, capsys):
    runs = tmp_path / "runs"
    (runs / "fold1").mkdir(parents=True)
    (runs / "fold1" / "embeddings.h5").write_bytes(parts["emb0"].read_bytes())
    cmd = argv("baselines", splits=parts["splits"], runs=runs, methods="avepool", folds=1)
    _fails(capsys, lambda: usnodule(cmd), "fold1/embeddings.h5", "embeddings of fold 0", "for fold 1")
    assert sorted(p.name for p in (runs / "fold1").iterdir()) == ["embeddings.h5"]


def test_head_data_accepts_its_own_fold_and_files_without_a_record(parts, tmp_path):
    from datamodules.embeddings import EmbeddingDataModule
    from datamodules.folds import load_fold

    own = EmbeddingDataModule(str(parts["emb0"]), str(parts["splits"]), fold=0)
    own.setup("fit")
    split = load_fold(parts["splits"], 0)
    assert {p: len(own.datasets[p]) for p in ("train", "val", "test")} == {
        p: len(split[p]) for p in ("train", "val", "test")
    }
    lengths = {"12_": 1, "7_": 2, "129_": 1, "3_": 1, "45_": 2}
    labels = {"12_": 1, "7_": 0, "129_": 1, "3_": 0, "45_": 0}
    bare = write_embeddings(tmp_path / "bare.h5", lengths, labels)  # written elsewhere: nothing to check
    other = EmbeddingDataModule(str(bare), str(parts["splits"]), fold=1)
    other.setup("fit")
    assert len(other.datasets["train"]) == len(load_fold(parts["splits"], 1)["train"])


# ---------------------------------------------------------------------------------------------- predict, export
def _fold_dir(parts, folder: Path, **which) -> Path:
    folder.mkdir(parents=True)
    names = {"seg": "seg0", "vit": "vit0", "maskcnn": "maskcnn0", "head_stact": "head0", **which}
    for stage, name in names.items():
        (folder / f"{stage}.ckpt").write_bytes(parts[name].read_bytes())
    return folder


def _clip(tmp_path) -> Path:
    clip = tmp_path / "clip.npy"
    np.save(clip, np.zeros((6, 24, 32), np.uint8))
    return clip


FOLD_DIR_MISMATCHES = {
    # name: (folder name, checkpoints in it, words)
    "fold0_named_fold1": ("fold1", {}, ["seg.ckpt", "MSU-Net checkpoint of fold 0", "fold1 is fold 1"]),
    "two_folds": ("best", {"maskcnn": "maskcnn1"}, ["maskcnn.ckpt", "of fold 1", "seg.ckpt is of fold 0"]),
    "other_splits": ("fold0", {"vit": "vit_other"}, ["vit.ckpt", "other_splits.json"]),
    "head_of_another_vit": ("fold0", {"vit": "vit0b"}, ["head_stact.ckpt", "emb0.h5", "another ViT checkpoint"]),
    "maskcnn_of_another_msunet": ("fold0", {"seg": "seg0b"}, ["maskcnn.ckpt", "masks0.h5", "another MSU-Net"]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(FOLD_DIR_MISMATCHES))
def test_predict_refuses_a_fold_folder_that_does_not_belong_together(parts, tmp_path, capsys, case):
    name, which, words = FOLD_DIR_MISMATCHES[case]
    folder = _fold_dir(parts, tmp_path / "runs" / name, **which)
    out = tmp_path / "out" / "predictions.csv"
    cmd = argv("predict", _clip(tmp_path), fold_dir=folder, out=out, device="cpu")
    _fails(capsys, lambda: usnodule(cmd), *words)
    assert not out.parent.exists()


def test_export_refuses_a_fold_0_checkpoint_named_fold_2(parts, tmp_path, capsys):
    folder = _fold_dir(parts, tmp_path / "runs" / "fold2")
    out = tmp_path / "onnx"
    _fails(capsys, lambda: usnodule(["export", "--onnx", str(out), "--fold-dir", str(folder)]),
           "fold2/seg.ckpt", "of fold 0", "fold2 is fold 2")  # fmt: skip
    assert not out.exists()
    # The same folder named for its fold passes the check (and fails later only for want of onnx, if at all).
    from datamodules.files import resolve_checkpoints
    from datamodules.provenance import check_fold_checkpoints

    good = _fold_dir(parts, tmp_path / "runs" / "fold0")
    check_fold_checkpoints(resolve_checkpoints(fold_dir=good), good)
