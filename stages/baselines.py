"""``usnodule baselines``: the comparison methods of STACT-Time Table 2, per fold, as prediction CSVs.

* ``tirads`` -- TI-RADS random forest: the five ACR descriptors (composition, echogenicity, shape, margin,
  echogenic foci) + the TI-RADS level -> histopathology (scikit-learn ``RandomForestClassifier``). Fitted per
  fold on the fold's *training* nodules only; blanks are imputed with the training median.
* ``avepool`` -- CineCNN-AvePool: a nodule's probability is the mean of its stage-1 (ViT) stack probabilities,
  read from the fold's ``embeddings.h5`` (``image_prob``). The same file gives the stack-level rows of Table 3
  (``stack_predictions_vit.csv`` from the ViT, ``stack_predictions_seg.csv`` from the mask CNN).
* ``cinetrans`` -- CineCNN-Trans (Yamashita et al. 2022): a 2-layer transformer encoder over the stack features
  (``HeadStage(variant="cine_trans")`` on the image embeddings), trained on the fold's training nodules, last
  epoch kept (no model selection on the test fold).
* ``--head NAME=PATTERN`` -- predictions of trained ``HeadStage`` checkpoints (e.g. STACT-Time and the Table 4
  variants), PATTERN holding ``{fold}``.

Each writes ``<runs>/fold<k>/predictions_<method>.csv`` (``annot_id,label,prob``) for the fold's test nodules;
``usnodule report`` reads them.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
from sklearn.ensemble import RandomForestClassifier
from sklearn.impute import SimpleImputer

from datamodules.atomic import write_predictions
from datamodules.embeddings import EmbeddingDataset, pad_collate, read_index
from datamodules.errors import DataError
from datamodules.folds import load_fold, load_splits
from datamodules.stanford import TIRADS_FEATURES, StanfordCine

METHOD_FILES = {"tirads": "tirads", "avepool": "cinecnn_avepool", "cinetrans": "cinecnn_trans"}
FEATURES = (*TIRADS_FEATURES, "level")


# ---------------------------------------------------------------------------------------------- outputs
def fold_dir(runs: Path, fold: int) -> Path:
    return runs / f"fold{fold}"


# ---------------------------------------------------------------------------------------------- TI-RADS RF
def tirads_features(cine: StanfordCine, ids: Sequence[str]) -> np.ndarray:
    """(n, 6) ACR points of the five descriptors + the level (1..5); NaN where the metadata is blank."""
    rows = []
    for i in ids:
        n = cine.by_id[i]
        rows.append([n.tirads[f] for f in TIRADS_FEATURES] + [n.tirads_level])
    return np.asarray(rows, dtype=float)


def tirads_forest(cine: StanfordCine, train_ids: Sequence[str], test_ids: Sequence[str], *, seed: int = 0,
                  n_estimators: int = 500) -> np.ndarray:
    """Malignant probability of ``test_ids`` from a random forest fitted on ``train_ids`` only."""
    x_train, x_test = tirads_features(cine, train_ids), tirads_features(cine, test_ids)
    y_train = np.array([cine.by_id[i].label for i in train_ids])
    # Median of the training nodules only; a column blank everywhere in training becomes 0 (kept, not dropped).
    imputer = SimpleImputer(strategy="median", keep_empty_features=True).fit(x_train)
    forest = RandomForestClassifier(n_estimators=n_estimators, random_state=seed, n_jobs=1)
    forest.fit(imputer.transform(x_train), y_train)
    proba = forest.predict_proba(imputer.transform(x_test))
    classes = list(forest.classes_)
    return proba[:, classes.index(1)] if 1 in classes else np.zeros(len(test_ids))


# ---------------------------------------------------------------------------------------------- from embeddings
def stack_probabilities(path: str | os.PathLike, ids: Sequence[str], key: str) -> pd.DataFrame:
    """Per-stack probabilities ``key`` (``image_prob`` / ``seg_prob``) of ``ids``: annot_id, stack, label, prob."""
    index = read_index(path)
    missing = [i for i in ids if i not in index]
    if missing:
        raise DataError(path, f"{len(missing)} nodule(s) have no embeddings, e.g. {missing[:3]}")
    parts = []
    with h5py.File(path, "r") as f:
        for i in ids:
            g = f[index[i]["group"]]
            if key not in g:
                raise DataError(path, f"nodule {i!r} has no '{key}' (re-export with `usnodule embeddings`)")
            p = g[key][()]
            parts.append(pd.DataFrame({"annot_id": i, "stack": np.arange(len(p)), "label": index[i]["label"],
                                       "prob": p.astype(float)}))
    return pd.concat(parts, ignore_index=True)


def average_pool(stacks: pd.DataFrame) -> pd.DataFrame:
    """CineCNN-AvePool: nodule probability = mean of its stack probabilities."""
    return stacks.groupby("annot_id", sort=True).agg(label=("label", "first"), prob=("prob", "mean")).reset_index()


def train_cine_transformer(path: str | os.PathLike, split: dict[str, list[str]], *, epochs: int = 50,
                           lr: float = 1e-4, batch_size: int = 16, seed: int = 0, accelerator: str = "cpu",
                           **head_kwargs) -> pd.DataFrame:
    """Fit CineCNN-Trans on the fold's training embeddings (AdamW + cosine, focal loss); predict its test ones."""
    import lightning.pytorch as L
    from torch.utils.data import DataLoader

    from lightning_modules.head_stage import HeadStage

    class _CineTrans(HeadStage):
        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=lr)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)}

    L.seed_everything(seed, workers=True, verbose=False)
    index = read_index(path)
    model = _CineTrans(variant="cine_trans", dim=next(iter(index.values()))["D"], **head_kwargs)
    train = DataLoader(EmbeddingDataset(path, split["train"], index=index), batch_size=batch_size, shuffle=True,
                       collate_fn=pad_collate)
    test_ds = EmbeddingDataset(path, split["test"], index=index)
    trainer = L.Trainer(max_epochs=epochs, accelerator=accelerator, devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        deterministic=True)
    trainer.fit(model, train_dataloaders=train)
    return predict_head(model, test_ds)


