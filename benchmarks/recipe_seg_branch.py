"""Issue 8: what STACT-Time's segmentation branch sees, and what it could add (BENCHMARKS.md, "Demo recipe,
round 4").  Three measurements on a finished demo run (`runs/<exp>/fold<k>/masks.h5`) and its data set:

    # how well a mask file keeps the planted shape change (range over the sweep of the masks' log aspect)
    python benchmarks/recipe_seg_branch.py shape DATA MASKS.h5 [MASKS.h5 ...]
    # the mask CNN fitted in memory on each fold's masks; pooled nodule AUROC on the test (or val) parts
    python benchmarks/recipe_seg_branch.py maskcnn DATA RUNS [--part val] [--roi] [--predicted-boxes]
        [--drawn] [--size 32] [--epochs 12] [--spread]
    # an MSU-Net recipe on one fold: Dice, false positives on empty frames, shape fidelity; writes masks.h5
    python benchmarks/recipe_seg_branch.py msunet DATA RUNS OUT --fold 0 [--size 48] [--steps 96]
        [--thresholds 0.5 0.7]

DATA is the Stanford-layout folder (dataset.hdf5, splits.json, truth.csv).  One torch thread
(OMP_NUM_THREADS=1); every figure is printed, nothing is chosen here.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from recipe_image import train_weighted  # benchmarks/ is on the path when run as a script
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from datamodules.folds import load_fold
from datamodules.stacks import FrameDataset, StackDataset
from datamodules.stanford import StanfordCine
from lightning_modules.losses import SegLoss
from lightning_modules.nets.mask_cnn import MaskCNN
from lightning_modules.nets.msunet import MSUNet


def _frames(data: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with h5py.File(data / "dataset.hdf5", "r") as f:
        ids = np.array([v.decode() for v in f["annot_id"][:]])
        return ids, f["frame_num"][:].astype(int), f["mask"][:] > 0


def aspect_range(masks: np.ndarray, ids: np.ndarray, order: np.ndarray, keep=None) -> pd.Series:
    """Per nodule: max - min over its frames of log(var x / var y) of the mask pixels (the aspect turn the
    generator plants along the sweep); frames with < 4 pixels (or not in ``keep``) are skipped."""
    out = {}
    for nid in np.unique(ids):
        rows = np.flatnonzero(ids == nid)
        vals = []
        for i in rows[np.argsort(order[rows])]:
            ys, xs = np.nonzero(masks[i])
            if len(ys) >= 4 and (keep is None or keep[i]):
                vals.append(np.log((xs.var() + 0.5) / (ys.var() + 0.5)))
        if len(vals) >= 2:
            out[nid] = max(vals) - min(vals)
    return pd.Series(out)


def cmd_shape(args) -> None:
    ids, order, drawn = _frames(args.data)
    truth = pd.read_csv(args.data / "truth.csv", dtype={"annot_id": str}).set_index("annot_id")

    def report(name, masks):
        r = aspect_range(masks, ids, order)
        t = truth.loc[r.index]
        print(f"{name}: nodules {len(r)}  Spearman with shape_change {spearmanr(r, t.shape_change)[0]:.3f}  "
              f"label AUROC {roc_auc_score(t.label, r):.3f}", flush=True)  # fmt: skip

    report("drawn 128 px", drawn)
    x = torch.from_numpy(drawn.astype(np.float32))[:, None]
    for s in (64, 48, 32):
        report(f"drawn via {s} px", F.interpolate(x, size=(s, s), mode="area")[:, 0].numpy() > 0.5)
    for m in args.masks:
        with h5py.File(m, "r") as f:
            report(str(m), f["mask"][:] > 0)


def _fit_maskcnn(x, y, train, epochs: int) -> np.ndarray:
    """The demo's mask CNN recipe (conf/demo/maskcnn.yaml): AdamW 1e-3, weight decay 0.05, the encoders' loop."""
    torch.manual_seed(0)
    net = MaskCNN(channels=(16, 32), pool_size=4)
    train_weighted(net, x[train], y[train], epochs, lr=1e-3, weight_decay=0.05)
    with torch.no_grad():
        return net(x).softmax(-1)[:, 1].numpy()


def cmd_maskcnn(args) -> None:
    cine = StanfordCine(args.data / "dataset.hdf5")
    t0, pooled_p, pooled_y, folds = time.time(), [], [], []
    for k in range(5):
        src = args.data / "dataset.hdf5" if args.drawn else args.runs / f"fold{k}" / "masks.h5"
        ds = StackDataset(cine, None, "mask", masks_h5=src, img_size=args.size, mask_roi=args.roi,
                          use_predicted_boxes=args.predicted_boxes,
                          stack_frames="spread" if args.spread else "adjacent")  # fmt: skip
        items = [ds[i] for i in range(len(ds))]
        x = torch.stack([b["image"] for b in items])
        y = torch.stack([b["label"] for b in items])
        stack_nodule = torch.stack([b["nodule"] for b in items]).numpy()
        ids, labels = np.array(ds.nodule_ids), np.array(ds.labels)
        fold = load_fold(args.data / "splits.json", k)
        train, part = np.isin(ids, fold["train"]), np.isin(ids, fold[args.part])
        p = _fit_maskcnn(x, y, torch.from_numpy(train[stack_nodule]), args.epochs)
        nod = np.array([p[stack_nodule == j].mean() for j in range(len(ids))])
        folds.append(roc_auc_score(labels[part], nod[part]))
        pooled_p += list(nod[part])
        pooled_y += list(labels[part])
    print(f"{args.part} pooled AUROC {roc_auc_score(pooled_y, pooled_p):.3f}  folds "
          f"{' '.join(f'{v:.2f}' for v in folds)}  ({time.time() - t0:.0f} s)")  # fmt: skip


def cmd_msunet(args) -> None:
    ids, order, drawn = _frames(args.data)
    with h5py.File(args.data / "dataset.hdf5", "r") as f:
        images = f["image"][:]
    fold = load_fold(args.data / "splits.json", args.fold)
    ds = FrameDataset(StanfordCine(args.data / "dataset.hdf5"), fold["train"], size=args.size)
    x_train = torch.stack([ds[i]["image"] for i in range(len(ds))])
    y_train = torch.stack([ds[i]["mask"] for i in range(len(ds))])
    torch.manual_seed(0)
    net, loss_fn = MSUNet(base=args.base, depth=5), SegLoss()  # conf/demo/seg.yaml: Dice + BCE, Adam, cosine
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    gen = torch.Generator().manual_seed(0)
    t0 = time.time()
    for _ in range(args.steps):
        idx = torch.randint(len(x_train), (16,), generator=gen)
        loss = loss_fn(net(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    fit_s = time.time() - t0
    net.eval()
    h, w = images.shape[1:]
    with torch.no_grad():
        x = torch.from_numpy(images).float()[:, None] / 255.0
        x = F.interpolate(
            x, size=(args.size, args.size), mode="bilinear", antialias=True, align_corners=False
        )
        prob = np.concatenate([
            torch.sigmoid(F.interpolate(net(x[i : i + 64]), size=(h, w), mode="bilinear", align_corners=False))[
                :, 0].numpy() for i in range(0, len(x), 64)
        ])  # fmt: skip
    truth = pd.read_csv(args.data / "truth.csv", dtype={"annot_id": str}).set_index("annot_id")
    test = np.isin(ids, fold["test"])
    drawn_flat = drawn.reshape(len(drawn), -1)
    nonempty = drawn_flat.any(1)
    for thr in args.thresholds:
        pred = prob > thr
        p = pred.reshape(len(pred), -1)
        dice = 2 * (drawn_flat & p).sum(1) / np.maximum(drawn_flat.sum(1) + p.sum(1), 1)
        shape = aspect_range(pred, ids, order, keep=nonempty)
        rho = spearmanr(shape, truth.loc[shape.index, "shape_change"])[0]
        print(f"size {args.size} steps {args.steps} base {args.base} lr {args.lr} threshold {thr}: fit {fit_s:.0f} s  "
              f"test Dice {dice[test & nonempty].mean():.3f}  false positives on empty test frames "
              f"{(p[test & ~nonempty].sum(1) > 0).mean():.2f}  shape Spearman (frames with a drawn nodule) {rho:.3f}",
              flush=True)  # fmt: skip
        out = args.out / f"thr{thr}" / f"fold{args.fold}"
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(args.runs / f"fold{args.fold}" / "masks.h5", out / "masks.h5")  # keeps ids and provenance
        with h5py.File(out / "masks.h5", "a") as f:
            f["mask"][...] = pred.astype(np.uint8)


def main() -> None:
    torch.set_num_threads(1)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("shape")
    s.add_argument("data", type=Path)
    s.add_argument("masks", type=Path, nargs="*")
    s.set_defaults(func=cmd_shape)
    m = sub.add_parser("maskcnn")
    m.add_argument("data", type=Path)
    m.add_argument("runs", type=Path)
    m.add_argument("--part", choices=("test", "val"), default="test")
    m.add_argument("--roi", action="store_true", help="crop the mask stacks like the image stacks")
    m.add_argument("--predicted-boxes", action="store_true", help="ROI boxes from the predicted masks")
    m.add_argument("--drawn", action="store_true", help="the drawn masks instead of the run's predicted ones")
    m.add_argument("--size", type=int, default=32)
    m.add_argument("--epochs", type=int, default=12)
    m.add_argument("--spread", action="store_true", help="stacks spanning the sweep (stack_frames: spread)")
    m.set_defaults(func=cmd_maskcnn)
    u = sub.add_parser("msunet")
    u.add_argument("data", type=Path)
    u.add_argument("runs", type=Path)
    u.add_argument("out", type=Path)
    u.add_argument("--fold", type=int, default=0)
    u.add_argument("--size", type=int, default=48)
    u.add_argument("--steps", type=int, default=96)
    u.add_argument("--base", type=int, default=4)
    u.add_argument("--lr", type=float, default=3e-3)
    u.add_argument("--thresholds", type=float, nargs="+", default=[0.5])
    u.set_defaults(func=cmd_msunet)
    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
