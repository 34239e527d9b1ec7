"""``usnodule baselines``: the comparison methods of STACT-Time Table 2, per fold, as prediction CSVs.

* ``tirads`` -- TI-RADS random forest: the five ACR descriptors (composition, echogenicity, shape, margin,
  echogenic foci) + the TI-RADS level -> histopathology (scikit-learn ``RandomForestClassifier``). Fitted per
  fold on the fold's *training* nodules only; blanks are imputed with the training median.
* ``avepool`` -- CineCNN-AvePool: a nodule's probability is the mean of its stage-1 (ViT) stack probabilities,
  read from the fold's ``embeddings.h5`` (``image_prob``; with cross-fitted embeddings, each stack's mean over the
  two halves' ViTs). The same file gives the stack-level rows of Table 3
  (``stack_predictions_vit.csv`` from the ViT, ``stack_predictions_seg.csv`` from the mask CNN).
* ``cinetrans`` -- CineCNN-Trans (Yamashita et al. 2022): a 2-layer transformer encoder over the stack features
  (``HeadStage(variant="cine_trans")`` on the image embeddings).  Fitted per fold by ``lightning fit -c
  conf/cinetrans.yaml`` (``make cinetrans``) on the fold's training nodules, last epoch kept; this command
  only predicts with the checkpoint ``--cinetrans PATTERN`` (default ``{runs}/fold{fold}/head_cine_trans.ckpt``).
* ``--head NAME=PATTERN`` -- predictions of trained ``HeadStage`` checkpoints (e.g. STACT-Time and the Table 4
  variants), PATTERN holding ``{fold}``; a nodule with two views (cross-fitted embeddings) gets the mean of the
  head's two probabilities.

Each writes ``<runs>/fold<k>/predictions_<method>.csv`` (``annot_id,label,prob``) for the fold's test nodules
and ``val_predictions_<method>.csv`` for its validation nodules; ``usnodule report`` reads them.

Calibration (``--calibrate``, on by default): the three baselines' probabilities are Platt-scaled on the fold's
validation nodules (:mod:`lightning_modules.calibration`, fitted on ``val_predictions``, applied to both files),
as the attention heads scale theirs inside the checkpoint (``HeadStage(calibrate=True)``), so that every
method's pooled AUROC, thresholds and Brier score compare calibrated scores; ``--head`` checkpoints are
written as they predict. Per-fold AUROCs are unchanged (the scaling is increasing).  Nothing here trains a network: a head checkpoint that is missing, or that was
fitted on another fold, splits file or embeddings file than the one predicted, is a one-line error.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
from sklearn.ensemble import RandomForestClassifier
from sklearn.impute import SimpleImputer

from datamodules.atomic import write_predictions
from datamodules.embeddings import EmbeddingDataset, pad_collate, read_index, view_key
from datamodules.errors import DataError
from datamodules.files import same_file
from datamodules.folds import load_fold, load_splits
from datamodules.provenance import check_file
from datamodules.stanford import TIRADS_FEATURES, StanfordCine
from lightning_modules.calibration import apply_platt, fit_platt, prob_to_margin
from stages.options import check_pattern, count, fold_pattern, positive_int, seed

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


def tirads_forest(
    cine: StanfordCine,
    train_ids: Sequence[str],
    test_ids: Sequence[str],
    *,
    seed: int = 0,
    n_estimators: int = 500,
) -> np.ndarray:
    """Malignant probability of ``test_ids`` from a random forest fitted on ``train_ids`` only."""
    x_train, x_test = tirads_features(cine, train_ids), tirads_features(cine, test_ids)
    y_train = np.array([cine.by_id[i].label for i in train_ids])
    # Median of the training nodules only; a column blank everywhere in training becomes 0 (kept, not dropped),
    # which the user is told: a metadata.csv without a TI-RADS column would otherwise look like a weak forest.
    blank = [name for name, col in zip(FEATURES, x_train.T, strict=True) if np.isnan(col).all()]
    if blank:
        names = ", ".join(f"ti-rads_{b}" for b in blank)
        print(
            f"warning: TI-RADS forest: {names} blank for every training nodule: the forest sees 0",
            file=sys.stderr,
        )
    imputer = SimpleImputer(strategy="median", keep_empty_features=True).fit(x_train)
    forest = RandomForestClassifier(n_estimators=n_estimators, random_state=seed, n_jobs=1)
    forest.fit(imputer.transform(x_train), y_train)
    proba = forest.predict_proba(imputer.transform(x_test))
    classes = list(forest.classes_)
    return proba[:, classes.index(1)] if 1 in classes else np.zeros(len(test_ids))


# ---------------------------------------------------------------------------------------------- from embeddings
def stack_probabilities(path: str | os.PathLike, ids: Sequence[str], key: str) -> pd.DataFrame:
    """Per-stack probabilities ``key`` (``image_prob`` / ``seg_prob``) of ``ids``: annot_id, stack, label, prob.

    A nodule embedded by two encoders (cross-fitted files) gets the mean of their probabilities per stack."""
    index = read_index(path)
    missing = [i for i in ids if i not in index]
    if missing:
        raise DataError(path, f"{len(missing)} nodule(s) have no embeddings, e.g. {missing[:3]}")
    parts = []
    with h5py.File(path, "r") as f:
        for i in ids:
            g = f[index[i]["group"]]
            views = [view_key(key, j) for j in range(index[i].get("views", 1))]
            if any(v not in g for v in views):
                raise DataError(path, f"nodule {i!r} has no '{key}' (re-export with `usnodule embeddings`)")
            p = np.mean([g[v][()] for v in views], axis=0)
            parts.append(
                pd.DataFrame(
                    {
                        "annot_id": i,
                        "stack": np.arange(len(p)),
                        "label": index[i]["label"],
                        "prob": p.astype(float),
                    }
                )
            )
    return pd.concat(parts, ignore_index=True)


def average_pool(stacks: pd.DataFrame) -> pd.DataFrame:
    """CineCNN-AvePool: nodule probability = mean of its stack probabilities."""
    return (
        stacks.groupby("annot_id", sort=True)
        .agg(label=("label", "first"), prob=("prob", "mean"))
        .reset_index()
    )


@torch.inference_mode()
def predict_head(model, dataset: EmbeddingDataset, batch_size: int = 32) -> pd.DataFrame:
    """Nodule probabilities of a HeadStage on an :class:`EmbeddingDataset` (annot_id, label, prob): the mean
    over a nodule's views (one view unless the embeddings are cross-fitted)."""
    from torch.utils.data import DataLoader

    model.eval()
    probs, nodules = [], []
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=pad_collate):
        batch = {k: v.to(model.device) for k, v in batch.items()}
        probs.append(model.malignant_prob(model.logits(batch)).cpu())
        nodules.append(batch["nodule"].cpu())
    p = torch.cat(probs).numpy() if probs else np.zeros(0)
    n = torch.cat(nodules).numpy() if nodules else np.zeros(0, int)
    mean = np.bincount(n, weights=p, minlength=len(dataset.nodule_ids)) / np.maximum(
        np.bincount(n, minlength=len(dataset.nodule_ids)), 1
    )
    return pd.DataFrame({"annot_id": dataset.nodule_ids, "label": dataset.labels, "prob": mean})


