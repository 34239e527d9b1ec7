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
    strata: Sequence[str] | None = None,
) -> dict:
    """Assign ids to ``k`` label-stratified, group-disjoint folds; return the splits.json document.

    ``strata`` (e.g. the carcinoma subtype of each id): stratify by it instead of the label, so that a rare
    subtype is spread over the folds too (the label must be a function of it, as subtypes are; the
    benign / malignant checks below still hold).  The document then records ``"stratify": "strata"``.
    """
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
    y = labels if strata is None else np.unique(np.asarray([str(s) for s in strata]), return_inverse=True)[1]
    if len(y) != len(ids):
        raise DataError(source, f"{len(y)} strata for {len(ids)} ids")
    for f, (_, test_idx) in enumerate(splitter.split(np.zeros(len(ids)), y, groups)):
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
    extra = {} if strata is None else {"stratify": "strata"}
    return {
        "k": k,
        "seed": seed,
        "source": source,
        **extra,
        "n": len(ids),
        "n_positive": int(labels.sum()),
        "folds": folds,
        "groups": dict(zip(ids, groups.tolist(), strict=True)),
    }


def write_splits(doc: dict, path: str | os.PathLike) -> Path:
    return write_json(doc, path)


def load_splits(path: str | os.PathLike) -> dict:
    """Read ``splits.json`` and validate the whole document (:func:`check_splits`) before any stage uses it.

    Every problem is one :class:`DataError` naming the file: a hand-written or edited file that leaks a
    nodule into its own training set would otherwise give silently optimistic numbers, and a missing key
    would surface as a KeyError deep inside a datamodule.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "splits file does not exist (run `usnodule split` first)")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(path, f"not a splits.json document ({str(e).splitlines()[0]})") from None
    check_splits(doc, path)
    return doc


def _examples(ids) -> str:
    ids = sorted(ids)
    return ", ".join(map(repr, ids[:3])) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")


def check_splits(doc, path: str | os.PathLike | None = None) -> None:
    """Raise a one-line :class:`DataError` for the first problem of a splits document; return None if sound.

    Checked, in this order (structure first, so later checks can index freely):

    * a JSON object with ``k`` (a positive integer) and ``folds`` (a list of exactly ``k`` folds);
    * each fold an object with ``train``, ``val`` and ``test`` lists of non-empty strings, and, when it has a
      ``fold`` entry (``usnodule split`` writes one), that entry equal to its position -- ``load_fold`` picks
      folds by position, so a mismatch would silently hand out another fold than the one named;
    * no id twice in one part, and no id in two parts of one fold (train/test or val/test overlap is leakage,
      train/val overlap makes early stopping score training data);
    * no id in the test part of two folds (it would count twice in the pooled cross-validated predictions);
    * when the ``groups`` map (id -> patient) is present -- ``usnodule split`` always writes it, so it is the
      file's list of the data set's ids: a patient for every id of the folds, every id of it in the test part
      of exactly one fold (one never tested would silently drop out of the pooled results), and no patient in
      two parts of one fold (patient-level leakage; ``make_folds`` never produces it).

    Without ``groups`` the file does not say which ids make up the data set, so an id that no fold tests is
    accepted there: hand-written files that spell out only the parts used (as several test fixtures do, e.g.
    extra nodules for training only) stay valid; what they must not do is leak or test an id twice.
    Not required either: that each fold's parts cover every id (a hand-written file may leave nodules out of
    training), that validation is the next fold's test part (``make_folds``'s choice, not a correctness
    condition), and ``k >= 3`` (an explicit file may use an empty validation part).
    """
    if not isinstance(doc, dict):
        raise DataError(path, f"not a splits.json document (a JSON {type(doc).__name__}, not an object)")
    missing = [key for key in ("k", "folds") if key not in doc]
    if missing:
        raise DataError(path, f"not a splits.json document: missing key(s) {', '.join(missing)}")
    k, folds = doc["k"], doc["folds"]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise DataError(path, f"k must be a positive integer, got {k!r}")
    if not isinstance(folds, list):
        raise DataError(path, f"folds must be a list, got a {type(folds).__name__}")
    if len(folds) != k:
        raise DataError(path, f"k is {k} but the file has {len(folds)} fold(s)")
    for f, fold in enumerate(folds):
        if not isinstance(fold, dict):
            raise DataError(path, f"fold {f} is not an object with train/val/test lists")
        absent = [p for p in PARTS if p not in fold]
        if absent:
            raise DataError(path, f"fold {f} has no {'/'.join(absent)} list")
        if "fold" in fold and (isinstance(fold["fold"], bool) or fold["fold"] != f):
            raise DataError(path, f"fold at position {f} says it is fold {fold['fold']!r}")
        for p in PARTS:
            ids = fold[p]
            if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
                raise DataError(path, f"fold {f} {p} must be a list of non-empty string ids")
            if len(set(ids)) != len(ids):
                twice = {i for i in ids if ids.count(i) > 1}
                raise DataError(path, f"fold {f} lists id(s) {_examples(twice)} more than once in {p}")
        for a, b in (("train", "test"), ("val", "test"), ("train", "val")):
            both = set(fold[a]) & set(fold[b])
            if both:
                raise DataError(path, f"fold {f}: id(s) {_examples(both)} in both {a} and {b} (leakage)")
    tested: dict[str, list[int]] = {}
    for f, fold in enumerate(folds):
        for i in fold["test"]:
            tested.setdefault(i, []).append(f)
    again = {i: fs for i, fs in tested.items() if len(fs) > 1}
    if again:
        i = min(again)
        raise DataError(
            path,
            f"{len(again)} id(s) tested in more than one fold (e.g. {i!r} in folds "
            f"{', '.join(map(str, again[i]))}): each id must be in exactly one fold's test part",
        )
    groups = doc.get("groups")
    if groups is None:
        return
    if not isinstance(groups, dict) or not all(isinstance(g, str) for g in groups.values()):
        raise DataError(path, "groups must map every id to a patient (a string)")
    used = set().union(*(set(fold[p]) for fold in folds for p in PARTS))
    unknown = used - set(groups)
    if unknown:
        raise DataError(path, f"groups has no patient for id(s) {_examples(unknown)}")
    never = set(groups) - set(tested)
    if never:
        raise DataError(
            path,
            f"{len(never)} id(s) in no fold's test part ({_examples(never)}): each id of groups must be "
            "tested in exactly one fold",
        )
    for f, fold in enumerate(folds):
        for a, b in (("train", "test"), ("val", "test"), ("train", "val")):
            both = {groups[i] for i in fold[a]} & {groups[i] for i in fold[b]}
            if both:
                raise DataError(
                    path,
                    f"fold {f}: patient(s) {_examples(both)} in both {a} and {b} (patient-level leakage)",
                )


def load_fold(path: str | os.PathLike, fold: int | None) -> dict[str, list[str]]:
    """``{"train", "val", "test"}`` id lists of one fold; ``fold=None`` puts every id in training.

    The file is validated whole (:func:`load_splits`); ``fold`` must be an integer in 0..k-1 (a negative index
    is refused rather than counted from the end: ``--fold -1`` is a typo, not "the last fold").
    """
    doc = load_splits(path)
    if fold is None:
        everything = sorted({i for f in doc["folds"] for i in f["test"]})
        return {"train": everything, "val": [], "test": []}
    if isinstance(fold, bool) or not isinstance(fold, int | np.integer):
        raise DataError(path, f"fold must be an integer, got {fold!r}")
    if not 0 <= fold < doc["k"]:
        raise DataError(path, f"fold {fold} out of range: the file has folds 0..{doc['k'] - 1}")
    return {p: list(doc["folds"][fold][p]) for p in PARTS}
