"""Issue 12: CSASN's demo recipe, chosen on validation (BENCHMARKS.md, "CSASN demo recipe, chosen on validation").

Fits a CSASN config (``conf/demo/csasn.yaml`` plus command-line overrides) on every fold of a still-image set's
``splits_subtype.json``, in this one Python process (``lightning fit`` without its start-up), each fold testing
its checkpoint as ``make csasn`` does (``predictions_csasn.csv``); the same checkpoint then scores the fold's
validation part (``val_predictions_csasn.csv``, same columns).  Prints one JSON line: pooled and mean-of-folds
malignancy AUROC and macro-F1 on the validation parts (what recipes are compared on) and on the test parts
(reported, never used to choose), the fits' CPU seconds, and the same figures for the methods whose
``val_predictions_<m>.csv`` / ``predictions_<m>.csv`` already sit in ``--ref`` (e.g. ``usnodule feature-forest
--runs REF``) and for the generator's Bayes ceiling (``truth.csv`` beside the manifest).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/recipe_csasn.py OUT.jsonl --name NAME [--runs DIR] \\
        [--conf conf/demo/csasn.yaml] [--manifest M] [--splits S] [--ref DIR] [--folds 0 1 ...] [-- OVERRIDES...]

``--runs DIR`` keeps each fold's checkpoint, predictions and per-epoch CSV log (``csasn/metrics.csv``; the
printed ``val_curve`` is its validation AUROC and macro-F1 per epoch, mean over folds) in ``DIR/fold<k>/``, for
``usnodule report``; without it they go to a temporary folder.  ``--reuse`` keeps folds of ``DIR`` already
fitted (same recipe only).  The BENCHMARKS runs, e.g. the chosen recipe against the old config:

    usnodule split data/synth/stills/manifest.csv -k 5 --seed 0 --stratify subtype --out runs/recipe/splits.json
    usnodule feature-forest --manifest data/synth/stills/manifest.csv --splits runs/recipe/splits.json \
        --runs runs/recipe/forest
    python benchmarks/recipe_csasn.py runs/recipe/results.jsonl --name e24 --runs runs/recipe/e24 \
        --splits runs/recipe/splits.json --ref runs/recipe/forest -- --trainer.max_epochs=24 \
        --lr_scheduler.init_args.T_max=24 --data.init_args.roi_jitter=0.15 \
        --optimizer.init_args.weight_decay=0.05 --model.init_args.dropout=0.3

Round 2 (BENCHMARKS.md "CSASN demo recipe, round 2"): the same with ``conf/demo/csasn.yaml``'s later
defaults and overrides such as ``--model.init_args.mask_channel=true --data.init_args.roi_square=true``,
screened with ``--folds 0 1 2`` and completed with ``--folds 0 1 2 3 4 --reuse`` into the same ``--runs``.
Round 3 (BENCHMARKS.md "round 3"): overrides such as ``--model.init_args.shape_weight=1.0
--data.init_args.class_sampling=0.5 --data.init_args.roi_min_side=0.6``, screened on folds 0-2; what the network
sees for a recipe: ``benchmarks/csasn_inputs.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader

from datamodules.atomic import write_predictions
from datamodules.folds import load_splits
from datamodules.still_data import StillDataModule
from lightning_modules.csasn_stage import CSASNStage
from stages import fit
from stages.report_multiclass import fold_metrics

SUBTYPES = ["benign", "PTC", "FTC", "MTC"]


def fit_fold(conf: str, manifest: str, splits: str, fold: int, out: Path, extra: list[str]) -> Path:
    """``lightning fit`` of one fold with ``test_after_fit`` (writes ``out/predictions_csasn.csv``); the
    per-epoch metrics to ``out/csasn/metrics.csv`` (a CSV logger)."""
    ckpt = out / "csasn.ckpt"
    logger = {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": str(out), "name": "csasn", "version": ""},
    }
    fit.main(
        [
            "fit",
            "-c",
            conf,
            f"--data.init_args.manifest={manifest}",
            f"--data.init_args.splits={splits}",
            f"--data.init_args.fold={fold}",
            "--model.init_args.test_after_fit=true",
            f"--model.init_args.predictions_dir={out}",
            f"--trainer.default_root_dir={out}/csasn",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger={json.dumps(logger)}",
            "--resume=false",
            f"--ckpt_out={ckpt}",
            *extra,
        ]
    )
    return ckpt


@torch.no_grad()
def predict_val(ckpt: Path, out: Path) -> Path:
    """The checkpoint's subtype and malignant probabilities on its fold's validation part, with the data settings
    it was trained with (no augmentation), as ``val_predictions_csasn.csv``."""
    model = CSASNStage.load_from_checkpoint(ckpt, map_location="cpu").eval()
    hp = torch.load(ckpt, map_location="cpu", weights_only=False)["datamodule_hyper_parameters"]
    settings = {k: v for k, v in dict(hp).items() if not k.startswith("_")}  # LightningCLI's _class_path
    dm = StillDataModule(**{**settings, "augment": False})
    dm.setup("validate")
    ds = dm.datasets["val"]
    subs, mals = [], []
    for b in DataLoader(ds, batch_size=64):
        sub, mal = model.probabilities(model(model.inputs(b)))
        subs.append(sub)
        mals.append(mal)
    sub, mal = torch.cat(subs).numpy(), torch.cat(mals).numpy()
    names = model.subtypes
    extra = {
        "subtype": [names[i] for i in ds.subtype_index],
        "pred_subtype": [names[i] for i in sub.argmax(1)],
        **{f"p_{n}": sub[:, i] for i, n in enumerate(names)},
    }
    ids = [c.case_id for c in ds.cases]
    return write_predictions(
        out / "val_predictions_csasn.csv", ids, [c.label for c in ds.cases], mal, **extra
    )


def curves(runs: Path, folds: list[int]) -> dict[str, list[float]]:
    """Validation AUROC and macro-F1 per epoch, mean over folds (from each fold's CSV log)."""
    frames = []
    for k in folds:
        log = pd.read_csv(runs / f"fold{k}" / "csasn" / "metrics.csv")
        frames.append(log.dropna(subset=["val/auroc"]).groupby("epoch")[["val/auroc", "val/macro_f1"]].last())
    mean = pd.concat(frames).groupby(level=0).mean()
    return {c.split("/")[1]: [round(float(v), 3) for v in mean[c]] for c in mean.columns}


def scores(frames: list[pd.DataFrame]) -> dict[str, float]:
    """Pooled and mean-of-folds malignancy AUROC and macro-F1 of per-fold prediction frames."""
    d = pd.concat(frames, ignore_index=True)
    fm = [fold_metrics(f, SUBTYPES) for f in frames]
    return {
        "auroc": round(float(roc_auc_score(d["label"], d["prob"])), 4),
        "auroc_folds": round(float(np.mean([roc_auc_score(f["label"], f["prob"]) for f in frames])), 4),
        "macro_f1": round(float(fold_metrics(d, SUBTYPES)["macro_f1"]), 4),
        "macro_f1_folds": round(float(np.mean([m["macro_f1"] for m in fm])), 4),
        "balanced_acc_folds": round(float(np.mean([m["balanced_acc"] for m in fm])), 4),
    }


def read(folder: Path, method: str, folds: list[int], part: str) -> list[pd.DataFrame]:
    prefix = "val_predictions_" if part == "val" else "predictions_"
    return [
        pd.read_csv(folder / f"fold{k}" / f"{prefix}{method}.csv", dtype={"annot_id": str}) for k in folds
    ]


def ceiling(truth: pd.DataFrame, frames: list[pd.DataFrame]) -> list[pd.DataFrame]:
    """The generator's class posterior on the same images, in the prediction files' columns."""
    out = []
    for f in frames:
        t = truth.loc[f["annot_id"]]
        probs = {f"p_{c}": t[f"p_{c}"].to_numpy(float) for c in SUBTYPES}
        out.append(
            f[["annot_id", "subtype", "label"]].assign(prob=1 - t["p_benign"].to_numpy(float), **probs)
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--name", required=True)
    p.add_argument("--runs", type=Path, default=None)
    p.add_argument("--conf", default="conf/demo/csasn.yaml")
    p.add_argument("--manifest", default="data/synth/stills/manifest.csv")
    p.add_argument("--splits", default="data/synth/stills/splits_subtype.json")
    p.add_argument("--ref", type=Path, default=None, help="folder of other methods' fold<k>/ predictions")
    p.add_argument("--ref-methods", nargs="*", default=["feature_forest"])
    p.add_argument("--folds", type=int, nargs="*", default=None)
    p.add_argument("--reuse", action="store_true", help="keep a fold of --runs already fitted (same recipe!)")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)  # fit overrides after "--"
    a = p.parse_args(argv[:cut])
    a.overrides = argv[cut + 1 :]
    torch.set_num_threads(1)
    folds = list(range(load_splits(a.splits)["k"])) if a.folds is None else a.folds
    with tempfile.TemporaryDirectory() as tmp:
        runs = a.runs or Path(tmp)
        cpu, per_fold = 0.0, []
        for k in folds:
            out = runs / f"fold{k}"
            out.mkdir(parents=True, exist_ok=True)
            t0 = time.process_time()
            ckpt = out / "csasn.ckpt"
            if not (a.reuse and ckpt.is_file() and (out / "predictions_csasn.csv").is_file()):
                ckpt = fit_fold(a.conf, a.manifest, a.splits, k, out, a.overrides)
            predict_val(ckpt, out)
            cpu += time.process_time() - t0
            per_fold.append(round(time.process_time() - t0, 1))
        row: dict = {"name": a.name, "overrides": a.overrides, "folds": folds, "cpu_s": round(cpu, 1)}
        row["cpu_s_folds"] = per_fold
        parts = {part: read(runs, "csasn", folds, part) for part in ("val", "test")}
        for part, frames in parts.items():
            row[part] = scores(frames)
        row["val_curve"] = curves(runs, folds)
    truth_path = Path(a.manifest).parent / "truth.csv"
    if truth_path.is_file():
        truth = pd.read_csv(truth_path, dtype={"case_id": str}).set_index("case_id")
        row["ceiling"] = {part: scores(ceiling(truth, frames)) for part, frames in parts.items()}
    for m in a.ref_methods if a.ref is not None else []:
        row[m] = {part: scores(read(a.ref, m, folds, part)) for part in ("val", "test")}
    print(json.dumps(row), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with a.out.open("a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
