"""In-process K-fold harness over the real AsyCMST module and PairedVideoDataModule (issue 8, the AsyCMST recipe).

    python benchmarks/recipe_asycmst.py OUT --manifest M --splits S [--folds 0,1,2,3,4] [--conf YAML]
        [--method NAME] [section.name=VALUE ...]

Fits ``conf/demo/asycmst.yaml`` (or ``--conf``) on each fold in this one process, the way ``lightning fit -c``
does in ``make asycmst`` (same classes, same YAML arguments, ``test_after_fit``), without the CLI's start-up per
fold, and writes ``OUT/fold<k>/{predictions,val_predictions}_<method>.csv``: ``usnodule report --runs OUT`` reads
them (two methods in one OUT: the report's DeLong test pairs them).  Overrides are YAML values for the model,
data, trainer or optimizer arguments: ``model.strategy=none``, ``trainer.max_epochs=3``, ``optimizer.lr=0.002``.
Prints one line per fold (test and validation AUROC, CPU seconds) and the pooled figures, and writes them to
``OUT/recipe_<method>.json``.  Choosing between recipes: read the pooled *validation* AUROC; test is reported.
One torch thread (the demo runs one thread per fit).  Not a test: numbers go to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning.pytorch as L
import numpy as np
import pandas as pd
import torch
import yaml
from sklearn.metrics import roc_auc_score

from datamodules.paired_video import PairedVideoDataModule
from lightning_modules.asycmst import AsyCMST


def _overrides(pairs: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {"model": {}, "data": {}, "trainer": {}, "optimizer": {}}
    for pair in pairs:
        key, _, value = pair.partition("=")
        section, _, name = key.partition(".")
        if section not in out or not name or not _:
            raise SystemExit(
                f"error: override {pair!r} is not section.name=VALUE (model, data, trainer, optimizer)"
            )
        out[section][name] = yaml.safe_load(value)
    return out


def _auroc(df: pd.DataFrame) -> float:
    return float(roc_auc_score(df["label"], df["prob"])) if df["label"].nunique() == 2 else float("nan")


def fit_fold(
    conf: dict, over: dict[str, dict], manifest: Path, splits: Path, fold: int, out: Path, method: str
):
    torch.set_num_threads(1)
    L.seed_everything(conf.get("seed_everything", 0), verbose=False)
    data_args = {
        **conf["data"]["init_args"],
        **over["data"],
        "manifest": manifest,
        "splits": splits,
        "fold": fold,
    }
    model_args = {**conf["model"]["init_args"], **over["model"], "method": method, "predictions_dir": str(out),
                  "test_after_fit": True}  # fmt: skip
    dm = PairedVideoDataModule(**data_args)
    model = AsyCMST(**model_args)
    opt_args = {**conf["optimizer"]["init_args"], **over["optimizer"]}

    def configure_optimizers():  # what LightningCLI builds from the YAML (AdamW + per-step cosine)
        opt = torch.optim.AdamW(model.parameters(), **opt_args)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1)}

    model.configure_optimizers = configure_optimizers
    keep = ("max_epochs", "limit_val_batches", "precision", "num_sanity_val_steps")
    trainer_args = {k: v for k, v in conf["trainer"].items() if k in keep} | over["trainer"]
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
                        **trainer_args)  # fmt: skip
    trainer.fit(model, datamodule=dm)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--splits", type=Path, required=True)
    ap.add_argument("--folds", default="0,1,2,3,4", help="comma-separated fold numbers")
    ap.add_argument("--conf", type=Path, default=Path("conf/demo/asycmst.yaml"))
    ap.add_argument("--method", default="asycmst")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args(argv)
    conf = yaml.safe_load(args.conf.read_text())
    over = _overrides(args.overrides)
    rows, test, val = [], [], []
    for k in [int(f) for f in args.folds.split(",")]:
        d = args.out / f"fold{k}"
        d.mkdir(parents=True, exist_ok=True)
        t0 = time.process_time()
        fit_fold(conf, over, args.manifest, args.splits, k, d, args.method)
        cpu = time.process_time() - t0
        te = pd.read_csv(d / f"predictions_{args.method}.csv").assign(fold=k)
        va = pd.read_csv(d / f"val_predictions_{args.method}.csv").assign(fold=k)
        test.append(te)
        val.append(va)
        rows.append({"fold": k, "test_auroc": _auroc(te), "val_auroc": _auroc(va), "cpu_s": round(cpu, 1)})
        print(f"fold {k}: test AUROC {rows[-1]['test_auroc']:.3f}  val {rows[-1]['val_auroc']:.3f}  {cpu:.0f} CPU-s",
              flush=True)  # fmt: skip
    summary = {
        "method": args.method, "overrides": args.overrides, "folds": rows,
        "test_pooled": _auroc(pd.concat(test)), "val_pooled": _auroc(pd.concat(val)),
        "test_fold_mean": float(np.mean([r["test_auroc"] for r in rows])),
        "val_fold_mean": float(np.mean([r["val_auroc"] for r in rows])),
        "cpu_s": round(sum(r["cpu_s"] for r in rows), 1),
    }  # fmt: skip
    print(f"{args.method}: test pooled {summary['test_pooled']:.3f} (fold mean {summary['test_fold_mean']:.3f}), "
          f"val pooled {summary['val_pooled']:.3f} (fold mean {summary['val_fold_mean']:.3f}), {summary['cpu_s']:.0f} CPU-s")  # fmt: skip
    (args.out / f"recipe_{args.method}.json").write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