@torch.inference_mode()
def predict_head(model, dataset: EmbeddingDataset, batch_size: int = 32) -> pd.DataFrame:
    """Nodule probabilities of a HeadStage on an :class:`EmbeddingDataset` (annot_id, label, prob)."""
    from torch.utils.data import DataLoader

    model.eval()
    probs = []
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=pad_collate):
        batch = {k: v.to(model.device) for k, v in batch.items()}
        probs.append(model.malignant_prob(model.logits(batch)).cpu())
    p = torch.cat(probs).numpy() if probs else np.zeros(0)
    return pd.DataFrame({"annot_id": dataset.nodule_ids, "label": dataset.labels, "prob": p})


def load_head(path: str | os.PathLike):
    from lightning_modules.head_stage import HeadStage

    return HeadStage.from_checkpoint(path)[0]


# ---------------------------------------------------------------------------------------------- stage
def run_baselines(*, cine: str | os.PathLike | None, splits: str | os.PathLike, runs: str | os.PathLike,
                  methods: Sequence[str] = ("tirads", "avepool", "cinetrans"), folds: Sequence[int] | None = None,
                  embeddings: str = "{runs}/fold{fold}/embeddings.h5", heads: dict[str, str] | None = None,
                  seed: int = 0, n_estimators: int = 500, trans_epochs: int = 50, trans_lr: float = 1e-4,
                  metadata: str | os.PathLike | None = None, log=print) -> list[Path]:
    """Write every requested method's predictions for every fold; returns the files written."""
    runs = Path(runs)
    unknown = [m for m in methods if m not in METHOD_FILES]
    if unknown:
        raise DataError(None, f"unknown baseline(s) {unknown}; choose from {sorted(METHOD_FILES)}")
    doc = load_splits(splits)
    folds = list(range(doc["k"])) if folds is None else list(folds)
    data = None
    if "tirads" in methods:
        if cine is None:
            raise DataError(None, "the TI-RADS baseline needs --cine (its metadata.csv holds the descriptors)")
        data = StanfordCine(cine, metadata, require_mask=False)
    written = []
    for k in folds:
        split = load_fold(splits, k)
        out = fold_dir(runs, k)
        emb = Path(embeddings.format(runs=runs, fold=k))
        if "tirads" in methods:
            p = tirads_forest(data, split["train"], split["test"], seed=seed, n_estimators=n_estimators)
            labels = [data.by_id[i].label for i in split["test"]]
            written.append(write_predictions(out / "predictions_tirads.csv", split["test"], labels, p))
        if "avepool" in methods:
            for key, name in (("image_prob", "vit"), ("seg_prob", "seg")):
                stacks = stack_probabilities(emb, split["test"], key)
                written.append(write_predictions(out / f"stack_predictions_{name}.csv", stacks["annot_id"],
                                                 stacks["label"], stacks["prob"], stack=stacks["stack"]))
                if name == "vit":
                    nod = average_pool(stacks)
                    written.append(write_predictions(out / "predictions_cinecnn_avepool.csv", nod["annot_id"],
                                                     nod["label"], nod["prob"]))
        if "cinetrans" in methods:
            pred = train_cine_transformer(emb, split, epochs=trans_epochs, lr=trans_lr, seed=seed + k)
            written.append(write_predictions(out / "predictions_cinecnn_trans.csv", pred["annot_id"], pred["label"],
                                             pred["prob"]))
        for name, pattern in (heads or {}).items():
            model = load_head(pattern.format(runs=runs, fold=k))
            pred = predict_head(model, EmbeddingDataset(emb, split["test"]))
            written.append(write_predictions(out / f"predictions_{name}.csv", pred["annot_id"], pred["label"],
                                             pred["prob"]))
        log(f"fold {k}: wrote {', '.join(p.name for p in written if p.parent == out)}")
    return written


