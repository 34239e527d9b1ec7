"""Cross-fitting the head's training embeddings (issue 10, item 3): halves, derived splits, the export's views and
their provenance, the head's averaging over views, the report's protocol line, the refusal of predict/export."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from datamodules.crossfit import encoder_training_ids, load_halves, split_halves, write_halves
from datamodules.embeddings import (
    EmbeddingDataset,
    pad_collate,
    read_index,
    refuse_crossfitted_head,
    view_key,
)
from datamodules.errors import DataError
from datamodules.files import file_digest
from datamodules.folds import load_fold, make_folds, write_splits
from datamodules.stanford import StanfordCine
from stages.cli import main as usnodule
from stages.embeddings import export, export_crossfit
from stages.masks import predict_masks
from tests.stanford_files import write_stanford
from tests.test_embeddings import save_ckpt


def test_halves_are_stratified_grouped_deterministic_and_cover_the_training_part():
    ids = [f"n{i}" for i in range(40)]
    labels = {i: int(k % 4 == 0) for k, i in enumerate(ids)}  # 10 malignant
    groups = {i: f"p{k // 2}" for k, i in enumerate(ids)}  # two nodules per patient
    h = split_halves(ids, labels, groups, seed=3)
    assert sorted(h["A"] + h["B"]) == sorted(ids) and not set(h["A"]) & set(h["B"])
    assert not {groups[i] for i in h["A"]} & {groups[i] for i in h["B"]}  # no patient on both sides
    n_mal = Counter(labels[i] for i in h["A"])[1], Counter(labels[i] for i in h["B"])[1]
    assert abs(n_mal[0] - n_mal[1]) <= 2 and abs(len(h["A"]) - len(h["B"])) <= 4
    assert split_halves(ids, labels, groups, seed=3) == h  # same seed, same halves
    assert split_halves(ids, labels, groups, seed=4) != h
    with pytest.raises(DataError, match="at least 2 patient groups"):
        split_halves(ids[:4], labels, {i: "one" for i in ids}, seed=0)


@pytest.fixture(scope="module")
def cf(tmp_path_factory):
    """18 nodules, 3 folds; fold 0's training part halved; random-init encoders per half whose checkpoints
    record the derived splits files (as `lightning fit` with --data.init_args.splits=splits_<h>.json would)."""
    from lightning_modules.maskcnn_stage import MaskCNNStage
    from lightning_modules.seg_stage import SegStage
    from lightning_modules.vit_stage import ViTStage

    root = tmp_path_factory.mktemp("crossfit")
    h5 = write_stanford(root / "stanford", extra=13)
    cine = StanfordCine(h5)
    ids = [n.annot_id for n in cine.nodules]
    splits = write_splits(
        make_folds(ids, [n.label for n in cine.nodules], ids, k=3, seed=0), root / "splits.json"
    )
    crossfit = root / "fold0" / "crossfit"
    usnodule(
        ["crossfit-halves", "--cine", str(h5), "--splits", str(splits), "--fold", "0", "--out", str(crossfit)]
    )
    torch.manual_seed(0)
    seg = save_ckpt(SegStage(base=2, depth=2), root / "seg.ckpt", {"size": 16})
    masks = predict_masks(cine=h5, seg=seg, out=root / "masks.h5", batch_size=4, progress=False)
    for h in ("A", "B"):
        fit = {"splits": str(crossfit / f"splits_{h}.json"), "fold": 0}
        save_ckpt(
            ViTStage(backbone="test_vit", img_size=32),
            crossfit / f"vit_{h}.ckpt",
            {"img_size": 32, "buffer": 5, "normalize": "half", **fit},
        )
        save_ckpt(MaskCNNStage(channels=(4, 8)), crossfit / f"maskcnn_{h}.ckpt", {"img_size": 16, **fit})
    kw = dict(cine=h5, masks=masks, splits=splits, fold=0, batch_size=4, accelerator="cpu", progress=False)
    out = export_crossfit(crossfit=crossfit, out=root / "fold0" / "embeddings.h5", **kw)
    return {
        "root": root,
        "h5": h5,
        "splits": splits,
        "crossfit": crossfit,
        "masks": masks,
        "out": out,
        "kw": kw,
    }


def test_derived_splits_restrict_training_to_the_half_and_keep_validation_and_test(cf):
    from datamodules.stacks import StackDataModule

    halves = load_halves(cf["crossfit"], fold=0)
    full = load_fold(cf["splits"], 0)
    assert sorted(halves["A"] + halves["B"]) == sorted(full["train"])
    assert halves["seed"] == 0 and halves["splits_sha256"] == file_digest(cf["splits"])
    for h in ("A", "B"):
        part = load_fold(cf["crossfit"] / f"splits_{h}.json", 0)
        assert part["train"] == halves[h] and part["val"] == full["val"] and part["test"] == full["test"]
        assert load_fold(cf["crossfit"] / f"splits_{h}.json", 1) == load_fold(cf["splits"], 1)
        # the ViT / mask-CNN datamodule selects its training nodules from this file: half h only
        dm = StackDataModule(str(cf["h5"]), str(cf["crossfit"] / f"splits_{h}.json"), fold=0, img_size=32)
        dm.setup("fit")
        assert dm.datasets["train"].nodule_ids == sorted(halves[h])
    with pytest.raises(DataError, match="not fold 1"):
        load_halves(cf["crossfit"], fold=1)


def test_no_training_embedding_comes_from_an_encoder_that_saw_its_nodule(cf):
    """Provenance read back from the file: each view's encoder, its checkpoint (digest checked), the training
    nodules that checkpoint's own splits file and fold give -- never the nodule the view belongs to."""
    halves = load_halves(cf["crossfit"], fold=0)
    train = set(load_fold(cf["splits"], 0)["train"])
    with h5py.File(cf["out"], "r") as f:
        assert f.attrs["stacking"] == "cross-fitted" and "vit_checkpoint" not in f.attrs
        seen = {}
        for h in ("A", "B"):
            seen[h] = set()
            for k in ("vit", "maskcnn"):
                ckpt = f.attrs[f"{k}_checkpoint_{h}"]
                assert f.attrs[f"{k}_sha256_{h}"] == file_digest(ckpt)
                data = torch.load(ckpt, map_location="cpu", weights_only=False)["datamodule_hyper_parameters"]
                seen[h] |= encoder_training_ids(data, ckpt)
            assert seen[h] == set(halves[h])
        assert len(f) == 18
        for g in f.values():
            nid, encoders = str(g.attrs["annot_id"]), str(g.attrs["encoders"]).split(",")
            for j, enc in enumerate(encoders):
                assert nid not in seen[enc], f"{nid} embedded by encoder {enc}, which was fitted on it"
                assert view_key("image", j) in g and view_key("seg_prob", j) in g
            if nid in train:  # the other half's encoders only
                assert encoders == ["B" if nid in halves["A"] else "A"]
            else:  # validation / test / outside the fold: both halves, averaged by the readers
                assert encoders == ["A", "B"]


