"""Issue 11, the kinds that used to end in a traceback: every one is exit status 2, exactly one line on stderr
naming the file (or option) and the problem, no traceback, and nothing finished-looking left behind.

Kinds: errors inside DataLoader workers (``usnodule`` and ``lightning fit``), config errors of ``lightning fit``,
a paper config with ``pretrained: true`` and no network, the resume stamp and changed inputs, unreadable HDF5
chunks, ids that are not UTF-8, TI-RADS values outside ACR TI-RADS, prediction CSVs, bad option values
(``--out`` a folder, ``--batch-size 0``, negative seeds, ``{fold}`` typos) and a full disk while writing.
"""

from __future__ import annotations

import errno
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from stages.cli import main as usnodule
from stages.fit import main as fit
from tests.commands import argv
from tests.stanford_files import write_stanford
from tests.test_embeddings import save_ckpt, write_splits

ROOT = Path(__file__).resolve().parents[1]


def _fails(capsys, call, *words: str, lines: int | None = 1) -> str:
    """Run ``call``; it must exit with status 2 and print one ``error:`` line holding every one of ``words``
    (``lines=None``: other, non-error lines on stderr are allowed, e.g. Lightning's device banner)."""
    with pytest.raises(SystemExit) as e:
        call()
    out, err = capsys.readouterr()
    assert e.value.code == 2, err
    assert "Traceback" not in out + err and "usage:" not in err, err
    errors = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1, err
    if lines is not None:
        assert err.strip().splitlines() == errors, err
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def corrupt_chunks(h5: Path, key: str = "image") -> None:
    """Overwrite the stored bytes of every chunk of ``key`` (gzip) with garbage; the header stays intact."""
    with h5py.File(h5, "r") as f:
        ds = f[key]
        spans = [ds.id.get_chunk_info(i) for i in range(ds.id.get_num_chunks())]
    with open(h5, "r+b") as f:
        for info in spans:
            f.seek(info.byte_offset)
            f.write(b"\xff" * info.size)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny Stanford file, its splits, random-init seg / ViT / mask CNN checkpoints and predicted masks."""
    from lightning_modules.maskcnn_stage import MaskCNNStage
    from lightning_modules.seg_stage import SegStage
    from lightning_modules.vit_stage import ViTStage
    from stages.masks import predict_masks

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("errors")
    h5 = write_stanford(root / "stanford")
    seg = save_ckpt(SegStage(base=2, depth=2), root / "seg.ckpt", {"size": 16})
    vit = save_ckpt(ViTStage(backbone="test_vit", img_size=32), root / "vit.ckpt", {"img_size": 32})
    maskcnn = save_ckpt(MaskCNNStage(channels=(4, 8)), root / "maskcnn.ckpt", {"img_size": 16})
    masks = predict_masks(cine=h5, seg=seg, out=root / "masks.h5", batch_size=4, progress=False)
    splits = write_splits(root / "stanford" / "splits.json")
    return {
        "root": root,
        "h5": h5,
        "seg": seg,
        "vit": vit,
        "maskcnn": maskcnn,
        "masks": masks,
        "splits": splits,
    }


def _copy_stanford(files, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("dataset.hdf5", "metadata.csv", "splits.json"):
        (dest / name).write_bytes((files["h5"].parent / name).read_bytes())
    return dest / "dataset.hdf5"


# ---------------------------------------------------------------------------------------------- workers
@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_chunk_in_a_worker_is_one_line_for_usnodule(files, tmp_path, capsys, workers):
    h5 = _copy_stanford(files, tmp_path / "data")
    corrupt_chunks(h5)
    out = tmp_path / "out" / "masks.h5"
    cmd = argv("masks", cine=h5, seg=files["seg"], out=out, batch_size=4, num_workers=workers)
    line = _fails(capsys, lambda: usnodule(cmd), str(h5), "cannot read rows", "'image'")
    assert "DataLoader worker" not in line
    assert not out.parent.exists() or _names(out.parent) == []  # no masks.h5, no partial file


def _vit_fit(h5: Path, root: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "-c",
        str(ROOT / "conf" / "demo" / "vit.yaml"),
        f"--data.init_args.h5={h5}",
        f"--data.init_args.splits={h5.with_name('splits.json')}",
        "--data.init_args.batch_size=2",
        "--trainer.max_epochs=1",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={root}",
        *extra,
    ]


def test_data_error_in_a_worker_is_one_line_for_lightning_fit(files, tmp_path, capsys):
    h5 = _copy_stanford(files, tmp_path / "data")
    corrupt_chunks(h5)
    out = tmp_path / "vit.ckpt"
    cmd = _vit_fit(h5, tmp_path / "run", "--data.init_args.num_workers=2", f"--ckpt_out={out}")
    _fails(capsys, lambda: fit(cmd), str(h5), "cannot read rows", lines=None)
    assert not out.exists()
    assert not list((tmp_path / "run").rglob("*.ckpt"))  # the fit never finished an epoch


def test_data_error_object_survives_torch_worker_reraise():
    from torch.utils.data import DataLoader, Dataset

    from datamodules.errors import DataError

    class Bad(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise DataError("/data/x.h5", "frame 3 is unreadable")

    with pytest.raises(DataError) as e:
        next(iter(DataLoader(Bad(), num_workers=1)))
    assert str(e.value) == "/data/x.h5: frame 3 is unreadable"


# ---------------------------------------------------------------------------------------------- fit config
CONFIG_ERRORS = {
    "unknown_key": (["--data.init_args.bogus=1"], ["data.init_args", "'bogus'"]),
    "wrong_type": (["--model.init_args.dropout=high"], ["model.init_args.dropout", "float"]),
    "wrong_type_union": (["--data.init_args.fold=first"], ["data.init_args.fold", "int", "'first'"]),
    "unknown_class": (["--model.class_path=lightning_modules.nope.Stage"], ["model.class_path", "nope"]),
    "model_img_size_0": (["--model.init_args.img_size=0"], ["model.init_args.img_size", "got 0"]),
    "data_img_size_0": (["--data.init_args.img_size=0"], ["data.init_args.img_size", ">= 1"]),
    "batch_size_0": (["--data.init_args.batch_size=0"], ["data.init_args.batch_size", ">= 1"]),
    "normalize": (["--data.init_args.normalize=imagnet"], ["data.init_args.normalize", "'imagnet'"]),
    "img_size_mismatch": (["--data.init_args.img_size=48"], ["data.init_args.img_size", "48", "32"]),
    "unknown_top_level": (["--bogus=1"], ["--bogus"]),
}


@pytest.mark.parametrize("case", sorted(CONFIG_ERRORS))
def test_config_error_is_one_line_before_anything_runs(files, tmp_path, capsys, case):
    extra, words = CONFIG_ERRORS[case]
    cmd = _vit_fit(files["h5"], tmp_path / "run", *extra)
    _fails(capsys, lambda: fit(cmd), *words)
    assert not (tmp_path / "run").exists()


def test_yaml_errors_name_the_config_file(files, tmp_path, capsys):
    bad = tmp_path / "vit.yaml"
    bad.write_text(
        "model:\n  class_path: lightning_modules.vit_stage.ViTStage\n  init_args:\n    img_size: [32\n"
    )
    _fails(capsys, lambda: fit(["fit", "-c", str(bad)]), str(bad), "YAML syntax error at line")
    bad.write_text("data:\n  init_args:\n    num_workers: -1\n")  # valid YAML, impossible value
    cmd = ["fit", "-c", str(ROOT / "conf" / "demo" / "vit.yaml"), "-c", str(bad)]
    cmd += [f"--data.init_args.h5={files['h5']}", f"--trainer.default_root_dir={tmp_path / 'run'}"]
    _fails(capsys, lambda: fit(cmd), "data.init_args.num_workers", ">= 0")
    _fails(capsys, lambda: fit(["fit", "-c", str(tmp_path / "missing.yaml")]), "missing.yaml")
    with pytest.raises(SystemExit) as e:  # the usage is still there, on --help
        fit(["fit", "--help"])
    assert e.value.code == 0 and "usage:" in capsys.readouterr().out


def test_pretrained_paper_config_without_network_says_what_to_set(files, tmp_path, capsys, monkeypatch):
    """conf/vit.yaml (pretrained: true) where the download fails: timm's loader is made to fail as
    huggingface_hub does offline, so nothing is ever downloaded (and a weights cache cannot hide the case)."""
    import timm.models._builder as builder
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*a, **k):
        raise LocalEntryNotFoundError("cannot find the requested files in the local cache")

    monkeypatch.setattr(builder, "load_pretrained", offline)
    cmd = ["fit", "-c", str(ROOT / "conf" / "vit.yaml"), f"--data.init_args.h5={files['h5']}"]
    cmd += [f"--data.init_args.splits={files['splits']}", f"--trainer.default_root_dir={tmp_path / 'run'}"]
    _fails(capsys, lambda: fit(cmd), "model.init_args.pretrained", "network", "checkpoint_path:")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- resume
TOY = [
    "--model=tests.toy.ToyStage",
    "--data=tests.toy.ToyData",
    "--trainer.accelerator=cpu",
    "--trainer.enable_model_summary=false",
    "--seed_everything=7",
    "--trainer.logger=false",
    "--trainer.max_epochs=3",
]


def test_changed_input_file_starts_afresh_with_a_notice(tmp_path, capsys):
    source = tmp_path / "toy.txt"
    source.write_text("1")
    run = [*TOY, f"--data.init_args.source={source}", f"--trainer.default_root_dir={tmp_path / 'r'}"]
    crash = ["--trainer.callbacks+=tests.toy.Crash", "--trainer.callbacks.init_args.at_epoch=1"]
    with pytest.raises(RuntimeError, match="simulated kill"):
        fit(["fit", *run, *crash])
    capsys.readouterr()
    source.write_text("22")  # other data at the same path
    fit(["fit", *run])
    err = capsys.readouterr().err
    assert "resuming from" not in err
    (notice,) = [x for x in err.splitlines() if x.startswith("notice: ")]
    assert str(source.resolve()) in notice and "starting afresh" in notice
    # Unchanged inputs still resume.
    with pytest.raises(RuntimeError, match="simulated kill"):
        fit(["fit", *run, *crash])
    fit(["fit", *run])
    assert "resuming from" in capsys.readouterr().err


def test_input_identity_covers_metadata_beside_the_h5(tmp_path):
    from stages.fit import input_files

    h5 = write_stanford(tmp_path / "s")
    found = input_files({"h5": str(h5), "splits": str(tmp_path / "nothere.json"), "metadata": None}, {})
    assert set(found) == {str(h5.resolve()), str(h5.with_name("metadata.csv").resolve())}


# ---------------------------------------------------------------------------------------------- readers
def test_non_utf8_id_is_one_line(tmp_path, capsys):
    h5 = write_stanford(tmp_path / "s")
    with h5py.File(h5, "r+") as f:
        ids = f["annot_id"][()]
        ids[0] = b"7\xff_"
        del f["annot_id"]
        f["annot_id"] = ids
    _fails(capsys, lambda: usnodule(argv("split", h5, folds=3)), str(h5), "annot_id", "not UTF-8")
    assert not h5.with_name("splits.json").exists()


@pytest.mark.parametrize(
    "column, value, words",
    [
        ("ti-rads_level", "TR4a", ["ti-rads_level", "'TR4a'", "TR1-TR5"]),
        ("ti-rads_level", "TR7", ["ti-rads_level", "'TR7'"]),
        ("ti-rads_margin", "smooth", ["ti-rads_margin", "'smooth'", "number"]),
    ],
)
def test_tirads_value_outside_acr_is_one_line(tmp_path, capsys, column, value, words):
    h5 = write_stanford(tmp_path / "s")
    meta = pd.read_csv(h5.with_name("metadata.csv"), dtype=str)
    meta.loc[1, column] = value
    meta.to_csv(h5.with_name("metadata.csv"), index=False)
    _fails(capsys, lambda: usnodule(argv("split", h5, folds=3)), "metadata.csv", *words)
    assert not h5.with_name("splits.json").exists()


@pytest.mark.parametrize(
    "text, problem",
    [("", "not a readable CSV"), ("annot_id,label,prob\n1_0,0,x\n", "prob must be a number"),
     (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "not a readable CSV")],
)  # fmt: skip
def test_bad_prediction_csv_is_one_line(tmp_path, capsys, text, problem):
    runs = tmp_path / "runs"
    for k in range(2):
        (runs / f"fold{k}").mkdir(parents=True)
        pd.DataFrame({"annot_id": ["a", "b"], "label": [0, 1], "prob": [0.2, 0.8]}).to_csv(
            runs / f"fold{k}" / "predictions_x.csv", index=False
        )
    bad = runs / "fold1" / "predictions_x.csv"
    bad.write_bytes(text if isinstance(text, bytes) else text.encode())
    cmd = argv("report", runs=runs, out=tmp_path / "rep", n_boot=5)
    _fails(capsys, lambda: usnodule(cmd), str(bad), problem)
    assert not (tmp_path / "rep").exists()


# ---------------------------------------------------------------------------------------------- options
def test_predict_out_naming_a_folder_fails_before_any_model_work(tmp_path, capsys, monkeypatch):
    import stages.predict as predict

    monkeypatch.setattr(predict, "load_predictor", lambda *a, **k: pytest.fail("models were loaded"))
    clip = tmp_path / "clip.npy"
    np.save(clip, np.zeros((3, 16, 16), np.uint8))
    cmd = argv("predict", clip, fold_dir=tmp_path / "nothere", out=tmp_path)
    _fails(capsys, lambda: usnodule(cmd), "--out", "is a folder")
    _fails(capsys, lambda: usnodule(argv("predict", clip, out=f"{tmp_path}/new/")), "--out", "folder")


OPTION_ERRORS = {
    "masks_batch_0": (["masks", "--cine", "x.h5", "--seg", "s.ckpt", "--out", "m.h5", "--batch-size", "0"],
                      ["--batch-size", ">= 1, got 0"]),
    "masks_workers_negative": (["masks", "--cine", "x.h5", "--seg", "s.ckpt", "--out", "m.h5",
                                "--num-workers", "-1"], ["--num-workers"]),
    "masks_threshold": (["masks", "--cine", "x.h5", "--seg", "s.ckpt", "--out", "m.h5", "--threshold", "2"],
                        ["--threshold", "[0, 1]"]),
    "embeddings_batch_0": (["embeddings", "--cine", "x", "--masks", "m", "--vit", "v", "--maskcnn", "c",
                            "--out", "e.h5", "--batch-size", "0"], ["--batch-size"]),
    "predict_batch_0": (["predict", "c.npy", "--batch-size", "0"], ["--batch-size", ">= 1"]),
    "predict_batch_text": (["predict", "c.npy", "--batch-size", "many"], ["--batch-size", "'many'"]),
    "split_seed_negative": (["split", "d.h5", "--seed", "-1"], ["--seed", ">= 0, got -1"]),
    "split_one_fold": (["split", "d.h5", "-k", "1"], ["-k/--folds", ">= 3"]),
    "report_seed_negative": (["report", "--runs", "r", "--out", "o", "--seed", "-3"], ["--seed"]),
    "report_n_boot_0": (["report", "--runs", "r", "--out", "o", "--n-boot", "0"], ["--n-boot"]),
    "synth_seed_huge": (["synth", "--seed", str(2**40)], ["--seed", "<="]),
    "baselines_seed": (["baselines", "--splits", "s", "--runs", "r", "--seed", "-5"], ["--seed"]),
    "baselines_fold_typo": (["baselines", "--splits", "s", "--runs", "r", "--embeddings",
                             "{runs}/fold{flod}/embeddings.h5"], ["--embeddings", "{flod}"]),
    "baselines_brace": (["baselines", "--splits", "s", "--runs", "r", "--cinetrans",
                         "{runs}/fold{fold/head.ckpt"], ["--cinetrans"]),
    "baselines_index": (["baselines", "--splits", "s", "--runs", "r", "--embeddings", "{runs}/{fold[0]}.h5"],
                        ["--embeddings"]),
    "baselines_head_typo": (["baselines", "--splits", "s", "--runs", "r", "--head", "stact={runs}/{fodl}.ckpt"],
                            ["--head", "{fodl}"]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(OPTION_ERRORS))
def test_bad_option_value_is_one_line_naming_the_option(tmp_path, capsys, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    args, words = OPTION_ERRORS[case]
    _fails(capsys, lambda: usnodule(args), *words)
    assert _names(tmp_path) == []


# ---------------------------------------------------------------------------------------------- disk full
def _disk_full(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_writing_masks(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(h5py.Dataset, "__setitem__", _disk_full)
    out = tmp_path / "out" / "masks.h5"
    cmd = argv("masks", cine=files["h5"], seg=files["seg"], out=out, batch_size=4)
    _fails(capsys, lambda: usnodule(cmd), str(out), "No space left on device")
    assert _names(out.parent) == []


def test_disk_full_while_writing_embeddings(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(h5py.Dataset, "__setitem__", _disk_full)
    out = tmp_path / "out" / "embeddings.h5"
    cmd = argv("embeddings", cine=files["h5"], masks=files["masks"], vit=files["vit"],
               maskcnn=files["maskcnn"], out=out, batch_size=4, accelerator="cpu")  # fmt: skip
    _fails(capsys, lambda: usnodule(cmd), str(out), "No space left on device", lines=None)
    assert _names(out.parent) == []  # no embeddings.h5, no shard folder


def test_disk_full_while_writing_a_small_file(tmp_path, capsys, monkeypatch):
    """splits.json and the CSVs are written by plain Python (not h5py): the same one line."""
    import datamodules.atomic as atomic

    h5 = write_stanford(tmp_path / "data", extra=6)
    real = Path.write_text

    def full(self, *a, **k):
        if ".partial-" in self.name:
            real(self, "{", encoding="utf-8")  # a half-written temporary, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(atomic.Path, "write_text", full)
    _fails(capsys, lambda: usnodule(argv("split", h5, folds=3)), "splits.json", "No space left", lines=None)
    assert _names(tmp_path / "data") == ["dataset.hdf5", "metadata.csv"]
