"""``usnodule embeddings``: per-nodule image and segmentation embeddings -> ``embeddings.h5`` (STACT-Time sec. 2.3).

For every nodule of the cine file (all parts: the head trains on the fold's training nodules and is tested on
its test nodules), every 3-stack goes through the fine-tuned ViT (image embedding, 256-d "last hidden layer")
and the mask CNN on the matching stack of predicted masks (segmentation embedding), in the same stack order.
The stage-1/3 stack probabilities are kept too (``image_prob``/``seg_prob``): they are the CineCNN-AvePool
baseline and the Table 3 stack-level rows, at no extra forward pass.

Runs through ``Trainer.predict`` with :class:`EmbeddingWriter`, a ``BasePredictionWriter``: every batch carries
its dataset index (``nodule``, ``stack``), each rank appends its rows to its own shard as batches arrive
(memory does not grow with the number of nodules: only small per-nodule bookkeeping is held), and rank 0
merges the shards into one file laid out exactly as a single-process run (groups in nodule-id order, rows in
stack order, same attributes; each row is written at its (nodule, stack) place, so shard order does not
matter). Values agree to float rounding (~1e-7 measured with 2 CPU ranks): the ranks' batches hold other stacks,
and BLAS kernels may sum in another order for another batch. The shards live beside the output (a multi-node run
needs a shared filesystem there). The output is written through :func:`atomic_path`: an interrupted export
leaves no ``embeddings.h5``.

Before any work, the ViT, the mask CNN and ``masks.h5`` must say they are of one fold (``--fold`` when given; the
file records the fold they share when it is not) and one data set, and the mask CNN must have been fitted on masks
of the MSU-Net behind ``masks.h5`` (:func:`check_inputs`, :mod:`datamodules.provenance`).

``--crossfit DIR`` (opt-in, ``make train-head CROSSFIT=1``): cross-fitted embeddings for the head (issue 10): the
fold's training part was halved (``usnodule crossfit-halves``) and one ViT + mask CNN fitted per half; each
training nodule is embedded by the other half's encoders, so no training embedding comes from an encoder that
saw its nodule, and every validation / test nodule by both halves' encoders, stored as two views over which the
head's predictions are averaged (:func:`export_crossfit`; the file's ``stacking`` attribute says
``cross-fitted``, an ordinary export's ``in-sample``).  The predicted masks stay the fold's MSU-Net's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import lightning.pytorch as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader

from datamodules.atomic import atomic_path
from datamodules.crossfit import HALVES, OTHER, encoder_training_ids, load_halves
from datamodules.embeddings import group_name, view_key
from datamodules.errors import DataError, is_write_error, write_error
from datamodules.files import file_digest
from datamodules.folds import load_fold
from datamodules.provenance import UNKNOWN, check_fold_set, file_record, read_attrs
from datamodules.stacks import PredictedMasks, build_dataset
from datamodules.stanford import StanfordCine
from lightning_modules.export import EmbeddingExport
from stages.options import count, output_file, positive_int

SHARD_KEYS = ("nodule", "stack", "image", "seg", "image_prob", "seg_prob")


# ---------------------------------------------------------------------------------------------- checkpoints
# ---------------------------------------------------------------------------------------------- writer
class EmbeddingWriter(BasePredictionWriter):
    """Streams predictions to a per-rank shard, then rank 0 merges the shards into ``out`` (atomically).

    ``nodule_ids``/``n_stacks``/``group_attrs`` describe the dataset (index -> id, S per nodule, attrs per
    nodule); ``file_attrs`` go on the output file (checkpoints, inputs).
    """

    def __init__(
        self,
        out: str | os.PathLike,
        nodule_ids: Sequence[str],
        n_stacks: Sequence[int],
        group_attrs: Sequence[dict],
        file_attrs: dict[str, Any],
    ) -> None:
        super().__init__(write_interval="batch")
        self.out = Path(out)
        self.nodule_ids, self.n_stacks = list(nodule_ids), list(n_stacks)
        self.group_attrs, self.file_attrs = list(group_attrs), dict(file_attrs)
        self.shard_dir: Path | None = None
        self._shard: h5py.File | None = None

    # -- per rank --------------------------------------------------------------------------------------------
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # One token per run (from rank 0) names the shard folder, so stale shards of a killed run never mix in.
        token = trainer.strategy.broadcast(uuid.uuid4().hex[:12], src=0)
        self.shard_dir = self.out.with_name(f".{self.out.name}.shards") / token
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        self._shard = None

    def _open_shard(self, rank: int, dim: int) -> h5py.File:
        f = h5py.File(self.shard_dir / f"rank{rank}.h5", "w")
        for key in SHARD_KEYS:
            shape, dtype = ((0, dim), np.float32) if key in ("image", "seg") else ((0,), np.float32)
            if key in ("nodule", "stack"):
                dtype = np.int64
            f.create_dataset(
                key, shape=shape, maxshape=(None, *shape[1:]), dtype=dtype, chunks=(256, *shape[1:])
            )
        return f

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ) -> None:
        try:
            if self._shard is None:
                self._shard = self._open_shard(trainer.global_rank, int(prediction["image"].shape[1]))
            n = len(prediction["nodule"])
            for key in SHARD_KEYS:
                ds = self._shard[key]
                ds.resize(ds.shape[0] + n, axis=0)
                ds[-n:] = (
                    prediction[key].detach().float().cpu().numpy()
                    if key not in ("nodule", "stack")
                    else prediction[key].cpu().numpy()
                )
        except OSError as e:  # disk full under the shard folder: name the output, not h5py's internals
            if is_write_error(e):
                raise write_error(self.out, e) from None
            raise

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._shard is not None:
            self._shard.close()
            self._shard = None
        trainer.strategy.barrier("embeddings-shards-written")
        if trainer.is_global_zero:
            try:
                merge_shards(
                    sorted(self.shard_dir.glob("rank*.h5")),
                    self.out,
                    self.nodule_ids,
                    self.n_stacks,
                    self.group_attrs,
                    self.file_attrs,
                )
            finally:
                shutil.rmtree(self.shard_dir.parent, ignore_errors=True)
        trainer.strategy.barrier("embeddings-merged")

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if self._shard is not None:
            self._shard.close()
            self._shard = None
        if self.shard_dir is not None:
            shutil.rmtree(self.shard_dir, ignore_errors=True)
            try:  # the shards folder itself, once no rank has anything left in it
                self.shard_dir.parent.rmdir()
            except OSError:
                pass


def merge_shards(
    shards: Sequence[Path],
    out: Path,
    nodule_ids: Sequence[str],
    n_stacks: Sequence[int],
    group_attrs: Sequence[dict],
    file_attrs: dict[str, Any],
    block: int = 1024,
) -> Path:
    """Write ``out``: one group per nodule (id order), rows placed by (nodule, stack); streams ``block`` rows.

    Every (nodule, stack) must arrive exactly once or more (duplicates carry the same values); a hole is an
    error, so a lost shard can never produce a silently short file.
    """
    offsets = np.concatenate([[0], np.cumsum(n_stacks)])
    seen = np.zeros(int(offsets[-1]), dtype=bool)
    dim = None
    for s in shards:
        with h5py.File(s, "r") as f:
            dim = int(f["image"].shape[1])
            break
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as h:
        for k, v in file_attrs.items():
            h.attrs[k] = v
        groups = []
        for nid, s, attrs in zip(nodule_ids, n_stacks, group_attrs, strict=True):
            g = h.create_group(group_name(nid))
            for k, v in {"annot_id": nid, **attrs}.items():
                g.attrs[k] = v
            for key in ("image", "seg"):
                g.create_dataset(key, shape=(s, dim or 0), dtype=np.float32, chunks=(min(s, 64), dim or 1))
            for key in ("image_prob", "seg_prob"):
                g.create_dataset(key, shape=(s,), dtype=np.float32)
            groups.append(g)
        for path in shards:
            with h5py.File(path, "r") as f:
                total = f["nodule"].shape[0]
                for start in range(0, total, block):
                    sl = slice(start, min(total, start + block))
                    rows = {k: f[k][sl] for k in SHARD_KEYS}
                    seen[offsets[rows["nodule"]] + rows["stack"]] = True
                    # Group the block's rows by nodule: one h5py write per (nodule, key), stacks increasing.
                    order = np.lexsort((rows["stack"], rows["nodule"]))
                    nod = rows["nodule"][order]
                    for j in np.unique(nod):
                        sel = order[nod == j]
                        stacks = rows["stack"][sel]
                        stacks, first = np.unique(stacks, return_index=True)
                        sel = sel[first]
                        for key in ("image", "seg", "image_prob", "seg_prob"):
                            groups[j][key][stacks.tolist()] = rows[key][sel]
        if not seen.all():
            j = int(np.searchsorted(offsets, np.flatnonzero(~seen)[0], side="right") - 1)
            raise DataError(out, f"export incomplete: nodule {nodule_ids[j]!r} is missing stacks")
    return out


# ---------------------------------------------------------------------------------------------- provenance
def check_inputs(
    cine, masks, vit, vit_data, maskcnn, mask_data, splits, fold
) -> tuple[int | None, Path | None]:
    """The ViT, the mask CNN and ``masks.h5`` must be of one fold (``--fold`` when given) and one data set
    (:mod:`datamodules.provenance`); returns the fold (``--fold``, else the one they record) and the splits
    file they were made with (``--splits``, else the checkpoints' own, when it exists).

    With ``--fold`` or ``--splits`` the export is of fold k of ``--cine``, so the checkpoints must have been
    fitted on ``--cine`` too; without, fold-k networks may embed another data set (an external test set), and
    only the checkpoints are compared with each other."""
    records = {
        "vit": (Path(vit), vit_data),
        "maskcnn": (Path(maskcnn), mask_data),
        "masks": (Path(masks), file_record(masks)),
    }
    asked = UNKNOWN if fold is None else fold
    shared = check_fold_set(records, fold=asked, asked="--fold asks for {fold}", data={"splits": splits})
    if fold is not None or splits is not None:
        check_fold_set(records, data={"h5": cine})
    else:
        check_fold_set({k: records[k] for k in ("vit", "maskcnn")}, data={"h5": None})
    # The mask CNN was fitted on masks of one MSU-Net: those given must be of the same one.
    seg_now = records["masks"][1].get("seg_sha256")
    fitted_on = mask_data.get("masks_h5")
    if seg_now and fitted_on and Path(fitted_on).is_file():
        seg_then = read_attrs(fitted_on).get("seg_sha256")
        if seg_then and seg_then != seg_now:
            raise DataError(
                maskcnn,
                f"was fitted on {fitted_on}, masks of another MSU-Net checkpoint (SHA-256 {seg_then[:12]}) than "
                f"--masks {masks} (SHA-256 {seg_now[:12]})",
            )
    if fold is None and shared is not UNKNOWN:
        fold = shared
    trained = splits or vit_data.get("splits") or mask_data.get("splits")
    return fold, (Path(trained) if trained and Path(trained).is_file() else None)


# ---------------------------------------------------------------------------------------------- stage
def export(
    *,
    cine: str | os.PathLike,
    masks: str | os.PathLike,
    vit: str | os.PathLike,
    maskcnn: str | os.PathLike,
    out: str | os.PathLike,
    splits: str | os.PathLike | None = None,
    fold: int | None = None,
    metadata: str | os.PathLike | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    img_size: int | None = None,
    mask_size: int | None = None,
    accelerator: str = "auto",
    devices: Any = 1,
    strategy: str = "auto",
    precision: Any = None,
    boxes: str = "auto",
    progress: bool = True,
    callbacks: Sequence[L.Callback] = (),
    nodule_ids: Sequence[str] | None = None,
    encoder_train: set[str] | None = None,
) -> Path:
    """Export embeddings of every nodule (or of ``nodule_ids``) to ``out``; see the module docstring. Returns
    ``out``.  ``encoder_train`` (cross-fitting): the ids both encoders must have been fitted on, exactly (read
    from their checkpoints' splits file and fold), none of which may be among the nodules embedded."""
    from lightning_modules.maskcnn_stage import MaskCNNStage
    from lightning_modules.vit_stage import ViTStage

    out = Path(out)
    vit_model, vit_data = ViTStage.from_checkpoint(vit)
    mask_model, mask_data = MaskCNNStage.from_checkpoint(maskcnn)
    if encoder_train is None:
        fold, trained_splits = check_inputs(cine, masks, vit, vit_data, maskcnn, mask_data, splits, fold)
    else:  # half encoders are fitted on derived splits (the halves): checked against them instead
        trained_splits = None
        for path, data_settings in ((vit, vit_data), (maskcnn, mask_data)):
            seen = encoder_training_ids(data_settings, path)
            if seen != set(encoder_train):
                raise DataError(
                    path,
                    "was not fitted on the cross-fit half it stands for (its splits' training part differs)",
                )
            inside = sorted(seen & set(nodule_ids or ()))
            if inside:
                raise DataError(
                    path, f"would embed {len(inside)} nodule(s) it was fitted on, e.g. {inside[:3]}"
                )
    img_size = img_size or vit_model.input_size(vit_data)
    mask_size = mask_size or mask_data.get("img_size") or img_size
    if boxes not in ("auto", "annotated", "predicted"):
        raise DataError(None, f"boxes must be auto, annotated or predicted, got {boxes!r}")
    predicted_boxes = None if boxes == "auto" else boxes == "predicted"
    if predicted_boxes is None:
        predicted_boxes = bool(vit_data.get("use_predicted_boxes", False))
    # Annotated masks are needed only for annotated boxes: with predicted boxes, clips alone are enough.
    data = StanfordCine(cine, metadata, require_mask=not predicted_boxes)
    pred = PredictedMasks(masks, data)
    dataset = build_dataset(data, pred, vit_data, mask_data, img_size, mask_size, predicted_boxes, nodule_ids)

    part_of: dict[str, str] = {}
    if splits is not None:
        split = load_fold(splits, fold)
        part_of = {i: p for p, ids in split.items() for i in ids}
    group_attrs = [
        {
            "label": int(lab),
            "fold": -1 if fold is None else int(fold),
            "part": part_of.get(nid, ""),
            "source": str(Path(cine).resolve()),
        }
        for nid, lab in zip(dataset.nodule_ids, dataset.labels, strict=True)
    ]
    file_attrs = {
        "format": "usnodule-embeddings/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cine": str(Path(cine).resolve()),
        "masks": str(Path(masks).resolve()),
        "vit_checkpoint": str(Path(vit).resolve()),
        "vit_sha256": file_digest(vit),
        "maskcnn_checkpoint": str(Path(maskcnn).resolve()),
        "maskcnn_sha256": file_digest(maskcnn),
        "splits": "" if splits is None else str(Path(splits).resolve()),
        "splits_sha256": file_digest(trained_splits) if trained_splits else "",
        "masks_seg_sha256": str(read_attrs(masks).get("seg_sha256", "")),
        "fold": -1 if fold is None else int(fold),
        "img_size": int(img_size),
        "mask_size": int(mask_size),
        "boxes": "predicted masks" if predicted_boxes else "annotated masks",
        "stacking": "in-sample",
        "stack_order": "groups by annot_id; rows = stacks in order (datamodules/stacks.py stack_positions)",
        "image_stack_frames": dataset.image.stack_frames,
        "mask_stack_frames": dataset.mask.stack_frames,
    }
    writer = EmbeddingWriter(out, dataset.nodule_ids, dataset.n_stacks, group_attrs, file_attrs)
    bar = []
    if progress and sys.stdout.isatty():  # Rich bar on a terminal; none in CI logs / make output
        from lightning.pytorch.callbacks import RichProgressBar

        bar = [RichProgressBar()]
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=bool(bar),
        callbacks=[writer, *bar, *callbacks],
    )
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )
    trainer.predict(EmbeddingExport(vit_model, mask_model), dataloaders=loader, return_predictions=False)
    return out


