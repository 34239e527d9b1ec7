"""``usnodule predict-pair``: AsyCMST on new BUS + CEUS pairs, and the cross-modal attention it captures.

One module-scoped fit makes a real Lightning checkpoint: ``usnodule synth`` writes 12 paired cases, ``usnodule
split`` 3 folds, and ``lightning fit -c conf/demo/asycmst.yaml`` (1 epoch, ROI crops at 1.15x the BUS mask box)
tests fold 0 in the same process, writing the test step's ``predictions_asycmst.csv``: the command must give
the same probabilities on the same cases.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.errors import DataError
from datamodules.folds import load_fold
from lightning_modules.asycmst import AsyCMST
from lightning_modules.asycmst_predict import load_asycmst, pair_settings, predict_pairs
from lightning_modules.nets.asycmst import AsyCMSTNet
from lightning_modules.nets.asycmst_attention import summarise_weights
from stages.cli import main as usnodule
from stages.fit import main as lightning

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(dim=16, depth=2, heads=2, num_frames=4, img_size=64, backbone="test_resnet", decoder_width=16)


def predict_pair(*args) -> None:
    """``usnodule predict-pair ARGS`` in this process (paths given as ``Path``)."""
    usnodule(["predict-pair", *map(str, args)])


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def save(model: torch.nn.Module, path: Path, data: dict, class_path: bool = True) -> Path:
    """A checkpoint as LightningCLI writes one (``_class_path`` recorded), or without the class (``False``)."""
    cls = type(model)
    hparams = dict(model.hparams)
    if class_path:
        hparams["_class_path"] = f"{cls.__module__}.{cls.__name__}"
    state = {
        "state_dict": model.state_dict(),
        "hyper_parameters": hparams,
        "datamodule_hyper_parameters": data,
    }
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pair")
    usnodule(
        ["synth", "--out", str(root / "synth"), "--nodules", "3", "--frames", "6", "--size", "64"]
        + ["--cases", "12", "--paired-frames", "6", "--paired-size", "64", "--prevalence", "0.5"]
    )
    manifest = root / "synth" / "paired" / "manifest.csv"
    usnodule(["split", str(manifest), "-k", "3"])
    splits, run = manifest.with_name("splits.json"), root / "run"
    lightning(
        [
            "fit",
            "-c", str(ROOT / "conf/demo/asycmst.yaml"),
            f"--data.init_args.manifest={manifest}",
            f"--data.init_args.splits={splits}",
            f"--trainer.default_root_dir={run}",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.max_epochs=1",
            "--model.init_args.test_after_fit=true",
            f"--model.init_args.predictions_dir={run}",
            f"--ckpt_out={run / 'asycmst.ckpt'}",
        ]
    )  # fmt: skip
    return {
        "root": root,
        "manifest": manifest,
        "ckpt": run / "asycmst.ckpt",
        "test_step": run / "predictions_asycmst.csv",
        "test_ids": list(load_fold(splits, 0)["test"]),
    }


def test_command_gives_the_test_step_probabilities(trained, tmp_path):
    """The same checkpoint, the same cases: the command's probability equals the test step's (the datamodule's
    test loader + ``AsyCMST.test_step``) within 1e-5, with the checkpoint's ROI crop, frames and size."""
    out = tmp_path / "pairs.csv"
    predict_pair("--ckpt", trained["ckpt"], "--pairs", trained["manifest"], "--out", out)
    rows = {r["case_id"]: r for r in read_csv(out)}
    reference = {r["annot_id"]: r for r in read_csv(trained["test_step"])}
    assert sorted(reference) == sorted(trained["test_ids"]) and set(reference) < set(rows)
    probs = np.array([float(rows[i]["prob_malignant"]) for i in reference])
    expected = np.array([float(reference[i]["prob"]) for i in reference])
    np.testing.assert_allclose(probs, expected, atol=1e-5, rtol=0)
    assert np.ptp(expected) > 1e-3  # the cases differ far more than the tolerance: a wrong input would show
    assert all(rows[i]["label"] == reference[i]["label"] for i in reference)
    # every case cropped around its drawn mask, 4 of 6 frames at linspace(0, 5, 4).round()
    assert {r["roi"] for r in rows.values()} == {"annotated"}
    assert {r["frames"] for r in rows.values()} == {"0 2 3 5"} and {r["n_frames"] for r in rows.values()} == {
        "6"
    }
    assert {r["pred"] for r in rows.values()} <= {"0", "1"} and {r["overlay"] for r in rows.values()} == {""}


