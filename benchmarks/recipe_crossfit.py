"""Issue 10 item 3: in-sample vs cross-fitted embeddings for the head (BENCHMARKS.md, "Cross-fitting").

The image branch only (the demo's test_byobnet recipe), with a logistic regression on nodule-mean embeddings
standing in for the attention head.  Usage (after `make demo` made the data):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/recipe_crossfit.py [data/synth/stanford]
"""

import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from datamodules.folds import load_fold
from datamodules.stacks import StackDataset
from datamodules.stanford import StanfordCine
from lightning_modules.nets.vit_stack import StackClassifier

torch.set_num_threads(1)
DATA = sys.argv[1] if len(sys.argv) > 1 else "data/synth/stanford"
cine = StanfordCine(DATA + "/dataset.hdf5")
ds = StackDataset(cine, None, "image", img_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
items = [ds[i] for i in range(len(ds))]
X = torch.stack([b["image"] for b in items])
Y = torch.stack([b["label"] for b in items])
N = torch.stack([b["nodule"] for b in items]).numpy()
ids = np.array(ds.nodule_ids)
lab = np.array(ds.labels)


def fit(sel, seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    xt, yt = X[sel], Y[sel]
    m = StackClassifier(backbone="test_byobnet", img_size=32, freeze_backbone=False, dropout=0.5)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.5)
    ep, bs = 12, 32
    steps = ep * ((len(xt) + bs - 1) // bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=steps, pct_start=0.15)
    pos = yt.float().mean()
    w = torch.tensor([1 / (1 - pos), 1 / pos]) / 2
    for _e in range(ep):
        m.train()
        perm = torch.randperm(len(xt))
        for i in range(0, len(perm), bs):
            idx = perm[i : i + bs]
            if len(idx) < 2:
                continue
            x = xt[idx]
            f = torch.rand(len(x)) < 0.5
            x = torch.where(f[:, None, None, None], x.flip(-1), x)
            loss = F.cross_entropy(m(x), yt[idx], weight=w)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    m.eval()
    with torch.no_grad():
        emb = torch.cat([m.forward_features(X[i : i + 512]) for i in range(0, len(X), 512)])
        prob = m.forward_head(emb).softmax(-1)[:, 1]
    # nodule means
    E = np.zeros((len(ids), emb.shape[1]))
    P = np.zeros(len(ids))
    for j in range(len(ids)):
        E[j] = emb[N == j].mean(0).numpy()
        P[j] = prob[N == j].mean().item()
    return E, P


res = {}
pooled = {}
t0 = time.time()
for k in range(5):
    sp = load_fold(DATA + "/splits.json", k)
    tr = np.isin(ids, sp["train"])
    te = np.isin(ids, sp["test"])
    stack_tr = tr[N]
    E, P = fit(torch.from_numpy(stack_tr), 0)
    lr = LogisticRegression(C=0.01, max_iter=3000).fit(E[tr], lab[tr])
    out = {"avepool": P[te], "insample_head": lr.predict_proba(E[te])[:, 1]}
    # cross-fit: two halves of the training nodules, stratified
    rng = np.random.default_rng(k)
    trn = np.where(tr)[0]
    half = np.zeros(len(ids), bool)
    for c in (0, 1):
        idx = trn[lab[trn] == c]
        rng.shuffle(idx)
        half[idx[: len(idx) // 2]] = True
    A = tr & half
    B = tr & ~half
    EA, PA = fit(torch.from_numpy(A[N]), 0)
    EB, PB = fit(torch.from_numpy(B[N]), 1)
    oof = np.where(A[:, None], EB, EA)  # A embedded by B's encoder and vice versa
    lr2 = LogisticRegression(C=0.01, max_iter=3000).fit(oof[tr], lab[tr])
    out["crossfit_head"] = (lr2.predict_proba(EA[te])[:, 1] + lr2.predict_proba(EB[te])[:, 1]) / 2
    out["half_ensemble_avepool"] = (PA[te] + PB[te]) / 2
    lr3 = LogisticRegression(
        C=0.01, max_iter=3000
    )  # in-sample head on each half encoder, averaged (ensemble control)
    a3 = lr3.fit(EA[A], lab[A]).predict_proba(EA[te])[:, 1]
    b3 = lr3.fit(EB[B], lab[B]).predict_proba(EB[te])[:, 1]
    out["half_insample_head"] = (a3 + b3) / 2
    for name, p in out.items():
        res.setdefault(name, []).append(roc_auc_score(lab[te], p))
        pooled.setdefault(name, ([], []))[0].extend(p)
        pooled[name][1].extend(lab[te])
    print(k, {n: round(v[-1], 3) for n, v in res.items()}, round(time.time() - t0), flush=True)
print(
    "RESULT",
    json.dumps(
        {
            n: dict(
                mean=round(float(np.mean(v)), 3), pooled=round(roc_auc_score(pooled[n][1], pooled[n][0]), 3)
            )
            for n, v in res.items()
        }
    ),
)
