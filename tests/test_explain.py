"""``usnodule explain`` (lightning_modules/explain.py, stages/explain.py): Grad-CAM++ maps of the STACT-Time image
encoder and of AsyCMST, their montages, t-SNE of the fused features, errors.

Models are random-init and tiny; checkpoints are written as ``lightning fit`` leaves them (weights, init args
with LightningCLI's ``_class_path``, the data settings).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from datamodules.folds import make_folds, write_splits
from lightning_modules import explain as ex
from lightning_modules.asycmst import AsyCMST
from lightning_modules.head_stage import HeadStage
from lightning_modules.maskcnn_stage import MaskCNNStage
from lightning_modules.vit_stage import ViTStage
from stages.cli import main as usnodule
from tests.stanford_files import write_stanford
from tests.test_asycmst import TINY
from tests.test_paired_video import write_paired_set
from tests.test_wandb_media import offline, offline_run  # noqa: F401  (offline is a fixture)

LABELS = {"12_": 1, "7_": 0, "129_": 1, "3_": 0, "45_": 0}  # write_stanford's five, plus `extra` below


def save_ckpt(path: Path, model, data: dict) -> Path:
    cls = type(model)
    hparams = {**model.hparams, "_class_path": f"{cls.__module__}.{cls.__name__}"}
    torch.save(
        {"state_dict": model.state_dict(), "hyper_parameters": hparams, "datamodule_hyper_parameters": data},
        path,
    )
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A Stanford set (3 folds) with a ViT-stage checkpoint, a paired set with an AsyCMST checkpoint, and an
    embeddings file whose features separate the labels, with a head checkpoint on it."""
    root = tmp_path_factory.mktemp("explain")
    torch.manual_seed(0)
    h5 = write_stanford(root / "stanford", shape=(40, 48), extra=7)
    with h5py.File(h5) as f:
        ids = sorted({a.decode() for a in f["annot_id"][()]})
    labels = [LABELS.get(i, int(int(i[:-1]) % 2 == 0)) for i in ids]
    splits = write_splits(make_folds(ids, labels, ids, k=3), root / "stanford" / "splits.json")
    vit = ViTStage(backbone="test_byobnet", img_size=64, freeze_backbone=True)
    vit_data = {"_class_path": "datamodules.stacks.StackDataModule", "h5": str(h5), "splits": str(splits),
                "fold": 0, "img_size": 64, "normalize": "half", "augment": True, "cache": True}  # fmt: skip
    vit_ckpt = save_ckpt(root / "vit.ckpt", vit, vit_data)

    manifest, paired_splits = write_paired_set(root / "paired", n=9)
    asy = AsyCMST(**TINY)
    asy_data = {"_class_path": "datamodules.paired_video.PairedVideoDataModule", "manifest": str(manifest),
                "splits": str(paired_splits), "fold": 0, "frames": 4, "size": 64, "augment": True}  # fmt: skip
    asy_ckpt = save_ckpt(root / "asycmst.ckpt", asy, asy_data)

    # embeddings: 15 nodules, label 1 around +2, label 0 around -2 (t-SNE must keep the two groups apart)
    rng = np.random.default_rng(0)
    emb_ids = [f"n{i:02d}" for i in range(15)]
    emb_labels = [i % 2 for i in range(15)]
    doc = make_folds(emb_ids, emb_labels, emb_ids, k=3)
    emb_splits = write_splits(doc, root / "emb_splits.json")
    part = {i: p for p, members in doc["folds"][0].items() if p != "fold" for i in members}
    emb = root / "embeddings.h5"
    with h5py.File(emb, "w") as f:
        f.attrs["fold"] = 0
        for nid, y in zip(emb_ids, emb_labels, strict=True):
            g = f.create_group(nid)
            s = 2 + int(nid[1:]) % 3
            centre = 2.0 if y else -2.0
            g["image"] = (centre + rng.normal(0, 0.5, (s, 16))).astype(np.float32)
            g["seg"] = (centre + rng.normal(0, 0.5, (s, 16))).astype(np.float32)
            g.attrs.update({"annot_id": nid, "label": y, "fold": 0, "part": part[nid]})
    head = HeadStage(variant="stact", dim=16, num_heads=2)
    head_data = {"path": str(emb), "splits": str(emb_splits), "fold": 0, "batch_size": 16}
    head_ckpt = save_ckpt(root / "head_stact.ckpt", head, head_data)
    return {
        "root": root, "h5": h5, "splits": splits, "vit": vit_ckpt, "manifest": manifest, "asycmst": asy_ckpt,
        "emb": emb, "emb_doc": doc, "head": head_ckpt, "paired_splits": paired_splits,
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------- maps
def _stacks(files, n=4) -> torch.Tensor:
    from datamodules.stacks import StackDataset

    ds = StackDataset(files["h5"], img_size=64, mean=(0.5,) * 3, std=(0.5,) * 3)
    return torch.stack([ds[i]["image"] for i in range(n)])


@pytest.mark.parametrize("backbone", ["test_byobnet", "test_vit"])
def test_stack_maps_have_the_input_shape_lie_in_0_1_and_depend_on_the_class(files, backbone):
    """CNN (last stage with >= 2 x 2 cells) and ViT (norm1 of the last block, tokens laid on their grid)."""
    torch.manual_seed(0)
    net = ViTStage(backbone=backbone, img_size=64).net
    images = _stacks(files)
    maps = {c: ex.stack_cams(net, images, [c] * len(images)) for c in (0, 1)}
    for m in maps.values():
        assert m.shape == (4, 64, 64) and m.dtype == np.float32
        assert m.min() >= 0.0 and m.max() <= 1.0 + 1e-6
        peak = m.reshape(4, -1).max(1)  # each stack's map is scaled to [0, 1] on its own (all 0: no evidence)
        assert ((peak > 0.99) | (peak == 0)).all() and (peak > 0.99).any()
    assert np.abs(maps[0] - maps[1]).max() > 0.1  # the class asked for is the one explained
    # the test_byobnet demo backbone at 64 px: stride-32 final_conv is 2 x 2, so it is the layer; at 32 px
    # it would be one cell, and the stride-16 stage (2 x 2) is taken instead
    if backbone == "test_byobnet":
        assert ex.stack_target(net.backbone, (64, 64))[0] is net.backbone.final_conv
        assert ex.stack_target(net.backbone, (32, 32))[0] is net.backbone.stages[2]


def test_layers_without_a_map_are_refused():
    """No feature_info, or a stage whose output is not (B, C, h, w) (e.g. channels-last tokens): NoTargetLayer,
    which the command prints as its one error line."""
    with pytest.raises(ex.NoTargetLayer, match="no timm feature_info"):
        ex.last_stage(nn.Linear(2, 2))
    with pytest.raises(ex.NoTargetLayer, match=r"gives \(2, 16, 8\), not a \(B, C, h, w\) map"):
        ex.check_feature_map(torch.zeros(2, 16, 8))


class TwoBlobBackbone(nn.Module):
    """A timm-like backbone: channel k of its feature map is ReLU of input channel 2k (a 1x1 conv), pooled."""

    feature_info = [{"module": "conv", "num_chs": 2, "reduction": 1}]
    num_features = 2

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0] = 1.0  # frame t of the stack
            self.conv.weight[1, 2] = 1.0  # frame t + 2

    def forward_features(self, x):
        return torch.relu(self.conv(x))

    def forward_head(self, x, pre_logits=False):
        return x.mean(dim=(2, 3))


