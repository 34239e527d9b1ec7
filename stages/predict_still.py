"""``usnodule predict-still``: the two still-image systems on new images -> one CSV row per image.

  usnodule predict-still --system twostage --fold-dir runs/demo/twostage/fold0 a.png b.jpg c.dcm
  usnodule predict-still --system csasn --fold-dir runs/demo/csasn/fold0 a.png --masks a_mask.png
  usnodule predict-still --system csasn --csasn runs/x/csasn.ckpt --manifest data/stills/manifest.csv --cases S1 S7

Images: PNG, JPEG, BMP, TIFF or single-frame DICOM (as the still-image manifest), given as files or as a
still-image manifest (``--manifest``, optionally only ``--cases``; its labels and subtypes are copied into the
CSV, so a labelled set can be scored).  The fold's checkpoints come from ``--fold-dir`` (the Makefile's names:
``transunet.ckpt`` + ``roi_resnet18.ckpt`` for ``twostage``, ``csasn.ckpt`` for ``csasn``) or one by one
(``--transunet``, ``--roi-classifier``, ``--csasn``).  Each image is read and preprocessed as the fold's test step
reads a manifest row (:mod:`lightning_modules.still_predict`), so the probabilities are the test step's.

* ``twostage``: TransUNet mask -> its box + margin -> ROI ResNet-18: ``prob_malignant``, and the predicted
  mask's size: ``mask_px`` (pixels of the whole mask), ``mask_box`` (``x0 y0 x1 y1`` of the crop's mask box in
  file pixels, end-exclusive; blank when TransUNet found nothing and the whole image was classified),
  ``width_px``/``height_px`` of the largest component, and ``width_mm``/``height_mm``/``max_extent_mm`` when the
  pixel spacing is known (a DICOM tissue region; :func:`datamodules.nodule_size.nodule_size`).
* ``csasn``: ``pred_subtype``, ``p_<subtype>`` per class and ``prob_malignant`` (the malignancy head, or
  1 - P(benign subtypes), as the checkpoint says).  A checkpoint trained on crops around the drawn mask needs
  that mask (``--masks`` in the order of the images, or the manifest's ``mask`` column); without it the whole
  image is used, the ``roi`` column says ``missing`` and a warning line counts them.

DICOM: a file given on the command line with a Sequence of Ultrasound Regions is cut to its 2D tissue
region(s) first, one row each (``region`` = the item number), as ``usnodule predict`` does, so burned-in text
never reaches the models; a manifest's DICOM images are read whole, as the data module read them in training
(``--dicom-regions tissue|whole`` overrides both).

Columns: ``case_id, image, region, label, subtype, system, fold, roi, prob_malignant, pred`` (``pred`` =
``prob_malignant >= --threshold``), then the system's own.  The CSV is written atomically, only when every
image succeeded.  One line and exit status 2 for a missing or unreadable image, a checkpoint of the wrong kind,
of another fold than ``--fold`` or its ``fold<k>`` folder, or two-stage checkpoints of different folds; a
warning line when manifest images were in the fold's training or validation part (their probabilities are
in-sample).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from datamodules.errors import DataError
from stages.options import count, fraction, output_file, positive_int

COMMON = ("case_id", "image", "region", "label", "subtype", "system", "fold", "roi", "prob_malignant", "pred")
TWOSTAGE_COLUMNS = (
    "mask_px",
    "mask_box",
    "width_px",
    "height_px",
    "spacing",
    "width_mm",
    "height_mm",
    "max_extent_mm",
)
WHOLE = "whole image"


# ---------------------------------------------------------------------------------------------- inputs
def _is_dicom(path: Path) -> bool:
    from datamodules.clips import IMAGE_SUFFIXES, is_dicom

    return path.suffix.lower() not in IMAGE_SUFFIXES and is_dicom(path)


def _regions(path: Path, shape: tuple[int, int], cut: bool):
    """``[(label, box (y0, x0, y1, x1), spacing_mm)]``: the DICOM tissue regions when ``cut``, else the whole."""
    whole = [(WHOLE, (0, 0, *shape), None)]
    if not cut or not _is_dicom(path):
        return whole
    from datamodules.dicom import tissue_regions, ultrasound_regions

    regions = ultrasound_regions(path)
    tissue = tissue_regions(regions) if regions else []
    return [(str(r.item), r.box, r.spacing_mm) for r in tissue] or whole


def make_inputs(cases, cut_regions: bool) -> list:
    """:class:`~lightning_modules.still_predict.StillInput` per case and region: pixels read (and checked)
    here, so a bad file stops the run before the checkpoints are loaded."""
    from dataclasses import replace

    import numpy as np

    from datamodules.stills import read_still, read_still_mask
    from lightning_modules.still_predict import StillInput

    out = []
    for case in cases:
        image = read_still(case.image)
        mask = None
        if case.mask is not None:
            mask = read_still_mask(case.mask)
            if mask.shape != image.shape:
                raise DataError(
                    case.mask,
                    f"mask size {mask.shape[1]}x{mask.shape[0]} differs from image {case.image} "
                    f"{image.shape[1]}x{image.shape[0]}",
                )
        regions = _regions(case.image, image.shape, cut_regions)
        for label, box, spacing in regions:
            y0, x0, y1, x1 = box
            crop = image if label == WHOLE else image[y0:y1, x0:x1]
            cropped_mask = None if mask is None else (mask if label == WHOLE else mask[y0:y1, x0:x1])
            sub = case if label == WHOLE else replace(case, case_id=f"{case.case_id}_region{label}")
            out.append(
                StillInput(
                    sub,
                    np.ascontiguousarray(crop),
                    None if cropped_mask is None else np.ascontiguousarray(cropped_mask),
                    label,
                    box,
                    spacing,
                )
            )
    return out


def file_cases(images: Sequence[Path], masks: Sequence[Path] | None):
    """Unlabelled cases (label -1) named after the image files (a repeated name gets ``_2``, ``_3``...)."""
    from datamodules.stills import StillCase, still_size

    if masks is not None and len(masks) != len(images):
        raise DataError(None, f"--masks names {len(masks)} mask(s) for {len(images)} image(s): one per image")
    cases, seen = [], set()
    for n, path in enumerate(images):
        for p in (path, None if masks is None else masks[n]):
            if p is not None and not Path(p).is_file():
                raise DataError(p, "does not exist")
        still_size(path)  # an unsupported format or a multi-frame DICOM: one line, before any work
        name, k = path.stem or "image", 2
        case_id = name
        while case_id in seen:
            case_id, k = f"{name}_{k}", k + 1
        seen.add(case_id)
        cases.append(StillCase(case_id, path, None if masks is None else Path(masks[n]), -1, case_id))
    return cases


def manifest_cases(manifest: Path, ids: Sequence[str] | None):
    from datamodules.stills import read_manifest

    cases = read_manifest(manifest)
    if not ids:
        return cases
    by_id = {c.case_id: c for c in cases}
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise DataError(manifest, f"--cases {', '.join(unknown[:3])}: not in the manifest")
    return [by_id[i] for i in ids]


# ---------------------------------------------------------------------------------------------- rows
def _size_columns(mask, spacing_mm, offset: tuple[int, int] = (0, 0)) -> dict:
    """The predicted mask's size; ``mask_box`` in file pixels (``offset``: the region's top-left y, x)."""
    import numpy as np

    from datamodules.nodule_size import nodule_size
    from datamodules.stanford import bbox_from_mask

    size = nodule_size(mask[None], spacing_mm)
    box, (dy, dx) = bbox_from_mask(mask), offset
    spacing = "unknown" if spacing_mm is None else f"{spacing_mm[1]:.6g} x {spacing_mm[0]:.6g} mm/px"
    return {
        "mask_px": int(np.count_nonzero(mask)),
        "mask_box": "" if box is None else f"{box[1] + dx} {box[0] + dy} {box[3] + dx} {box[2] + dy}",
        "width_px": None if size is None else size.width_px,
        "height_px": None if size is None else size.height_px,
        "spacing": spacing,
        "width_mm": None if size is None else size.width_mm,
        "height_mm": None if size is None else size.height_mm,
        "max_extent_mm": None if size is None else size.max_extent_mm,
    }


def predict_still(args: argparse.Namespace):
    """Predict every image; write the CSV only when all succeeded.  Returns the table."""
    import pandas as pd

    from datamodules.atomic import atomic_path
    from datamodules.files import resolve_fold_files
    from lightning_modules import still_predict as sp

    if (args.manifest is None) == (not args.images):
        raise DataError(None, "give either image files or --manifest MANIFEST")
    if args.manifest is not None:
        if args.masks is not None:
            raise DataError(None, "--masks goes with image files; a manifest has its mask column")
        cases = manifest_cases(args.manifest, args.cases)
    else:
        if args.cases is not None:
            raise DataError(None, "--cases picks ids of a --manifest; with image files name the files")
        cases = file_cases(args.images, args.masks)
    cut = args.dicom_regions == "tissue" or (args.dicom_regions == "auto" and args.manifest is None)
    inputs = make_inputs(cases, cut)
    given = {
        "twostage": {"transunet": args.transunet, "roi-classifier": args.roi_classifier},
        "csasn": {"csasn": args.csasn},
    }[args.system]
    others = [o for o, v in (("transunet", args.transunet), ("roi-classifier", args.roi_classifier),
                             ("csasn", args.csasn)) if v is not None and o not in given]  # fmt: skip
    if others:
        raise DataError(None, f"--{others[0]} is not a checkpoint of --system {args.system}")
    paths = resolve_fold_files(args.fold_dir, given, sp.SYSTEM_FILES[args.system])
    load = sp.load_twostage if args.system == "twostage" else sp.load_csasn
    model = load(paths, fold_dir=args.fold_dir, fold=args.fold, device=args.device)
    predict = sp.predict_twostage if args.system == "twostage" else sp.predict_csasn
    results = predict(model, inputs, batch_size=args.batch_size)
    fold = sp.fold_label(model.fold)
    rows = []
    for x, r in zip(inputs, results, strict=True):
        row = {
            "case_id": x.case.case_id,
            "image": str(x.case.image),
            "region": x.region,
            "label": "" if x.case.label < 0 else x.case.label,
            "subtype": x.case.subtype,
            "system": args.system,
            "fold": fold,
            "roi": r["roi"],
            "prob_malignant": r["prob"],
            "pred": int(r["prob"] >= args.threshold),
        }
        if args.system == "twostage":
            offset = (0, 0) if x.region_box is None else x.region_box[:2]
            row.update(_size_columns(r["mask"], x.spacing_mm, offset))
        else:
            names = list(model.stage.subtypes)
            row["pred_subtype"] = names[int(r["subtype_prob"].argmax())]
            row.update({f"p_{s}": float(v) for s, v in zip(names, r["subtype_prob"], strict=True)})
        rows.append(row)
    extra = TWOSTAGE_COLUMNS if args.system == "twostage" else ()
    if args.system == "csasn":
        extra = ("pred_subtype", *(f"p_{s}" for s in model.stage.subtypes))
    table = pd.DataFrame(rows, columns=[*COMMON, *extra])
    with atomic_path(args.out) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    warn(args, model, table, paths)
    return table


def warn(args: argparse.Namespace, model, table, paths) -> None:
    """One warning line each: images not cropped as in training (CSASN without the drawn mask, two-stage with
    an empty predicted mask); manifest images the fold's networks were fitted or selected on."""
    from datamodules.provenance import checkpoint_record
    from lightning_modules.still_predict import in_sample

    off = table[table["roi"].isin(["missing", "empty"])]
    if len(off) and args.system == "csasn":
        print(
            f"warning: {len(off)} of {len(table)} image(s) predicted whole, but the checkpoint was trained on "
            "crops around the drawn mask (roi column; give --masks or a manifest mask column)",
            file=sys.stderr,
        )
    elif len(off):
        print(
            f"warning: TransUNet found no nodule in {len(off)} of {len(table)} image(s); they were classified "
            "whole, as the fold's data module does (roi column 'empty')",
            file=sys.stderr,
        )
    if args.manifest is not None:
        last = list(paths.values())[-1]
        found = in_sample(checkpoint_record(last), args.manifest, list(table["case_id"]))
        if found is not None and found[0]:
            print(
                f"warning: {found[0]} of {len(table)} image(s) are in the training or validation part of "
                f"{found[1]}: their probabilities are in-sample",
                file=sys.stderr,
            )


