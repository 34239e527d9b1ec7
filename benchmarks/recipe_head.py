"""Issue 8: the attention heads' demo recipe, chosen on validation (BENCHMARKS.md, "Demo recipe, round 3").

Fits a head config on every fold of a finished demo run (its embeddings.h5), in this one Python process
(`lightning fit` without the start-up), and prints pooled validation and test nodule AUROC, the fit's CPU
seconds and the Brier score. Recipes are compared on the pooled *validation* AUROC; the test column is
reported, never used to choose.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/recipe_head.py RUNS OUT.json [--variant stact] \
        [--conf conf/demo/head.yaml] [--splits data/synth/stanford/splits.json] [-- FIT OVERRIDES...]
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

from datamodules.embeddings import EmbeddingDataset
from datamodules.folds import load_fold, load_splits
from stages import fit
from stages.baselines import load_head, predict_head


def fit_fold(
    conf: str, runs: Path, splits: str, fold: int, variant: str, extra: list[str], tmp: Path
) -> Path:
    ckpt = tmp / f"head_fold{fold}.ckpt"
    args = [
        "fit",
        "-c",
        conf,
        f"--data.init_args.path={runs}/fold{fold}/embeddings.h5",
        f"--data.init_args.splits={splits}",
        f"--data.init_args.fold={fold}",
        f"--model.init_args.variant={variant}",
        f"--trainer.default_root_dir={tmp}/fold{fold}",
        "--trainer.enable_progress_bar=false",
        "--trainer.logger=false",
        f"--ckpt_out={ckpt}",
        *extra,
    ]
    fit.main(args)
    return ckpt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--variant", default="stact")
    p.add_argument("--conf", default="conf/demo/head.yaml")
    p.add_argument("--splits", default="data/synth/stanford/splits.json")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    a = p.parse_args(argv[:cut])
    a.overrides = argv[cut + 1 :]
    torch.set_num_threads(1)
    k = load_splits(a.splits)["k"]
    parts: dict[str, list[pd.DataFrame]] = {"val": [], "test": []}
    per_fold, cpu = [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for fold in range(k):
            t0 = time.process_time()
            ckpt = fit_fold(a.conf, a.runs, a.splits, fold, a.variant, a.overrides, Path(tmp))
            cpu += time.process_time() - t0
            model = load_head(ckpt)
            split = load_fold(a.splits, fold)
            emb = a.runs / f"fold{fold}" / "embeddings.h5"
            for part in parts:
                pred = predict_head(model, EmbeddingDataset(emb, split[part])).assign(fold=fold)
                parts[part].append(pred)
            t = parts["test"][-1]
            per_fold.append(round(float(roc_auc_score(t["label"], t["prob"])), 3))
    row = {"variant": a.variant, "overrides": a.overrides, "cpu_s": round(cpu, 1), "test_folds": per_fold}
    for part, dfs in parts.items():
        d = pd.concat(dfs)
        row[f"{part}_pooled"] = round(float(roc_auc_score(d["label"], d["prob"])), 4)
        row[f"{part}_brier"] = round(float(np.mean((d["prob"] - d["label"]) ** 2)), 4)
    print(json.dumps(row))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with a.out.open("a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
