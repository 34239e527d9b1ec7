"""``usnodule roi-predict``: test and validation predictions of one fold's stage-2 ROI classifier (two-stage
framework: predicted-mask ROI -> ResNet-18) as ``predictions_<method>.csv`` / ``val_predictions_<method>.csv``.

Only predicts: the classifier is fitted by ``lightning fit -c conf/roi_resnet18.yaml``.  The images are
cropped exactly as in its training (the data settings saved in the checkpoint: ROI source, margin, size,
normalisation), from the predicted-mask file it was trained with unless ``--masks`` names another one.  A
checkpoint of another fold or splits file, or a mask file whose provenance names another fold, manifest or
splits file, is a one-line error.  Prints ``RESULT test_auroc=... test_f1=...``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch

from datamodules.files import same_file


@torch.inference_mode()
def roi_predict(
    *,
    ckpt: str | os.PathLike,
    splits: str | os.PathLike,
    fold: int,
    out_dir: str | os.PathLike,
    method: str = "twostage",
    manifest: str | os.PathLike | None = None,
    masks: str | os.PathLike | None = None,
    batch_size: int = 64,
) -> dict[str, float]:
    """Write the two CSVs (module doc); returns test AUROC and F1 at 0.5."""
    from sklearn.metrics import f1_score, roc_auc_score
    from torch.utils.data import DataLoader

    from datamodules.atomic import write_predictions
    from datamodules.errors import DataError
    from datamodules.folds import load_fold
    from datamodules.still_data import PredictedStillMasks, StillDataset
    from datamodules.still_masks import check_still_masks
    from datamodules.stills import read_manifest
    from lightning_modules.roi_stage import RoiClassifierStage

    model, data = RoiClassifierStage.from_checkpoint(ckpt)
    if data.get("fold") != fold:
        raise DataError(ckpt, f"was fitted on fold {data.get('fold')}, not fold {fold}")
    if data.get("splits") and not same_file(data["splits"], splits):
        raise DataError(ckpt, f"was fitted on splits {data['splits']}, not {splits}")
    manifest = manifest or data.get("manifest")
    roi = data.get("roi")
    predicted = None
    if roi == "predicted":
        masks = masks or data.get("predicted_masks")
        check_still_masks(masks, fold=fold, manifest=manifest, splits=splits)
        predicted = PredictedStillMasks(masks)
    by_id = {c.case_id: c for c in read_manifest(manifest)}
    part = load_fold(splits, fold)
    out_dir = Path(out_dir)
    result = {}
    for prefix, name in (("predictions_", "test"), ("val_predictions_", "val")):
        cases = [by_id[i] for i in part[name]]
        if predicted is not None:
            predicted.check([c.case_id for c in cases])
        ds = StillDataset(
            cases,
            img_size=int(data.get("img_size", 224)),
            roi=roi,
            roi_margin=float(data.get("roi_margin", 0.1)),
            roi_square=bool(data.get("roi_square", False)),
            roi_min_side=float(data.get("roi_min_side", 0.0)),
            predicted=predicted,
            channels=int(data.get("channels", 3)),
            normalize=data.get("normalize", "imagenet"),
        )
        probs = [model.malignant_prob(model(b["image"])) for b in DataLoader(ds, batch_size=batch_size)]
        p = torch.cat(probs).numpy() if probs else np.zeros(0)
        y = [c.label for c in cases]
        write_predictions(out_dir / f"{prefix}{method}.csv", [c.case_id for c in cases], y, p)
        if name == "test":
            two = len(set(y)) == 2
            result = {
                "test_auroc": roc_auc_score(y, p) if two else float("nan"),
                "test_f1": f1_score(y, p >= 0.5, zero_division=0),
            }
    return result


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "roi-predict",
        help="one fold's ROI classifier (two-stage stage 2) -> predictions CSVs for the report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ckpt", type=Path, required=True, help="RoiClassifierStage checkpoint")
    p.add_argument("--splits", type=Path, required=True, help="splits.json")
    p.add_argument("--fold", type=int, required=True)
    p.add_argument("--out-dir", type=Path, required=True, help="fold folder, e.g. runs/x/fold0")
    p.add_argument("--method", default="twostage", help="method name in the file names (default twostage)")
    p.add_argument("--manifest", type=Path, default=None, help="manifest (default: the checkpoint's)")
    p.add_argument("--masks", type=Path, default=None, help="predicted masks (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    r = roi_predict(
        ckpt=args.ckpt,
        splits=args.splits,
        fold=args.fold,
        out_dir=args.out_dir,
        method=args.method,
        manifest=args.manifest,
        masks=args.masks,
        batch_size=args.batch_size,
    )
    print(f"RESULT test_auroc={r['test_auroc']:.4g} test_f1={r['test_f1']:.4g}")
