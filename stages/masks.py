"""``usnodule masks``: MSU-Net predicted masks for every frame -> ``masks.h5`` (STACT-Time sec. 2.3, stage 2).

Output layout: dataset ``mask`` (N, H, W) uint8 in {0, 1}, in the cine file's row order (so row r of
``masks.h5`` is the prediction for row r of ``dataset.hdf5``), plus copies of its ``annot_id`` and
``frame_num`` columns (readers check them row by row); attrs name the checkpoint and settings, and say which
fold, splits file and checkpoint (SHA-256) made the masks (:func:`datamodules.provenance.masks_attrs`), which
``usnodule embeddings`` and the mask CNN's fit check.

Streaming: contiguous blocks of rows are read (one HDF5 slice each, in DataLoader workers), resized to the
segmentation input size, segmented, the logits resized back to full frame size (bilinear) and thresholded,
and the block written straight into a chunked, compressed dataset; memory is one block. Written through
:func:`atomic_path`, so an interrupted run leaves no ``masks.h5``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from datamodules.atomic import atomic_path
from datamodules.provenance import masks_attrs
from datamodules.stacks import RowBlocks
from datamodules.stanford import StanfordCine
from stages.options import count, fraction, output_file, positive_int


@torch.inference_mode()
def predict_masks(
    *,
    cine: str | os.PathLike,
    seg: str | os.PathLike,
    out: str | os.PathLike,
    size: int | None = None,
    batch_size: int = 16,
    num_workers: int = 0,
    device: str = "auto",
    threshold: float | None = None,
    metadata: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    """Write ``out`` (see module docstring); returns its path."""
    from lightning_modules.export import segment_blocks
    from lightning_modules.seg_stage import SegStage

    data = StanfordCine(cine, metadata, require_mask=False)  # validates the file; masks not needed to predict
    model, seg_data = SegStage.from_checkpoint(seg)
    provenance = masks_attrs(seg, seg_data)
    size = size or seg_data.get("size") or 256  # the FrameDataModule's size
    threshold = model.hparams.get("threshold", 0.5) if threshold is None else threshold
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    model.to(dev)
    h, w = data.image_shape
    n = sum(nod.n_frames for nod in data.nodules)
    blocks = RowBlocks(cine, n, batch_size, (size, size))
    out = Path(out)
    with h5py.File(cine, "r") as src:
        ids, nums = src["annot_id"][()], src["frame_num"][()]
    # A bar on a terminal only: rich would print the finished bar into a CI log / make output.
    columns = Progress(
        TextColumn("masks"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not (progress and sys.stdout.isatty()),
    )
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as f, columns as bar:
        f["annot_id"], f["frame_num"] = ids, nums
        ds = f.create_dataset(
            "mask", shape=(n, h, w), dtype=np.uint8, chunks=(1, h, w), compression="gzip", compression_opts=1
        )
        f.attrs.update(
            {
                "seg_checkpoint": str(Path(seg).resolve()),
                "cine": str(Path(cine).resolve()),
                "size": int(size),
                "threshold": float(threshold),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                **provenance,
            }
        )
        task = bar.add_task("masks", total=n)
        for r0, mask in segment_blocks(model, blocks, (h, w), threshold, dev, num_workers):
            ds[r0 : r0 + len(mask)] = mask
            bar.advance(task, len(mask))
    return out


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "masks",
        help="predict a nodule mask for every frame (MSU-Net) -> masks.h5",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--cine", type=Path, required=True, help="Stanford dataset.hdf5")
    p.add_argument("--metadata", type=Path, default=None, help="metadata CSV (default: beside the HDF5)")
    p.add_argument("--seg", type=Path, required=True, help="SegStage checkpoint (seg.ckpt)")
    p.add_argument("--out", type=output_file, required=True, help="output masks.h5")
    p.add_argument(
        "--size", type=positive_int, default=None, help="network input size (default: from the checkpoint)"
    )
    p.add_argument("--batch-size", type=positive_int, default=16, help="frames per forward pass")
    p.add_argument("--num-workers", type=count, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--threshold", type=fraction, default=None, help="mask probability threshold (default: stage's)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    out = predict_masks(
        cine=args.cine,
        seg=args.seg,
        out=args.out,
        size=args.size,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=args.device,
        threshold=args.threshold,
        metadata=args.metadata,
    )
    print(f"wrote {out}")
    frames, foreground = _mask_summary(out)
    print(
        f"RESULT frames={frames} foreground={foreground:.4g}"
    )  # the key numbers for `python -m stages.step`


def _mask_summary(path: Path, block: int = 256) -> tuple[int, float]:
    """Frames in a masks file and the mean fraction of foreground pixels (0: the MSU-Net found nothing)."""
    with h5py.File(path, "r") as f:
        ds = f["mask"]
        on = sum(int(np.count_nonzero(ds[r : r + block])) for r in range(0, ds.shape[0], block))
        return ds.shape[0], on / max(1, ds.size)
