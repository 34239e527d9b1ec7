"""``usnodule crossfit-halves``: split one fold's training part into two halves A and B for cross-fitting.

Writes ``--out DIR/halves.json`` (the two id lists, the seed, the splits file and its digest) and
``DIR/splits_A.json`` / ``DIR/splits_B.json``: the splits file with fold k's training part replaced by one half,
for fitting the ViT and mask CNN of that half with the same configs (``--data.init_args.splits=DIR/splits_A.json
--data.init_args.fold=k``).  The halves are label-stratified and grouped by patient (the splits file's groups),
deterministic for a seed.  ``usnodule embeddings --crossfit DIR`` then embeds each training nodule with the
other half's encoders (``make train-head CROSSFIT=1`` runs the whole chain; datamodules/crossfit.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from datamodules.crossfit import write_halves
from datamodules.errors import DataError
from datamodules.stanford import StanfordCine
from stages.options import count, seed


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "crossfit-halves",
        help="split a fold's training part into halves A/B for cross-fitting (halves.json, splits_A/B.json)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--cine", type=Path, required=True, help="Stanford dataset.hdf5 (its labels stratify the halves)"
    )
    p.add_argument("--metadata", type=Path, default=None, help="metadata CSV (default: beside the HDF5)")
    p.add_argument("--splits", type=Path, required=True, help="splits.json")
    p.add_argument("--fold", type=count, required=True, help="the fold whose training part is halved")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--out", type=Path, required=True, help="folder for halves.json and splits_A/B.json")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    if args.out.exists() and not args.out.is_dir():
        raise DataError(args.out, "is a file; --out names a folder")
    cine = StanfordCine(args.cine, args.metadata, require_mask=False)
    labels = {n.annot_id: n.label for n in cine.nodules}
    groups = dict(zip((n.annot_id for n in cine.nodules), cine.groups(), strict=True))
    path = write_halves(args.splits, args.fold, labels, args.out, seed=args.seed, groups=groups)
    doc = json.loads(path.read_text())
    print(f"wrote {path}: fold {args.fold} training part in halves of {len(doc['A'])} and {len(doc['B'])}")
    print(f"RESULT half_A={len(doc['A'])} half_B={len(doc['B'])}")