def test_the_map_peaks_where_the_class_evidence_is():
    """Class 1 is driven by a blob in frame t (top left), class 0 by a blob in frame t + 2 (bottom right):
    each class's map peaks on its own blob, and the predicted class is the one whose blob is brighter."""
    net = ViTStage(backbone="test_byobnet", img_size=32, hidden_dim=2, activation="identity").net
    net.backbone, net.fc1 = TwoBlobBackbone(), nn.Linear(2, 2)
    with torch.no_grad():
        net.fc1.weight.copy_(torch.eye(2))
        net.fc1.bias.zero_()
        net.fc2.weight.copy_(
            torch.tensor([[0.0, 1.0], [1.0, 0.0]])
        )  # logit 0 <- frame t+2, logit 1 <- frame t
        net.fc2.bias.zero_()
    x = torch.zeros(1, 3, 32, 32)
    x[0, 0, 2:10, 3:11] = 2.0  # class 1 evidence, top left, brighter
    x[0, 2, 20:28, 22:30] = 1.0  # class 0 evidence, bottom right
    assert int(net(x).argmax()) == 1
    for cls, (rows, cols) in {1: (slice(2, 10), slice(3, 11)), 0: (slice(20, 28), slice(22, 30))}.items():
        m = ex.stack_cams(net, x, [cls])[0]
        y, x_ = np.unravel_index(m.argmax(), m.shape)
        assert rows.start <= y < rows.stop and cols.start <= x_ < cols.stop, (cls, y, x_)
        assert m[rows, cols].mean() > 0.9 and m.mean() < 0.2