def test_each_view_holds_its_encoders_embeddings(cf, tmp_path):
    """The view named B is what half B's encoders alone give (a plain export with them), for training and
    test nodules alike; A's differ (another random init)."""
    # A half's encoders may embed only nodules outside their half (the provenance check refuses the rest), so
    # each reference export is of those: exactly the nodules whose view it is.
    halves = load_halves(cf["crossfit"], 0)
    with h5py.File(cf["h5"]) as f:
        everything = sorted({str(a) for a in f["annot_id"].asstr()[()]})
    single = {
        h: export(
            vit=cf["crossfit"] / f"vit_{h}.ckpt",
            maskcnn=cf["crossfit"] / f"maskcnn_{h}.ckpt",
            out=tmp_path / f"{h}.h5",
            nodule_ids=[i for i in everything if i not in set(halves[h])],
            encoder_train=set(halves[h]),
            **cf["kw"],
        )
        for h in ("A", "B")
    }
    with h5py.File(cf["out"], "r") as f, h5py.File(single["A"]) as a, h5py.File(single["B"]) as b:
        assert a.attrs["stacking"] == "in-sample"
        ref = {"A": a, "B": b}
        for name, g in f.items():
            for j, enc in enumerate(str(g.attrs["encoders"]).split(",")):
                for key in ("image", "seg", "image_prob"):
                    np.testing.assert_allclose(g[view_key(key, j)][()], ref[enc][name][key][()], atol=1e-5)
        both = next(n for n in a if n in b)  # a validation / test nodule: embedded by both halves
        assert not np.allclose(a[both]["image"][()], b[both]["image"][()])


