"""Can a model learn the paired set's cross-modal term?  A probe on a label of that term alone (issue 8).

    python benchmarks/probe_concordance.py PAIRED_DIR --fusion full|tokens|pooled [--strategy asymmetric]
        [--depth 2] [--epochs 6] [--fold 0]

Relabels the paired set of ``PAIRED_DIR`` (``manifest.csv``, ``splits.json``, ``truth.csv`` from ``usnodule
synth``) by its generator truth: label 1 when the CEUS perfusion defect lies under the B-mode focus
(``concordance > 0.5``), nothing else.  Either modality alone says nothing about it (both are always drawn, at
uniform angles), so a model learns it only by matching the two clips position by position.  Trains on the
fold's training part with the demo's inputs (4 frames, 32 px crops at 1.15x the BUS box, read once into memory)
and the demo's narrow ResNet-10t frame encoders, AdamW 3e-3 at a constant rate, batch 32, no auxiliary tasks,
and prints the test AUROC after every epoch:

- ``full``: :class:`AsyCMSTNet` itself (``--strategy``, ``--depth``; dim 32, 2 heads: the demo's);
- ``tokens``: the same frame encoders, then each (frame, position) token pair of the two streams concatenated
  and put through a small MLP, averaged (what cross-attention at the same position can compute);
- ``pooled``: the same encoders, each stream averaged over frames and positions first, then the MLP (late
  fusion: what ``strategy: none`` can compute).

One torch thread; a few CPU-seconds per epoch.  Not a test: figures go to BENCHMARKS.md ("AsyCMST and the
cross-modal term").
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from datamodules.paired_video import PairedVideoDataModule
from lightning_modules.nets.asycmst import AsyCMSTNet


def load(paired: Path, fold: int, work: Path) -> dict[str, tuple[torch.Tensor, ...]]:
    """The fold's train and test clips ``(ceus, bus, label)`` with the concordance label."""
    man = pd.read_csv(paired / "manifest.csv", dtype=str)
    truth = pd.read_csv(paired / "truth.csv", dtype={"case_id": str}).set_index("case_id")
    man["label"] = (truth.loc[man["case_id"], "concordance"].to_numpy() > 0.5).astype(int).astype(str)
    for col in ("bus", "ceus", "bus_mask"):
        man[col] = [str(paired / p) for p in man[col]]
    work.mkdir(parents=True, exist_ok=True)
    man.to_csv(work / "manifest_concordance.csv", index=False)
    dm = PairedVideoDataModule(manifest=work / "manifest_concordance.csv", splits=paired / "splits.json",
                               fold=fold, frames=4, size=32, roi=1.15, batch_size=32, augment=False)  # fmt: skip
    dm.setup("fit")
    dm.setup("test")
    out = {}
    for part in ("train", "test"):
        items = [dm.datasets[part][i] for i in range(len(dm.datasets[part]))]
        out[part] = tuple(torch.stack([it[k] for it in items]) for k in ("ceus", "bus", "label"))
    return out


def build(fusion: str, strategy: str, depth: int) -> tuple[AsyCMSTNet, nn.Module, callable]:
    net = AsyCMSTNet(dim=32, depth=depth, heads=2, num_frames=4, img_size=32, strategy=strategy, fss=False,
                     ns=False, backbone="resnet10t",
                     backbone_args={"channels": [16, 32, 48, 64], "stem_width": 8, "out_indices": [3]})  # fmt: skip
    mlp = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))

    def forward(c: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if fusion == "full":
            return net(c, b)["logits"]
        f_c, f_b = net.forward_frames(c, b)  # (B, T, N, D) each
        if fusion == "pooled":
            f_c, f_b = f_c.mean((1, 2), keepdim=True), f_b.mean((1, 2), keepdim=True)
        return mlp(torch.cat([f_c, f_b], -1)).mean((1, 2))

    return net, mlp, forward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paired", type=Path)
    ap.add_argument("--fusion", choices=("full", "tokens", "pooled"), default="full")
    ap.add_argument("--strategy", default="asymmetric")
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("runs/probe_concordance"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = load(args.paired, args.fold, args.work)
    (c_tr, b_tr, y_tr), (c_te, b_te, y_te) = data["train"], data["test"]
    net, mlp, forward = build(args.fusion, args.strategy, args.depth)
    opt = torch.optim.AdamW([*net.parameters(), *mlp.parameters()], lr=3e-3, weight_decay=0.01)
    start = time.process_time()
    for epoch in range(1, args.epochs + 1):
        net.train()
        for idx in torch.randperm(len(y_tr)).split(32):
            loss = nn.functional.cross_entropy(forward(c_tr[idx], b_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            prob = forward(c_te, b_te).softmax(1)[:, 1]
        auroc = roc_auc_score(y_te.numpy(), prob.numpy())
        print(f"{args.fusion} {args.strategy} depth {args.depth} epoch {epoch}: test AUROC {auroc:.3f} "
              f"({time.process_time() - start:.0f} CPU-s)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
