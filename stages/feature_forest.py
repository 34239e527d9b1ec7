"""``usnodule feature-forest``: CSASN's non-deep baseline -- a multi-class random forest over the subtypes on
hand-crafted features of each still: the shape features of the nodule mask (the two-stage shape forest's) and
the intensity and texture of the pixels inside it (mean, std, percentiles, contrast to the surrounding ring and
of the inner rim, GLCM contrast / homogeneity / energy / correlation / dissimilarity); definitions in
:mod:`datamodules.still_features`.

Per fold k of ``--splits`` the forest is fitted on fold k's training cases only (features and subtypes; the
validation and test cases are scored, never fitted) and writes ``<runs>/fold<k>/predictions_<method>.csv`` and
``val_predictions_<method>.csv`` in the CSASN stage's format: ``annot_id, subtype, pred_subtype,
p_<subtype>..., label, prob`` with ``prob = 1 - P(benign subtypes)``, so ``usnodule report-multiclass`` (subtypes)
and ``usnodule report`` (malignancy) put it beside CSASN (``make csasn`` does).

Choices (no paper defines this baseline): the drawn masks by default (``--source annotated``: CSASN's demo and
paper-size configs crop around the drawn mask too, so both see the same nodule outline; ``--source predicted``
reads a segmentation's masks, e.g. the two-stage's ``still_masks.h5`` of each fold), 500 trees, training-median
imputation of undefined features, and ``class_weight: balanced`` (each subtype weighted by the inverse of its
training frequency; FTC and MTC are 5% each, and an unweighted forest almost never predicts them:
``--class-weight none``), the analogue of CSASN's class weighting.  A subtype absent from a fold's training part
gets probability 0 there.  Features are computed once per image (they do not depend on the fold for drawn
masks).  Prints ``RESULT files=N``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from stages.options import count, fold_pattern, positive_int, seed

METHOD = "feature_forest"


def subtype_forest(
    x_train: np.ndarray,
    y_train: Sequence[int],
    x_eval: np.ndarray,
    n_classes: int,
    *,
    seed: int = 0,
    n_estimators: int = 500,
    class_weight: str | None = "balanced",
) -> np.ndarray:
    """``(len(x_eval), n_classes)`` class probabilities from a forest fitted on ``x_train`` / ``y_train``
    (class indices) only; NaNs imputed with the training median; classes absent from training get 0."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.impute import SimpleImputer

    imputer = SimpleImputer(strategy="median", keep_empty_features=True).fit(x_train)
    forest = RandomForestClassifier(
        n_estimators=n_estimators, random_state=seed, n_jobs=1, class_weight=class_weight
    )
    forest.fit(imputer.transform(x_train), np.asarray(y_train, int))
    out = np.zeros((len(x_eval), n_classes))
    out[:, forest.classes_.astype(int)] = forest.predict_proba(imputer.transform(x_eval))
    return out


