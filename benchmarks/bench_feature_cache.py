"""Frozen backbone, computed once (issue 14, item 1): the ViT stage's epoch with and without the feature cache.

Two fits of the paper's ViT stage (``conf/vit.yaml``'s model and optimiser: frozen ViT-B/16 at 224 px, two
linear layers, SGD 1e-4 momentum 0.9; random init, ``pretrained: false``: nothing downloaded) on a small
synthetic Stanford-layout set, same seed, one after the other in this process:

- ``uncached`` (``feature_cache: false``): the backbone runs on every training and validation batch;
- ``cached`` (the default): one build pass at fit start computes the pooled features into
  ``<run>/feature_cache/``, the epochs train the head on them;
- ``reused``: a third fit in the same folder, which finds the files, checks the data (a read pass over the
  crops, no backbone) and runs one epoch.

Per epoch (training + validation, ``on_train_epoch_start`` to ``on_train_epoch_end``) the script records wall
and process CPU time (one torch thread, no loader workers: everything runs in this process, so CPU time is not
inflated by waiting for a shared core).  Figures: the ratio cached / uncached epoch (epochs after the first),
the first epoch's overhead (build + first cached epoch, over an uncached epoch), the reuse check, and the
projection to the paper's 100 epochs x 5 folds:
``speedup = 100 E_u / (B + 100 E_c)`` per fold, ``B`` the build, ``E_u`` / ``E_c`` the epochs.

    OMP_NUM_THREADS=1 python benchmarks/bench_feature_cache.py            # ViT-B/16, 224 px, ~2 CPU-min
    python benchmarks/bench_feature_cache.py --backbone test_vit --img-size 32 --epochs 2   # seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import lightning.pytorch as L
import torch

from datamodules.atomic import write_json
from datamodules.stacks import StackDataModule
from lightning_modules.feature_cache import FrozenFeatureCache
from lightning_modules.vit_stage import ViTStage


class EpochClock(L.Callback):
    """Wall and process-CPU seconds of every epoch (training + its validation), and of the fit's start-up
    (``on_fit_start`` hooks, where the cache is built, to the first epoch)."""

    def __init__(self) -> None:
        self.epochs: list[dict] = []
        self.weights: list[dict] = []
        self.setup_s: dict = {}

    @staticmethod
    def _now() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def on_fit_start(self, trainer, pl_module) -> None:  # runs before the cache callback's (added later)
        self._fit = self._now()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = self._now()
        if not self.setup_s:
            self.setup_s = {"wall": self._start[0] - self._fit[0], "cpu": self._start[1] - self._fit[1]}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        w, c = self._now()
        self.epochs.append({"wall": w - self._start[0], "cpu": c - self._start[1]})
        head = {k: v.detach().clone() for k, v in pl_module.state_dict().items() if ".backbone." not in k}
        self.weights.append(
            head
        )  # the head after each epoch: cached and uncached fits compared epoch by epoch


def write_set(root: Path, nodules: int, frames: int, size: int) -> tuple[Path, Path]:
    """A small synthetic Stanford-layout set and a one-fold split (2/3 train, 1/3 validation)."""
    from datamodules.synth import synthesize_stanford

    data = synthesize_stanford(root / "stanford", n_nodules=nodules, frames=frames, size=size, seed=0,
                               vary_frames=False, workers=0)  # fmt: skip
    import h5py

    with h5py.File(data / "dataset.hdf5", "r") as f:
        ids = sorted({v.decode() for v in f["annot_id"][()]})
    n_val = max(1, len(ids) // 3)
    split = {"fold": 0, "train": ids[n_val:], "val": ids[:n_val], "test": []}
    splits = root / "splits.json"
    splits.write_text(json.dumps({"k": 1, "seed": 0, "folds": [split]}))
    return data / "dataset.hdf5", splits


def fit(h5: Path, splits: Path, root: Path, args, *, cache: bool, epochs: int) -> dict:
    L.seed_everything(0, verbose=False)
    model = ViTStage(backbone=args.backbone, pretrained=False, img_size=args.img_size, feature_cache=cache)
    # conf/vit.yaml's optimiser; the frozen backbone's parameters get no gradient
    model.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    dm = StackDataModule(str(h5), str(splits), img_size=args.img_size, batch_size=args.batch_size,
                         normalize="half", num_workers=0)  # fmt: skip
    clock = EpochClock()
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
        callbacks=[clock],
    )
    trainer.fit(model, datamodule=dm)
    found = [cb for cb in trainer.callbacks if isinstance(cb, FrozenFeatureCache)]
    return {
        "epochs": clock.epochs,
        "setup_s": clock.setup_s,
        "cache": found[0].report if found else None,
        "train_stacks": len(dm.datasets["train"]),
        "val_stacks": len(dm.datasets["val"]),
        "weights": clock.weights,
    }


def summarise(plain: dict, cached: dict, reused: dict, paper_epochs: int, folds: int) -> dict:
    out = {}
    for clock in ("cpu", "wall"):
        e_u = statistics.median(e[clock] for e in plain["epochs"])
        later = [e[clock] for e in cached["epochs"][1:]]
        e_c = statistics.median(later)
        build = cached["setup_s"][clock]
        first = build + cached["epochs"][0][clock]
        out[clock] = {
            "uncached_epoch_s": e_u,
            "cached_epoch_s": e_c,
            "cached_over_uncached": e_c / e_u,
            "build_s": build,
            "first_epoch_overhead": first / e_u - 1.0,  # (build + first cached epoch) / uncached epoch - 1
            "reuse_check_s": reused["setup_s"][clock],
            "reuse_check_over_uncached_epoch": reused["setup_s"][clock] / e_u,
            "paper_fold_speedup": paper_epochs * e_u / (build + paper_epochs * e_c),
            "paper_hours_uncached_at_this_speed": folds * paper_epochs * e_u / 3600,
            "paper_hours_cached_at_this_speed": folds * (build + paper_epochs * e_c) / 3600,
        }
    # the heads after the uncached fit's last epoch and the cached fit's same epoch
    a, b = plain["weights"][-1], cached["weights"][len(plain["weights"]) - 1]
    out["max_abs_weight_difference"] = max((a[k] - b[k]).abs().max().item() for k in a)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="vit_base_patch16_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--nodules", type=int, default=12, help="synthetic nodules (3 stacks each)")
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--size", type=int, default=128, help="synthetic frame side")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--epochs", type=int, default=3, help="epochs per fit (uncached fit: one fewer)")
    p.add_argument("--paper-epochs", type=int, default=100)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/feature_cache.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        h5, splits = write_set(root, args.nodules, args.frames, args.size)
        plain = fit(h5, splits, root / "plain", args, cache=False, epochs=max(1, args.epochs - 1))
        print(f"uncached: {[round(e['cpu'], 2) for e in plain['epochs']]} CPU s per epoch", flush=True)
        cached = fit(h5, splits, root / "cached", args, cache=True, epochs=args.epochs)
        print(f"cached: build {cached['setup_s']['cpu']:.2f} s, epochs "
              f"{[round(e['cpu'], 3) for e in cached['epochs']]} CPU s", flush=True)  # fmt: skip
        reused = fit(h5, splits, root / "cached", args, cache=True, epochs=1)
    result = {
        "benchmark": "frozen backbone, computed once (issue 14 item 1)",
        "backbone": args.backbone,
        "img_size": args.img_size,
        "batch_size": args.batch_size,
        "train_stacks": plain["train_stacks"],
        "val_stacks": plain["val_stacks"],
        "torch_threads": torch.get_num_threads(),
        "uncached_epochs": plain["epochs"],
        "cached_setup": cached["setup_s"],
        "cached_epochs": cached["epochs"],
        "cache_report": cached["cache"],
        "reused_setup": reused["setup_s"],
        "reused_report": reused["cache"],
        **summarise(plain, cached, reused, args.paper_epochs, args.folds),
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''} {platform.node()}".strip(),
    }
    write_json(result, args.out)
    c = result["cpu"]
    print(f"cached / uncached epoch {c['cached_over_uncached']:.4f} (CPU), first-epoch overhead "
          f"{c['first_epoch_overhead']:+.2f}, paper fold speedup x{c['paper_fold_speedup']:.1f}; "
          f"wrote {args.out}")  # fmt: skip
    return result


if __name__ == "__main__":
    main()