def show(table, threshold: float) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"predict-still (malignant if prob >= {threshold:g})")
    cols = ["case", "roi", "prob", "pred"] + (["subtype"] if "pred_subtype" in table else ["mask px"])
    for col in cols:
        t.add_column(col, justify="left" if col in ("case", "roi", "subtype") else "right", overflow="fold")
    for r in table.to_dict("records")[:50]:
        last = r["pred_subtype"] if "pred_subtype" in r else str(r["mask_px"])
        verdict = "malignant" if r["pred"] else "benign"
        t.add_row(str(r["case_id"]), r["roi"], f"{r['prob_malignant']:.3f}", verdict, last)
    Console().print(t)
    if len(table) > 50:
        print(f"... {len(table) - 50} more rows in the CSV")


# ---------------------------------------------------------------------------------------------- CLI
def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict-still",
        help="two-stage or CSASN on new still images (PNG/JPEG/DICOM) -> probabilities CSV",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--system", choices=("twostage", "csasn"), required=True)
    p.add_argument(
        "images", type=Path, nargs="*", help="still images (PNG, JPEG, BMP, TIFF, single-frame DICOM)"
    )
    p.add_argument(
        "--manifest", type=Path, default=None, help="a still-image manifest instead of image files"
    )
    p.add_argument("--cases", nargs="+", default=None, help="with --manifest: only these case ids")
    p.add_argument(
        "--masks", type=Path, nargs="+", default=None, help="drawn masks, in the order of the images"
    )
    p.add_argument(
        "--fold-dir",
        type=Path,
        default=None,
        help="the fold's folder: runs/<exp>/twostage/fold<k> or runs/<exp>/csasn/fold<k>",
    )
    p.add_argument("--fold", type=count, default=None, help="the fold the checkpoints must be of (checked)")
    p.add_argument(
        "--transunet", type=Path, default=None, help="TransUNetStage checkpoint (overrides --fold-dir)"
    )
    p.add_argument(
        "--roi-classifier",
        type=Path,
        default=None,
        help="RoiClassifierStage checkpoint (overrides --fold-dir)",
    )
    p.add_argument("--csasn", type=Path, default=None, help="CSASNStage checkpoint (overrides --fold-dir)")
    p.add_argument(
        "--dicom-regions",
        choices=("auto", "tissue", "whole"),
        default="auto",
        help="auto: image files cut to their DICOM tissue regions, manifest images whole (as in training)",
    )
    p.add_argument(
        "--out",
        type=output_file,
        default=Path("still_predictions.csv"),
        help="output CSV (default still_predictions.csv)",
    )
    p.add_argument("--threshold", type=fraction, default=0.5, help="decision threshold on prob_malignant")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    table = predict_still(args)
    show(table, args.threshold)
    print(f"wrote {args.out}")
