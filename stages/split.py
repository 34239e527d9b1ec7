"""``usnodule split``: K stratified folds grouped by patient (or nodule) -> ``splits.json``."""

from __future__ import annotations

import argparse
from pathlib import Path

from datamodules.folds import make_folds, write_splits


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "split",
        help="write splits.json: K folds grouped by patient, stratified by label",
        description=__doc__,
    )
    p.add_argument(
        "data", type=Path, help="Stanford dataset.hdf5 (metadata.csv beside it) or a paired manifest.csv"
    )
    p.add_argument("--metadata", type=Path, default=None, help="metadata CSV (default: beside the HDF5)")
    p.add_argument("-k", "--folds", type=int, default=5, help="number of folds (default 5, as the paper)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", type=Path, default=None, help="output path (default: splits.json beside the data)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    ids, labels, groups = _cases(args.data, args.metadata)
    doc = make_folds(ids, labels, groups, k=args.folds, seed=args.seed, source=str(args.data))
    out = write_splits(doc, args.out or args.data.with_name("splits.json"))
    n_groups = len(set(groups))
    print(f"wrote {out}: {len(ids)} cases ({sum(labels)} malignant) in {n_groups} groups, {args.folds} folds")
    print(
        f"RESULT cases={len(ids)} malignant={sum(labels)} folds={args.folds}"
    )  # for `python -m stages.step`


def _cases(data: Path, metadata: Path | None) -> tuple[list[str], list[int], list[str]]:
    if data.suffix.lower() == ".csv":
        from datamodules.paired import read_manifest

        cases = read_manifest(data)
        return [c.case_id for c in cases], [c.label for c in cases], [c.patient_id for c in cases]
    from datamodules.stanford import StanfordCine

    ds = StanfordCine(data, metadata)
    return [n.annot_id for n in ds.nodules], ds.labels().tolist(), ds.groups()