def load_head(
    path: str | os.PathLike,
    *,
    fold: int | None = None,
    embeddings: str | os.PathLike | None = None,
    splits: str | os.PathLike | None = None,
    variant: str | None = None,
):
    """A trained ``HeadStage``; with ``fold``/``embeddings``/``splits``/``variant`` given, the checkpoint must
    say it was fitted on exactly those (the datamodule init args ``lightning fit`` saves in it), so a head of
    another fold -- which saw this fold's test nodules in training -- never scores them."""
    from lightning_modules.head_stage import HeadStage

    model, data = HeadStage.from_checkpoint(path)
    if variant is not None and model.variant != variant:
        raise DataError(path, f"is a head_{model.variant} checkpoint, expected variant {variant!r}")
    if fold is None and embeddings is None and splits is None:
        return model
    if "fold" not in data:
        raise DataError(path, "records no training fold or data (a checkpoint of `lightning fit` does)")
    if fold is not None and data["fold"] != fold:
        raise DataError(path, f"was fitted on fold {data['fold']}, not fold {fold}")
    for key, want in (("path", embeddings), ("splits", splits)):
        if want is not None and data.get(key) and not same_file(data[key], want):
            raise DataError(path, f"was fitted on {data[key]}, not {want}")
    return model


# ---------------------------------------------------------------------------------------------- stage
def run_baselines(
    *,
    cine: str | os.PathLike | None,
    splits: str | os.PathLike,
    runs: str | os.PathLike,
    methods: Sequence[str] = ("tirads", "avepool", "cinetrans"),
    folds: Sequence[int] | None = None,
    embeddings: str = "{runs}/fold{fold}/embeddings.h5",
    heads: dict[str, str] | None = None,
    cinetrans: str = "{runs}/fold{fold}/head_cine_trans.ckpt",
    seed: int = 0,
    n_estimators: int = 500,
    metadata: str | os.PathLike | None = None,
    calibrate: bool = True,
    log=print,
) -> list[Path]:
    """Write every requested method's predictions for every fold; returns the files written.

    ``cinetrans`` and ``heads`` are checkpoint patterns (``{runs}``, ``{fold}``); they are only read."""
    runs = Path(runs)
    unknown = [m for m in methods if m not in METHOD_FILES]
    if unknown:
        raise DataError(None, f"unknown baseline(s) {unknown}; choose from {sorted(METHOD_FILES)}")
    doc = load_splits(splits)
    folds = list(range(doc["k"])) if folds is None else list(folds)
    data = None
    if "tirads" in methods:
        if cine is None:
            raise DataError(
                None, "the TI-RADS baseline needs --cine (its metadata.csv holds the descriptors)"
            )
        data = StanfordCine(cine, metadata, require_mask=False)
    if "cinetrans" in methods:  # before any fold's work: a missing fit is a one-line error, not a half run
        for k in folds:
            ckpt = Path(cinetrans.format(runs=runs, fold=k))
            if not ckpt.is_file():
                raise DataError(
                    ckpt,
                    "CineCNN-Trans checkpoint not found; `usnodule baselines` only predicts: "
                    "fit it first (`make cinetrans`, or `lightning fit -c conf/cinetrans.yaml`)",
                )
    written = []
    for k in folds:
        split = load_fold(splits, k)
        out = fold_dir(runs, k)
        emb = Path(embeddings.format(runs=runs, fold=k))
        if (
            "avepool" in methods or heads or "cinetrans" in methods
        ):  # fold k's scores from fold k's embeddings
            check_file(
                "embeddings", emb, fold=k, splits=splits, asked="`usnodule baselines` reads it for {fold}"
            )
        # Each method scores the fold's test nodules (predictions_*.csv) and its validation nodules
        # (val_predictions_*.csv): the report picks each fold's operating threshold on the latter, never on test.
        parts = {"predictions_": split["test"], "val_predictions_": split["val"]}
        if "tirads" in methods:
            ids = split["test"] + split["val"]
            p = tirads_forest(data, split["train"], ids, seed=seed, n_estimators=n_estimators)
            preds = {}
            for prefix, part in parts.items():
                pp = p[: len(split["test"])] if prefix == "predictions_" else p[len(split["test"]) :]
                labels = [data.by_id[i].label for i in part]
                preds[prefix] = pd.DataFrame({"annot_id": part, "label": labels, "prob": pp})
            written += write_parts(out, "tirads", preds, calibrate)
        if "avepool" in methods:
            for key, name in (("image_prob", "vit"), ("seg_prob", "seg")):
                stacks = stack_probabilities(emb, split["test"], key)
                written.append(
                    write_predictions(
                        out / f"stack_predictions_{name}.csv",
                        stacks["annot_id"],
                        stacks["label"],
                        stacks["prob"],
                        stack=stacks["stack"],
                    )
                )
                if name == "vit":
                    preds = {
                        prefix: average_pool(
                            stacks if prefix == "predictions_" else stack_probabilities(emb, part, key)
                        )
                        for prefix, part in parts.items()
                    }
                    written += write_parts(out, "cinecnn_avepool", preds, calibrate)
        todo = {name: (pattern, None) for name, pattern in (heads or {}).items()}
        if "cinetrans" in methods:
            todo = {"cinecnn_trans": (cinetrans, "cine_trans"), **todo}
        index = read_index(emb) if todo else None  # one read of the file's index for every head and part
        for name, (pattern, variant) in todo.items():
            model = load_head(
                pattern.format(runs=runs, fold=k), fold=k, embeddings=emb, splits=splits, variant=variant
            )
            preds = {
                prefix: predict_head(model, EmbeddingDataset(emb, part, index=index))
                for prefix, part in parts.items()
            }
            # a baseline is scaled here; a --head checkpoint scales itself (HeadStage calibrate)
            written += write_parts(out, name, preds, calibrate and variant is not None)
        log(f"fold {k}: wrote {', '.join(p.name for p in written if p.parent == out)}")
    return written