def run_feature_forest(
    *,
    manifest: str | os.PathLike,
    splits: str | os.PathLike,
    runs: str | os.PathLike,
    subtypes: Sequence[str] = ("benign", "PTC", "FTC", "MTC"),
    benign_subtypes: Sequence[str] = ("benign",),
    source: str = "annotated",
    masks: str = "{runs}/fold{fold}/still_masks.h5",
    folds: Sequence[int] | None = None,
    seed: int = 0,
    n_estimators: int = 500,
    class_weight: str | None = "balanced",
    method: str = METHOD,
    log=print,
) -> list[Path]:
    """Write ``predictions_<method>.csv`` and ``val_predictions_<method>.csv`` of every fold; returns them."""
    from datamodules.atomic import write_predictions
    from datamodules.errors import DataError
    from datamodules.folds import load_fold, load_splits
    from datamodules.still_data import PredictedStillMasks, subtype_indices
    from datamodules.still_features import feature_matrix
    from datamodules.still_masks import check_still_masks
    from datamodules.stills import read_manifest, read_still, read_still_mask

    if source not in ("predicted", "annotated"):
        raise ValueError(f"source must be 'predicted' or 'annotated', got {source!r}")
    subtypes, runs = list(subtypes), Path(runs)
    cases = read_manifest(manifest)
    try:
        found = subtype_indices(cases, subtypes, benign_subtypes, manifest)
    except ValueError as e:  # a bad --subtypes / --benign-subtypes list
        raise DataError(None, str(e)) from None
    index = dict(zip((c.case_id for c in cases), found, strict=True))
    by_id = {c.case_id: c for c in cases}
    benign = [subtypes.index(s) for s in benign_subtypes]
    folds = list(range(load_splits(splits)["k"])) if folds is None else list(folds)
    parts = {k: load_fold(splits, k) for k in folds}
    images: dict[str, np.ndarray] = {}
    cached: dict[str, np.ndarray] = {}  # drawn-mask features, computed once per image

    def image(i: str) -> np.ndarray:
        if i not in images:
            images[i] = read_still(by_id[i].image)
        return images[i]

    if source == "annotated":
        used = sorted({i for part in parts.values() for ids in part.values() for i in ids})
        missing = [i for i in used if by_id[i].mask is None]
        if missing:
            raise DataError(manifest, f"{len(missing)} case(s) have no drawn mask, e.g. {missing[:3]}")
        x = feature_matrix([read_still_mask(by_id[i].mask) for i in used], [image(i) for i in used])
        cached = dict(zip(used, x, strict=True))
    written = []
    for k in folds:
        part = parts[k]
        if source == "predicted":
            path = Path(masks.format(runs=runs, fold=k))
            check_still_masks(path, fold=k, manifest=manifest, splits=splits)
            pred = PredictedStillMasks(path)
            ids = [i for p in ("train", "test", "val") for i in part[p]]
            pred.check(ids)
            x = feature_matrix([pred.mask(i, image(i).shape) for i in ids], [image(i) for i in ids])
            feats = dict(zip(ids, x, strict=True))
        else:
            feats = cached
        ids_eval = part["test"] + part["val"]
        prob = subtype_forest(
            np.array([feats[i] for i in part["train"]]),
            [index[i] for i in part["train"]],
            np.array([feats[i] for i in ids_eval]),
            len(subtypes),
            seed=seed,
            n_estimators=n_estimators,
            class_weight=class_weight,
        )
        out = runs / f"fold{k}"
        n_test = len(part["test"])
        for prefix, ids, p in (
            ("predictions_", part["test"], prob[:n_test]),
            ("val_predictions_", part["val"], prob[n_test:]),
        ):
            extra = {
                "subtype": [subtypes[index[i]] for i in ids],
                "pred_subtype": [subtypes[j] for j in p.argmax(axis=1)] if len(p) else [],
                **{f"p_{s}": p[:, j] for j, s in enumerate(subtypes)},
            }
            malignant = 1.0 - p[:, benign].sum(axis=1)
            written.append(
                write_predictions(
                    out / f"{prefix}{method}.csv", ids, [by_id[i].label for i in ids], malignant, **extra
                )
            )
        log(f"fold {k}: wrote {out}/predictions_{method}.csv ({n_test} test cases)")
    return written


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "feature-forest",
        help="multi-class random forest on shape + intensity/texture features (CSASN baseline), per fold",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--manifest", type=Path, required=True, help="still-image manifest.csv with a subtype column"
    )
    p.add_argument(
        "--splits", type=Path, required=True, help="splits.json of the manifest (e.g. splits_subtype.json)"
    )
    p.add_argument(
        "--runs", type=Path, required=True, help="experiment folder holding fold<k>/ (e.g. runs/demo/csasn)"
    )
    p.add_argument(
        "--subtypes", default="benign,PTC,FTC,MTC", help="the class list, comma-separated (CSASN's)"
    )
    p.add_argument(
        "--benign-subtypes", default="benign", help="the benign names of --subtypes, comma-separated"
    )
    p.add_argument(
        "--source",
        choices=("annotated", "predicted"),
        default="annotated",
        help="which masks feed the features",
    )
    p.add_argument(
        "--masks",
        type=fold_pattern,
        default="{runs}/fold{fold}/still_masks.h5",
        help="with --source predicted: mask file pattern (default {runs}/fold{fold}/still_masks.h5)",
    )
    p.add_argument("--folds", type=count, nargs="*", default=None, help="folds to run (default: all)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--n-estimators", type=positive_int, default=500)
    p.add_argument("--class-weight", choices=("balanced", "none"), default="balanced")
    p.add_argument("--method", default=METHOD, help=f"method name in the file names (default {METHOD})")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    written = run_feature_forest(
        manifest=args.manifest,
        splits=args.splits,
        runs=args.runs,
        subtypes=[s for s in args.subtypes.split(",") if s],
        benign_subtypes=[s for s in args.benign_subtypes.split(",") if s],
        source=args.source,
        masks=args.masks,
        folds=args.folds,
        seed=args.seed,
        n_estimators=args.n_estimators,
        class_weight=None if args.class_weight == "none" else args.class_weight,
        method=args.method,
    )
    print(f"RESULT files={len(written)}")