def export_crossfit(
    *,
    cine: str | os.PathLike,
    masks: str | os.PathLike,
    crossfit: str | os.PathLike,
    out: str | os.PathLike,
    splits: str | os.PathLike | None,
    fold: int | None,
    metadata: str | os.PathLike | None = None,
    **kwargs: Any,
) -> Path:
    """Cross-fitted embeddings of every nodule to ``out`` (``usnodule embeddings --crossfit DIR``).

    ``DIR`` holds ``halves.json`` (``usnodule crossfit-halves``) and each half's encoders, ``vit_A.ckpt``,
    ``maskcnn_A.ckpt``, ``vit_B.ckpt``, ``maskcnn_B.ckpt``, fitted on ``splits_A.json`` / ``splits_B.json``.
    A training nodule of half A is embedded by B's encoders only and one of half B by A's; every other nodule
    (validation, test, outside the fold) by both, stored as two views that the head's readers average over
    (datamodules/embeddings.py).  Each nodule group's ``encoders`` attribute names the half of each view; the
    file's ``stacking`` attribute is ``cross-fitted`` and ``vit_checkpoint_<half>`` / ``vit_sha256_<half>``
    (and the mask CNN's) name the encoders.  Each encoder's checkpoint must record exactly its half as its
    training part.  Other arguments as :func:`export`.
    """
    out, crossfit = Path(out), Path(crossfit)
    if splits is None or fold is None:
        raise DataError(
            None, "--crossfit needs --splits and --fold (the fold whose training part was halved)"
        )
    halves = load_halves(crossfit, fold)
    train = set(load_fold(splits, fold)["train"])
    if set(halves["A"]) | set(halves["B"]) != train:
        raise DataError(
            crossfit / "halves.json", f"halves do not make up fold {fold}'s training part of {splits}"
        )
    everything = [n.annot_id for n in StanfordCine(cine, metadata, require_mask=False).nodules]
    ckpts = {h: {k: crossfit / f"{k}_{h}.ckpt" for k in ("vit", "maskcnn")} for h in HALVES}
    views: dict[str, Path] = {}
    # Under DDP every rank runs both exports (each ends once its file is merged, behind a barrier); then rank 0
    # alone merges the two files and removes them: another rank removing them could pull them from under it.
    rank0 = int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0
    try:
        for h in HALVES:  # encoders of half h embed every nodule outside half h
            views[h] = out.with_name(f".{out.name}.view_{h}.h5")
            export(
                cine=cine,
                masks=masks,
                vit=ckpts[h]["vit"],
                maskcnn=ckpts[h]["maskcnn"],
                out=views[h],
                splits=splits,
                fold=fold,
                metadata=metadata,
                nodule_ids=[i for i in everything if i not in set(halves[h])],
                encoder_train=set(halves[h]),
                **kwargs,
            )
        if rank0:
            encoders = {i: [OTHER[h]] for h in HALVES for i in halves[h]}
            extra = {
                "crossfit": str(crossfit.resolve()),
                "crossfit_halves_sha256": file_digest(crossfit / "halves.json"),
            }
            for h in HALVES:
                for k in ("vit", "maskcnn"):
                    extra[f"{k}_checkpoint_{h}"] = str(ckpts[h][k].resolve())
                    extra[f"{k}_sha256_{h}"] = file_digest(ckpts[h][k])
            merge_views(views, {i: encoders.get(i, list(HALVES)) for i in everything}, out, extra)
    finally:
        for path in views.values() if rank0 else ():
            path.unlink(missing_ok=True)
    return out


