"""``usnodule explain``: Grad-CAM++ montages and t-SNE of the fused features, per trained fold.

Each INPUT is one fold's file, and says what is drawn:

* a **ViTStage** checkpoint (STACT-Time stage 1): Grad-CAM++ of the image encoder on the 3-stacks of the
  chosen cases, one PNG per nodule (columns = stacks, at most ``--max-frames`` spread over the clip; the map is
  the stack's, drawn on its middle frame);
* an **AsyCMST** checkpoint: Grad-CAM++ of both branches, one PNG per paired clip (a row of frames and a row
  of maps per modality, columns = the T frames), and the t-SNE of the fused features before the classifier
  (``forward_features``: pooled ``X_C + X_B``) of every case of the part;
* a **HeadStage** checkpoint (STACT-Time attention head): t-SNE of its fused nodule features
  (``forward_features``) on the embeddings file it was trained on;
* an **embeddings.h5** (``usnodule embeddings``): t-SNE of the exported features, one point per nodule (the
  mean over its stacks of the image and segmentation embeddings, concatenated).

Checkpoints are loaded through :meth:`BaseStage.from_checkpoint`, and the data are the ones the checkpoint
was trained on (its recorded data settings: cine file or manifest, splits file, fold; ``--data`` /
``--splits`` when they moved), without augmentation.  ``--part`` (default ``test``, the fold's held-out
part) picks the cases; Grad-CAM++ draws ``--max-cases`` of them (malignant and benign alternately, in id
order) or those ``--cases`` names, for the class ``--target`` says (default: the model's prediction for the
case).  Method details: :mod:`lightning_modules.explain`.

Writes ``<out>/fold<k>/<name>/`` (``fold_all`` for a fit on every case; ``name`` = ``vit``, the AsyCMST
``method`` (``asycmst``, ``asycmst_none``), ``head_<variant>`` or ``embeddings``): ``gradcam/<case>.png``,
``tsne.png`` (one dot per case coloured by label) and ``tsne.csv`` (``case_id,label,prob,x,y``; ``prob`` blank
for an embeddings file).  Each folder is written whole or not at all.  ``--wandb`` also logs every picture to
one W&B run (project ``usnodule``, group ``--exp``, job_type ``explain``; offline unless ``WANDB_MODE`` or
credentials say otherwise), as ``explain/fold<k>/<name>/gradcam`` and ``.../tsne``.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import torch
from torch.utils.data import ConcatDataset, DataLoader

from datamodules.atomic import atomic_path
from datamodules.embeddings import EmbeddingDataset, group_name, pad_collate, read_index
from datamodules.errors import DataError
from datamodules.folds import load_fold
from lightning_modules import explain as ex
from lightning_modules.wandb_media import CLASSES
from stages.options import positive_int, seed

PARTS = ("test", "val", "train", "all")
TARGETS = ("predicted", "label", "malignant", "benign")
KINDS = "a ViTStage, AsyCMST or HeadStage checkpoint, or an embeddings.h5 from `usnodule embeddings`"


@dataclass
class Job:
    """One input: its kind, output folder name, fold, model (``None`` for an embeddings file), data settings."""

    path: Path
    kind: str  # vit | asycmst | head | embeddings
    name: str
    fold: int | None
    model: Any = None
    data: dict = field(default_factory=dict)

    @property
    def folder(self) -> str:
        return "fold_all" if self.fold is None else f"fold{self.fold}"


@dataclass
class Options:
    part: str = "test"
    max_cases: int = 8
    cases: list[str] | None = None
    max_frames: int = 8
    target: str = "predicted"
    data: Path | None = None
    splits: Path | None = None
    batch_size: int = 16
    seed: int = 0


Cases = tuple[pd.DataFrame, np.ndarray]  # (case_id, label, prob) per case, and its feature vector


# ---------------------------------------------------------------------------------------------- inputs
def load_job(path: str | os.PathLike, device: str) -> Job:
    """The input at ``path`` (module docstring); a missing file or another stage's checkpoint is a
    one-line :class:`DataError`."""
    from lightning_modules.asycmst import AsyCMST
    from lightning_modules.base import BaseStage
    from lightning_modules.head_stage import HeadStage
    from lightning_modules.vit_stage import ViTStage

    path = Path(path)
    if not path.is_file():
        raise DataError(path, f"not found (explain takes {KINDS})")
    if h5py.is_hdf5(path):
        read_index(path)  # validates the layout, one line on a foreign HDF5
        with h5py.File(path, "r") as f:
            fold = int(f.attrs.get("fold", -1))
        return Job(path, "embeddings", "embeddings", None if fold < 0 else fold)
    model, data = BaseStage.from_checkpoint(path, map_location=device)
    fold = data.get("fold")
    if isinstance(model, ViTStage):
        return Job(path, "vit", "vit", fold, model, data)
    if isinstance(model, AsyCMST):
        return Job(path, "asycmst", model.method, fold, model, data)
    if isinstance(model, HeadStage):
        return Job(path, "head", f"head_{model.variant}", fold, model, data)
    raise DataError(path, f"is a {type(model).__name__} checkpoint; explain takes {KINDS}")


def _settings(job: Job, opts: Options, data_key: str) -> dict:
    """The job's data settings with ``--data`` / ``--splits`` applied; one line when none are known."""
    settings = dict(job.data)
    if opts.data is not None:
        settings[data_key] = str(opts.data)
    if opts.splits is not None:
        settings["splits"] = str(opts.splits)
    if not settings.get(data_key):
        raise DataError(
            job.path, f"records no training data (fit without a datamodule); pass --data ({data_key})"
        )
    return settings


