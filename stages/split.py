"""``usnodule split``: K stratified folds grouped by patient (or nodule) -> ``splits.json``.

Groups come from the data's patient ids (a ``patient_id`` column in the Stanford metadata, the paired or the
still-image manifest), or from ``--groups FILE``: a CSV whose first column is the case id (``annot_id`` / ``case_id``) and
whose second is the patient, for data that ships without them -- the public Stanford file has no patient id, so
every nodule is its own group there and two nodules of one patient (192 nodules from about 167 patients) can
fall on both sides of a split.  When every case is its own group, the command says so in one warning line.
Every stage reads its fold from ``splits.json``, so the grouping chosen here holds for all of them.

``--stratify subtype`` (still-image manifests with a ``subtype`` column, for the multi-class CSASN): stratify by
the subtype instead of the label, so that rare subtypes (FTC, MTC at ~5%) land in every test fold as evenly as
the patient groups allow; a subtype with fewer patient groups than folds is warned about (some test folds will
lack it).  The document records ``"stratify": "subtype"``.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from datamodules.errors import DataError
from datamodules.folds import make_folds, write_splits
from stages.options import int_at_least, output_file, seed


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "split",
        help="write splits.json: K folds grouped by patient, stratified by label",
        description=__doc__,
    )
    p.add_argument(
        "data",
        type=Path,
        help="Stanford dataset.hdf5 (metadata.csv beside it), a paired manifest.csv or a still-image manifest.csv",
    )
    p.add_argument("--metadata", type=Path, default=None, help="metadata CSV (default: beside the HDF5)")
    p.add_argument(
        "-k", "--folds", type=int_at_least(3), default=5, help="number of folds (default 5, as the paper)"
    )
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument(
        "--groups",
        type=Path,
        default=None,
        help="CSV: case id, patient id (first two columns); overrides the data's own patient ids",
    )
    p.add_argument(
        "--out", type=output_file, default=None, help="output path (default: splits.json beside the data)"
    )
    p.add_argument(
        "--stratify",
        choices=("label", "subtype"),
        default="label",
        help="stratify by the malignancy label (default) or by a still-image manifest's subtype column",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    ids, labels, groups = _cases(args.data, args.metadata)
    if args.groups is not None:
        groups = read_groups(args.groups, ids)
    elif all(g == i for g, i in zip(groups, ids, strict=True)):
        print(
            "warning: no patient ids (no patient_id column, no --groups): each case is its own group, so two "
            "nodules of one patient can fall in different folds",
            file=sys.stderr,
        )
    strata = None
    if args.stratify == "subtype":
        strata = _subtypes(args.data, ids, groups, args.folds)
    doc = make_folds(ids, labels, groups, k=args.folds, seed=args.seed, source=str(args.data), strata=strata)
    if strata is not None:
        doc["stratify"] = "subtype"
    out = write_splits(doc, args.out or args.data.with_name("splits.json"))
    n_groups = len(set(groups))
    print(f"wrote {out}: {len(ids)} cases ({sum(labels)} malignant) in {n_groups} groups, {args.folds} folds")
    print(
        f"RESULT cases={len(ids)} malignant={sum(labels)} folds={args.folds}"
    )  # for `python -m stages.step`


def _cases(data: Path, metadata: Path | None) -> tuple[list[str], list[int], list[str]]:
    if data.suffix.lower() == ".csv":
        from datamodules.stills import is_still_manifest

        if is_still_manifest(data):  # a still-image manifest (an `image` column)
            from datamodules.stills import read_manifest as read_stills

            stills = read_stills(data)
            return [c.case_id for c in stills], [c.label for c in stills], [c.patient_id for c in stills]
        from datamodules.paired import read_manifest

        cases = read_manifest(data)
        return [c.case_id for c in cases], [c.label for c in cases], [c.patient_id for c in cases]
    from datamodules.stanford import StanfordCine

    ds = StanfordCine(data, metadata)
    return [n.annot_id for n in ds.nodules], ds.labels().tolist(), ds.groups()


def _subtypes(data: Path, ids: list[str], groups: list[str], k: int) -> list[str]:
    """The ``subtype`` of each id of a still-image manifest (blank refused: it cannot be stratified); a warning
    line for each subtype held by fewer than ``k`` patient groups."""
    from datamodules.stills import is_still_manifest
    from datamodules.stills import read_manifest as read_stills

    if data.suffix.lower() != ".csv" or not is_still_manifest(data):
        raise DataError(data, "--stratify subtype needs a still-image manifest with a subtype column")
    subtype = {c.case_id: c.subtype for c in read_stills(data)}
    blank = [i for i in ids if not subtype[i]]
    if blank:
        raise DataError(
            data, f"{len(blank)} case(s) have no subtype (e.g. {blank[:3]}): cannot stratify by it"
        )
    strata = [subtype[i] for i in ids]
    for name in sorted(set(strata)):
        n = len({g for g, s in zip(groups, strata, strict=True) if s == name})
        if n < k:
            print(
                f"warning: subtype {name!r} has {n} patient group(s) for {k} folds: some test folds lack it",
                file=sys.stderr,
            )
    return strata


def read_groups(path: Path, ids: list[str]) -> list[str]:
    """The patient of each id from a ``case id, patient`` CSV (header row, first two columns); every id must be
    there (a one-line :class:`DataError` names how many are not), extra rows are ignored."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except OSError as e:
        raise DataError(path, f"cannot read the groups file ({e.strerror})") from None
    if not rows or len(rows[0]) < 2:
        raise DataError(path, "groups file needs a header and two columns: case id, patient id")
    patient = {r[0].strip(): r[1].strip() for r in rows[1:] if len(r) >= 2 and r[0].strip()}
    missing = [i for i in ids if not patient.get(i)]
    if missing:
        raise DataError(
            path, f"{len(missing)} case(s) have no patient in the groups file, e.g. {missing[:3]}"
        )
    return [patient[i] for i in ids]