def merge_views(
    views: dict[str, Path], encoders: dict[str, list[str]], out: Path, extra: dict[str, Any]
) -> Path:
    """``out`` with one group per nodule holding, in order, the view of each encoder ``encoders[id]`` names
    (view 0 under the plain dataset names, view j under ``<name>_<j>``), copied from the per-encoder files
    ``views``; the file attributes of the first file less its single-encoder ones, plus ``extra``."""
    files = {h: h5py.File(p, "r") for h, p in views.items()}
    try:
        first = next(iter(files.values()))
        with atomic_path(out) as tmp, h5py.File(tmp, "w") as h:
            single = ("vit_checkpoint", "vit_sha256", "maskcnn_checkpoint", "maskcnn_sha256")
            for k, v in first.attrs.items():
                if k not in single:
                    h.attrs[k] = v
            h.attrs.update({**extra, "stacking": "cross-fitted"})
            for nid in sorted(encoders):
                name = group_name(nid)
                g = h.create_group(name)
                for j, enc in enumerate(encoders[nid]):
                    src = files[enc][name]
                    if j == 0:
                        g.attrs.update(dict(src.attrs))
                    for key in ("image", "seg", "image_prob", "seg_prob"):
                        g.create_dataset(view_key(key, j), data=src[key][()])
                g.attrs["encoders"] = ",".join(encoders[nid])
    finally:
        for f in files.values():
            f.close()
    return out


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embeddings",
        help="export per-nodule image + segmentation embeddings to embeddings.h5",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--cine", type=Path, required=True, help="Stanford dataset.hdf5 (metadata.csv beside it)")
    p.add_argument("--metadata", type=Path, default=None, help="metadata CSV (default: beside the HDF5)")
    p.add_argument("--masks", type=Path, required=True, help="predicted masks (from `usnodule masks`)")
    p.add_argument("--vit", type=Path, default=None, help="ViT stage checkpoint (stage 1)")
    p.add_argument("--maskcnn", type=Path, default=None, help="mask CNN stage checkpoint (stage 3)")
    p.add_argument(
        "--crossfit",
        type=Path,
        default=None,
        metavar="DIR",
        help="cross-fitted embeddings instead of --vit/--maskcnn: DIR holds halves.json (`usnodule "
        "crossfit-halves`) and vit_A/B.ckpt, maskcnn_A/B.ckpt; each training nodule is embedded by the other "
        "half's encoders, every other nodule by both (needs --splits and --fold)",
    )
    p.add_argument("--splits", type=Path, default=None, help="splits.json (records each nodule's part)")
    p.add_argument(
        "--fold",
        type=count,
        default=None,
        help="fold the checkpoints were trained for (default: the one they record)",
    )
    p.add_argument("--out", type=output_file, required=True, help="output embeddings.h5")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--num-workers", type=count, default=0)
    p.add_argument(
        "--img-size", type=positive_int, default=None, help="ViT input size (default: from the checkpoint)"
    )
    p.add_argument(
        "--mask-size",
        type=positive_int,
        default=None,
        help="mask CNN input size (default: from the checkpoint)",
    )
    p.add_argument(
        "--boxes",
        choices=("auto", "annotated", "predicted"),
        default="auto",
        help="ROI boxes of the image crops: as the ViT was trained (auto), from the annotated masks, or "
        "from the predicted masks (for clips without annotations)",
    )
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--devices", default="1", help="Trainer devices (e.g. 1, 4, auto)")
    p.add_argument("--strategy", default="auto", help="Trainer strategy (e.g. ddp)")
    p.add_argument("--precision", default=None, help="Trainer precision (e.g. bf16-mixed)")
    p.set_defaults(func=run)