def test_export_refuses_encoders_not_fitted_on_their_half(cf, tmp_path):
    """Swapped checkpoints (B's encoders standing for A) would embed training nodules in-sample: refused."""
    import shutil

    bad = tmp_path / "crossfit"
    shutil.copytree(cf["crossfit"], bad)
    for k in ("vit", "maskcnn"):
        (bad / f"{k}_A.ckpt").write_bytes((cf["crossfit"] / f"{k}_B.ckpt").read_bytes())
    with pytest.raises(DataError, match="not fitted on the cross-fit half"):
        export_crossfit(crossfit=bad, out=tmp_path / "e.h5", **cf["kw"])
    assert not (tmp_path / "e.h5").exists() and not list(tmp_path.glob(".e.h5*"))


def test_head_items_are_views_and_predictions_average_them(cf):
    """One item per view sharing the nodule index; the head's nodule probability (usnodule baselines and the
    validation metric) is the mean of its views' probabilities, a DDP-padding repeat counted once."""
    from lightning_modules.head_stage import HeadStage
    from stages.baselines import predict_head

    split = load_fold(cf["splits"], 0)
    index = read_index(cf["out"])
    train = EmbeddingDataset(cf["out"], split["train"], index=index)
    test = EmbeddingDataset(cf["out"], split["test"], index=index)
    assert len(train) == len(split["train"]) and len(test) == 2 * len(split["test"])
    torch.manual_seed(0)
    head = HeadStage(dim=256, num_heads=2).eval()
    items = [test[k] for k in range(len(test))]
    batch = pad_collate(items)
    with torch.no_grad():
        p = head.malignant_prob(head.logits(batch))
    per_view = pd.DataFrame({"nodule": batch["nodule"].numpy(), "p": p.numpy()})
    expected = per_view.groupby("nodule")["p"].mean().to_numpy()
    assert (per_view.groupby("nodule").size() == 2).all()
    got = predict_head(head, test, batch_size=3)
    np.testing.assert_allclose(got["prob"].to_numpy(), expected, atol=1e-6)
    assert got["annot_id"].tolist() == test.nodule_ids
    # the head stage's validation metric: same means, a repeated (nodule, view) row counted once
    pad = pad_collate(items + items[:1])
    with torch.no_grad():
        head._eval_step(pad, "val", batch_idx=1)
    head.val_nodule.compute()
    np.testing.assert_allclose(head.val_nodule.scores["prob"].numpy(), expected, atol=1e-6)


def test_avepool_averages_the_two_encoders_stack_probabilities(cf):
    from stages.baselines import stack_probabilities

    test = load_fold(cf["splits"], 0)["test"]
    got = stack_probabilities(cf["out"], test, "image_prob")
    with h5py.File(cf["out"], "r") as f:
        nid = test[0]
        expected = (f[nid]["image_prob"][()] + f[nid]["image_prob_1"][()]) / 2
    np.testing.assert_allclose(got[got["annot_id"] == nid]["prob"].to_numpy(), expected, atol=1e-6)


