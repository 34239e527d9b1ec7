"""``usnodule import-stills``: a public still-image layout, or frames of a cine set, -> a still-image manifest.

Layouts (what each keeps and drops: README "Still images", :mod:`datamodules.still_import`):

  busi      SRC/{benign,malignant,normal}/<name>.png + <name>_mask.png (several _mask_<n>.png merged by union);
            normal images skipped unless --normal keep (label 0, subtype normal)
  tn3k      SRC/{trainval,test}-{image,mask}/ + label4trainval.csv, label4test.csv (0 benign, 1 malignant)
  ddti      SRC/<case>.xml + <case>_<n>.jpg; polygons drawn as masks; TI-RADS only, so --tirads-malignant
            LEVEL is required (TI-RADS >= LEVEL labelled malignant: a proxy, not pathology)
  tn5000    SRC/Annotations/*.xml (VOC, name 0/1) + JPEGImages/; boxes only: imported without masks
  stanford  SRC = dataset.hdf5 (metadata.csv beside it): --frames middle | largest | all per nodule

Writes OUT/manifest.csv (columns case_id, image, mask, label, patient_id, subtype, then layout columns) and the
masks/images it had to make; the folder appears only when complete and valid.  A non-empty OUT not written by
this command is refused (--overwrite replaces it).  Layouts without patient ids say so in a warning line: each
image is then its own group in `usnodule split`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from datamodules.still_import import (
    FRAME_CHOICES,
    LAYOUTS,
    TIRADS_LEVELS,
    export_cine_stills,
    import_busi,
    import_ddti,
    import_tn3k,
    import_tn5000,
)

_ONLY_FOR = {"normal": "busi", "tirads_malignant": "ddti", "frames": "stanford", "metadata": "stanford"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import-stills",
        help="import a still-image layout (BUSI, TN3K, DDTI, TN5000) or cine frames into a manifest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", type=Path, help="the layout's folder (stanford: dataset.hdf5)")
    p.add_argument("--layout", choices=LAYOUTS, required=True)
    p.add_argument("--out", type=Path, required=True, help="output folder (gets manifest.csv)")
    p.add_argument(
        "--normal", choices=("skip", "keep"), default=None, help="busi: normal images (default skip)"
    )
    p.add_argument(
        "--tirads-malignant",
        choices=TIRADS_LEVELS,
        type=str.lower,
        default=None,
        help="ddti (required): lowest TI-RADS category labelled malignant",
    )
    p.add_argument(
        "--frames", choices=FRAME_CHOICES, default=None, help="stanford: frames per nodule (default middle)"
    )
    p.add_argument(
        "--metadata", type=Path, default=None, help="stanford: metadata CSV (default beside the HDF5)"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty OUT not written by this command"
    )
    p.set_defaults(func=run, _parser=p)


def run(args: argparse.Namespace) -> None:
    for option, layout in _ONLY_FOR.items():
        if getattr(args, option) is not None and args.layout != layout:
            args._parser.error(f"--{option.replace('_', '-')} applies to --layout {layout} only")
    common = {"overwrite": args.overwrite}
    if args.layout == "busi":
        result = import_busi(args.src, args.out, normal=args.normal or "skip", **common)
    elif args.layout == "tn3k":
        result = import_tn3k(args.src, args.out, **common)
    elif args.layout == "ddti":
        result = import_ddti(args.src, args.out, tirads_malignant=args.tirads_malignant, **common)
    elif args.layout == "tn5000":
        result = import_tn5000(args.src, args.out, **common)
    else:
        src = args.src / "dataset.hdf5" if args.src.is_dir() else args.src
        result = export_cine_stills(
            src, args.out, frames=args.frames or "middle", metadata=args.metadata, **common
        )
    for line in result.warnings:
        print(f"warning: {line}", file=sys.stderr)
    print(f"wrote {result.manifest}: {result.n} images ({result.n_malignant} malignant)")
    print(f"RESULT images={result.n} malignant={result.n_malignant}")  # for `python -m stages.step`