def test_asycmst_maps_per_frame_for_both_branches(files):
    from datamodules.paired_video import PairedVideoDataModule

    dm = PairedVideoDataModule(files["manifest"], splits=files["paired_splits"], fold=0, frames=4, size=64,
                               augment=False)  # fmt: skip
    dm.setup("test")
    batch = next(iter(torch.utils.data.DataLoader(dm.datasets["test"], batch_size=2)))
    for kw in ({}, {"share_encoders": True, "block": "official"}):
        torch.manual_seed(0)
        model = AsyCMST(**TINY, **kw).eval()
        c, b = batch["ceus"], batch["bus"]
        maps = {cls: ex.clip_cams(model.net, c, b, [cls, cls]) for cls in (0, 1)}
        for m in maps.values():
            assert set(m) == {"c", "b"}
            for branch in m.values():
                assert branch.shape == (2, 4, 64, 64)
                assert branch.min() >= 0.0 and branch.max() <= 1.0 + 1e-6
        for branch in ("c", "b"):
            assert np.abs(maps[0][branch] - maps[1][branch]).max() > 0.1, (kw, branch)
        # holding the other branch's frame features fixed is exact: the logits through BranchLogits are the
        # model's own
        fixed = model.net.encoder_b(b)
        wrapped = ex.BranchLogits(model.net, "c", fixed, 4)
        with torch.no_grad():
            torch.testing.assert_close(wrapped(c.flatten(0, 1)), model(batch)["logits"])


# ---------------------------------------------------------------------------------------------- t-SNE
def test_tsne_plot_one_dot_per_case_coloured_by_label(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.array([0, 1, 1, 0, 1, 0, 0])
    points = rng.normal(size=(7, 2))
    colours = ex.save_tsne(points, labels, tmp_path / "t.png", "title")
    assert colours == [ex.LABEL_COLOURS[y] for y in labels] and ex.LABEL_COLOURS[0] != ex.LABEL_COLOURS[1]
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="at least 2"):
        ex.tsne(np.zeros((1, 4)))


def _nearest_neighbour_agreement(table: pd.DataFrame) -> float:
    xy = table[["x", "y"]].to_numpy()
    d = ((xy[:, None] - xy[None]) ** 2).sum(-1) + np.eye(len(xy)) * 1e9
    return float((table["label"].to_numpy()[d.argmin(1)] == table["label"].to_numpy()).mean())


# ---------------------------------------------------------------------------------------------- the command
def test_explain_every_kind_of_input(files, tmp_path, capsys):
    out = tmp_path / "explain"
    usnodule(["explain", str(files["vit"]), str(files["asycmst"]), str(files["head"]), str(files["emb"]),
              "--out", str(out), "--max-cases", "3", "--device", "cpu"])  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("explain fold0 ") for line in lines)

    # ViT stage: one montage per drawn nodule of fold 0's test part, malignant and benign alternately
    from datamodules.folds import load_fold

    test_ids = sorted(load_fold(files["splits"], 0)["test"])
    pngs = sorted(p.stem for p in (out / "fold0" / "vit" / "gradcam").glob("*.png"))
    assert len(pngs) == min(3, len(test_ids)) and set(pngs) <= set(test_ids)
    assert not (out / "fold0" / "vit" / "tsne.png").exists()  # stack embeddings are not fused features

    # AsyCMST: montages and a t-SNE of every test clip, labels as in the manifest
    manifest = pd.read_csv(files["manifest"], dtype={"case_id": str}).set_index("case_id")
    paired_test = load_fold(files["paired_splits"], 0)["test"]
    asy = out / "fold0" / "asycmst"
    assert len(list((asy / "gradcam").glob("*.png"))) == min(3, len(paired_test))
    table = pd.read_csv(asy / "tsne.csv", dtype={"case_id": str})
    assert list(table.columns) == ["case_id", "label", "prob", "x", "y"]
    assert sorted(table["case_id"]) == sorted(paired_test)
    assert (table["label"].to_numpy() == manifest.loc[table["case_id"], "label"].to_numpy()).all()
    assert table["prob"].between(0, 1).all() and (asy / "tsne.png").is_file()

    # STACT-Time: the head's fused features and the exported embeddings, one point per test nodule
    emb_test = sorted(files["emb_doc"]["folds"][0]["test"])
    for name in ("head_stact", "embeddings"):
        table = pd.read_csv(out / "fold0" / name / "tsne.csv", dtype={"case_id": str})
        assert sorted(table["case_id"]) == emb_test, name
        assert (table["label"] == table["case_id"].str[1:].astype(int) % 2).all()
    # the exported features separate the labels, and t-SNE keeps them apart: features, ids and labels line up
    table = pd.read_csv(out / "fold0" / "embeddings" / "tsne.csv", dtype={"case_id": str})
    assert _nearest_neighbour_agreement(table) == 1.0 and table["prob"].isna().all()


