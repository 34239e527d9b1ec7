"""W&B content (lightning_modules/wandb_media.py, stages/report.py --wandb): offline runs hold the expected metric
keys, tables, images and config.

Offline runs of wandb >= 0.2x write no ``wandb-summary.json``/``config.yaml``; what they reliably write is the
record log ``run-<id>.wandb`` (LevelDB log format of protobuf ``Record``s, read by :func:`records`) and the media
files under ``files/media/``.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from google.protobuf.message import DecodeError

from tests.stanford_files import write_stanford

ROOT = Path(__file__).resolve().parents[1]
LABELS = {"12_": 1, "7_": 0, "129_": 1, "3_": 0, "45_": 0, "50_": 1, "60_": 1, "70_": 0}
FRAMES = {nid: list(range(1, 1 + 3 * (1 + i % 3))) for i, nid in enumerate(LABELS)}
SPLIT = {"train": ["129_", "45_", "50_", "70_"], "val": ["12_", "7_", "60_"], "test": ["3_"]}


def records(path: Path):
    """Protobuf records of a ``run-*.wandb`` file: 7-byte header, 32 KiB blocks of (crc32, length, type) chunks
    (type 1 full, 2 first, 3 middle, 4 last; a block tail under 7 bytes is padding)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, buf = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding up to the end of the block
            pos += left
            continue
        if pos + 7 + length > len(data):  # the chunk wandb-core is still writing
            return
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


def offline_run(root: Path, wait: float = 30.0) -> dict:
    """The one offline run under ``root``: run record, history keys, config keys, media files (relative).

    Waits up to ``wait`` s for the exit record: wandb-core writes the log in its own process, and once (under a
    heavily loaded machine) the file was read before it was complete."""
    runs = list(Path(root).rglob("offline-run-*"))
    assert len(runs) == 1, runs
    run = runs[0]
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            if any(r.WhichOneof("record_type") == "exit" for r in records(next(run.glob("run-*.wandb")))):
                break
        except DecodeError:  # a record read while wandb-core was writing it (seen under heavy load)
            pass
        time.sleep(0.5)
    out = {"history": set(), "config": set(), "run": None, "media": set()}
    for rec in records(next(run.glob("run-*.wandb"))):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            out["history"] |= {i.key or "/".join(i.nested_key) for i in rec.history.item}
        elif kind == "config":
            out["config"] |= {i.key for i in rec.config.update}
        elif kind == "run":
            out["run"] = rec.run
    out["media"] = {str(p.relative_to(run / "files")) for p in (run / "files").rglob("*") if p.is_file()}
    return out


