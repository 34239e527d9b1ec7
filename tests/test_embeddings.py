"""Predicted masks (stages/masks.py), embedding export (stages/embeddings.py), embeddings.h5 reading
(datamodules/embeddings.py)."""

from __future__ import annotations

import json

import h5py
import lightning
import numpy as np
import pytest
import torch

from datamodules.embeddings import EmbeddingDataModule, EmbeddingDataset, pad_collate, read_index
from datamodules.errors import DataError
from datamodules.stacks import PredictedMasks, build_dataset
from datamodules.stanford import StanfordCine
from lightning_modules.export import EmbeddingExport
from stages.embeddings import export, merge_shards
from stages.masks import predict_masks
from tests.stanford_files import write_stanford

IDS = sorted(["12_", "7_", "129_", "3_", "45_"])


def save_ckpt(model, path, data_hparams=None):
    """A Lightning-format checkpoint without running a Trainer (what load_from_checkpoint reads)."""
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": dict(model.hparams),
            "pytorch-lightning_version": lightning.__version__,
            "datamodule_hyper_parameters": data_hparams or {},
        },
        path,
    )
    return path


def write_splits(path):
    folds = [
        {"fold": 0, "train": ["12_", "7_", "45_"], "val": ["3_"], "test": ["129_"]},
        {"fold": 1, "train": ["129_", "3_", "45_"], "val": ["7_"], "test": ["12_"]},
    ]
    path.write_text(json.dumps({"k": 2, "seed": 0, "folds": folds}))
    return path


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Tiny cine file, random-init SegStage/ViTStage/MaskCNNStage checkpoints and the predicted masks."""
    from lightning_modules.maskcnn_stage import MaskCNNStage
    from lightning_modules.seg_stage import SegStage
    from lightning_modules.vit_stage import ViTStage

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("chain")
    h5 = write_stanford(root / "stanford")
    seg = save_ckpt(SegStage(base=2, depth=2), root / "seg.ckpt", {"size": 16})
    vit = save_ckpt(
        ViTStage(backbone="test_vit", img_size=32),
        root / "vit.ckpt",
        {"img_size": 32, "buffer": 5, "normalize": "half"},
    )
    # A spread mask branch beside an adjacent image branch: the export must follow each checkpoint's setting.
    maskcnn = save_ckpt(
        MaskCNNStage(channels=(4, 8)), root / "maskcnn.ckpt", {"img_size": 16, "stack_frames": "spread"}
    )
    masks = predict_masks(cine=h5, seg=seg, out=root / "masks.h5", batch_size=4, progress=False)
    return {
        "root": root,
        "h5": h5,
        "seg": seg,
        "vit": vit,
        "maskcnn": maskcnn,
        "masks": masks,
        "splits": write_splits(root / "splits.json"),
    }


def test_masks_h5_in_row_order_of_the_cine_file(chain):
    with h5py.File(chain["h5"], "r") as src, h5py.File(chain["masks"], "r") as f:
        assert f["mask"].shape == src["image"].shape and f["mask"].dtype == np.uint8
        assert set(np.unique(f["mask"][()]).tolist()) <= {0, 1}
        assert (f["annot_id"][()] == src["annot_id"][()]).all()
        assert (f["frame_num"][()] == src["frame_num"][()]).all()
        assert f.attrs["seg_checkpoint"].endswith("seg.ckpt") and f.attrs["size"] == 16
    PredictedMasks(chain["masks"], StanfordCine(chain["h5"]))  # validates against the cine file


def test_export_one_group_per_nodule_matching_direct_forward(chain):
    out = export(
        cine=chain["h5"],
        masks=chain["masks"],
        vit=chain["vit"],
        maskcnn=chain["maskcnn"],
        out=chain["root"] / "embeddings.h5",
        splits=chain["splits"],
        fold=0,
        batch_size=3,
        accelerator="cpu",
        progress=False,
    )
    cine = StanfordCine(chain["h5"])
    with h5py.File(out, "r") as f:
        assert sorted(f.keys()) == IDS
        for nid in IDS:
            g = f[nid]
            s = max(1, cine.by_id[nid].n_frames // 3)
            assert g["image"].shape == g["seg"].shape == (s, 256) and g["image_prob"].shape == (s,)
            assert g.attrs["label"] == cine.by_id[nid].label and g.attrs["fold"] == 0
        assert f["129_"].attrs["part"] == "test" and f["12_"].attrs["part"] == "train"
        assert f.attrs["vit_checkpoint"].endswith("vit.ckpt") and len(f.attrs["maskcnn_sha256"]) == 64
        assert f.attrs["img_size"] == 32 and f.attrs["mask_size"] == 16
        assert (f.attrs["image_stack_frames"], f.attrs["mask_stack_frames"]) == ("adjacent", "spread")
        got = {nid: (f[nid]["image"][()], f[nid]["seg"][()]) for nid in IDS}
    # Same numbers as the bare encoders on the same stacks, in stack order.
    from lightning_modules.maskcnn_stage import MaskCNNStage
    from lightning_modules.vit_stage import ViTStage

    model = EmbeddingExport(
        ViTStage.from_checkpoint(chain["vit"])[0], MaskCNNStage.from_checkpoint(chain["maskcnn"])[0]
    )
    mask_data = {"stack_frames": "spread"}
    ds = build_dataset(cine, PredictedMasks(chain["masks"], cine), {"normalize": "half"}, mask_data, 32, 16)
    batch = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])
    with torch.inference_mode():
        pred = model.predict_step(batch, 0)
    for row in range(len(ds)):
        nid, s = ds.nodule_ids[int(batch["nodule"][row])], int(batch["stack"][row])
        np.testing.assert_allclose(got[nid][0][s], pred["image"][row].numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got[nid][1][s], pred["seg"][row].numpy(), rtol=1e-4, atol=1e-5)
    assert not list(chain["root"].glob(".embeddings.h5.shards/*/*"))  # shards cleaned up


def _rows(n_stacks, dim=4, seed=0):
    rng = np.random.default_rng(seed)
    nod = np.repeat(np.arange(len(n_stacks)), n_stacks)
    stack = np.concatenate([np.arange(s) for s in n_stacks])
    return {
        "nodule": nod,
        "stack": stack,
        "image": rng.normal(size=(len(nod), dim)).astype(np.float32),
        "seg": rng.normal(size=(len(nod), dim)).astype(np.float32),
        "image_prob": rng.random(len(nod)).astype(np.float32),
        "seg_prob": rng.random(len(nod)).astype(np.float32),
    }


def _shard(path, rows, sel):
    with h5py.File(path, "w") as f:
        for k, v in rows.items():
            f[k] = v[sel]
    return path


def test_merged_ddp_shards_equal_single_process_file(tmp_path):
    n_stacks, ids = [2, 5, 1, 3], ["a", "b", "c", "d"]
    rows = _rows(n_stacks)
    n = len(rows["nodule"])
    attrs = [{"label": i % 2} for i in range(4)]
    single = merge_shards(
        [_shard(tmp_path / "one.h5", rows, np.arange(n))],
        tmp_path / "single.h5",
        ids,
        n_stacks,
        attrs,
        {"vit_checkpoint": "x"},
        block=3,
    )
    # Two ranks with a DistributedSampler-style interleaving, written in a scrambled order.
    perm = np.random.default_rng(1).permutation(n)
    shards = [_shard(tmp_path / f"rank{r}.h5", rows, perm[r::2]) for r in range(2)]
    multi = merge_shards(
        shards, tmp_path / "multi.h5", ids, n_stacks, attrs, {"vit_checkpoint": "x"}, block=2
    )
    with h5py.File(single, "r") as a, h5py.File(multi, "r") as b:
        assert list(a.keys()) == list(b.keys()) == ids
        assert dict(a.attrs) == dict(b.attrs)
        for g in ids:
            assert dict(a[g].attrs) == dict(b[g].attrs)
            for k in ("image", "seg", "image_prob", "seg_prob"):
                np.testing.assert_array_equal(a[g][k][()], b[g][k][()])
    # A lost shard is an error, never a silently short file.
    with pytest.raises(DataError, match="incomplete"):
        merge_shards(shards[:1], tmp_path / "lost.h5", ids, n_stacks, attrs, {})
    assert not (tmp_path / "lost.h5").exists()


def test_interrupted_export_leaves_no_file(chain, monkeypatch):
    calls = {"n": 0}
    real = EmbeddingExport.predict_step

    def flaky(self, batch, batch_idx, dataloader_idx=0):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("killed midway")
        return real(self, batch, batch_idx, dataloader_idx)

    monkeypatch.setattr(EmbeddingExport, "predict_step", flaky)
    out = chain["root"] / "interrupted.h5"
    with pytest.raises(RuntimeError, match="midway"):
        export(
            cine=chain["h5"],
            masks=chain["masks"],
            vit=chain["vit"],
            maskcnn=chain["maskcnn"],
            out=out,
            batch_size=2,
            accelerator="cpu",
            progress=False,
        )
    assert not out.exists()
    assert not [p for p in chain["root"].rglob("*") if "interrupted" in p.name]  # no partial file, no shards


@pytest.mark.parametrize("which", ["vit", "maskcnn", "masks"])
def test_missing_or_bad_inputs_are_one_line_data_errors(chain, which, tmp_path):
    args = {k: chain[k] for k in ("vit", "maskcnn", "masks")}
    bad = tmp_path / f"bad_{which}"
    if which == "masks":
        bad.write_bytes(b"not an hdf5 file")
    args[which] = bad if which == "masks" else tmp_path / "missing.ckpt"
    with pytest.raises(DataError) as e:
        export(cine=chain["h5"], out=tmp_path / "e.h5", accelerator="cpu", progress=False, **args)
    assert "\n" not in str(e.value) and not (tmp_path / "e.h5").exists()
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(DataError, match="not a ViTStage checkpoint"):
        export(
            cine=chain["h5"],
            out=tmp_path / "e.h5",
            masks=chain["masks"],
            vit=garbage,
            maskcnn=chain["maskcnn"],
            accelerator="cpu",
            progress=False,
        )


def test_pad_collate_pads_and_marks_valid_stacks():
    items = [
        {
            "image_emb": torch.full((s, 4), float(s)),
            "seg_emb": torch.full((s, 4), -float(s)),
            "label": torch.tensor(s % 2),
            "nodule": torch.tensor(i),
        }
        for i, s in enumerate([2, 5, 1])
    ]
    b = pad_collate(items)
    assert b["image_emb"].shape == b["seg_emb"].shape == (3, 5, 4)
    assert b["valid"].tolist() == [
        [True, True, False, False, False],
        [True] * 5,
        [True, False, False, False, False],
    ]
    assert float(b["image_emb"][0, 2:].abs().sum()) == 0.0 and float(b["image_emb"][1, 4, 0]) == 5.0
    assert b["label"].tolist() == [0, 1, 1] and b["nodule"].tolist() == [0, 1, 2]


def write_embeddings(path, lengths, labels):
    with h5py.File(path, "w") as f:
        for nid, s in lengths.items():
            g = f.create_group(nid)
            g["image"] = np.full((s, 8), s, np.float32)
            g["seg"] = np.full((s, 8), -s, np.float32)
            g.attrs["label"], g.attrs["annot_id"] = labels[nid], nid
    return path


def test_embedding_datamodule_folds_and_bad_files(tmp_path):
    lengths = {"12_": 1, "7_": 2, "129_": 1, "3_": 1, "45_": 2}
    labels = {"12_": 1, "7_": 0, "129_": 1, "3_": 0, "45_": 0}
    path = write_embeddings(tmp_path / "emb.h5", lengths, labels)
    dm = EmbeddingDataModule(str(path), str(write_splits(tmp_path / "splits.json")), fold=0, batch_size=2)
    dm.setup("fit")
    assert dm.datasets["train"].nodule_ids == ["12_", "45_", "7_"] and dm.datasets["test"].nodule_ids == [
        "129_"
    ]
    seen = {dm.datasets["train"].nodule_ids[int(j)] for b in dm.train_dataloader() for j in b["nodule"]}
    assert seen == {"12_", "45_", "7_"}
    batch = next(iter(dm.val_dataloader()))
    assert batch["image_emb"].shape == (1, 1, 8) and batch["valid"].all()
    assert len(dm.datasets["predict"]) == 5
    path = write_embeddings(tmp_path / "bad.h5", lengths, labels)
    with h5py.File(path, "a") as f:
        del f["3_"]["seg"]
        f["3_"]["seg"] = np.zeros((2, 8), np.float32)  # S differs from image
    with pytest.raises(DataError, match="3_"):
        read_index(path)
    with pytest.raises(DataError, match="does not exist"):
        EmbeddingDataset(tmp_path / "nope.h5")
