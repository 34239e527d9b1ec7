"""DDP and AMP on CPU (issue 5): two gloo processes through the real ``lightning`` / ``usnodule`` console scripts
(``--trainer.strategy=ddp``: Lightning relaunches the script once per extra rank), bf16 autocast in-process.

Sizes are chosen so DistributedSampler pads: the validation part holds 7 stacks of 3 nodules (odd), so rank 1
gets a repeat of the first stack, and nodule ``12_``'s three stacks land on both ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import lightning
import numpy as np
import pandas as pd
import pytest
import torch

from stages.fit import main
from tests.stanford_files import write_stanford

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# 9 frames = 3 stacks, 6 = 2, 3 = 1 (non-overlapping 3-frame windows).
FRAMES = {
    "12_": list(range(1, 10)),
    "7_": [2, 4, 7, 8, 13, 14, 15, 16, 17],
    "129_": list(range(1, 7)),
    "3_": [1, 2, 3],
    "45_": list(range(1, 10)),
    "50_": list(range(2, 8)),
    "60_": [1, 2, 3],
    "70_": list(range(4, 10)),
}
LABELS = {"12_": 1, "7_": 0, "129_": 1, "3_": 0, "45_": 0, "50_": 1, "60_": 1, "70_": 0}
SPLIT = {"train": ["129_", "45_", "50_", "70_"], "val": ["12_", "7_", "60_"], "test": ["3_"]}
VAL_STACKS = 3 + 3 + 1


def save_ckpt(model, path, data_hparams=None):
    """A Lightning-format checkpoint without a Trainer (what ``--ckpt_path`` and load_from_checkpoint read)."""
    # `_class_path`: what LightningCLI stores in subclass mode, and reads back for `--ckpt_path`.
    hparams = {**model.hparams, "_class_path": f"{type(model).__module__}.{type(model).__name__}"}
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": hparams,
            "pytorch-lightning_version": lightning.__version__,
            "datamodule_hyper_parameters": data_hparams or {},
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Cine file, splits, masks.h5 (the annotated masks), embeddings.h5 and random ViT / mask CNN checkpoints."""
    from lightning_modules.maskcnn_stage import MaskCNNStage
    from lightning_modules.vit_stage import ViTStage

    root = tmp_path_factory.mktemp("ddp")
    h5 = write_stanford(root / "stanford", shape=(40, 48), frames=FRAMES, labels=LABELS)
    splits = root / "splits.json"
    splits.write_text(json.dumps({"k": 1, "seed": 0, "folds": [{"fold": 0, **SPLIT}]}))  # one fold, as k says
    with h5py.File(h5, "r") as src, h5py.File(root / "masks.h5", "w") as dst:
        for key in ("annot_id", "frame_num"):
            dst[key] = src[key][()]
        dst["mask"] = (src["mask"][()] > 0).astype("uint8")
    rng = np.random.default_rng(0)
    with h5py.File(root / "embeddings.h5", "w") as f:
        for nid, frames in FRAMES.items():
            g = f.create_group(nid)
            shift = 0.5 if LABELS[nid] else -0.5  # learnable signal, so a 2-epoch fit moves the metrics
            g["image"] = (rng.normal(size=(len(frames) // 3, 256)) + shift).astype(np.float32)
            g["seg"] = rng.normal(size=(len(frames) // 3, 256)).astype(np.float32)
            g.attrs.update({"annot_id": nid, "label": LABELS[nid]})
    torch.manual_seed(0)
    vit = ViTStage(backbone="test_vit", img_size=32)
    with torch.no_grad():  # spread the probabilities away from 0.5: no metric sits on a rounding edge
        vit.net.fc2.weight.mul_(30.0)
    save_ckpt(vit, root / "vit.ckpt", {"img_size": 32, "buffer": 5, "normalize": "half"})
    save_ckpt(MaskCNNStage(channels=(4, 8)), root / "maskcnn.ckpt", {"img_size": 16})
    return {
        "root": root,
        "h5": str(h5),
        "splits": str(splits),
        "masks": str(root / "masks.h5"),
        "embeddings": str(root / "embeddings.h5"),
        "vit": str(root / "vit.ckpt"),
        "maskcnn": str(root / "maskcnn.ckpt"),
    }


def run_cli(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """A console script of the venv in a fresh process (so Lightning's DDP launcher can relaunch it)."""
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
    }
    p = subprocess.run(
        [str(BIN / args[0]), *args[1:]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert p.returncode == 0, f"{args}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


def csv_logger(save_dir: Path) -> list[str]:
    return [
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.init_args.save_dir={save_dir}",
    ]


def logged(save_dir: Path) -> dict[str, float]:
    """Last value of every column of the CSVLogger's metrics.csv under ``save_dir`` (exactly one file)."""
    found = list(Path(save_dir).rglob("metrics.csv"))
    assert len(found) == 1, found
    df = pd.read_csv(found[0])
    return {c: float(df[c].dropna().iloc[-1]) for c in df.columns if df[c].notna().any()}


def ddp(devices: int = 2) -> list[str]:
    return ["--trainer.strategy=ddp", f"--trainer.devices={devices}", "--trainer.accelerator=cpu"]


@pytest.mark.timeout(300)
def test_two_process_fit_of_the_attention_head(files):
    root = files["root"] / "head"
    out = root / "head.ckpt"
    run_cli(
        "lightning",
        "fit",
        "-c",
        str(ROOT / "conf/demo/head.yaml"),
        *ddp(),
        f"--data.init_args.path={files['embeddings']}",
        f"--data.init_args.splits={files['splits']}",
        "--data.init_args.batch_size=2",
        "--trainer.max_epochs=2",
        "--lr_scheduler.init_args.T_max=2",
        f"--trainer.default_root_dir={root}",
        *csv_logger(root / "logs"),
        f"--ckpt_out={out}",
    )
    ckpt = torch.load(out, map_location="cpu", weights_only=False)
    assert ckpt["epoch"] in (0, 1) and any(k.startswith("net.") for k in ckpt["state_dict"])
    assert (root / "checkpoints" / "last.ckpt").is_file()
    metrics = logged(root / "logs")  # rank 0 alone wrote the one metrics.csv
    assert {"train/loss_epoch", "val/loss", "val/auroc", "val/acc"} <= set(metrics)
    assert np.isfinite(metrics["val/loss"])


@pytest.mark.timeout(300)
def test_ddp_validation_metrics_equal_single_process(files):
    """Same checkpoint, same data: `lightning validate` on 1 and on 2 processes logs the same numbers
    (stacks of a nodule gathered from both ranks, the padded repeat counted once)."""
    common = [
        "-c",
        str(ROOT / "conf/demo/vit.yaml"),
        f"--data.init_args.h5={files['h5']}",
        f"--data.init_args.splits={files['splits']}",
        "--data.init_args.batch_size=2",
        f"--ckpt_path={files['vit']}",
        "--trainer.enable_progress_bar=false",
    ]
    single, multi = files["root"] / "val1", files["root"] / "val2"
    main(
        [
            "validate",
            *common,
            "--trainer.devices=1",
            f"--trainer.default_root_dir={single}",
            *csv_logger(single),
        ]
    )
    run_cli(
        "lightning", "validate", *common, *ddp(), f"--trainer.default_root_dir={multi}", *csv_logger(multi)
    )
    a, b = logged(single), logged(multi)
    keys = {
        f"val/{p}{k}"
        for p in ("", "stack_")
        for k in ("acc", "precision", "recall", "specificity", "f1", "auroc")
    } | {"val/loss"}
    assert keys <= set(a) and keys <= set(b)
    for k in sorted(keys):
        assert b[k] == pytest.approx(a[k], abs=1e-5), k
    # The single-process numbers are the plain ones: 3 nodules, 7 stacks (sanity of the fixture sizes).
    assert VAL_STACKS % 2 == 1 and 0.0 <= a["val/stack_acc"] <= 1.0
    assert a["val/stack_acc"] * VAL_STACKS == pytest.approx(round(a["val/stack_acc"] * VAL_STACKS), abs=1e-4)
    assert a["val/acc"] * 3 == pytest.approx(round(a["val/acc"] * 3), abs=1e-4)


@pytest.mark.timeout(300)
def test_ddp_embedding_export_equals_single_process(files):
    from stages.embeddings import export

    args = {
        "cine": files["h5"],
        "masks": files["masks"],
        "vit": files["vit"],
        "maskcnn": files["maskcnn"],
        "splits": files["splits"],
        "fold": 0,
    }
    single = export(out=files["root"] / "emb1.h5", batch_size=3, accelerator="cpu", progress=False, **args)
    multi = files["root"] / "emb2.h5"
    p = run_cli(
        "usnodule",
        "embeddings",
        *[f"--{k}={v}" for k, v in args.items()],
        f"--out={multi}",
        "--batch-size=3",
        "--strategy=ddp",
        "--devices=2",
        "--accelerator=cpu",
    )
    assert p.stdout.count("wrote") == 1  # rank 0 alone reports
    assert "━" not in p.stdout + p.stderr  # stdout is not a TTY: no progress bar in the log
    with h5py.File(single, "r") as a, h5py.File(multi, "r") as b:
        assert list(a.keys()) == list(b.keys()) == sorted(FRAMES)
        volatile = {"created"}  # the creation time differs
        assert {k: v for k, v in a.attrs.items() if k not in volatile} == {
            k: v for k, v in b.attrs.items() if k not in volatile
        }
        for g in a:
            assert dict(a[g].attrs) == dict(b[g].attrs)
            for key in ("image", "seg", "image_prob", "seg_prob"):
                assert a[g][key].shape == b[g][key].shape
                np.testing.assert_allclose(
                    b[g][key][()], a[g][key][()], rtol=1e-4, atol=1e-5, err_msg=f"{g}/{key}"
                )
    assert not list(files["root"].glob(".emb2.h5.shards*"))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["head", "vit"])
def test_bf16_mixed_fit_on_cpu(files, name):
    root = files["root"] / f"bf16_{name}"
    data = {
        "head": [f"--data.init_args.path={files['embeddings']}"],
        "vit": [
            f"--data.init_args.h5={files['h5']}",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=2",
        ],
    }[name]
    main(
        [
            "fit",
            "-c",
            str(ROOT / f"conf/demo/{name}.yaml"),
            *data,
            f"--data.init_args.splits={files['splits']}",
            "--data.init_args.batch_size=4",
            "--trainer.precision=bf16-mixed",
            "--trainer.max_epochs=1",
            "--lr_scheduler.init_args.T_max=1",
            f"--trainer.default_root_dir={root}",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            f"--ckpt_out={root / 'out.ckpt'}",
        ]
    )
    ckpt = torch.load(root / "out.ckpt", map_location="cpu", weights_only=False)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert ckpt["callbacks"]  # the checkpoint callbacks ran under autocast too


@pytest.mark.timeout(300)
def test_two_process_fit_of_demo_asycmst(tmp_path):
    """`lightning fit -c conf/demo/asycmst.yaml` on 2 gloo processes (test-size ResNet, 1 epoch) completes, and with
    test_after_fit writes every validation and test case's prediction once (gathered from both ranks)."""
    from tests.test_paired_video import write_paired_set

    manifest, splits = write_paired_set(tmp_path / "paired", n=8)
    out = tmp_path / "asycmst.ckpt"
    run_cli(
        "lightning",
        "fit",
        "-c",
        str(ROOT / "conf/demo/asycmst.yaml"),
        *ddp(),
        f"--data.init_args.manifest={manifest}",
        f"--data.init_args.splits={splits}",
        "--data.init_args.batch_size=2",
        "--model.init_args.backbone=test_resnet",
        "--trainer.max_epochs=1",
        "--model.init_args.test_after_fit=true",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        *csv_logger(tmp_path / "logs"),
        f"--ckpt_out={out}",
    )
    assert out.is_file()
    metrics = logged(tmp_path / "logs")
    assert {"train/loss_epoch", "val/loss"} <= set(metrics) and np.isfinite(metrics["val/loss"])
    from datamodules.folds import load_fold

    fold = load_fold(splits, 0)
    for prefix, part in (("val_", "val"), ("", "test")):
        rows = pd.read_csv(tmp_path / "run" / f"{prefix}predictions_asycmst.csv", dtype={"annot_id": str})
        assert sorted(rows["annot_id"]) == sorted(fold[part])


def test_sampler_repeats_count_once_in_stack_loss_and_pixel_metrics():
    """What DDP padding looks like to the metrics (rank states concatenated): repeated keys count once."""
    from lightning_modules.base import CaseMetrics
    from lightning_modules.seg_stage import PixelOverlap

    nod, stack = torch.tensor([0, 0, 0, 1, 2]), torch.tensor([0, 1, 2, 0, 0])
    prob, label = torch.tensor([0.9, 0.8, 0.2, 0.3, 0.7]), torch.tensor([1, 1, 1, 0, 0])
    loss = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])
    plain, padded = CaseMetrics(stack_level=True), CaseMetrics(stack_level=True)
    plain.update(nod, prob, label, stack, loss)
    padded.update(
        nod[[0, 2, 4]], prob[[0, 2, 4]], label[[0, 2, 4]], stack[[0, 2, 4]], loss[[0, 2, 4]]
    )  # rank 0
    padded.update(
        nod[[1, 3, 0]], prob[[1, 3, 0]], label[[1, 3, 0]], stack[[1, 3, 0]], loss[[1, 3, 0]]
    )  # rank 1
    a, b = plain.compute(), padded.compute()
    assert set(a) == {
        "loss",
        *(
            f"{p}{k}"
            for p in ("", "stack_")
            for k in ("acc", "precision", "recall", "specificity", "f1", "auroc")
        ),
    }
    for k in a:
        torch.testing.assert_close(b[k], a[k], msg=k)
    assert float(a["loss"]) == pytest.approx(0.3) and float(a["stack_acc"]) == pytest.approx(0.6)

    target = (torch.rand(3, 1, 8, 8) > 0.5).float()
    pred = torch.rand(3, 1, 8, 8)
    nodule, frame = torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0])
    one, two = PixelOverlap(), PixelOverlap()
    one.update(pred, target, nodule, frame)
    two.update(pred[[0, 2]], target[[0, 2]], nodule[[0, 2]], frame[[0, 2]])
    two.update(pred[[1, 0]], target[[1, 0]], nodule[[1, 0]], frame[[1, 0]])  # frame (0, 0) repeated
    for k, v in one.compute().items():
        torch.testing.assert_close(two.compute()[k], v, msg=k)
