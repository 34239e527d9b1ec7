"""Issue 8: the demo's image encoder on a synthetic set drawn with chosen generator constants
(BENCHMARKS.md, "Demo recipe, round 2").

Draws the demo's Stanford plan (400 nodules x ~9 frames x 128 px, 25% malignant; nodules=N frames=F change it) with generator constants set
on the command line, splits it as `make splits` does, then fits the demo's image-encoder recipe (test_byobnet,
32 px 3-stack ROI crops, AdamW 1e-3, weight decay 0.5, dropout 0.5, class-weighted CE, flips, 12 epochs) in
memory on each of the 5 folds' training part and scores the test part (nodule = mean of its stack
probabilities).  Prints pooled and mean-of-folds AUROC next to the generator's own rankings (truth.csv).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/recipe_image.py OUT [NAME=VALUE ...] [seed=S]

NAME is a constant of datamodules/synth/nodule.py or labels.py (HETEROGENEITY_GRAY, HIDDEN_WEIGHT, ...).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

import datamodules.synth.labels as synth_labels
import datamodules.synth.nodule as synth_nodule
from datamodules.folds import load_fold
from datamodules.stacks import StackDataset
from datamodules.stanford import StanfordCine
from datamodules.synth import synthesize
from lightning_modules.nets.vit_stack import StackClassifier

EPOCHS, BATCH = 12, 32
IMG_SIZE = int(os.environ.get("IMG_SIZE", 32))  # the demo config's 32 px; IMG_SIZE=48 to compare
PART = os.environ.get("PART", "test")  # the part scored: test, or val to choose a recipe


def draw(out: Path, settings: list[str]) -> dict:
    plan = {"seed": 0, "nodules": 400, "frames": 9}
    changed = {}
    for kv in settings:
        name, value = kv.split("=", 1)
        if name in plan:
            plan[name] = int(value)
            continue
        module = synth_nodule if hasattr(synth_nodule, name) else synth_labels
        if not hasattr(module, name):
            raise SystemExit(f"error: no generator constant {name}")
        setattr(module, name, type(getattr(module, name))(float(value)))
        changed[name] = getattr(module, name)
    seed = plan["seed"]
    synthesize(out, n_nodules=plan["nodules"], frames=plan["frames"], size=128, n_cases=0, prevalence=0.25,
               seed=seed, overwrite=True)  # fmt: skip
    data = out / "stanford"
    subprocess.run([sys.executable, "-m", "stages", "split", str(data / "dataset.hdf5"), "--seed", str(seed)],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    return {**plan, **changed}


def train_weighted(net, xt, yt, epochs: int, lr: float, weight_decay: float) -> None:
    """The demo encoders' recipe in memory: AdamW, cosine per step, class-weighted CE, horizontal flips, batch 32
    (also used by recipe_seg_branch.py)."""
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * ((len(xt) + BATCH - 1) // BATCH))
    pos = yt.float().mean()
    weight = torch.tensor([1 / (1 - pos), 1 / pos]) / 2
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(xt))
        for i in range(0, len(perm), BATCH):
            idx = perm[i : i + BATCH]
            if len(idx) < 2:
                continue
            xb = xt[idx]
            flip = torch.rand(len(xb)) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = F.cross_entropy(net(xb), yt[idx], weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()


def fit_fold(x, y, stack_nodule, n_nodules, train):
    torch.manual_seed(0)
    net = StackClassifier(backbone="test_byobnet", img_size=IMG_SIZE, freeze_backbone=False, dropout=0.5)
    train_weighted(net, x[train], y[train], EPOCHS, lr=1e-3, weight_decay=0.5)
    with torch.no_grad():
        prob = torch.cat([net(x[i : i + 512]).softmax(-1)[:, 1] for i in range(0, len(x), 512)]).numpy()
    return np.array([prob[stack_nodule == j].mean() for j in range(n_nodules)])


def main() -> None:
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    settings = draw(out, sys.argv[2:])
    data = out / "stanford"
    ds = StackDataset(StanfordCine(data / "dataset.hdf5"), None, "image", img_size=IMG_SIZE,
                      mean=(0.5,) * 3, std=(0.5,) * 3)  # fmt: skip
    items = [ds[i] for i in range(len(ds))]
    x = torch.stack([b["image"] for b in items])
    y = torch.stack([b["label"] for b in items])
    stack_nodule = torch.stack([b["nodule"] for b in items]).numpy()
    ids, labels = np.array(ds.nodule_ids), np.array(ds.labels)
    truth = pd.read_csv(data / "truth.csv").set_index("annot_id").loc[ids]
    t0, per_fold, pooled_p, pooled_y = time.time(), [], [], []
    for k in range(5):
        fold = load_fold(data / "splits.json", k)
        train, test = np.isin(ids, fold["train"]), np.isin(ids, fold[PART])
        p = fit_fold(x, y, stack_nodule, len(ids), torch.from_numpy(train[stack_nodule]))
        per_fold.append(roc_auc_score(labels[test], p[test]))
        pooled_p += list(p[test])
        pooled_y += list(labels[test])
        print(f"fold {k}: {per_fold[-1]:.3f} ({time.time() - t0:.0f} s)", flush=True)
    result = {
        "settings": {**settings, "part": PART},
        "pooled": round(roc_auc_score(pooled_y, pooled_p), 3),
        "mean_of_folds": round(float(np.mean(per_fold)), 3),
        "folds": [round(v, 3) for v in per_fold],
        "truth": {
            c: round(roc_auc_score(labels, truth[c]), 3)
            for c in ("heterogeneity", "shape_change", "tirads_risk", "risk")
        },  # fmt: skip
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
