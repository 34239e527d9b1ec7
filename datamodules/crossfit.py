"""Cross-fitting the attention head's training embeddings (issue 10, item 3): the two halves of a fold's training part.

In-sample stacking trains the head on embeddings of nodules its encoders (ViT, mask CNN) were fitted on, which
are more confident than any test nodule's.  Cross-fitting splits fold k's training part into two halves A and
B (label-stratified, grouped by patient: scikit-learn's ``StratifiedGroupKFold`` with two splits, shuffled by
``seed``), fits one encoder pair per half, and embeds every training nodule with the pair of the *other* half.

:func:`write_halves` writes, into one folder per fold (the Makefile's ``runs/<exp>/fold<k>/crossfit/``):

* ``halves.json``: ``{"fold", "seed", "splits", "splits_sha256", "A": [ids], "B": [ids]}``, the record of which
  nodule went where;
* ``splits_A.json`` / ``splits_B.json``: copies of ``splits.json`` whose fold k has ``train`` = that half (its
  validation and test parts, and every other fold, unchanged; a ``"crossfit"`` key says what it is).  The
  stage datamodules select nodules from a splits file and a fold, so an encoder fitted with
  ``--data.init_args.splits=.../splits_A.json --data.init_args.fold=k`` sees half A only, and its checkpoint
  records that file: :func:`encoder_training_ids` reads it back (the provenance check of the embeddings).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from datamodules.atomic import write_json
from datamodules.errors import DataError
from datamodules.files import file_digest
from datamodules.folds import check_splits, load_fold, load_splits

HALVES = ("A", "B")
OTHER = {"A": "B", "B": "A"}


def split_halves(
    ids: list[str], labels: Mapping[str, int], groups: Mapping[str, str], seed: int = 0
) -> dict[str, list[str]]:
    """``{"A": ids, "B": ids}``: two label-stratified halves of ``ids`` with no patient group in both.

    Deterministic for a given ``seed`` (and id set).  A half left empty (fewer than two patient groups) is a
    one-line :class:`DataError`: there would be nothing to fit one of the encoders on.
    """
    ids = sorted(ids)
    y = np.array([int(labels[i]) for i in ids])
    g = np.array([str(groups.get(i, i)) for i in ids])
    if len(set(g)) < 2:
        raise DataError(None, f"cross-fitting needs at least 2 patient groups in training, got {len(set(g))}")
    splitter = StratifiedGroupKFold(n_splits=2, shuffle=True, random_state=seed)
    _, a_idx = next(iter(splitter.split(np.zeros(len(ids)), y, g)))
    in_a = np.zeros(len(ids), dtype=bool)
    in_a[a_idx] = True
    return {
        "A": [i for i, a in zip(ids, in_a, strict=True) if a],
        "B": [i for i, a in zip(ids, in_a, strict=True) if not a],
    }


def write_halves(
    splits: str | os.PathLike,
    fold: int,
    labels: Mapping[str, int],
    out: str | os.PathLike,
    seed: int = 0,
    groups: Mapping[str, str] | None = None,
) -> Path:
    """Write ``halves.json``, ``splits_A.json`` and ``splits_B.json`` into ``out`` (module docstring); returns
    the ``halves.json`` path.  ``labels``: id -> 0/1 of (at least) the fold's training nodules; patients come
    from the splits file's ``groups`` (what its folds were grouped by), else from ``groups``, else each id."""
    splits, out = Path(splits), Path(out)
    doc = load_splits(splits)
    train = load_fold(splits, fold)["train"]
    missing = [i for i in train if i not in labels]
    if missing:
        raise DataError(
            splits, f"{len(missing)} training id(s) of fold {fold} have no label, e.g. {missing[:3]}"
        )
    halves = split_halves(train, labels, doc.get("groups") or groups or {}, seed)
    out.mkdir(parents=True, exist_ok=True)
    for name in HALVES:
        derived = json.loads(json.dumps(doc))
        derived["folds"][fold]["train"] = halves[name]
        derived["crossfit"] = {"fold": fold, "half": name, "seed": seed, "splits": str(splits.resolve())}
        check_splits(
            derived, out / f"splits_{name}.json"
        )  # a subset of a sound file is sound; checked anyway
        write_json(derived, out / f"splits_{name}.json")
    record = {
        "fold": fold,
        "seed": seed,
        "splits": str(splits.resolve()),
        "splits_sha256": file_digest(splits),
        **halves,
    }
    return write_json(record, out / "halves.json")


def load_halves(folder: str | os.PathLike, fold: int | None = None) -> dict:
    """``halves.json`` of a cross-fit folder, checked: two disjoint non-empty id lists, the fold it says (and
    ``fold`` when given)."""
    path = Path(folder) / "halves.json"
    if not path.is_file():
        raise DataError(path, "cross-fit halves not found (run `usnodule crossfit-halves` first)")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(path, f"not a halves.json document ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict) or any(not isinstance(doc.get(h), list) or not doc[h] for h in HALVES):
        raise DataError(path, "needs non-empty 'A' and 'B' id lists")
    both = set(doc["A"]) & set(doc["B"])
    if both:
        raise DataError(path, f"id(s) {sorted(both)[:3]} in both halves")
    if fold is not None and doc.get("fold") != fold:
        raise DataError(path, f"holds the halves of fold {doc.get('fold')}, not fold {fold}")
    return doc


def encoder_training_ids(data: Mapping, source: str | os.PathLike | None = None) -> set[str]:
    """The nodule ids an encoder was fitted on, from the data settings saved in its checkpoint (``splits`` and
    ``fold``, as ``BaseStage.from_checkpoint`` returns them): the training part of that fold of that file."""
    if not data.get("splits") or "fold" not in data:
        raise DataError(
            source, "records no training splits file and fold (a checkpoint of `lightning fit` does)"
        )
    return set(load_fold(data["splits"], data["fold"])["train"])