def test_two_files_with_and_without_the_bus_mask(trained, tmp_path, capsys):
    """``--bus/--ceus/--bus-mask`` gives the manifest's probability; without the mask the whole frame is used
    (as the datamodule does for an unannotated clip), the row says so and one warning line is printed."""
    paired = trained["manifest"].parent
    case = trained["test_ids"][0]
    files = [paired / "bus" / f"{case}.npy", paired / "ceus" / f"{case}.npy"]
    reference = {r["annot_id"]: float(r["prob"]) for r in read_csv(trained["test_step"])}[case]
    with_mask, without = tmp_path / "with.csv", tmp_path / "without.csv"
    common = ["--ckpt", trained["ckpt"], "--bus", files[0], "--ceus", files[1]]
    predict_pair(*common, "--bus-mask", paired / "bus_mask" / f"{case}.npy", "--out", with_mask)
    assert "warning" not in capsys.readouterr().err
    predict_pair(*common, "--out", without)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: 1 of 1 pair(s) predicted on whole frames")
    (row,), (bare,) = read_csv(with_mask), read_csv(without)
    assert row["case_id"] == case and row["label"] == "" and row["roi"] == "annotated"
    assert abs(float(row["prob_malignant"]) - reference) <= 1e-5
    assert bare["roi"] == "missing" and bare["bus_mask"] == ""
    assert abs(float(bare["prob_malignant"]) - reference) > 1e-4  # the crop changes the input


@pytest.mark.parametrize("block", ["factorised", "official"])
def test_capturing_attention_changes_no_number(block):
    """The hooks see every cross-attention sub-layer, their weights are distributions on the strategy's keys,
    the last layer's summaries are ``attention_maps``, and the logits are bit-identical with and without."""
    net = AsyCMSTNet(**TINY, block=block).eval()
    g = torch.Generator().manual_seed(1)
    c, b = torch.randn(2, 4, 3, 64, 64, generator=g), torch.randn(2, 4, 3, 64, 64, generator=g)
    with torch.no_grad():
        plain = net(c, b)["logits"]
        with net.capture_attention() as records:
            captured = net(c, b)["logits"]
        again = net(c, b)["logits"]  # hooks removed on exit
    assert torch.equal(plain, captured) and torch.equal(plain, again)
    assert sorted((r["layer"], r["direction"]) for r in records) == [
        (i, d) for i in (0, 1) for d in ("b_to_c", "c_to_b")
    ]
    t, n = 4, net.grid**2
    for r in records:
        w = r["weights"]
        assert w.shape == (2, t, n, t, n)
        torch.testing.assert_close(w.sum(dim=(-2, -1)), torch.ones(2, t, n))
        if r["direction"] == "c_to_b":  # Eq. 10: a CEUS query looks at its own BUS frame only
            off = w.sum(-1) * (1 - torch.eye(t))[:, None, :]
        else:  # Eq. 8: a BUS query looks at its own position in every CEUS frame only
            off = w.sum(-2) * (1 - torch.eye(n))[None, :, :]
        assert off.abs().max() == 0
    maps = net.attention_maps(c, b)
    for r in records:
        if r["layer"] == 1:
            frames, positions = summarise_weights(r["weights"])
            assert torch.equal(maps[f"{r['direction']}_frames"], frames)
            assert torch.equal(maps[f"{r['direction']}_positions"], positions)


def test_predict_pairs_same_probabilities_with_and_without_attention(trained):
    stage, settings = load_asycmst(trained["ckpt"])
    from datamodules.paired import read_manifest

    cases = read_manifest(trained["manifest"])[:5]
    plain = list(predict_pairs(stage, settings, cases, batch_size=2, attention=False))
    seen = list(predict_pairs(stage, settings, cases, batch_size=2, attention=True))
    assert [p.prob for p in plain] == [p.prob for p in seen]
    assert all(p.attention == {} for p in plain)
    grid = stage.net.grid
    for p in seen:
        assert set(p.attention) == {"c_to_b", "b_to_c"} and p.layer == 1  # the demo model's last stage
        for w in p.attention.values():
            assert w.shape == (4, grid, grid)
            assert abs(w.sum() - 1) < 1e-5  # every key token's received share, over the key stream
        assert p.bus.shape == (4, 32, 32) and 0 <= p.bus.min() and p.bus.max() <= 1


