"""AsyCMST LightningModule: the composite loss (Eq. 14), overfitting a separable set, the CLI from the demo YAML."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from datamodules.paired_video import PairedVideoDataModule
from lightning_modules.asycmst import AsyCMST
from stages.fit import main
from tests.test_paired_video import write_paired_set

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(dim=16, depth=1, heads=2, num_frames=4, img_size=64, backbone="test_resnet", decoder_width=16)


@pytest.fixture(scope="module")
def paired(tmp_path_factory) -> tuple[Path, Path]:
    return write_paired_set(tmp_path_factory.mktemp("paired"), n=8)


def _batch(paired, **kw) -> dict[str, torch.Tensor]:
    manifest, splits = paired
    dm = PairedVideoDataModule(manifest, splits=splits, fold=None, frames=4, size=64, batch_size=8, **kw)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def test_loss_parts_and_switches(paired):
    batch = _batch(paired, augment=False)
    model = AsyCMST(**TINY)
    parts, logits = model.losses(batch)
    assert logits.shape == (8, 2)
    assert set(parts) == {"loss", "loss_diag", "loss_fss", "loss_seg"}
    expected = parts["loss_diag"] + 0.4 * parts["loss_fss"] + 0.4 * parts["loss_seg"]
    torch.testing.assert_close(parts["loss"], expected)
    # no annotated frame: the Dice term is zero but the step still works
    unmasked = {**batch, "mask_valid": torch.zeros_like(batch["mask_valid"])}
    assert model.losses(unmasked)[0]["loss_seg"].item() == 0.0
    bare = AsyCMST(**TINY, fss=False, ns=False, strategy="none", streams=("bus", "ceus"))
    parts, _ = bare.losses(batch)
    assert set(parts) == {"loss", "loss_diag"}
    with pytest.raises(ValueError, match="streams"):
        AsyCMST(**TINY, streams=("ceus", "doppler"))


def test_tiny_model_overfits_separable_set(paired):
    """Loss falls and training accuracy reaches 1.0 on 8 separable clips (all three losses on).  Checked with
    BatchNorm on batch statistics (train mode): after 20 steps its running averages still lag behind."""
    torch.manual_seed(0)
    batch = _batch(paired, augment=False)
    model = AsyCMST(**TINY)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        parts, _ = model.losses(batch)
        opt.zero_grad()
        parts["loss"].backward()
        opt.step()
        losses.append(parts["loss"].item())
    with torch.no_grad():
        parts, logits = model.losses(batch)
    acc = (logits.argmax(-1) == batch["label"]).float().mean().item()
    assert parts["loss"].item() < 0.7 * losses[0]
    assert acc == 1.0


def _cli_args(paired, tmp_path: Path) -> list[str]:
    manifest, splits = paired
    return [
        "-c", str(ROOT / "conf/demo/asycmst.yaml"),
        f"--data.init_args.manifest={manifest}",
        f"--data.init_args.splits={splits}",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
    ]  # fmt: skip


def test_cli_fit_fast_dev_run_from_demo_yaml(paired, tmp_path):
    out = tmp_path / "asycmst.ckpt"
    main(["fit", *_cli_args(paired, tmp_path), "--trainer.fast_dev_run=1", f"--ckpt_out={out}"])
    ckpt = torch.load(out, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 1  # one optimiser step happened
    assert ckpt["hyper_parameters"]["strategy"] == "asymmetric" and ckpt["hyper_parameters"]["w1"] == 0.4
    assert any(k.startswith("net.acmst.") for k in ckpt["state_dict"])


def _test_ids(paired) -> list[str]:
    from datamodules.folds import load_fold

    return list(load_fold(paired[1], 0)["test"])


def _read_predictions(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_cli_validate_test_predict(paired, tmp_path):
    # fold 0 of the 3-fold test splits holds both classes, so the ROC is defined
    main(["test", *_cli_args(paired, tmp_path)])
    assert (tmp_path / "roc_test.png").stat().st_size > 1000
    # per-case predictions in the report's format, keyed by the manifest's case_id
    rows = _read_predictions(tmp_path / "predictions_asycmst.csv")
    assert list(rows[0]) == ["annot_id", "label", "prob"]
    assert sorted(r["annot_id"] for r in rows) == sorted(_test_ids(paired))
    assert all(0.0 <= float(r["prob"]) <= 1.0 and r["label"] in ("0", "1") for r in rows)
    main(["validate", *_cli_args(paired, tmp_path), "--trainer.fast_dev_run=1"])
    main(["predict", *_cli_args(paired, tmp_path), "--trainer.fast_dev_run=1"])


def test_cli_fit_then_test_in_one_process(paired, tmp_path):
    """``test_after_fit``: one ``lightning fit`` call leaves the checkpoint, the test ROC and the predictions CSV
    (here the strategy-none comparison, written beside the main run's folder as the Makefile does)."""
    out, preds = tmp_path / "fold0" / "asycmst_none.ckpt", tmp_path / "fold0"
    main(
        [
            "fit",
            *_cli_args(paired, tmp_path / "fold0" / "none"),
            "--trainer.max_epochs=1",
            "--model.init_args.test_after_fit=true",
            "--model.init_args.strategy=none",
            "--model.init_args.method=asycmst_none",
            f"--model.init_args.predictions_dir={preds}",
            f"--ckpt_out={out}",
        ]
    )
    assert out.is_file()
    rows = _read_predictions(preds / "predictions_asycmst_none.csv")
    assert sorted(r["annot_id"] for r in rows) == sorted(_test_ids(paired))
    assert (tmp_path / "fold0" / "none" / "roc_test.png").is_file()
    assert not list(preds.glob(".*partial*"))  # written atomically, no temporary left
    # ... and the validation cases' predictions of the same weights, for the report's operating threshold
    from datamodules.folds import load_fold

    val = _read_predictions(preds / "val_predictions_asycmst_none.csv")
    assert sorted(r["annot_id"] for r in val) == sorted(load_fold(paired[1], 0)["val"])
    _threshold_comes_from_validation(tmp_path, val)


def _threshold_comes_from_validation(runs: Path, val: list[dict[str, str]]) -> None:
    """`usnodule report` on AsyCMST's fold folder: the deployable threshold is the validation predictions'
    95%-sensitivity threshold, and rewriting the test predictions does not move it."""
    import pandas as pd

    from datamodules.atomic import write_predictions
    from stages.report import at_sensitivity, report

    vy, vp = [int(r["label"]) for r in val], [float(r["prob"]) for r in val]
    want = at_sensitivity(vy, vp)["threshold"]
    report(runs, runs / "report", n_boot=20, show=False)
    row = pd.read_csv(runs / "report" / "results.csv").set_index("method").loc["asycmst_none"]
    assert row["valop_threshold_min"] == row["valop_threshold_max"] == pytest.approx(want, abs=1e-6)
    test = _read_predictions(runs / "fold0" / "predictions_asycmst_none.csv")
    ids, labels = [r["annot_id"] for r in test], [int(r["label"]) for r in test]
    write_predictions(
        runs / "fold0" / "predictions_asycmst_none.csv", ids, labels, [0.5 + 0.4 * y for y in labels]
    )
    report(runs, runs / "report", n_boot=20, show=False)
    row = pd.read_csv(runs / "report" / "results.csv").set_index("method").loc["asycmst_none"]
    assert row["valop_threshold_min"] == pytest.approx(want, abs=1e-6)  # unchanged: never from test
    assert row["sens95_threshold"] == pytest.approx(0.9)  # the optimistic one follows the test predictions


def test_lr_per_step_spans_the_fit(paired, tmp_path):
    """``lr_per_step``: the cosine schedule is stepped per optimiser step and spans the fit's steps."""
    out = tmp_path / "last.ckpt"
    main(
        [
            "fit",
            *_cli_args(paired, tmp_path),
            "--trainer.max_steps=3",
            "--model.init_args.lr_per_step=true",
            "--lr_scheduler=torch.optim.lr_scheduler.CosineAnnealingLR",
            "--lr_scheduler.T_max=1000",
            f"--ckpt_out={out}",
            "--trainer.callbacks=[]",
            "--trainer.enable_checkpointing=false",
        ]
    )
    ckpt = torch.load(out, map_location="cpu", weights_only=False)
    sched, steps = ckpt["lr_schedulers"][0], ckpt["global_step"]
    assert steps >= 2 and sched["T_max"] == steps and sched["last_epoch"] == steps  # stepped once per step


def test_cli_print_config(paired, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", *_cli_args(paired, tmp_path), "--print_config"])
    out = capsys.readouterr().out
    assert "lightning_modules.asycmst.AsyCMST" in out and "torch.optim.AdamW" in out


def test_scores_count_ddp_padding_repeats_once():
    """DistributedSampler pads a rank's last batch by repeating cases: the metrics must see each case once."""
    from lightning_modules.base import CaseMetrics

    once, padded = CaseMetrics(), CaseMetrics()
    prob, label, index = torch.tensor([0.9, 0.2, 0.7]), torch.tensor([1, 0, 0]), torch.tensor([0, 1, 2])
    once.update(index, prob, label, torch.zeros_like(index))  # how AsyCMST feeds it: one row per case
    padded.update(index[:2], prob[:2], label[:2], torch.zeros(2, dtype=torch.long))
    padded.update(
        torch.tensor([2, 0]), torch.tensor([0.7, 0.9]), torch.tensor([0, 1]), torch.zeros(2, dtype=torch.long)
    )  # case 0 repeated
    m1 = once.compute()
    m2 = padded.compute()
    assert sorted(padded.scores["nodule"].tolist()) == [0, 1, 2]
    assert all(torch.allclose(m1[k], m2[k]) for k in m1)
    assert m2["acc"] == pytest.approx(2 / 3)  # with the repeat counted twice it would be 3/4