def _build(cls: type, settings: dict, **fixed: Any) -> Any:
    """``cls`` from the recorded settings its constructor takes (LightningCLI's ``_class_path`` etc. dropped)."""
    params = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in settings.items() if k in params and k not in fixed}, **fixed)


def _no_cases(job: Job, part: str) -> DataError:
    return DataError(job.path, f"the fold's '{part}' part holds no cases (choose another --part)")


def pick_cases(ids: Sequence[str], labels: Sequence[int], opts: Options, job: Job) -> list[int]:
    """Positions of the cases to draw: ``--cases`` (each must be in the part), else up to ``--max-cases``
    taken malignant, benign, malignant, ... in id order."""
    if opts.cases:
        where = {c: i for i, c in enumerate(ids)}
        missing = [c for c in opts.cases if c not in where]
        if missing:
            raise DataError(job.path, f"case(s) {missing[:3]} are not in the fold's '{opts.part}' part")
        return [where[c] for c in opts.cases]
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    queues = [[i for i in order if labels[i] == y] for y in (1, 0)]
    picked: list[int] = []
    while len(picked) < opts.max_cases and any(queues):
        for q in queues:
            if q and len(picked) < opts.max_cases:
                picked.append(q.pop(0))
    return picked


def target_class(prob: float, label: int, target: str) -> int:
    return {"predicted": int(prob >= 0.5), "label": int(label), "malignant": 1, "benign": 0}[target]


def _title(case: str, label: int, prob: float, cls: int, target: str) -> str:
    return (
        f"case {case}: {CLASSES[label]}, p(malignant) = {prob:.2f}\n"
        f"Grad-CAM++ for class {CLASSES[cls]} ({target})"
    )