def test_report_says_cross_fitted_and_predict_refuses_the_head(cf, tmp_path):
    from datamodules.atomic import write_predictions
    from stages.report import report

    runs = tmp_path / "runs"
    (runs / "fold0").mkdir(parents=True)
    (runs / "fold0" / "embeddings.h5").write_bytes(cf["out"].read_bytes())
    write_predictions(runs / "fold0" / "predictions_stact.csv", ["a", "b"], [0, 1], [0.2, 0.7])
    report(runs, tmp_path / "out", n_boot=10, show=False)
    md = (tmp_path / "out" / "results.md").read_text()
    assert "heads trained on *cross-fitted* embeddings" in md
    with h5py.File(runs / "fold0" / "embeddings.h5", "a") as f:
        f.attrs["stacking"] = "in-sample"
    report(runs, tmp_path / "out", n_boot=10, show=False)
    assert "heads trained on *in-sample* embeddings" in (tmp_path / "out" / "results.md").read_text()
    # a head fitted on cross-fitted embeddings cannot run on the fold's single encoder pair
    with pytest.raises(DataError, match="cross-fitted embeddings"):
        refuse_crossfitted_head("head_stact.ckpt", {"path": str(cf["out"])})
    refuse_crossfitted_head("head_stact.ckpt", {"path": str(runs / "fold0" / "embeddings.h5")})  # in-sample


def test_cli_embeddings_needs_one_encoder_source(cf, capsys):
    base = [
        "embeddings",
        "--cine",
        str(cf["h5"]),
        "--masks",
        str(cf["masks"]),
        "--out",
        str(cf["root"] / "x.h5"),
    ]
    for extra in ([], ["--vit", "v.ckpt", "--crossfit", str(cf["crossfit"])], ["--vit", "v.ckpt"]):
        with pytest.raises(SystemExit) as e:
            usnodule(base + extra)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "give --vit and --maskcnn, or --crossfit DIR" in err
    with pytest.raises(SystemExit):
        usnodule(base + ["--crossfit", str(cf["crossfit"])])  # no --splits / --fold
    assert "needs --splits and --fold" in capsys.readouterr().err
    assert not (cf["root"] / "x.h5").exists()


def test_write_halves_records_the_halves(tmp_path):
    ids = [f"c{i}" for i in range(24)]
    labels = {i: k % 3 == 0 for k, i in enumerate(ids)}
    splits = write_splits(make_folds(ids, [int(labels[i]) for i in ids], ids, k=3), tmp_path / "s.json")
    write_halves(splits, 2, {i: int(v) for i, v in labels.items()}, tmp_path / "cf", seed=7)
    doc = json.loads((tmp_path / "cf" / "halves.json").read_text())
    assert doc["fold"] == 2 and doc["seed"] == 7 and doc["splits"] == str(splits.resolve())
    derived = json.loads((tmp_path / "cf" / "splits_B.json").read_text())
    assert derived["crossfit"] == {"fold": 2, "half": "B", "seed": 7, "splits": str(splits.resolve())}
    assert derived["folds"][2]["train"] == doc["B"]


