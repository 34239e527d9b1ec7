"""``usnodule predict``: STACT-Time on new, unannotated clips from a scanner -> ``predictions.csv``.

The deployable predictor: one fold's four checkpoints (``--fold-dir runs/<exp>/fold<k>`` or each by name) and
one or more clips (anything :func:`datamodules.clips.read_clip` reads: ``.dcm`` single/multi-frame DICOM, also
without a suffix, .mp4/.avi, a folder of frames, .npy/.npz, .h5). Per clip, as in training (STACT-Time sec.
2.3-2.4):

1. MSU-Net mask for every frame (SegStage's input size and threshold from its checkpoint), computed by the
   code of ``usnodule masks`` (:func:`lightning_modules.export.segment_frames`): frames resized to the network
   input, logits resized back to full frame, thresholded.
2. Non-overlapping 3-stacks in frame order (a trailing 1-2 frames dropped; a clip of 1-2 frames gives one
   stack with its last frame repeated), ROI box = union of the three *predicted* masks' boxes + buffer
   (fallback: the clip's union box, then the full frame), ViT input = ROI crop, mask CNN input = the masks.
   None of this is re-implemented: the clip is held as a one-nodule :class:`StanfordCine` and the stacks come
   from :func:`datamodules.stacks.build_dataset` / :class:`datamodules.stacks.StackDataset`, with the sizes,
   buffer and normalisation read from the checkpoints' saved datamodule hyper-parameters.
3. ViT and mask-CNN embeddings per stack (:class:`lightning_modules.export.EmbeddingExport`), then the
   attention head (HeadStage) on the sequence: ``prob_malignant``.

Output columns: ``clip, n_frames, n_stacks, frames_with_mask, prob_malignant, pred, prob_avepool`` where
``pred = prob_malignant >= --threshold`` and ``prob_avepool`` is the mean of the ViT's per-stack probabilities
(the CineCNN-AvePool baseline of Table 2, free from the same forward pass); ``frames_with_mask`` counts frames
where MSU-Net found a nodule (0 means every ROI fell back to the full frame: check the clip). The CSV is written
atomically and only when every clip succeeded; a bad clip or checkpoint stops with one line naming the file, and
so do checkpoints of another fold than the ``fold<k>`` folder they are in, or of two folds
(:func:`datamodules.provenance.check_fold_checkpoints`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from datamodules.atomic import atomic_path
from datamodules.clips import read_clip, split_h5_spec
from datamodules.embeddings import pad_collate
from datamodules.errors import DataError
from datamodules.files import resolve_checkpoints
from datamodules.provenance import check_fold_checkpoints
from datamodules.stacks import PredictedMasks
from datamodules.stanford import StanfordCine
from stages.options import add_checkpoint_options, fraction, output_file, positive_int

COLUMNS = ("clip", "n_frames", "n_stacks", "frames_with_mask", "prob_malignant", "pred", "prob_avepool")


# ---------------------------------------------------------------------------------------------- clips
def clip_data(name: str, frames: np.ndarray, masks: np.ndarray) -> tuple[StanfordCine, PredictedMasks]:
    """One clip in memory as a one-nodule :class:`StanfordCine` and its :class:`PredictedMasks`, so that the
    training code (:class:`~datamodules.stacks.StackDataset`) builds its stacks, ROI boxes and crops
    unchanged.

    The clip has no annotation, so the predicted masks serve as its masks too: they are the only masks of a
    new clip (this also makes a ``mask_roi`` mask CNN crop around predicted boxes). Label -1 = unknown.
    """
    cine = StanfordCine.from_arrays(name, frames, masks)
    return cine, PredictedMasks.from_arrays(masks, cine)


# ---------------------------------------------------------------------------------------------- models
@dataclass
class Predictor:
    """The four loaded stages of one fold and the data settings they were trained with."""

    seg: torch.nn.Module
    vit: torch.nn.Module
    maskcnn: torch.nn.Module
    head: torch.nn.Module
    seg_size: int
    seg_threshold: float
    vit_data: dict
    mask_data: dict
    img_size: int
    mask_size: int
    device: torch.device


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(None, f"--device {device}: CUDA is not available on this machine")
    return torch.device(device)


def load_predictor(
    paths: dict[str, Path], device: str = "auto", mask_threshold: float | None = None
) -> Predictor:
    """Load the four stages in eval mode, as ``usnodule masks`` / ``embeddings`` load them."""
    from lightning_modules.head_stage import HeadStage
    from lightning_modules.maskcnn_stage import MaskCNNStage
    from lightning_modules.seg_stage import SegStage
    from lightning_modules.vit_stage import ViTStage

    seg, seg_data = SegStage.from_checkpoint(paths["seg"])
    vit, vit_data = ViTStage.from_checkpoint(paths["vit"])
    maskcnn, mask_data = MaskCNNStage.from_checkpoint(paths["maskcnn"])
    head, _ = HeadStage.from_checkpoint(paths["head"])
    img_size = vit.input_size(vit_data)
    dev = pick_device(device)
    return Predictor(
        seg=seg.to(dev),
        vit=vit.to(dev),
        maskcnn=maskcnn.to(dev),
        head=head.to(dev),
        seg_size=int(seg_data.get("size") or 256),
        seg_threshold=float(seg.hparams.get("threshold", 0.5) if mask_threshold is None else mask_threshold),
        vit_data=vit_data,
        mask_data=mask_data,
        img_size=img_size,
        mask_size=int(mask_data.get("img_size") or img_size),
        device=dev,
    )


# ---------------------------------------------------------------------------------------------- pipeline
def segment(p: Predictor, frames: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """(T, H, W) uint8 {0, 1} predicted masks, by the mask inference of ``usnodule masks``."""
    from lightning_modules.export import segment_frames

    return segment_frames(p.seg, frames, p.seg_size, p.seg_threshold, p.device, batch_size)


@torch.inference_mode()
def embed(
    p: Predictor, cine: StanfordCine, masks: PredictedMasks, batch_size: int = 16
) -> dict[str, torch.Tensor]:
    """Per-stack ``image``/``seg`` embeddings (S, 256) and ``image_prob`` (S,), in stack order, exactly as
    ``usnodule embeddings --boxes predicted`` computes them for a nodule (``cine``, ``masks``:
    :func:`clip_data`)."""
    from datamodules.stacks import build_dataset
    from lightning_modules.export import EmbeddingExport

    dataset = build_dataset(
        cine, masks, p.vit_data, p.mask_data, p.img_size, p.mask_size, predicted_boxes=True
    )
    export = EmbeddingExport(p.vit, p.maskcnn)
    parts: dict[str, list[torch.Tensor]] = {"image": [], "seg": [], "image_prob": []}
    for i, batch in enumerate(DataLoader(dataset, batch_size=batch_size, shuffle=False)):
        batch = {k: v.to(p.device) for k, v in batch.items()}
        out = export.predict_step(batch, i)
        for key in parts:
            parts[key].append(out[key].float().cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


@torch.inference_mode()
def head_prob(p: Predictor, emb: dict[str, torch.Tensor]) -> float:
    """HeadStage malignant probability of one sequence, batched as the head's DataModule batches it."""
    item = {
        "image_emb": emb["image"],
        "seg_emb": emb["seg"],
        "label": torch.tensor(-1),
        "nodule": torch.tensor(0),
    }
    batch = {k: v.to(p.device) for k, v in pad_collate([item]).items()}
    return float(p.head.predict_step(batch, 0)["prob"][0])