def test_overlays(trained, tmp_path):
    """One PNG per pair beside the CSV; a rerun replaces the folder; a folder of other files is refused."""
    out, overlay = tmp_path / "pairs.csv", tmp_path / "overlays"
    ids = trained["test_ids"][:2]
    argv = ["--ckpt", trained["ckpt"], "--pairs", trained["manifest"], "--cases", *ids]
    predict_pair(*argv, "--out", out, "--overlay", overlay)
    rows = read_csv(out)
    assert [r["case_id"] for r in rows] == ids
    for r in rows:
        png = Path(r["overlay"])
        assert png == overlay / f"{r['case_id']}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    predict_pair(*argv[:-1], "--out", out, "--overlay", overlay)  # one case now: the folder is replaced
    assert sorted(p.name for p in overlay.glob("*.png")) == [f"{ids[0]}.png"]
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(SystemExit) as e:
        predict_pair(*argv, "--out", tmp_path / "other.csv", "--overlay", foreign)
    assert e.value.code == 2 and sorted(p.name for p in foreign.iterdir()) == ["holiday.jpg"]
    assert not (tmp_path / "other.csv").exists()


def test_model_without_cross_attention_or_data_settings(trained, tmp_path):
    """A ``strategy: none`` checkpoint saved without its class path or data settings: loaded as AsyCMST, the
    model's frames and size, whole frames (``roi`` none), an overlay without attention rows."""
    model = AsyCMST(**{**TINY, "strategy": "none"})
    ckpt = save(model, tmp_path / "none.ckpt", {}, class_path=False)
    stage, settings = load_asycmst(ckpt)
    assert (settings.frames, settings.size, settings.roi) == (4, 64, None)
    paired, case = trained["manifest"].parent, trained["test_ids"][0]
    out, overlay = tmp_path / "pairs.csv", tmp_path / "overlays"
    bus, ceus = paired / "bus" / f"{case}.npy", paired / "ceus" / f"{case}.npy"
    predict_pair("--ckpt", ckpt, "--bus", bus, "--ceus", ceus, "--out", out, "--overlay", overlay)
    (row,) = read_csv(out)
    assert row["roi"] == "none" and (overlay / f"{case}.png").is_file()
    with pytest.raises(DataError, match="differ from the model"):
        pair_settings(stage, {"frames": 8, "size": 64}, ckpt)


def test_errors_are_one_line_and_leave_nothing(trained, tmp_path, capsys):
    from lightning_modules.head_stage import HeadStage

    paired, case = trained["manifest"].parent, trained["test_ids"][0]
    bus, ceus = paired / "bus" / f"{case}.npy", paired / "ceus" / f"{case}.npy"
    short = tmp_path / "short_ceus.npy"
    np.save(short, np.load(ceus)[:5])
    head = save(HeadStage(), tmp_path / "head.ckpt", {})
    ckpt, out = trained["ckpt"], tmp_path / "pairs.csv"
    cases = {
        "does not exist": ["--ckpt", ckpt, "--bus", tmp_path / "nope.mp4", "--ceus", ceus],
        "paired clips must have the same length": ["--ckpt", ckpt, "--bus", bus, "--ceus", short],
        "is a HeadStage checkpoint, not AsyCMST": ["--ckpt", head, "--bus", bus, "--ceus", ceus],
        "checkpoint not found": ["--ckpt", tmp_path / "none.ckpt", "--bus", bus, "--ceus", ceus],
        "give one CEUS per BUS": ["--ckpt", ckpt, "--bus", bus, bus, "--ceus", ceus],
        "give either --pairs": ["--ckpt", ckpt],
        "not in the manifest": ["--ckpt", ckpt, "--pairs", trained["manifest"], "--cases", "X9"],
        "--cases picks ids": ["--ckpt", ckpt, "--bus", bus, "--ceus", ceus, "--cases", case],
    }
    for problem, argv in cases.items():
        with pytest.raises(SystemExit) as e:
            predict_pair(*argv, "--out", out, "--overlay", tmp_path / "ov")
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
        assert problem in err, err
        assert not out.exists() and not (tmp_path / "ov").exists()