def _devices(text: str) -> Any:
    return int(text) if text.isdigit() else text


def run(args: argparse.Namespace) -> None:
    single = (args.vit, args.maskcnn)
    if (args.crossfit is not None and single != (None, None)) or (args.crossfit is None and None in single):
        raise DataError(None, "usnodule embeddings: give --vit and --maskcnn, or --crossfit DIR (not both)")
    encoders = (
        {"crossfit": args.crossfit}
        if args.crossfit is not None
        else {"vit": args.vit, "maskcnn": args.maskcnn}
    )
    out = (export_crossfit if args.crossfit is not None else export)(
        cine=args.cine,
        masks=args.masks,
        **encoders,
        out=args.out,
        splits=args.splits,
        fold=args.fold,
        metadata=args.metadata,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        img_size=args.img_size,
        mask_size=args.mask_size,
        accelerator=args.accelerator,
        devices=_devices(args.devices),
        strategy=args.strategy,
        precision=args.precision,
        boxes=args.boxes,
    )
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0:
        print(f"wrote {out}")
        with h5py.File(out, "r") as f:  # the key numbers for `python -m stages.step`
            groups = [g for g in f.values() if isinstance(g, h5py.Group)]
            print(f"RESULT nodules={len(groups)} stacks={sum(g['image'].shape[0] for g in groups)}")