# ---------------------------------------------------------------------------------------------- the kinds
def explain_vit(job: Job, opts: Options, out: Path) -> tuple[list[tuple[Path, str]], Cases | None]:
    """Grad-CAM++ montages of the ViT stage's image encoder (one PNG per nodule)."""
    from datamodules.stacks import StackDataModule

    settings = _settings(job, opts, "h5")
    dm = _build(StackDataModule, settings, augment=False, cache=False, predict_ids=opts.part)
    dm.setup("predict")
    ds = dm.datasets["predict"]
    if not len(ds):
        raise _no_cases(job, opts.part)
    rows_of: dict[int, list[int]] = {}
    for i, (j, _, _) in enumerate(ds.index):
        rows_of.setdefault(j, []).append(i)
    net, device = job.model.net, job.model.device
    pictures = []
    for j in pick_cases(ds.nodule_ids, ds.labels, opts, job):
        rows = rows_of[j]
        images = torch.stack([ds[i]["image"] for i in rows]).to(device)
        with (
            torch.no_grad()
        ):  # the nodule's probability: the mean over all its stacks, as the stage scores it
            logits = torch.cat([net(x) for x in images.split(opts.batch_size)])
        prob = float(job.model.malignant_prob(logits).mean())
        label, case = ds.labels[j], ds.nodule_ids[j]
        cls = target_class(prob, label, opts.target)
        keep = np.unique(np.linspace(0, len(rows) - 1, min(opts.max_frames, len(rows))).round().astype(int))
        shown = images[keep]
        maps = ex.stack_cams(net, shown, [cls] * len(keep))
        middle = shown[:, 1].detach().cpu().numpy()  # frame t+1 of each stack t, t+1, t+2
        png = ex.save_montage(
            [("middle frame", middle, maps)],
            out / "gradcam" / f"{group_name(case)}.png",
            _title(case, label, prob, cls, opts.target),
            columns=[f"stack {int(k)}" for k in keep],
        )
        pictures.append((png, case))
    return pictures, None


def explain_asycmst(job: Job, opts: Options, out: Path) -> tuple[list[tuple[Path, str]], Cases | None]:
    """Grad-CAM++ montages of both branches (one PNG per clip) and the fused features of every case."""
    from datamodules.paired_video import PairedVideoDataModule

    dm = _build(PairedVideoDataModule, _settings(job, opts, "manifest"), augment=False, cache=False)
    dm.setup("test")
    parts = ("train", "val", "test") if opts.part == "all" else (opts.part,)
    sets = [dm.datasets[p] for p in parts]
    cases = [c for s in sets for c in s.cases]
    if not cases:
        raise _no_cases(job, opts.part)
    data = ConcatDataset(sets)
    model, net = job.model, job.model.net
    upper, lower = model.streams
    feats, probs = [], []
    with torch.no_grad():
        for batch in DataLoader(data, batch_size=opts.batch_size, shuffle=False):
            f = net.forward_features(batch[upper].to(model.device), batch[lower].to(model.device))
            feats.append(f.float().cpu())
            probs.append(model.malignant_prob(net.forward_head(f)).cpu())
    prob = torch.cat(probs).numpy()
    ids, labels = [c.case_id for c in cases], [int(c.label) for c in cases]
    pictures = []
    branch_names = {
        "c": f"{upper.upper()} (upper)" if upper == lower else upper.upper(),
        "b": f"{lower.upper()} (lower)" if upper == lower else lower.upper(),
    }
    for i in pick_cases(ids, labels, opts, job):
        item = data[i]
        c, b = item[upper][None].to(model.device), item[lower][None].to(model.device)
        cls = target_class(float(prob[i]), labels[i], opts.target)
        maps = ex.clip_cams(net, c, b, [cls])
        rows = [
            (branch_names[br], clip[0, :, 0].cpu().numpy(), maps[br][0])  # channel 0: frames are gray x 3
            for br, clip in (("b", b), ("c", c))  # BUS first in the paper's model
        ]
        png = ex.save_montage(
            rows,
            out / "gradcam" / f"{group_name(ids[i])}.png",
            _title(ids[i], labels[i], float(prob[i]), cls, opts.target),
            columns=[f"frame {t}" for t in range(c.shape[1])],
        )
        pictures.append((png, ids[i]))
    return pictures, _table(ids, labels, prob, torch.cat(feats).numpy())


def explain_head(job: Job, opts: Options, out: Path) -> tuple[list[tuple[Path, str]], Cases | None]:
    """The attention head's fused nodule features of the part's nodules."""
    settings = _settings(job, opts, "path")
    path = Path(settings["path"])
    index = read_index(path)
    if opts.part == "all":
        ids = sorted(index)
    else:
        if not settings.get("splits"):
            raise DataError(job.path, "records no splits file; pass --splits")
        ids = load_fold(settings["splits"], job.fold)[opts.part]
    if not ids:
        raise _no_cases(job, opts.part)
    ds = EmbeddingDataset(path, ids, index=index)
    model, net = job.model, job.model.net
    feats, probs = [], []
    with torch.no_grad():
        for batch in DataLoader(ds, batch_size=opts.batch_size, shuffle=False, collate_fn=pad_collate):
            image, seg, valid = (batch[k].to(model.device) for k in ("image_emb", "seg_emb", "valid"))
            args = (image, valid) if model.variant == "cine_trans" else (image, seg, valid)
            f = net.forward_features(*args)
            feats.append(f.float().cpu())
            probs.append(model.malignant_prob(net.forward_head(f)).cpu())
    return [], _table(ds.nodule_ids, ds.labels, torch.cat(probs).numpy(), torch.cat(feats).numpy())