@pytest.mark.timeout(600)
def test_crossfit_chain_through_the_clis(tmp_path, monkeypatch, capsys):
    """The chain as `make report CROSSFIT=1` runs it (one fold, in-process, real fits with the demo configs):
    halves -> a ViT and a mask CNN per half fitted on splits_<half>.json -> cross-fitted embeddings -> head ->
    baselines -> report.  Each encoder's checkpoint records exactly its half, and the report names the protocol."""
    from stages.fit import main as fit

    root = tmp_path
    monkeypatch.chdir(root)
    conf = Path(__file__).resolve().parents[1] / "conf" / "demo"
    usnodule(["synth", "--out", "data", "--nodules", "18", "--frames", "6", "--size", "48", "--cases", "4",
              "--prevalence", "0.4", "--seed", "3"])  # fmt: skip
    h5 = root / "data" / "stanford" / "dataset.hdf5"
    usnodule(["split", str(h5), "-k", "3"])
    splits = h5.with_name("splits.json")
    fold, cfdir = root / "runs" / "fold0", root / "runs" / "fold0" / "crossfit"
    usnodule(
        ["crossfit-halves", "--cine", str(h5), "--splits", str(splits), "--fold", "0", "--out", str(cfdir)]
    )

    def lightning(config: str, out: Path, *args: str) -> Path:
        fit(["fit", "-c", str(conf / f"{config}.yaml"), *args, "--data.init_args.fold=0", "--trainer.max_epochs=1",
             "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.logger=false",
             "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={out.with_suffix('')}",
             f"--ckpt_out={out}"])  # fmt: skip
        return out

    seg = lightning(
        "seg", fold / "seg.ckpt", f"--data.init_args.h5={h5}", f"--data.init_args.splits={splits}"
    )
    masks = fold / "masks.h5"
    usnodule(["masks", "--cine", str(h5), "--seg", str(seg), "--out", str(masks), "--device", "cpu"])
    for h in ("A", "B"):
        data = [f"--data.init_args.h5={h5}", f"--data.init_args.splits={cfdir / f'splits_{h}.json'}"]
        lightning("vit", cfdir / f"vit_{h}.ckpt", *data)
        lightning("maskcnn", cfdir / f"maskcnn_{h}.ckpt", *data, f"--data.init_args.masks_h5={masks}")
    emb = fold / "embeddings.h5"
    usnodule(["embeddings", "--cine", str(h5), "--masks", str(masks), "--crossfit", str(cfdir), "--splits",
              str(splits), "--fold", "0", "--out", str(emb), "--accelerator", "cpu"])  # fmt: skip
    halves = load_halves(cfdir, fold=0)
    for h in ("A", "B"):
        for k in ("vit", "maskcnn"):
            data = torch.load(cfdir / f"{k}_{h}.ckpt", map_location="cpu", weights_only=False)
            assert encoder_training_ids(data["datamodule_hyper_parameters"]) == set(halves[h])
    head = lightning("head", fold / "head_stact.ckpt", f"--data.init_args.path={emb}",
                     f"--data.init_args.splits={splits}", "--model.init_args.variant=stact")  # fmt: skip
    usnodule(["baselines", "--cine", str(h5), "--splits", str(splits), "--runs", str(root / "runs"), "--folds", "0",
              "--methods", "tirads,avepool", "--n-estimators", "20", "--head", f"stact={head}"])  # fmt: skip
    test = load_fold(splits, 0)["test"]
    preds = pd.read_csv(fold / "predictions_stact.csv", dtype={"annot_id": str})
    assert sorted(preds["annot_id"]) == sorted(test) and preds["prob"].between(0, 1).all()
    usnodule(["report", "--runs", str(root / "runs"), "--out", str(root / "report"), "--n-boot", "20"])
    assert "heads trained on *cross-fitted* embeddings" in (root / "report" / "results.md").read_text()
    np.save(root / "clip.npy", np.random.default_rng(0).integers(0, 255, (6, 48, 48), dtype=np.uint8))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # the deployable predictor refuses the cross-fitted head
        usnodule(["predict", str(root / "clip.npy"), "--seg", str(seg), "--vit", str(cfdir / "vit_A.ckpt"),
                  "--maskcnn", str(cfdir / "maskcnn_A.ckpt"), "--head", str(head), "--out", str(root / "p.csv")])  # fmt: skip
    assert e.value.code == 2 and not (root / "p.csv").exists()
    assert "head_stact.ckpt: was trained on cross-fitted embeddings" in capsys.readouterr().err


@pytest.mark.timeout(300)
def test_crossfit_export_on_two_ddp_processes_equals_one_process(cf, tmp_path):
    """`usnodule embeddings --crossfit` on 2 gloo processes: both exports run on every rank, rank 0 alone merges
    (another rank removing the per-half files under it was a bug); the file equals the one-process one."""
    from tests.test_distributed import run_cli

    out = tmp_path / "ddp.h5"
    run_cli("usnodule", "embeddings", "--cine", str(cf["h5"]), "--masks", str(cf["masks"]), "--crossfit",
            str(cf["crossfit"]), "--splits", str(cf["splits"]), "--fold", "0", "--out", str(out), "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp")  # fmt: skip
    with h5py.File(cf["out"], "r") as a, h5py.File(out, "r") as b:
        assert list(a) == list(b)
        for name, g in a.items():
            assert g.attrs["encoders"] == b[name].attrs["encoders"]
            for key in g:
                np.testing.assert_allclose(g[key][()], b[name][key][()], atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp.h5"]  # no per-half file or shard left
