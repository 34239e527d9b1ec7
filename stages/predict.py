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

Ultrasound regions: a DICOM file with a Sequence of Ultrasound Regions (0018,6011) is cut to its 2D tissue
region(s) first (:func:`datamodules.dicom.tissue_regions`), so burned-in text, rulers and colour bars never reach
the models, and each region (two views side by side: two) is predicted on its own, one CSV row each. The
region's physical spacing gives the predicted nodule's size in mm (:func:`datamodules.nodule_size.nodule_size`).
Other files, and DICOM without the sequence, are predicted on the whole frame, as before, and say so.

Output columns, one row per clip and region:

``clip, region, n_frames, n_stacks, frames_with_mask, prob_malignant, pred, prob_avepool, crop_box, spacing,
nodule_frame, width_mm, height_mm, max_extent_mm`` where ``region`` is the item number (1 = first) in the
Sequence of Ultrasound Regions, or ``whole frame`` (no sequence, or no 2D tissue region in it);
``crop_box`` is the part of the frame predicted on, ``x0 y0 x1 y1`` in frame pixels, end-exclusive;
``pred = prob_malignant >= --threshold`` and ``prob_avepool`` is the mean of the ViT's per-stack probabilities
(the CineCNN-AvePool baseline of Table 2, free from the same forward pass); ``frames_with_mask`` counts frames
where MSU-Net found a nodule (0 means every ROI fell back to the full frame: check the clip); ``spacing`` is
``<dx> x <dy> mm/px`` from the region, or ``unknown``; ``nodule_frame`` (1 = first frame) is where the largest
predicted nodule is largest, and ``width_mm``, ``height_mm``, ``max_extent_mm`` its bounding box and longest
extent there (empty when the spacing is unknown or no frame has a mask).