def explain_embeddings(job: Job, opts: Options, out: Path) -> tuple[list[tuple[Path, str]], Cases | None]:
    """The exported features: per nodule the mean over stacks of ``[image | seg]``."""
    index = read_index(job.path)
    with h5py.File(job.path, "r") as f:
        if opts.part == "all":
            ids = sorted(index)
        elif opts.splits is not None:
            ids = sorted(load_fold(opts.splits, job.fold)[opts.part])
        else:
            ids = sorted(
                a for a, info in index.items() if str(f[info["group"]].attrs.get("part", "")) == opts.part
            )
            if not ids and not any(str(f[i["group"]].attrs.get("part", "")) for i in index.values()):
                raise DataError(
                    job.path, "records no parts (exported without --splits); pass --splits or --part all"
                )
        missing = [i for i in ids if i not in index]
        if missing:
            raise DataError(
                job.path, f"{len(missing)} nodule(s) of the part have no embeddings, e.g. {missing[:3]}"
            )
        if not ids:
            raise _no_cases(job, opts.part)
        feats = []
        for a in ids:
            g = f[index[a]["group"]]
            feats.append(np.concatenate([g["image"][()].mean(0), g["seg"][()].mean(0)]))
    labels = [index[a]["label"] for a in ids]
    return [], _table(ids, labels, np.full(len(ids), np.nan), np.stack(feats))


def _table(ids: Sequence[str], labels: Sequence[int], prob: np.ndarray, feats: np.ndarray) -> Cases:
    """One row per case (the t-SNE adds ``x, y``), and the ``(n, d)`` features in the same order."""
    table = pd.DataFrame({"case_id": list(ids), "label": [int(y) for y in labels], "prob": prob})
    return table, np.asarray(feats, dtype=np.float32)


RUNNERS = {
    "vit": explain_vit,
    "asycmst": explain_asycmst,
    "head": explain_head,
    "embeddings": explain_embeddings,
}
WHAT = {
    "asycmst": "fused features before the classifier",
    "head": "fused nodule features of the attention head",
    "embeddings": "exported embeddings (mean over stacks, image | seg)",
}


def run_job(job: Job, opts: Options, out: Path) -> tuple[list[tuple[Path, str]], Path | None, int]:
    """Write the job's folder ``out`` whole (or nothing); returns (montages, t-SNE PNG or None, cases)."""
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        try:
            pictures, cases = RUNNERS[job.kind](job, opts, tmp)
        except ex.NoTargetLayer as e:  # a backbone the maps cannot be read from: the user's choice of model
            raise DataError(job.path, f"Grad-CAM++: {e}") from None
        tsne_png, n = None, len(pictures)
        if cases is not None:
            table, feats = cases
            if len(table) < 2:
                raise DataError(
                    job.path, f"t-SNE needs at least 2 cases; the '{opts.part}' part has {len(table)}"
                )
            xy = ex.tsne(feats, seed=opts.seed)
            table["x"], table["y"] = xy[:, 0], xy[:, 1]
            with atomic_path(tmp / "tsne.csv") as t:
                table.to_csv(t, index=False, float_format="%.6g")
            title = f"t-SNE of the {WHAT[job.kind]}\n{job.name}, {job.folder}, part {opts.part}"
            ex.save_tsne(xy, table["label"], tmp / "tsne.png", title)
            tsne_png, n = out / "tsne.png", len(table)
    return [(out / p.relative_to(tmp), c) for p, c in pictures], tsne_png, n


