"""``usnodule import LAYOUT SRC --out OUT``: a data set as its authors distribute it -> one of our manifests.

Paired BUS + CEUS videos (AsyCMST):

  asycmst   SRC/videos/{0.ben,1.mal}/{bus,ceus}/<name>.mp4 + split CSVs SRC/*.csv (id,bus_vid,ceus_vid,label;
            train_1.csv, valid_1.csv, test_1.csv, ...: all merged, or only those given by --splits).
            OUT is the manifest CSV (case_id,patient_id,label,bus,ceus,bus_mask + source_splits), paths
            relative to it; --source images points at the extracted frame folders
            SRC/images/{0.ben,1.mal}/{bus,ceus}/<name>/ instead of the videos.  Folds then come from
            `usnodule split OUT` (the authors' split files are recorded in source_splits, not used as folds).

Still images (two-stage, CSASN; the same importers as `usnodule import-stills --layout LAYOUT`, kept as the older
spelling; each layout's subcommand takes only its own options):

  busi      SRC/{benign,malignant,normal}/<name>.png + <name>_mask.png (several _mask_<n>.png merged by union);
            normal images skipped unless --normal keep (label 0, subtype normal)
  tn3k      SRC/{trainval,test}-{image,mask}/ + label4trainval.csv, label4test.csv (0 benign, 1 malignant)
  ddti      SRC/<case>.xml + <case>_<n>.jpg; polygons drawn as masks; TI-RADS only, so --tirads-malignant
            LEVEL is required (TI-RADS >= LEVEL labelled malignant: a proxy, not pathology)
  tn5000    SRC/Annotations/*.xml (VOC, name 0/1) + JPEGImages/; boxes only: imported without masks
  stanford  SRC = dataset.hdf5 or its folder (metadata.csv beside it): --frames middle | largest | all

For the still layouts OUT is a folder that gets manifest.csv (and the masks/frames it had to make); it appears
only when complete and valid, and a non-empty OUT not written by an import is refused (--overwrite).  Every
manifest is written under a temporary name and renamed when complete.  Code: datamodules/paired.py
(import_asycmst_layout), datamodules/still_import.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from datamodules.still_import import FRAME_CHOICES, LAYOUTS, TIRADS_LEVELS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import",
        help="import a data set layout (asycmst, busi, tn3k, ddti, tn5000, stanford) into a manifest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    layouts = p.add_subparsers(dest="layout", metavar="LAYOUT", required=True)
    a = layouts.add_parser(
        "asycmst",
        help="AsyCMST authors' BUS + CEUS layout -> paired manifest CSV",
        description="AsyCMST authors' layout (videos/{0.ben,1.mal}/{bus,ceus}/<name>.mp4 + split CSVs "
        "id,bus_vid,ceus_vid,label) -> a paired manifest CSV.",
    )
    a.add_argument("src", type=Path, help="the data set folder (holds videos/ and the split CSVs)")
    a.add_argument("--out", type=Path, required=True, help="the manifest CSV to write")
    a.add_argument(
        "--splits",
        nargs="+",
        default=None,
        help="split CSVs to read (relative to SRC or absolute; default every SRC/*.csv)",
    )
    a.add_argument(
        "--source",
        choices=("videos", "images"),
        default="videos",
        help="point the manifest at the videos (default) or at the extracted frame folders under images/",
    )
    a.set_defaults(func=run_asycmst)
    for layout in LAYOUTS:
        s = layouts.add_parser(
            layout,
            help=f"still-image layout {layout} -> still-image manifest folder",
            description=__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        s.add_argument("src", type=Path, help="the layout's folder (stanford: dataset.hdf5 or its folder)")
        s.add_argument("--out", type=Path, required=True, help="output folder (gets manifest.csv)")
        # the options of `usnodule import-stills` (stages/import_stills.py), each under its layout only
        if layout == "busi":
            s.add_argument(
                "--normal", choices=("skip", "keep"), default="skip", help="normal images (default skip)"
            )
        elif layout == "ddti":
            s.add_argument(
                "--tirads-malignant",
                choices=TIRADS_LEVELS,
                type=str.lower,
                required=True,
                help="lowest TI-RADS category labelled malignant (DDTI has no pathology: a proxy)",
            )
        elif layout == "stanford":
            s.add_argument("--frames", choices=FRAME_CHOICES, default="middle", help="frames per nodule")
            s.add_argument(
                "--metadata", type=Path, default=None, help="metadata CSV (default beside the HDF5)"
            )
        s.add_argument(
            "--overwrite", action="store_true", help="replace a non-empty OUT not written by an import"
        )
        s.set_defaults(func=run_stills)


def run_stills(args: argparse.Namespace) -> None:
    import sys

    from datamodules import still_import as si

    common = {"overwrite": args.overwrite}
    if args.layout == "busi":
        result = si.import_busi(args.src, args.out, normal=args.normal, **common)
    elif args.layout == "tn3k":
        result = si.import_tn3k(args.src, args.out, **common)
    elif args.layout == "ddti":
        result = si.import_ddti(args.src, args.out, tirads_malignant=args.tirads_malignant, **common)
    elif args.layout == "tn5000":
        result = si.import_tn5000(args.src, args.out, **common)
    else:
        src = args.src / "dataset.hdf5" if args.src.is_dir() else args.src
        result = si.export_cine_stills(src, args.out, frames=args.frames, metadata=args.metadata, **common)
    for line in result.warnings:
        print(f"warning: {line}", file=sys.stderr)
    print(f"wrote {result.manifest}: {result.n} images ({result.n_malignant} malignant)")
    print(f"RESULT images={result.n} malignant={result.n_malignant}")  # for `python -m stages.step`


def run_asycmst(args: argparse.Namespace) -> None:
    from datamodules.paired import import_asycmst_layout, read_manifest

    out = import_asycmst_layout(args.src, args.out, splits=args.splits, source=args.source)
    cases = read_manifest(out)  # what every consumer will read: checked once here
    malignant = sum(c.label for c in cases)
    print(f"wrote {out}: {len(cases)} BUS/CEUS pairs ({malignant} malignant)")
    print(f"RESULT cases={len(cases)} malignant={malignant}")  # for `python -m stages.step`
