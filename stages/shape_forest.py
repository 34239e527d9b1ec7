"""``usnodule shape-forest``: the two-stage paper's baseline -- a random forest on hand-crafted morphological
features of the nodule mask (Abdelrazik et al. 2025: F1 0.829 vs the framework's 0.852), per fold.

Features (:func:`datamodules.still_features.shape_features`; scikit-image ``regionprops`` of the mask's largest connected component,
8-connectivity; pixels as the unit):

=====================  =====================================================================================
``area``               pixel count A
``area_frac``          A / image area (resolution-free size)
``perimeter``          P, ``regionprops.perimeter_crofton`` (Crofton estimate: within 1% of 2 pi r for a
                       digital disc, where the 4-connected ``perimeter`` is 3.6% over; nodules are rounded)
``circularity``        4 pi A / P^2 (1 for a disc, smaller for irregular or elongated outlines)
``compactness``        P^2 / A (= 4 pi / circularity; listed by the paper's feature family, kept for RF)
``aspect_ratio``       major / minor axis length of the ellipse with the same second moments (>= 1)
``taller_than_wide``   bounding-box height / width (depth over width: > 1 is the TI-RADS "taller-than-wide")
``solidity``           A / convex-hull area
``convexity``          convex-hull perimeter / P (1 for convex outlines, smaller for lobulated margins)
``eccentricity``       of that ellipse (0 disc, -> 1 elongated)
``extent``             A / bounding-box area
``equivalent_diameter``  diameter of the disc of area A
``n_components``       connected components in the mask (a fragmented prediction is informative too)
``empty``              1 when the mask is empty (then every other feature is NaN, imputed below)
=====================  =====================================================================================

The paper lists the feature family but not the exact set, the forest's settings or which masks feed it:
the set above, 500 trees, training-median imputation (as the TI-RADS forest of ``usnodule baselines``) and
*predicted* masks by default (``--source predicted``: the fold's ``still_masks.h5``, the deployable protocol,
the same masks stage 2 crops with) are ours; ``--source annotated`` uses the drawn masks instead.

Per fold k the forest is fitted on fold k's training cases only and scores its validation and test cases:
``<runs>/fold<k>/predictions_shape_forest.csv`` and ``val_predictions_shape_forest.csv`` (``annot_id,label,
prob``; the ids are case ids), which ``usnodule report`` reads.  A mask file of another fold, manifest or
splits file is a one-line error (:func:`~datamodules.still_masks.check_still_masks`).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# The features live in datamodules/still_features.py (shared with CSASN's feature forest); named here too.
from datamodules.still_features import FEATURES, feature_matrix, shape_features  # noqa: F401

METHOD = "shape_forest"


def shape_forest(
    x_train: np.ndarray,
    y_train: Sequence[int],
    x_eval: np.ndarray,
    *,
    seed: int = 0,
    n_estimators: int = 500,
) -> np.ndarray:
    """Malignant probability of the rows of ``x_eval`` from a forest fitted on ``x_train`` only (NaNs imputed
    with the training median; a column blank in all of training becomes 0)."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.impute import SimpleImputer

    imputer = SimpleImputer(strategy="median", keep_empty_features=True).fit(x_train)
    forest = RandomForestClassifier(n_estimators=n_estimators, random_state=seed, n_jobs=1)
    forest.fit(imputer.transform(x_train), np.asarray(y_train, int))
    proba = forest.predict_proba(imputer.transform(x_eval))
    classes = list(forest.classes_)
    return proba[:, classes.index(1)] if 1 in classes else np.zeros(len(x_eval))


def run_shape_forest(
    *,
    manifest: str | os.PathLike,
    splits: str | os.PathLike,
    runs: str | os.PathLike,
    masks: str = "{runs}/fold{fold}/still_masks.h5",
    source: str = "predicted",
    folds: Sequence[int] | None = None,
    seed: int = 0,
    n_estimators: int = 500,
    method: str = METHOD,
    log=print,
) -> list[Path]:
    """Write ``predictions_<method>.csv`` and ``val_predictions_<method>.csv`` of every fold; returns them."""
    from datamodules.atomic import write_predictions
    from datamodules.errors import DataError
    from datamodules.folds import load_fold, load_splits
    from datamodules.still_data import PredictedStillMasks
    from datamodules.still_masks import check_still_masks
    from datamodules.stills import read_manifest, read_still_mask, still_size

    if source not in ("predicted", "annotated"):
        raise ValueError(f"source must be 'predicted' or 'annotated', got {source!r}")
    runs = Path(runs)
    cases = {c.case_id: c for c in read_manifest(manifest)}
    folds = list(range(load_splits(splits)["k"])) if folds is None else list(folds)
    written = []
    for k in folds:
        part = load_fold(splits, k)
        if source == "predicted":
            path = Path(masks.format(runs=runs, fold=k))
            check_still_masks(path, fold=k, manifest=manifest, splits=splits)
            pred = PredictedStillMasks(path)

            def read(i: str, pred=pred) -> np.ndarray:
                return pred.mask(i, still_size(cases[i].image))
        else:
            missing = [i for ids in part.values() for i in ids if cases[i].mask is None]
            if missing:
                raise DataError(manifest, f"{len(missing)} case(s) have no drawn mask, e.g. {missing[:3]}")

            def read(i: str) -> np.ndarray:
                return read_still_mask(cases[i].mask)

        x = {name: feature_matrix([read(i) for i in ids]) for name, ids in part.items()}
        y = {name: [cases[i].label for i in ids] for name, ids in part.items()}
        ids_eval = part["test"] + part["val"]
        p = shape_forest(
            x["train"],
            y["train"],
            np.concatenate([x["test"], x["val"]]),
            seed=seed,
            n_estimators=n_estimators,
        )
        n_test = len(part["test"])
        out = runs / f"fold{k}"
        for prefix, ids, pp in (
            ("predictions_", part["test"], p[:n_test]),
            ("val_predictions_", part["val"], p[n_test:]),
        ):
            written.append(
                write_predictions(out / f"{prefix}{method}.csv", ids, [cases[i].label for i in ids], pp)
            )
        assert len(ids_eval) == len(p)
        log(f"fold {k}: wrote {out}/predictions_{method}.csv ({n_test} test cases)")
    return written


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "shape-forest",
        help="random forest on mask shape features (two-stage baseline), per fold -> prediction CSVs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--manifest", type=Path, required=True, help="still-image manifest.csv")
    p.add_argument("--splits", type=Path, required=True, help="splits.json of the manifest")
    p.add_argument("--runs", type=Path, required=True, help="experiment folder holding fold<k>/")
    p.add_argument(
        "--masks",
        default="{runs}/fold{fold}/still_masks.h5",
        help="predicted-mask file pattern (default: {runs}/fold{fold}/still_masks.h5)",
    )
    p.add_argument(
        "--source",
        choices=("predicted", "annotated"),
        default="predicted",
        help="which masks feed the features",
    )
    p.add_argument("--folds", type=int, nargs="*", default=None, help="folds to run (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-estimators", type=int, default=500)
    p.add_argument("--method", default=METHOD, help=f"method name in the file names (default {METHOD})")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    written = run_shape_forest(
        manifest=args.manifest,
        splits=args.splits,
        runs=args.runs,
        masks=args.masks,
        source=args.source,
        folds=args.folds,
        seed=args.seed,
        n_estimators=args.n_estimators,
        method=args.method,
    )
    print(f"RESULT files={len(written)}")