def write_parts(out: Path, name: str, preds: dict[str, pd.DataFrame], calibrate: bool) -> list[Path]:
    """Write ``{prefix}{name}.csv`` for each part (test, validation); with ``calibrate``, the probabilities of
    both are Platt-scaled on the validation part (``val_predictions_``) first."""
    if calibrate:
        val = preds["val_predictions_"]
        params = torch.tensor(
            fit_platt(
                prob_to_margin(torch.as_tensor(val["prob"].to_numpy())),
                torch.as_tensor(val["label"].to_numpy()),
            )
        )
        preds = {
            prefix: df.assign(
                prob=apply_platt(prob_to_margin(torch.as_tensor(df["prob"].to_numpy())), params).numpy()
            )
            for prefix, df in preds.items()
        }
    return [
        write_predictions(out / f"{prefix}{name}.csv", df["annot_id"], df["label"], df["prob"])
        for prefix, df in preds.items()
    ]


def _head_arg(text: str) -> tuple[str, str]:
    name, sep, pattern = text.partition("=")
    if not sep or not name or not pattern:
        raise argparse.ArgumentTypeError(f"expected NAME=PATTERN, got {text!r}")
    check_pattern(pattern)
    return name, pattern


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "baselines",
        help="TI-RADS forest, CineCNN-AvePool/-Trans (and head) predictions per fold",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--cine", type=Path, default=None, help="Stanford dataset.hdf5 (metadata.csv beside it)")
    p.add_argument("--metadata", type=Path, default=None, help="metadata CSV (default: beside the HDF5)")
    p.add_argument("--splits", type=Path, required=True, help="splits.json")
    p.add_argument(
        "--runs", type=Path, required=True, help="experiment folder holding fold<k>/ (e.g. runs/demo)"
    )
    p.add_argument(
        "--methods",
        default="tirads,avepool,cinetrans",
        help="comma list of tirads, avepool, cinetrans (default: all); empty for none",
    )
    p.add_argument(
        "--folds", type=count, nargs="*", default=None, help="folds to run (default: all in splits)"
    )
    p.add_argument(
        "--embeddings",
        type=fold_pattern,
        default="{runs}/fold{fold}/embeddings.h5",
        help="embeddings file pattern (default: {runs}/fold{fold}/embeddings.h5)",
    )
    p.add_argument(
        "--cinetrans",
        type=fold_pattern,
        default="{runs}/fold{fold}/head_cine_trans.ckpt",
        metavar="PATTERN",
        help="CineCNN-Trans checkpoint of each fold, fitted by `lightning fit -c conf/cinetrans.yaml` "
        "(default: {runs}/fold{fold}/head_cine_trans.ckpt)",
    )
    p.add_argument(
        "--head",
        type=_head_arg,
        action="append",
        default=[],
        metavar="NAME=PATTERN",
        help="HeadStage checkpoint pattern, e.g. stact={runs}/fold{fold}/head/last.ckpt "
        "(writes predictions_NAME.csv; repeatable)",
    )
    p.add_argument(
        "--calibrate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Platt-scale the baselines on each fold's validation nodules (default: on)",
    )
    p.add_argument("--seed", type=seed, default=0, help="random forest seed")
    p.add_argument("--n-estimators", type=positive_int, default=500, help="random forest trees")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    written = run_baselines(
        cine=args.cine,
        splits=args.splits,
        runs=args.runs,
        methods=methods,
        folds=args.folds,
        embeddings=args.embeddings,
        heads=dict(args.head),
        cinetrans=args.cinetrans,
        seed=args.seed,
        n_estimators=args.n_estimators,
        metadata=args.metadata,
        calibrate=args.calibrate,
    )
    names = {p.name for p in written if p.name.startswith("predictions_")}
    folds = {p.parent for p in written}
    print(f"RESULT methods={len(names)} folds={len(folds)}")  # the key numbers for `python -m stages.step`