def _head_arg(text: str) -> tuple[str, str]:
    name, sep, pattern = text.partition("=")
    if not sep or not name or not pattern:
        raise argparse.ArgumentTypeError(f"expected NAME=PATTERN, got {text!r}")
    return name, pattern


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("baselines", help="TI-RADS forest, CineCNN-AvePool/-Trans (and head) predictions per fold",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cine", type=Path, default=None, help="Stanford dataset.hdf5 (metadata.csv beside it)")
    p.add_argument("--metadata", type=Path, default=None, help="metadata CSV (default: beside the HDF5)")
    p.add_argument("--splits", type=Path, required=True, help="splits.json")
    p.add_argument("--runs", type=Path, required=True, help="experiment folder holding fold<k>/ (e.g. runs/demo)")
    p.add_argument("--methods", default="tirads,avepool,cinetrans",
                   help="comma list of tirads, avepool, cinetrans (default: all); empty for none")
    p.add_argument("--folds", type=int, nargs="*", default=None, help="folds to run (default: all in splits)")
    p.add_argument("--embeddings", default="{runs}/fold{fold}/embeddings.h5",
                   help="embeddings file pattern (default: {runs}/fold{fold}/embeddings.h5)")
    p.add_argument("--head", type=_head_arg, action="append", default=[], metavar="NAME=PATTERN",
                   help="HeadStage checkpoint pattern, e.g. stact={runs}/fold{fold}/head/last.ckpt "
                        "(writes predictions_NAME.csv; repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-estimators", type=int, default=500, help="random forest trees")
    p.add_argument("--trans-epochs", type=int, default=50, help="CineCNN-Trans training epochs")
    p.add_argument("--trans-lr", type=float, default=1e-4, help="CineCNN-Trans AdamW learning rate")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    written = run_baselines(cine=args.cine, splits=args.splits, runs=args.runs, methods=methods,
                            folds=args.folds, embeddings=args.embeddings, heads=dict(args.head), seed=args.seed,
                            n_estimators=args.n_estimators, trans_epochs=args.trans_epochs,
                            trans_lr=args.trans_lr, metadata=args.metadata)
    names = {p.name for p in written if p.name.startswith("predictions_")}
    folds = {p.parent for p in written}
    print(f"RESULT methods={len(names)} folds={len(folds)}")  # the key numbers for `python -m stages.step`
