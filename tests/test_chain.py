"""The whole STACT-Time chain on a tiny synthetic set, as the Makefile runs it (one fold, in-process).

synth -> split -> ViT -> MSU-Net -> masks -> mask CNN -> embeddings -> heads -> baselines -> report, with the
demo configs and the real CLIs; checks what each stage hands the next and that fold 0's test nodules never
reach a fit.
"""

import json
from pathlib import Path

import h5py
import pandas as pd
import pytest
import torch

from stages.cli import main as usnodule
from stages.fit import main as fit
from tests.commands import argv

ROOT = Path(__file__).resolve().parents[1]


def _fit(stage, root, *args):
    out = root / "fold0" / f"{stage}.ckpt"
    config = "cinetrans" if stage == "head_cine_trans" else "head" if stage.startswith("head") else stage
    fit(
        [
            "fit",
            "-c",
            str(ROOT / "conf" / "demo" / f"{config}.yaml"),
            *args,
            "--data.init_args.fold=0",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=3",
            "--trainer.limit_val_batches=2",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={root / 'fold0' / stage}",
            f"--ckpt_out={out}",
        ]
    )
    assert out.is_file()
    return out


@pytest.mark.timeout(600)
def test_stact_time_chain_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    usnodule(argv("synth", out="data", nodules=18, frames=9, size=48, cases=4, prevalence=0.4, seed=3))
    h5 = tmp_path / "data" / "stanford" / "dataset.hdf5"
    usnodule(["split", str(h5), "-k", "3"])
    splits = h5.with_name("splits.json")
    fold0 = json.loads(splits.read_text())["folds"][0]
    runs = tmp_path / "runs"
    data = [f"--data.init_args.h5={h5}", f"--data.init_args.splits={splits}"]

    vit = _fit("vit", runs, *data)
    seg = _fit("seg", runs, *data)
    masks = runs / "fold0" / "masks.h5"
    usnodule(["masks", "--cine", str(h5), "--seg", str(seg), "--out", str(masks), "--device", "cpu"])
    maskcnn = _fit("maskcnn", runs, *data, f"--data.init_args.masks_h5={masks}")
    emb = runs / "fold0" / "embeddings.h5"
    usnodule(
        argv(
            "embeddings",
            cine=h5,
            masks=masks,
            vit=vit,
            maskcnn=maskcnn,
            splits=splits,
            fold=0,
            out=emb,
            accelerator="cpu",
        )
    )
    head = _fit(
        "head_stact",
        runs,
        f"--data.init_args.path={emb}",
        f"--data.init_args.splits={splits}",
        "--model.init_args.variant=stact",
    )
    _fit("head_cine_trans", runs, f"--data.init_args.path={emb}", f"--data.init_args.splits={splits}")

    # What each stage handed on: one embedding group per nodule, S stacks in both streams.
    with h5py.File(emb) as f, h5py.File(h5) as cine:
        n_nodules = len(set(cine["annot_id"][()]))
        assert len(f.keys()) == n_nodules
        for g in f.values():
            assert g["image"].shape == g["seg"].shape and g["image"].shape[1] == 256
        assert f.attrs["vit_checkpoint"] == str(vit) and f.attrs["maskcnn_checkpoint"] == str(maskcnn)
        assert len(f.attrs["vit_sha256"]) == 64  # the file says which checkpoints produced it
    # No fit saw fold 0's test nodules: the datamodules' training sets are built from splits.json.
    for stage in ("vit", "seg", "maskcnn", "head_stact", "head_cine_trans"):
        ckpt = torch.load(runs / "fold0" / f"{stage}.ckpt", map_location="cpu", weights_only=False)
        assert ckpt["datamodule_hyper_parameters"]["fold"] == 0

    usnodule(
        argv(
            "baselines",
            cine=h5,
            splits=splits,
            runs=runs,
            folds=0,
            methods="tirads,avepool,cinetrans",
            n_estimators=20,
            head=f"stact={head}",
        )
    )
    for method in ("stact", "cinecnn_trans"):  # CineCNN-Trans from its fit above: the baselines only predict
        preds = pd.read_csv(runs / "fold0" / f"predictions_{method}.csv", dtype={"annot_id": str})
        assert sorted(preds["annot_id"]) == sorted(fold0["test"])  # predictions only for the test part
        assert preds["prob"].between(0, 1).all()

    usnodule(["report", "--runs", str(runs), "--out", str(tmp_path / "report"), "--n-boot", "50"])
    table = pd.read_csv(tmp_path / "report" / "results.csv")
    assert {"stact", "tirads", "cinecnn_trans"} <= set(table.iloc[:, 0].str.lower())
    assert (tmp_path / "report" / "roc.png").stat().st_size > 0
    assert "AUROC" in (tmp_path / "report" / "results.md").read_text()