@pytest.fixture
def offline(tmp_path, monkeypatch):
    import wandb

    # An earlier in-process fit may have left its run open: WandbLogger would log into it instead; and wandb's
    # settings singleton keeps the mode of the first run in this process (conftest: disabled) until torn down.
    wandb.finish()
    wandb.teardown()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield tmp_path
    wandb.finish()
    wandb.teardown()  # later in-process fits must not keep writing offline runs


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("wb")
    h5 = write_stanford(root / "stanford", shape=(40, 48), frames=FRAMES, labels=LABELS)
    splits = root / "splits.json"
    splits.write_text(json.dumps({"k": 1, "seed": 0, "folds": [{"fold": 0, **SPLIT}]}))  # one fold, as k says
    rng = np.random.default_rng(0)
    with h5py.File(root / "embeddings.h5", "w") as f:
        for nid, frames in FRAMES.items():
            g = f.create_group(nid)
            g["image"] = rng.normal(size=(len(frames) // 3, 256)).astype(np.float32)
            g["seg"] = rng.normal(size=(len(frames) // 3, 256)).astype(np.float32)
            g.attrs.update({"annot_id": nid, "label": LABELS[nid]})
    return {"root": root, "h5": str(h5), "splits": str(splits), "embeddings": str(root / "embeddings.h5")}


def cli(args: list[str]) -> None:
    """`lightning` as the lead's main() runs it, plus the config callback proposed for it (WandbSaveConfig)."""
    import wandb
    from lightning.pytorch import LightningDataModule, LightningModule

    from lightning_modules.wandb_media import WandbSaveConfig
    from stages.fit import UsnoduleCLI

    try:
        UsnoduleCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=WandbSaveConfig,
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    finally:
        wandb.finish()  # a process exit would finish it; in-process the next fit must not reuse the run


# stage -> (extra CLI args, media keys logged once per validation epoch)
STAGES = {
    "head": (["--data.init_args.path={embeddings}"], {"val/attention"}),
    "vit": (["--data.init_args.h5={h5}"], {"val/samples"}),
    "seg": (
        [
            "--data.init_args.h5={h5}",
            "--data.init_args.size=32",
            "--model.init_args.base=2",
            "--model.init_args.depth=2",
        ],
        {"val/masks"},
    ),
}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_offline_run_holds_metrics_media_and_config(files, offline, stage):
    extra, media_keys = STAGES[stage]
    root = offline / stage
    cli(
        [
            "fit",
            "-c",
            str(ROOT / f"conf/demo/{stage}.yaml"),
            *[a.format(**files) for a in extra],
            f"--data.init_args.splits={files['splits']}",
            "--data.init_args.batch_size=4",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=2",
            "--trainer.log_every_n_steps=1",
            "--lr_scheduler.init_args.T_max=1",
            f"--trainer.default_root_dir={root}",
            "--exp=wbtest",
            "--trainer.enable_progress_bar=false",
            "--trainer.callbacks+=lightning.pytorch.callbacks.LearningRateMonitor",
            "--trainer.callbacks.init_args.logging_interval=step",
        ]
    )
    run = offline_run(root)
    job = "head_stact" if stage == "head" else stage  # one job type per head variant
    assert (run["run"].run_group, run["run"].job_type, run["run"].display_name) == (
        "wbtest",
        job,
        f"{job}-fold0",
    )
    hist = run["history"]
    assert {"train/loss_step", "trainer/global_step", "val/loss"} <= hist
    assert any(k.startswith("lr-") for k in hist), hist  # LearningRateMonitor, per step
    assert "cli" in run["config"]  # the resolved LightningCLI config (WandbSaveConfig)
    for key in media_keys:  # sample images of the first validation batch
        folder = f"media/images/{key.split('/')[0]}"
        assert any(
            m.startswith(f"{folder}/{key.split('/')[1]}_") and m.endswith(".png") for m in run["media"]
        ), run["media"]
    if stage == "seg":
        assert {"val/dice", "val/iou"} <= hist
        assert any(m.startswith("media/images/mask/") for m in run["media"])  # prediction / truth overlays
    else:
        assert {"val/auroc", "val/acc"} <= hist
        for table in ("predictions", "confusion_matrix_table", "roc_table"):  # per-nodule table, CM, ROC
            assert any(k.startswith(f"val/{table}/") for k in hist), (table, hist)
            assert any(m.startswith(f"media/table/val/{table}_") for m in run["media"]), (table, run["media"])
        pred = next(Path(offline).rglob("media/table/val/predictions_*.table.json"))
        doc = json.loads(pred.read_text())
        assert doc["columns"] == ["nodule", "label", "prob", "pred"]
        assert sorted(r[0] for r in doc["data"]) == sorted(SPLIT["val"])  # annot_ids, every val nodule once


def test_no_wandb_logger_logs_no_media(files, tmp_path):
    """CSV logger / no logger: the W&B hooks do nothing (and need no W&B run)."""
    from lightning_modules.wandb_media import wandb_run
    from stages.fit import main

    main(
        [
            "fit",
            "-c",
            str(ROOT / "conf/demo/head.yaml"),
            f"--data.init_args.path={files['embeddings']}",
            f"--data.init_args.splits={files['splits']}",
            "--trainer.max_epochs=1",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert not list(tmp_path.rglob("offline-run-*"))
    assert wandb_run(torch.nn.Module()) is None


def test_attention_maps_are_row_stochastic_and_ignore_padding():
    from lightning_modules.head_stage import HeadStage

    valid = torch.tensor([[True, True, True], [True, False, False]])
    batch = {"image_emb": torch.randn(2, 3, 16), "seg_emb": torch.randn(2, 3, 16), "valid": valid}
    for variant, names in (
        ("stact", {"self", "cross"}),
        ("joint", {"self"}),
        ("cine_trans", {"layer0", "layer1"}),
    ):
        model = HeadStage(variant=variant, dim=16, num_heads=2, ff_dim=32).eval()
        maps = model.attention_maps(batch)
        assert set(maps) == names
        for w in maps.values():
            assert w.shape == (2, 3, 3)
            torch.testing.assert_close(w.sum(-1), torch.ones(2, 3))
            assert float(w[1, :, 1:].abs().sum()) == 0.0  # padded keys get no weight


@pytest.mark.timeout(120)
def test_report_logs_one_summary_run(tmp_path, offline):
    from stages.report import report
    from tests.test_report import hand_made

    hand_made(tmp_path / "runs" / "myexp", np.random.default_rng(0))
    out = tmp_path / "reports"
    report(tmp_path / "runs" / "myexp", out, n_boot=20, show=False, wandb=True)
    run = offline_run(out)
    assert (run["run"].run_group, run["run"].job_type) == ("myexp", "report")
    assert {"report/results/nrows", "report/results_stack/nrows", "report/predictions/nrows"} <= run[
        "history"
    ]
    assert any(m.startswith("media/table/report/results_") for m in run["media"])
    assert any(m.startswith("media/images/report/roc_") and m.endswith(".png") for m in run["media"])
    assert any(m.startswith("media/images/report/calibration_") for m in run["media"])