``--overlay DIR`` also writes, per row, ``DIR/<clip name>[_region<k>].mp4`` (every frame with the predicted
mask contour, the region and crop boxes, the probability, and the attention head's attention over the stacks
as a strip below, the frame's stack outlined) and ``.png`` (a montage of each stack's middle frame over its
attention cells); drawing code: :mod:`datamodules.overlay`. The attention weights are recomputed by
``HeadStage.attention_maps`` on the same inputs after the probability, so the probabilities are the same with
or without ``--overlay``. A name used twice gets ``-2``, ``-3``... The CSV is written atomically and the
overlays are moved into ``DIR`` only when every clip succeeded; a bad clip or checkpoint stops with one line
naming the file, and so do checkpoints of another fold than the ``fold<k>`` folder they are in, or of two
folds (:func:`datamodules.provenance.check_fold_checkpoints`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from datamodules.atomic import atomic_path, clean_stale
from datamodules.clips import clip_format, read_clip, split_h5_spec
from datamodules.dicom import tissue_regions, ultrasound_regions
from datamodules.embeddings import pad_collate, refuse_crossfitted_head
from datamodules.errors import DataError, is_write_error, write_error
from datamodules.files import resolve_checkpoints
from datamodules.nodule_size import nodule_size
from datamodules.provenance import check_fold_checkpoints
from datamodules.stacks import PredictedMasks, stack_positions
from datamodules.stanford import StanfordCine
from stages.options import add_checkpoint_options, fraction, output_file, positive_int

COLUMNS = (
    "clip",
    "region",
    "n_frames",
    "n_stacks",
    "frames_with_mask",
    "prob_malignant",
    "pred",
    "prob_avepool",
    "crop_box",
    "spacing",
    "nodule_frame",
    "width_mm",
    "height_mm",
    "max_extent_mm",
)
WHOLE_FRAME = "whole frame"
UNKNOWN = "unknown"
OVERLAY_FPS = 10  # frames per second of the overlay videos (scanner frame rates are not read)


# ---------------------------------------------------------------------------------------------- regions
@dataclass(frozen=True)
class ClipRegion:
    """The part of a clip's frames predicted on: ``label`` for the CSV (``"1"``, ``"2"``... or
    ``whole frame``), ``box`` ``(y0, x0, y1, x1)`` in frame pixels, ``spacing_mm`` ``(dy, dx)`` or None."""

    label: str
    box: tuple[int, int, int, int]
    spacing_mm: tuple[float, float] | None = None

    @property
    def spacing(self) -> str:
        if self.spacing_mm is None:
            return UNKNOWN
        dy, dx = self.spacing_mm
        return f"{dx:.6g} x {dy:.6g} mm/px"

    @property
    def crop_box(self) -> str:
        y0, x0, y1, x1 = self.box
        return f"{x0} {y0} {x1} {y1}"

    def crop(self, frames: np.ndarray) -> np.ndarray:
        y0, x0, y1, x1 = self.box
        if (y0, x0, y1, x1) == (0, 0, *frames.shape[1:]):
            return frames
        return np.ascontiguousarray(frames[:, y0:y1, x0:x1])


def clip_regions(path: str | os.PathLike, shape: tuple[int, int]) -> list[ClipRegion]:
    """The regions of a clip to predict on: its DICOM tissue regions, else the whole ``shape`` (H, W) frame."""
    whole = [ClipRegion(WHOLE_FRAME, (0, 0, *shape))]
    if clip_format(path).name != "dicom":
        return whole
    regions = ultrasound_regions(path)
    if regions is None:
        return whole
    tissue = tissue_regions(regions)
    if not tissue:
        return [ClipRegion(f"{WHOLE_FRAME} (no 2D tissue region)", (0, 0, *shape))]
    return [ClipRegion(str(r.item), r.box, r.spacing_mm) for r in tissue]


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


def load_predictor(
    paths: dict[str, Path], device: str = "auto", mask_threshold: float | None = None
) -> Predictor:
    """Load the four stages in eval mode, as ``usnodule masks`` / ``embeddings`` load them."""
    from lightning_modules.export import pick_device
    from lightning_modules.head_stage import HeadStage
    from lightning_modules.maskcnn_stage import MaskCNNStage
    from lightning_modules.seg_stage import SegStage
    from lightning_modules.vit_stage import ViTStage

    seg, seg_data = SegStage.from_checkpoint(paths["seg"])
    vit, vit_data = ViTStage.from_checkpoint(paths["vit"])
    maskcnn, mask_data = MaskCNNStage.from_checkpoint(paths["maskcnn"])
    head, head_data = HeadStage.from_checkpoint(paths["head"])
    refuse_crossfitted_head(paths["head"], head_data)
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
    out = {k: torch.cat(v) for k, v in parts.items()}
    # Each stack's crop box (y0, x0, y1, x1), in stack order, for the overlays.
    nid = dataset.image.nodule_ids[0]
    out["roi"] = torch.tensor([dataset.image.roi(nid, pos) for _, _, pos in dataset.image.index])
    return out


def _head_batch(p: Predictor, emb: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One sequence batched as the head's DataModule batches it."""
    item = {
        "image_emb": emb["image"],
        "seg_emb": emb["seg"],
        "label": torch.tensor(-1),
        "nodule": torch.tensor(0),
    }
    return {k: v.to(p.device) for k, v in pad_collate([item]).items()}


@torch.inference_mode()
def head_prob(p: Predictor, emb: dict[str, torch.Tensor]) -> float:
    """HeadStage malignant probability of one sequence."""
    return float(p.head.predict_step(_head_batch(p, emb), 0)["prob"][0])


@torch.inference_mode()
def head_attention(p: Predictor, emb: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Per attention block of the head, the ``(S,)`` share of attention each stack receives
    (:func:`datamodules.overlay.stack_attention`), from ``HeadStage.attention_maps`` on the inputs of
    :func:`head_prob` (a separate pass: the probability's own computation is untouched)."""
    from datamodules.overlay import stack_attention

    batch = _head_batch(p, emb)
    valid = batch["valid"][0].cpu().numpy()
    maps = p.head.attention_maps(batch)
    return {k: stack_attention(v[0].float().cpu().numpy(), valid) for k, v in maps.items()}


def _size_columns(masks: np.ndarray, spacing_mm: tuple[float, float] | None) -> dict:
    size = nodule_size(masks, spacing_mm)
    return {
        "nodule_frame": None if size is None else size.frame + 1,
        "width_mm": None if size is None else size.width_mm,
        "height_mm": None if size is None else size.height_mm,
        "max_extent_mm": None if size is None else size.max_extent_mm,
    }


def predict_region(
    p: Predictor,
    name: str,
    frames: np.ndarray,
    region: ClipRegion,
    *,
    threshold: float = 0.5,
    batch_size: int = 16,
    overlay: Path | None = None,
) -> dict:
    """One CSV row: the clip's ``frames`` (T, H, W) cut to ``region`` and predicted; with ``overlay`` (a
    file name without suffix) its video and montage are written there too."""
    crop = region.crop(frames)
    masks = segment(p, crop, batch_size)
    emb = embed(p, *clip_data(name, crop, masks), batch_size)
    prob = head_prob(p, emb)
    if overlay is not None:
        write_overlay(
            overlay,
            name,
            frames,
            masks,
            region,
            prob,
            emb["roi"].tolist(),
            head_attention(p, emb),
            p.vit_data.get("stack_frames", "adjacent"),
        )
    return {
        "clip": name,
        "region": region.label,
        "n_frames": int(len(frames)),
        "n_stacks": int(len(emb["image"])),
        "frames_with_mask": int(masks.reshape(len(masks), -1).any(axis=1).sum()),
        "prob_malignant": prob,
        "pred": int(prob >= threshold),
        "prob_avepool": float(emb["image_prob"].mean()),
        "crop_box": region.crop_box,
        "spacing": region.spacing,
        **_size_columns(masks, region.spacing_mm),
    }


def predict_clip(
    p: Predictor,
    path: str | os.PathLike,
    *,
    threshold: float = 0.5,
    batch_size: int = 16,
    overlay: Path | None = None,
    names: set[str] | None = None,
) -> list[dict]:
    """The CSV rows of the clip at ``path``: one per region. ``overlay``: the folder for its pictures
    (``names``: the file names already used there)."""
    frames = read_clip(path)
    regions = clip_regions(path, frames.shape[1:])
    rows = []
    for region in regions:
        target = None
        if overlay is not None:
            stem = Path(split_h5_spec(path)[0]).stem or "clip"
            stem += f"_region{region.label}" if len(regions) > 1 or region.label.isdigit() else ""
            target = overlay / _unique(stem, names if names is not None else set())
        rows.append(
            predict_region(
                p, str(path), frames, region, threshold=threshold, batch_size=batch_size, overlay=target
            )
        )
    return rows


# ---------------------------------------------------------------------------------------------- overlays
def _unique(stem: str, used: set[str]) -> str:
    name, k = stem, 1
    while name in used:
        k += 1
        name = f"{stem}-{k}"
    used.add(name)
    return name


def write_overlay(
    target: Path,
    name: str,
    frames: np.ndarray,
    masks: np.ndarray,
    region: ClipRegion,
    prob: float,
    rois: Sequence[Sequence[int]],
    attention: dict[str, np.ndarray],
    stack_frames: str = "adjacent",
) -> None:
    """``target.mp4`` and ``target.png`` of one predicted region: ``masks`` and ``rois`` are in the region's
    pixels and are drawn on the whole frame."""
    from datamodules.overlay import ClipOverlay, write_mp4, write_png

    y0, x0, y1, x1 = region.box
    full = np.zeros(frames.shape, dtype=np.uint8)
    full[:, y0:y1, x0:x1] = masks
    whole = region.box == (0, 0, *frames.shape[1:])
    picture = ClipOverlay(
        name=Path(name).name + ("" if whole else f" region {region.label}"),
        frames=frames,
        masks=full,
        prob=prob,
        stacks=stack_positions(len(frames), stack_frames),
        rois=[(a + y0, b + x0, c + y0, d + x0) for a, b, c, d in rois],
        region=None if whole else region.box,
        attention=attention,
    )
    write_mp4(picture.video_frames(), target.with_suffix(".mp4"), fps=OVERLAY_FPS)
    write_png(picture.montage(), target.with_suffix(".png"))


@contextlib.contextmanager
def staged_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """A hidden folder beside ``folder`` to write into; its files move into ``folder`` only when the block
    succeeds, so a run that fails leaves no picture of a row it never wrote (a killed run's temporary is
    cleared by the next, as :func:`datamodules.atomic.clean_stale` clears every output's)."""
    folder = Path(folder)
    clean_stale(folder)
    tmp = folder.with_name(f".{folder.name}.partial-{os.getpid()}{folder.suffix}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        folder.mkdir(parents=True, exist_ok=True)
        for f in sorted(tmp.iterdir()):
            os.replace(f, folder / f.name)
    except OSError as e:
        if is_write_error(e):
            raise write_error(folder, e) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    overlay: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """Predict every clip; write ``out`` (atomically, only if all succeed) when given, and the pictures into
    ``overlay`` (likewise). Returns the table."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if not clips:
        raise DataError(None, "no clips given")
    for c in clips:  # fail before loading models for a plain typo
        if not split_h5_spec(c)[0].exists():  # "clip.h5:/key" names a dataset inside clip.h5
            raise DataError(c, "does not exist")
        if clip_format(c).name == "dicom":
            ultrasound_regions(c)  # header only: a region outside the frame fails before any model is loaded
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
    with contextlib.ExitStack() as stack:
        pictures = None if overlay is None else stack.enter_context(staged_folder(overlay))
        names: set[str] = set()
        with bar:
            task = bar.add_task("predict", total=len(clips))
            for c in clips:
                rows += predict_clip(
                    p, c, threshold=threshold, batch_size=batch_size, overlay=pictures, names=names
                )
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
    p.add_argument(
        "--overlay",
        type=output_folder,
        default=None,
        metavar="DIR",
        help="also write per clip (and region) an MP4 and a PNG montage with the predicted mask, crop boxes, "
        "probability and attention over stacks into DIR",
    )
    p.set_defaults(func=run)


def output_folder(text: str) -> Path:
    """A folder to write into: not an existing file, nor under one."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a folder")
    if any(q.exists() and not q.is_dir() for q in path.parents):
        raise argparse.ArgumentTypeError(f"{text!r} is under a file, not a folder")
    return path


def show(table: pd.DataFrame, threshold: float) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"STACT-Time predictions (malignant if prob >= {threshold:g})")
    for col in ("clip", "region", "frames", "stacks", "masked", "prob", "pred", "avepool", "size mm"):
        t.add_column(col, justify="left" if col in ("clip", "region") else "right", overflow="fold")
    for r in table.itertuples(index=False):
        size = "-" if pd.isna(r.width_mm) else f"{r.width_mm:.1f} x {r.height_mm:.1f}"
        t.add_row(
            str(r.clip),
            str(r.region),
            str(r.n_frames),
            str(r.n_stacks),
            str(r.frames_with_mask),
            f"{r.prob_malignant:.3f}",
            "malignant" if r.pred else "benign",
            f"{r.prob_avepool:.3f}",
            size,
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
        overlay=args.overlay,
    )
    show(table, args.threshold)
    print(f"wrote {args.out}")
    if args.overlay is not None:
        print(f"wrote {2 * len(table)} overlay files (.mp4, .png) to {args.overlay}")
