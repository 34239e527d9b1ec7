"""Cross-data-set transfer (AsyCMST Sec. 4.3): the datamodule trains on one manifest and tests on another, and
``usnodule shift-paired`` writes the second set as another scanner records it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from datamodules.clips import read_clip, read_mask_clip
from datamodules.domain_shift import Shift
from datamodules.folds import load_fold
from datamodules.paired import read_manifest
from datamodules.paired_video import PairedVideoDataModule
from datamodules.synth import synthesize_paired
from stages.cli import main
from tests.commands import argv
from tests.test_errors import _fails
from tests.test_paired_video import write_paired_set


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    """Set A (9 cases) and set B (12 other cases, ids b<i>), each with its own 3 folds."""
    root = tmp_path_factory.mktemp("transfer")
    a = write_paired_set(root / "a", n=9, frames=3, size=24, seed=0)
    b_manifest, b_splits = write_paired_set(root / "b", n=12, frames=5, size=24, seed=1)
    text = b_manifest.read_text().replace("\nc", "\nb")  # other case ids than A's
    b_manifest.write_text(text)
    b_splits.write_text(b_splits.read_text().replace('"c', '"b'))
    return a, (b_manifest, b_splits)


def ids(dataset) -> list[str]:
    return [c.case_id for c in dataset.cases]


def test_train_on_one_manifest_test_on_the_other(two_sets):
    (a, a_splits), (b, b_splits) = two_sets
    for fold in range(3):
        dm = PairedVideoDataModule(
            a, splits=a_splits, fold=fold, frames=2, size=16, test_manifest=b, test_splits=b_splits
        )
        dm.setup("fit")
        fold_a, fold_b = load_fold(a_splits, fold), load_fold(b_splits, fold)
        assert ids(dm.datasets["train"]) == fold_a["train"] and ids(dm.datasets["val"]) == fold_a["val"]
        assert ids(dm.datasets["test"]) == fold_b["test"] and ids(dm.datasets["predict"]) == fold_b["test"]
        labels = {c.case_id: c.label for c in read_manifest(b)}
        assert [c.label for c in dm.datasets["test"].cases] == [labels[i] for i in fold_b["test"]]
        assert dm.datasets["test"].n_frames == [5] * len(fold_b["test"])  # B's clips, not A's
    every = PairedVideoDataModule(a, splits=a_splits, fold=0, frames=2, size=16, test_manifest=b)
    every.setup("test")
    assert ids(every.datasets["test"]) == [c.case_id for c in read_manifest(b)]  # no test_splits: all of B
    same = PairedVideoDataModule(a, splits=a_splits, fold=0, frames=2, size=16)
    same.setup("test")
    assert ids(same.datasets["test"]) == load_fold(a_splits, 0)["test"]  # default: the training manifest's


def test_shift_formula():
    clip = np.full((6, 8, 8), 100, np.uint8)
    clip[:, 4, 4] = 200
    assert np.array_equal(Shift().frames(clip), clip)
    assert (
        Shift(gain=1.3).frames(clip)[0, 0, 0] == 130 and Shift(gain=1.3).frames(clip)[0, 4, 4] == 255
    )  # clipped
    assert Shift(gamma=0.5).frames(clip)[0, 0, 0] == round(255 * (100 / 255) ** 0.5)
    assert Shift(frame_step=2).frames(clip).shape == (3, 8, 8)
    blurred = Shift(psf=1.0).frames(clip)
    assert blurred[0, 4, 4] < 200 and blurred[0, 4, 5] > 100 and blurred[0, 0, 0] == 100
    with pytest.raises(ValueError):
        Shift(gain=0)


def test_shift_paired_manifest_writes_the_shifted_clips(two_sets, tmp_path, capsys):
    (a, _), _ = two_sets
    (a.parent / "truth.csv").write_text("case_id,risk,label\nc0,0.5,0\n")
    out = tmp_path / "shifted"
    main(argv("shift-paired", manifest=a, out=out, gain=1.2, frame_step=2))
    assert "wrote" in capsys.readouterr().out
    src, dst = read_manifest(a), read_manifest(out / "manifest.csv")
    assert [c.case_id for c in dst] == [c.case_id for c in src] and [c.label for c in dst] == [
        c.label for c in src
    ]
    bus = read_clip(dst[0].bus)
    assert bus.shape[0] == 2  # 3 frames, every second kept
    expected = np.clip(np.round(read_clip(src[0].bus)[::2].astype(np.float32) * 1.2), 0, 255)
    assert np.array_equal(bus, expected.astype(np.uint8))
    mask, annotated = read_mask_clip(dst[0].bus_mask)
    assert np.array_equal(mask, read_mask_clip(src[0].bus_mask)[0][::2]) and annotated.all()
    doc = json.loads((out / "shift.json").read_text())
    assert doc["shift"]["gain"] == 1.2 and doc["shift"]["frame_step"] == 2
    assert (out / "truth.csv").read_text() == (a.parent / "truth.csv").read_text()
    main(argv("shift-paired", manifest=a, out=out, gain=1.1))  # its own folder: replaced
    assert json.loads((out / "shift.json").read_text())["shift"]["gain"] == 1.1


def test_shift_paired_like_draws_other_nodules(tmp_path, capsys):
    src = synthesize_paired(tmp_path / "a", n_cases=4, frames=3, size=32, seed=5)
    out = tmp_path / "b"
    main(argv("shift-paired", like=src, out=out, psf=0.8))
    doc = json.loads((out / "shift.json").read_text())
    assert doc["source"]["generator"]["seed"] == 6 and doc["source"]["generator"]["frames"] == 3
    a, b = read_manifest(src / "manifest.csv"), read_manifest(out / "manifest.csv")
    assert len(b) == 4 and read_clip(b[0].bus).shape == (3, 32, 32)
    assert (out / "truth.csv").is_file()
    drawn_with_seed_6 = synthesize_paired(tmp_path / "c", n_cases=4, frames=3, size=32, seed=6)
    plain = read_clip(read_manifest(drawn_with_seed_6 / "manifest.csv")[0].bus)
    assert np.array_equal(read_clip(b[0].bus), Shift(psf=0.8).frames(plain))
    assert not np.array_equal(read_clip(a[0].bus), plain)  # other nodules than the source's
    assert not list(tmp_path.glob(".b.draw-*"))  # the scratch draw is gone


def test_shift_paired_errors_are_one_line(two_sets, tmp_path, capsys):
    (a, _), _ = two_sets
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    _fails(
        capsys, lambda: main(argv("shift-paired", manifest=a, out=foreign)), "not written by", "--overwrite"
    )
    assert (foreign / "notes.txt").read_text() == "keep"
    _fails(capsys, lambda: main(argv("shift-paired", like=a.parent, out=tmp_path / "x")), "not a synthetic")
    _fails(capsys, lambda: main(argv("shift-paired", manifest=a, out=tmp_path / "y", gain=0)), "--gain")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_lightning_test_of_a_fold_model_on_the_other_set(two_sets, tmp_path):
    """The Makefile's transfer step: `lightning test --ckpt_path` of set A's fold model, tested on set B's fold;
    the command line's model settings (where the predictions go, their name) win over the checkpoint's."""
    from stages.fit import main as lightning

    (a, a_splits), (b, b_splits) = two_sets
    common = ["-c", "conf/demo/asycmst.yaml", "--trainer.logger=false", "--trainer.enable_progress_bar=false"]
    data = [
        f"--data.init_args.manifest={a}",
        f"--data.init_args.splits={a_splits}",
        "--data.init_args.fold=1",
    ]
    ckpt = tmp_path / "a.ckpt"
    fit_dir = tmp_path / "fit"
    lightning(["fit", *common, *data, "--trainer.fast_dev_run=1", f"--trainer.default_root_dir={fit_dir}",
               f"--model.init_args.predictions_dir={fit_dir}", f"--ckpt_out={ckpt}"])  # fmt: skip
    out = tmp_path / "a_to_b"
    lightning(["test", *common, *data, f"--data.init_args.test_manifest={b}", f"--data.init_args.test_splits={b_splits}",
               f"--trainer.default_root_dir={out / 'logs'}", f"--model.init_args.predictions_dir={out}",
               "--model.init_args.method=asycmst_x", "--model.init_args.pretrained=false", f"--ckpt_path={ckpt}"])  # fmt: skip
    rows = (out / "predictions_asycmst_x.csv").read_text().splitlines()
    assert sorted(r.split(",")[0] for r in rows[1:]) == sorted(load_fold(b_splits, 1)["test"])
    assert not list(fit_dir.glob("predictions_*.csv"))  # not into the checkpoint's own predictions_dir


def test_model_overrides_read_the_command_lines_model_settings():
    from stages.fit import model_overrides

    argv = ["test", "-c", "x.yaml", "--model.init_args.method=m", "--model.init_args.pretrained", "false",
            "--model.init_args.backbone_args.channels=[8, 16]", "--data.init_args.fold=1", "--ckpt_path=a.ckpt"]  # fmt: skip
    assert model_overrides(argv) == {
        "method": "m",
        "pretrained": False,
        "backbone_args": {"channels": [8, 16]},
    }