# ---------------------------------------------------------------------------------------------- command
def explain(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    opts: Options | None = None,
    *,
    device: str = "auto",
    wandb: bool = False,
    exp: str | None = None,
) -> list[Path]:
    """Explain every input (module docstring); returns the folders written."""
    opts = opts or Options()
    out = Path(out)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    jobs = [load_job(p, device) for p in inputs]  # every input checked before anything is written
    seen: dict[Path, Path] = {}
    for job in jobs:
        folder = out / job.folder / job.name
        if folder in seen:
            raise DataError(job.path, f"writes {folder}, as {seen[folder]} does: explain them in two runs")
        seen[folder] = job.path
    media: dict[str, list[tuple[Path, str]]] = {}
    for job, folder in zip(jobs, seen, strict=True):
        start = time.perf_counter()
        pictures, tsne_png, n = run_job(job, opts, folder)
        key = f"explain/{job.folder}/{job.name}"
        media[f"{key}/gradcam"] = pictures
        if tsne_png is not None:
            media[f"{key}/tsne"] = [(tsne_png, f"{job.name} {job.folder} t-SNE, {n} cases")]
        plural = "" if len(pictures) == 1 else "s"
        what = [f"{len(pictures)} Grad-CAM++ montage{plural}"] if job.kind in ("vit", "asycmst") else []
        what += [f"t-SNE of {n} cases"] if tsne_png is not None else []
        print(
            f"explain {job.folder} {job.name}: {', '.join(what)} -> {folder} ({time.perf_counter() - start:.1f} s)"
        )
    if wandb:
        log_wandb(out, exp or out.resolve().name, media)
    return list(seen)


def log_wandb(out: Path, exp: str, media: dict[str, list[tuple[Path, str]]]) -> None:
    import wandb

    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    run = wandb.init(
        project="usnodule",
        group=exp,
        job_type="explain",
        name=f"explain-{exp}",
        dir=str(out),
        mode=mode,
        reinit="create_new",
    )
    try:
        ex.log_wandb(run, media)
    finally:
        run.finish()


def _case_list(text: str) -> list[str]:
    cases = [c for c in text.split(",") if c]
    if not cases:
        raise argparse.ArgumentTypeError("names no case")
    return cases


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain",
        help="Grad-CAM++ montages (AsyCMST, STACT-Time image encoder) and t-SNE of fused features, per fold",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help=f"one fold's file: {KINDS}")
    p.add_argument("--out", type=Path, required=True, help="folder; each input writes <out>/fold<k>/<name>/")
    p.add_argument(
        "--part", choices=PARTS, default="test", help="which cases (default: the fold's test part)"
    )
    p.add_argument(
        "--max-cases", type=positive_int, default=8, help="Grad-CAM++ montages per input (default 8)"
    )
    p.add_argument(
        "--cases",
        type=_case_list,
        default=None,
        help="comma-separated case ids to draw instead (each in the part of every input)",
    )
    p.add_argument(
        "--max-frames", type=positive_int, default=8, help="ViT stage: stacks shown per nodule (default 8)"
    )
    p.add_argument(
        "--target",
        choices=TARGETS,
        default="predicted",
        help="class the maps explain: the model's prediction (default), the true label, or a fixed class",
    )
    p.add_argument("--data", type=Path, default=None, help="the training data, when it moved (cine HDF5, "
                   "paired manifest or embeddings.h5, as the checkpoint's stage reads)")  # fmt: skip
    p.add_argument("--splits", type=Path, default=None, help="splits.json, when it moved")
    p.add_argument("--batch-size", type=positive_int, default=16, help="cases per batch for the features")
    p.add_argument("--seed", type=seed, default=0, help="t-SNE seed")
    p.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when there is one)"
    )
    p.add_argument("--wandb", action="store_true", help="also log the pictures to one W&B run")
    p.add_argument("--exp", default=None, help="W&B group (default: the --out folder name)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    opts = Options(
        part=args.part,
        max_cases=args.max_cases,
        cases=args.cases,
        max_frames=args.max_frames,
        target=args.target,
        data=args.data,
        splits=args.splits,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    explain(args.inputs, args.out, opts, device=args.device, wandb=args.wandb, exp=args.exp)
    sys.stdout.flush()
