"""``usnodule still-masks``: one fold's TransUNet masks for every still image of a manifest -> HDF5.

Output (:mod:`datamodules.still_masks`): one ``(H, W)`` uint8 {0, 1} dataset per case at key = case id, at the
image's own size (the network's probability at the trained input size, resized back bilinearly, thresholded),
gzip-compressed; file attributes record the fold, the checkpoint, the manifest and the splits file with their
SHA-256, the input size and the threshold.  Every case is written, training ones included: stage 2 trains on
the boxes of predicted masks (the deployable protocol), and its training images' masks come from a network
that saw them (in-sample, so tighter than on test images; the paper does not say what it did).

The checkpoint must have been fitted on ``--fold`` of ``--splits`` (its saved data settings say so), else one
line and exit 2.  Written through :func:`~datamodules.atomic.atomic_path`: an interrupted run leaves no file.
Prints ``RESULT cases=N test_dice=D`` (Dice of the fold's test images with a drawn mask, all pixels pooled).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from torchmetrics.classification import BinaryF1Score

from datamodules.files import same_file


@torch.inference_mode()
def predict_still_masks(
    *,
    manifest: str | os.PathLike,
    splits: str | os.PathLike,
    fold: int,
    seg: str | os.PathLike,
    out: str | os.PathLike,
    batch_size: int = 16,
    device: str = "auto",
    threshold: float | None = None,
) -> tuple[Path, dict[str, float]]:
    """Write ``out`` (module doc); returns its path and ``{"cases", "test_dice"}``."""
    import h5py
    from torch.utils.data import DataLoader

    from datamodules.atomic import atomic_path
    from datamodules.errors import DataError
    from datamodules.folds import load_fold
    from datamodules.still_data import StillDataset
    from datamodules.still_masks import provenance
    from datamodules.stills import read_manifest, read_still_mask, still_size
    from lightning_modules.still_predict import full_size_mask
    from lightning_modules.transunet_stage import TransUNetStage

    cases = read_manifest(manifest)
    test_ids = set(load_fold(splits, fold)["test"])
    model, data = TransUNetStage.from_checkpoint(seg)
    if data.get("fold") != fold:
        raise DataError(seg, f"was fitted on fold {data.get('fold')}, not fold {fold}")
    if data.get("splits") and not same_file(data["splits"], splits):
        raise DataError(seg, f"was fitted on splits {data['splits']}, not {splits}")
    threshold = float(model.hparams.get("threshold", 0.5) if threshold is None else threshold)
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    model.to(dev)
    ds = StillDataset(
        cases,
        img_size=int(data.get("img_size", 224)),
        roi=None,
        channels=int(data.get("channels", 3)),
        normalize=data.get("normalize", "imagenet"),
    )
    out = Path(out)
    # Dice of binary masks, all test pixels pooled, is the pixel F1 score: torchmetrics' BinaryF1Score summing
    # (TP, FP, FN) over the images.  It says 0 when no pixel is positive in either mask (its zero_division);
    # NaN below means no test image had a drawn mask, so there was nothing to compare.
    dice = BinaryF1Score()
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
        f.attrs.update(
            {
                **provenance(fold=fold, checkpoint=seg, manifest=manifest, splits=splits),
                "img_size": ds.img_size,
                "threshold": threshold,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
        )
        for batch in DataLoader(ds, batch_size=batch_size):
            prob = model.nodule_prob(batch["image"].to(dev)).float().cpu()
            for p, i in zip(prob, batch["index"].tolist(), strict=True):
                case = cases[i]
                drawn = read_still_mask(case.mask) if case.mask is not None else None
                h, w = drawn.shape if drawn is not None else still_size(case.image)
                mask = full_size_mask(p, (h, w), threshold)  # the copy predict-still uses
                f.create_dataset(case.case_id, data=mask, compression="gzip", compression_opts=1)
                if drawn is not None and case.case_id in test_ids:
                    dice.update(
                        torch.from_numpy(mask).flatten().long(), torch.from_numpy(drawn).flatten().long()
                    )
    test_dice = float(dice.compute()) if dice.update_called else float("nan")
    return out, {"cases": len(cases), "test_dice": test_dice}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "still-masks",
        help="one fold's TransUNet masks of every still image -> HDF5 keyed by case id",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--manifest", type=Path, required=True, help="still-image manifest.csv")
    p.add_argument("--splits", type=Path, required=True, help="splits.json of the manifest")
    p.add_argument("--fold", type=int, required=True, help="the fold the checkpoint was fitted on")
    p.add_argument("--seg", type=Path, required=True, help="TransUNetStage checkpoint (transunet.ckpt)")
    p.add_argument("--out", type=Path, required=True, help="output HDF5 (e.g. runs/x/fold0/still_masks.h5)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--threshold", type=float, default=None, help="probability threshold (default: stage's)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    out, summary = predict_still_masks(
        manifest=args.manifest,
        splits=args.splits,
        fold=args.fold,
        seg=args.seg,
        out=args.out,
        batch_size=args.batch_size,
        device=args.device,
        threshold=args.threshold,
    )
    print(f"wrote {out}")
    print(f"RESULT cases={summary['cases']} test_dice={summary['test_dice']:.4g}")