def test_explain_named_cases_other_part_and_target(files, tmp_path):
    from datamodules.folds import load_fold

    val = sorted(load_fold(files["paired_splits"], 0)["val"])
    out = tmp_path / "x"
    usnodule(["explain", str(files["asycmst"]), "--out", str(out), "--part", "val", "--cases", val[0],
              "--target", "malignant", "--device", "cpu"])  # fmt: skip
    assert [p.stem for p in (out / "fold0" / "asycmst" / "gradcam").glob("*.png")] == [val[0]]
    assert len(pd.read_csv(out / "fold0" / "asycmst" / "tsne.csv")) == len(val)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_errors_are_one_line_exit_2_and_leave_nothing(files, tmp_path, capsys):
    out = tmp_path / "explain"
    mask = save_ckpt(tmp_path / "maskcnn.ckpt", MaskCNNStage(channels=(4, 8)), {})
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.zeros(3)
    cases = [
        ([str(mask)], "MaskCNNStage checkpoint; explain takes a ViTStage, AsyCMST or HeadStage"),
        ([str(files["vit"]), str(tmp_path / "nothere.ckpt")], "nothere.ckpt: not found"),
        ([str(foreign)], "foreign.h5: 'x' is not a nodule group"),
        ([str(files["vit"]), "--data", str(tmp_path / "moved.hdf5")], "moved.hdf5"),
        ([str(files["asycmst"]), "--cases", "nope"], "case(s) ['nope'] are not in the fold's 'test' part"),
        ([str(files["vit"]), str(files["vit"])], "explain them in two runs"),
    ]
    for args, expected in cases:
        with pytest.raises(SystemExit) as e:
            usnodule(["explain", *args, "--out", str(out), "--device", "cpu"])
        assert e.value.code == 2
        line = _one_error_line(capsys)
        assert expected in line, (args, line)
        assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()], args
    bad = tmp_path / "junk.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as e:
        usnodule(["explain", str(bad), "--out", str(out)])
    assert e.value.code == 2 and "junk.ckpt: not a BaseStage checkpoint" in _one_error_line(capsys)


@pytest.mark.timeout(120)
def test_wandb_run_holds_the_pictures(files, tmp_path, offline):  # noqa: F811
    out = tmp_path / "explain"
    usnodule(["explain", str(files["asycmst"]), "--out", str(out), "--max-cases", "2", "--device", "cpu",
              "--wandb", "--exp", "myexp"])  # fmt: skip
    run = offline_run(out)
    assert (run["run"].run_group, run["run"].job_type) == ("myexp", "explain")
    assert {"explain/fold0/asycmst/gradcam/count", "explain/fold0/asycmst/tsne/count"} <= run["history"]
    gradcam = [m for m in run["media"] if m.startswith("media/images/explain/fold0/asycmst/gradcam")]
    assert len(gradcam) == 2 and all(m.endswith(".png") for m in gradcam)
    assert any(m.startswith("media/images/explain/fold0/asycmst/tsne_") for m in run["media"])
