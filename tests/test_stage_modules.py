"""The STACT-Time LightningModules on random tensors with tiny Trainers: steps run, metrics are right.

Optimizers come from the LightningCLI YAML in real runs; here each model gets a plain SGD/AdamW attached.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
import yaml
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from torch.utils.data import DataLoader

from lightning_modules.base import CaseMetrics, case_scores
from lightning_modules.head_stage import HEAD_VARIANTS, HeadStage
from lightning_modules.maskcnn_stage import MaskCNNStage
from lightning_modules.seg_stage import SegStage
from lightning_modules.vit_stage import ViTStage

ROOT = Path(__file__).resolve().parents[1]


def _trainer(**kw) -> L.Trainer:
    args = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        precision=32,
    )
    return L.Trainer(**{**args, **kw})


def _with_optimizer(model: L.LightningModule, cls=torch.optim.SGD, lr: float = 0.1) -> L.LightningModule:
    model.configure_optimizers = lambda: cls([p for p in model.parameters() if p.requires_grad], lr=lr)
    return model


def _stacks(n_nodules=5, per=3, size=32, binary=False):
    """Stack-level samples: nodule i has `per` stacks, label i % 2 (one nodule split over two batches)."""
    rows = []
    for i in range(n_nodules):
        for s in range(per):
            img = torch.rand(3, size, size)
            rows.append(
                {
                    "image": (img > 0.5).float() if binary else img,
                    "label": torch.tensor(i % 2),
                    "nodule": torch.tensor(i),
                    "stack": torch.tensor(s),
                    "index": torch.tensor(len(rows)),
                }
            )
    return rows


def _nodule_reference(model, rows):
    """Manual nodule-level scores: mean of the stack probabilities per nodule (eval mode)."""
    model.eval()
    with torch.no_grad():
        prob = {}
        for r in rows:
            p = model.logits({k: v[None] for k, v in r.items()}).softmax(-1)[0, 1].item()
            prob.setdefault(int(r["nodule"]), []).append(p)
    ids = sorted(prob)
    p = torch.tensor([sum(prob[i]) / len(prob[i]) for i in ids])
    y = torch.tensor([i % 2 for i in ids])
    return p, y


def _check_nodule_metrics(metrics, p, y):
    assert metrics["val/auroc"] == pytest.approx(roc_auc_score(y, p), abs=1e-5)
    assert metrics["val/acc"] == pytest.approx(accuracy_score(y, p >= 0.5), abs=1e-6)
    assert metrics["val/f1"] == pytest.approx(f1_score(y, p >= 0.5, zero_division=0), abs=1e-6)


def test_nodule_scores_and_metric_groups_by_nodule():
    nod = torch.tensor([3, 1, 3, 1, 7])
    prob = torch.tensor([0.2, 0.9, 0.4, 0.7, 0.6])
    lab = torch.tensor([0, 1, 0, 1, 1])
    ids, mean, y = case_scores(nod, prob, lab)
    assert ids.tolist() == [1, 3, 7] and y.tolist() == [1, 0, 1]
    torch.testing.assert_close(mean, torch.tensor([0.8, 0.3, 0.6]))
    m = CaseMetrics()
    m.update(nod[:2], prob[:2], lab[:2])
    m.update(nod[2:], prob[2:], lab[2:])
    out = m.compute()
    assert out["acc"] == 1.0 and out["auroc"] == 1.0
    # DistributedSampler-style repeat of (nodule 3, stack 0) does not bias the nodule mean
    dup = CaseMetrics(threshold=0.29)
    dup.update(
        torch.tensor([3, 3, 9]),
        torch.tensor([0.2, 0.4, 0.9]),
        torch.tensor([0, 0, 1]),
        torch.tensor([0, 1, 0]),
    )
    dup.update(torch.tensor([3]), torch.tensor([0.2]), torch.tensor([0]), torch.tensor([0]))
    assert dup.compute()["acc"] == 0.5  # mean 0.3 > 0.29 -> wrong; with the repeat it would be 0.267 -> right
    one_class = CaseMetrics()
    one_class.update(nod, prob, torch.ones(5, dtype=torch.long))
    assert torch.isnan(one_class.compute()["auroc"])


def test_vit_stage_head_only_training_and_nodule_metrics(tmp_path):
    rows = _stacks()
    model = _with_optimizer(ViTStage(backbone="test_vit", img_size=32))
    backbone0 = {k: v.clone() for k, v in model.net.backbone.state_dict().items()}
    head0 = model.net.fc1.weight.clone()
    _trainer(fast_dev_run=2).fit(
        model, DataLoader(rows, batch_size=4, shuffle=True), DataLoader(rows, batch_size=4)
    )
    for k, v in model.net.backbone.state_dict().items():
        assert torch.equal(v, backbone0[k]), k
    assert not torch.equal(model.net.fc1.weight, head0)

    trainer = _trainer()
    metrics = trainer.validate(model, DataLoader(rows, batch_size=4), verbose=False)[0]
    _check_nodule_metrics(metrics, *_nodule_reference(model, rows))
    assert {"val/stack_acc", "val/stack_auroc", "val/loss"} <= set(metrics)

    out = trainer.predict(model, DataLoader(rows[:5], batch_size=5))[0]
    assert out["embedding"].shape == (5, 256) and out["prob"].shape == (5,)
    assert out["nodule"].tolist() == [0, 0, 0, 1, 1] and out["stack"].tolist() == [0, 1, 2, 0, 1]
    # from_checkpoint: same numbers from the checkpoint, no pretrained fetch
    ckpt = tmp_path / "vit.ckpt"
    trainer.save_checkpoint(ckpt)
    again, _ = ViTStage.from_checkpoint(str(ckpt))
    with torch.no_grad():
        torch.testing.assert_close(
            again.predict_step(next(iter(DataLoader(rows[:5], batch_size=5))), 0)["prob"], out["prob"]
        )


def test_maskcnn_stage_fit_validate_predict():
    rows = _stacks(binary=True)
    model = _with_optimizer(MaskCNNStage())
    _trainer(fast_dev_run=1).fit(model, DataLoader(rows, batch_size=4), DataLoader(rows, batch_size=4))
    trainer = _trainer()
    metrics = trainer.validate(model, DataLoader(rows, batch_size=4), verbose=False)[0]
    _check_nodule_metrics(metrics, *_nodule_reference(model, rows))
    out = trainer.predict(model, DataLoader(rows[:3], batch_size=3))[0]
    assert out["embedding"].shape == (3, 256) and out["index"].tolist() == [0, 1, 2]


def _nodules(n=6, s=4, d=16):
    rows = []
    for i in range(n):
        length = 1 + i % s
        valid = torch.arange(s) < length
        rows.append(
            {
                "image_emb": torch.randn(s, d),
                "seg_emb": torch.randn(s, d),
                "valid": valid,
                "label": torch.tensor(i % 2),
                "nodule": torch.tensor(i),
            }
        )
    return rows


@pytest.mark.parametrize("variant", HEAD_VARIANTS)
def test_head_stage_variants_train_and_nodule_metrics(variant):
    rows = _nodules()
    model = _with_optimizer(
        HeadStage(variant=variant, dim=16, num_heads=2, ff_dim=32), torch.optim.AdamW, 1e-3
    )
    _trainer(fast_dev_run=1).fit(model, DataLoader(rows, batch_size=3), DataLoader(rows, batch_size=3))
    metrics = _trainer().validate(model, DataLoader(rows, batch_size=4), verbose=False)[0]
    assert "val/stack_acc" not in metrics
    _check_nodule_metrics(metrics, *_nodule_reference(model, rows))
    out = model.predict_step(next(iter(DataLoader(rows, batch_size=6))), 0)
    assert out["prob"].shape == (6,) and out["nodule"].tolist() == list(range(6))


def test_seg_stage_fit_metrics_predict_and_finetune_checkpoint(tmp_path):
    rows = []
    for _ in range(4):
        mask = torch.zeros(1, 32, 32)
        mask[:, 8:20, 10:24] = 1
        rows.append({"image": mask + 0.3 * torch.randn(1, 32, 32), "mask": mask})
    model = _with_optimizer(SegStage(base=2, focal_weight=0.5))
    _trainer(fast_dev_run=1).fit(model, DataLoader(rows, batch_size=2), DataLoader(rows, batch_size=2))
    trainer = _trainer()
    metrics = trainer.validate(model, DataLoader(rows, batch_size=2), verbose=False)[0]
    assert {"val/dice", "val/iou", "val/loss", "val/loss_dice", "val/loss_bce", "val/loss_focal"} <= set(
        metrics
    )
    model.eval()
    with torch.no_grad():  # Dice = 2TP/(2TP+FP+FN) over all pixels
        pred = torch.cat([model(r["image"][None]) for r in rows]).sigmoid() >= 0.5
        true = torch.stack([r["mask"] for r in rows]).bool()
        tp, fp, fn = (pred & true).sum(), (pred & ~true).sum(), (~pred & true).sum()
    assert metrics["val/dice"] == pytest.approx((2 * tp / (2 * tp + fp + fn)).item(), abs=1e-5)
    assert metrics["val/iou"] == pytest.approx((tp / (tp + fp + fn)).item(), abs=1e-5)
    out = model.predict_step({"image": rows[0]["image"][None], "index": torch.tensor([7])}, 0)
    assert out["prob"].shape == (1, 1, 32, 32) and out["index"].tolist() == [7]
    # fine-tune start: a Lightning checkpoint or a plain state dict
    trainer.save_checkpoint(tmp_path / "seg.ckpt")
    torch.save(model.net.state_dict(), tmp_path / "msunet.pth")
    for path in ("seg.ckpt", "msunet.pth"):
        tuned = SegStage(base=2, checkpoint_path=str(tmp_path / path))
        torch.testing.assert_close(tuned.net.state_dict(), model.net.state_dict())
    # reloading a stage fine-tuned from a start file that is gone: from_checkpoint does not read it again
    torch.save(
        {"state_dict": tuned.state_dict(), "hyper_parameters": dict(tuned.hparams)}, tmp_path / "t.ckpt"
    )
    (tmp_path / "msunet.pth").unlink()
    again, _ = SegStage.from_checkpoint(tmp_path / "t.ckpt")
    assert again.hparams["checkpoint_path"] is None and not again.training
    torch.testing.assert_close(again.net.state_dict(), model.net.state_dict())


def _load(class_path: str):
    module, cls = class_path.rsplit(".", 1)
    return getattr(importlib.import_module(module), cls)


@pytest.mark.parametrize("conf", ["conf", "conf/demo"])
@pytest.mark.parametrize("name", ["vit", "seg", "maskcnn", "head"])
def test_config_args_fit_the_classes(conf, name):
    """conf[/demo]/<name>.yaml: model/data init_args bind to the real signatures; demo models and optimizers
    build (the paper-size ones are not built: ImageNet ViT weights need a network)."""
    cfg = yaml.safe_load((ROOT / conf / f"{name}.yaml").read_text())
    model_cls, data_cls = _load(cfg["model"]["class_path"]), _load(cfg["data"]["class_path"])
    inspect.signature(model_cls).bind(**cfg["model"]["init_args"])
    inspect.signature(data_cls).bind(**cfg["data"]["init_args"])
    assert cfg["lr_scheduler"]["init_args"]["T_max"] == cfg["trainer"]["max_epochs"]
    if conf == "conf/demo":
        assert cfg["trainer"]["precision"] == 32 and cfg["trainer"]["accelerator"] == "cpu"
        model = model_cls(**cfg["model"]["init_args"])
        opt = _load(cfg["optimizer"]["class_path"])(model.parameters(), **cfg["optimizer"]["init_args"])
        _load(cfg["lr_scheduler"]["class_path"])(opt, **cfg["lr_scheduler"]["init_args"])


@pytest.fixture(scope="module")
def tiny_chain_files(tmp_path_factory):
    """A tiny Stanford-layout file, 3 folds, a masks file (the annotated masks) and an embeddings file."""
    import h5py

    from datamodules.folds import make_folds, write_splits
    from tests.stanford_files import write_stanford

    root = tmp_path_factory.mktemp("chain")
    h5 = write_stanford(root / "stanford", shape=(40, 48), extra=7)
    labels = {"12_": 1, "7_": 0, "129_": 1, "3_": 0, "45_": 0} | {
        f"{1000 + j}_": int(j % 2 == 0) for j in range(7)
    }
    ids = sorted(labels)
    splits = write_splits(make_folds(ids, [labels[i] for i in ids], ids, k=3, seed=0), root / "splits.json")
    with h5py.File(h5, "r") as src, h5py.File(root / "masks.h5", "w") as dst:
        for key in ("annot_id", "frame_num"):
            dst[key] = src[key][()]
        dst["mask"] = (src["mask"][()] > 0).astype("uint8")
    with h5py.File(root / "embeddings.h5", "w") as f:
        for n, nid in enumerate(ids):
            g = f.create_group(nid)
            g["image"] = torch.randn(1 + n % 3, 256).numpy()
            g["seg"] = torch.randn(1 + n % 3, 256).numpy()
            g.attrs.update({"annot_id": nid, "label": labels[nid]})
    return {
        "h5": str(h5),
        "splits": str(splits),
        "masks": str(root / "masks.h5"),
        "embeddings": str(root / "embeddings.h5"),
        "root": root,
    }


@pytest.mark.parametrize("name", ["vit", "seg", "maskcnn", "head"])
def test_demo_config_runs_through_the_cli(name, tiny_chain_files):
    """`lightning fit -c conf/demo/<name>.yaml` (fast_dev_run) with the real DataModules on tiny files."""
    from stages.fit import main

    f = tiny_chain_files
    data = {"head": ["--data.init_args.path", f["embeddings"]]}.get(name, ["--data.init_args.h5", f["h5"]])
    if name == "maskcnn":
        data += ["--data.init_args.masks_h5", f["masks"]]
    out = f["root"] / f"{name}.ckpt"
    main(
        [
            "fit",
            "-c",
            str(ROOT / "conf" / "demo" / f"{name}.yaml"),
            *data,
            "--data.init_args.splits",
            f["splits"],
            "--trainer.fast_dev_run",
            "1",
            "--trainer.default_root_dir",
            str(f["root"] / name),
            "--trainer.enable_progress_bar",
            "false",
            f"--ckpt_out={out}",
        ]
    )
    ckpt = torch.load(out, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 1 and ckpt["datamodule_hyper_parameters"]["fold"] == 0
