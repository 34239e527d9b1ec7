"""Cross-validation folds grouped by patient (or nodule), stratified by label, written once to ``splits.json``.

For fold k: test = fold k, validation = fold (k + 1) mod K, training = the other K - 2 folds.  Every later
stage reads this file, so all stages of fold k agree on which nodules they may fit on.  Grouping uses
scikit-learn's ``StratifiedGroupKFold``: all nodules of a patient land in one fold, so no patient (and no
nodule) is ever on both sides of a split.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from datamodules.atomic import write_json
from datamodules.errors import DataError

PARTS = ("train", "val", "test")


def make_folds(
    ids: Sequence[str],
    labels: Sequence[int],
    groups: Sequence[str],
    *,
    k: int = 5,
    seed: int = 0,
    source: str | None = None,
) -> dict:
    """Assign ids to ``k`` label-stratified, group-disjoint folds; return the splits.json document."""
    ids = [str(i) for i in ids]
    labels = np.asarray(labels, dtype=int)
    groups = np.asarray([str(g) for g in groups])
    if k < 3:
        raise DataError(source, f"need at least 3 folds (test, validation, training), got {k}")
    if len(set(ids)) != len(ids):
        raise DataError(source, "ids are not unique")
    for cls, name in ((1, "malignant"), (0, "benign")):
        n_groups = len(set(groups[labels == cls]))
        if n_groups < k:
            raise DataError(
                source,
                f"only {n_groups} {name} patient group(s): every fold needs one, so this "
                f"data set supports at most {max(n_groups, 0)} folds, not {k}",
            )
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    fold_of = np.empty(len(ids), dtype=int)
    for f, (_, test_idx) in enumerate(splitter.split(np.zeros(len(ids)), labels, groups)):
        fold_of[test_idx] = f
    folds = []
    for f in range(k):
        val = (f + 1) % k
        part = {"test": fold_of == f, "val": fold_of == val, "train": (fold_of != f) & (fold_of != val)}
        folds.append({"fold": f, **{p: sorted(np.asarray(ids)[m].tolist()) for p, m in part.items()}})
    for fold in folds:
        if not labels[np.isin(ids, fold["test"])].any():
            raise DataError(
                source, f"fold {fold['fold']} got no malignant case; use fewer folds or another seed"
            )
    return {
        "k": k,
        "seed": seed,
        "source": source,
        "n": len(ids),
        "n_positive": int(labels.sum()),
        "folds": folds,
        "groups": dict(zip(ids, groups.tolist(), strict=True)),
    }


def write_splits(doc: dict, path: str | os.PathLike) -> Path:
    return write_json(doc, path)


def load_splits(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "splits file does not exist (run `usnodule split` first)")
    try:
        doc = json.loads(path.read_text())
        doc["folds"][0]["train"]  # noqa: B018  (shape check)
    except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
        raise DataError(path, f"not a splits.json document ({e})") from None
    return doc


def load_fold(path: str | os.PathLike, fold: int | None) -> dict[str, list[str]]:
    """``{"train", "val", "test"}`` id lists of one fold; ``fold=None`` puts every id in training."""
    doc = load_splits(path)
    if fold is None:
        everything = sorted({i for f in doc["folds"] for i in f["test"]})
        return {"train": everything, "val": [], "test": []}
    if not 0 <= fold < doc["k"]:
        raise DataError(path, f"fold {fold} out of range: the file has folds 0..{doc['k'] - 1}")
    return {p: list(doc["folds"][fold][p]) for p in PARTS}