def predict_clip(
    p: Predictor, path: str | os.PathLike, *, threshold: float = 0.5, batch_size: int = 16
) -> dict:
    """One CSV row for the clip at ``path``."""
    frames = read_clip(path)
    masks = segment(p, frames, batch_size)
    emb = embed(p, *clip_data(str(path), frames, masks), batch_size)
    prob = head_prob(p, emb)
    return {
        "clip": str(path),
        "n_frames": int(len(frames)),
        "n_stacks": int(len(emb["image"])),
        "frames_with_mask": int(masks.reshape(len(masks), -1).any(axis=1).sum()),
        "prob_malignant": prob,
        "pred": int(prob >= threshold),
        "prob_avepool": float(emb["image_prob"].mean()),
    }


def predict(
    clips: Sequence[str | os.PathLike],
    *,
    seg=None,
    vit=None,
    maskcnn=None,
    head=None,
    fold_dir: str | os.PathLike | None = None,
    head_variant: str = "stact",
    out: str | os.PathLike | None = None,
    threshold: float = 0.5,
    device: str = "auto",
    batch_size: int = 16,
    mask_threshold: float | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Predict every clip; write ``out`` (atomically, only if all succeed) when given. Returns the table."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if not clips:
        raise DataError(None, "no clips given")
    for c in clips:  # fail before loading models for a plain typo
        if not split_h5_spec(c)[0].exists():  # "clip.h5:/key" names a dataset inside clip.h5
            raise DataError(c, "does not exist")
    paths = resolve_checkpoints(
        fold_dir=fold_dir, seg=seg, vit=vit, maskcnn=maskcnn, head=head, head_variant=head_variant
    )
    check_fold_checkpoints(paths, fold_dir)  # one fold's four stages, fitted on each other's outputs
    p = load_predictor(paths, device, mask_threshold)
    rows = []
    bar = Progress(
        TextColumn("predict"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not (progress and sys.stdout.isatty()),
    )
    with bar:
        task = bar.add_task("predict", total=len(clips))
        for c in clips:
            rows.append(predict_clip(p, c, threshold=threshold, batch_size=batch_size))
            bar.advance(task)
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    if out is not None:
        with atomic_path(out) as tmp:
            table.to_csv(tmp, index=False)
    return table


# ---------------------------------------------------------------------------------------------- CLI
def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="STACT-Time malignancy probability of new clips (DICOM, video, .npy, ...)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("clips", nargs="+", type=Path, help="clips: .dcm, .mp4/.avi, frame folder, .npy/.npz, .h5")
    add_checkpoint_options(
        p, "runs/<exp>/fold<k>: seg.ckpt, vit.ckpt, maskcnn.ckpt, head_<variant>.ckpt inside it"
    )
    p.add_argument(
        "--out",
        type=output_file,
        default=Path("predictions.csv"),
        help="output CSV (default predictions.csv)",
    )
    p.add_argument("--threshold", type=fraction, default=0.5, help="decision threshold on prob_malignant")
    p.add_argument(
        "--mask-threshold",
        type=fraction,
        default=None,
        help="mask probability threshold (default: the SegStage's)",
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=positive_int, default=16, help="frames / stacks per forward pass")
    p.set_defaults(func=run)


def show(table: pd.DataFrame, threshold: float) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"STACT-Time predictions (malignant if prob >= {threshold:g})")
    for col in ("clip", "frames", "stacks", "masked", "prob", "pred", "avepool"):
        t.add_column(col, justify="left" if col == "clip" else "right", overflow="fold")
    for r in table.itertuples(index=False):
        t.add_row(
            str(r.clip),
            str(r.n_frames),
            str(r.n_stacks),
            str(r.frames_with_mask),
            f"{r.prob_malignant:.3f}",
            "malignant" if r.pred else "benign",
            f"{r.prob_avepool:.3f}",
        )
    Console().print(t)


def run(args: argparse.Namespace) -> None:
    table = predict(
        args.clips,
        seg=args.seg,
        vit=args.vit,
        maskcnn=args.maskcnn,
        head=args.head,
        fold_dir=args.fold_dir,
        head_variant=args.head_variant,
        out=args.out,
        threshold=args.threshold,
        device=args.device,
        batch_size=args.batch_size,
        mask_threshold=args.mask_threshold,
    )
    show(table, args.threshold)
    print(f"wrote {args.out}")
