"""Embedding export throughput (stacks/s) against the bare encoder forward, and its peak memory vs nodule count.

``export``: the whole ``usnodule embeddings`` path (``stages.embeddings.export``): DataLoader reads of the ROI
crops and predicted-mask stacks, resizing, ViT + mask CNN forward through ``Trainer.predict``, the streaming
shard writer and the merge into ``embeddings.h5``. Timed twice: the predict loop alone (first to last batch,
what the issue's ">= 90% of the bare forward" goal is about) and end to end (also checkpoint loading/hashing,
Trainer set-up and the merge).

``bare``: the same two encoders (``vit.net.forward_features`` + ``maskcnn.net.forward_features`` + their
heads) on the *same* stacks, already in memory as batched tensors, same batch size, same process: nothing but
compute.

Memory: the export of 1x, 2x and 4x the nodules, each in a fresh subprocess, reporting the peak RSS of the
process (``ru_maxrss``) and the tracemalloc peak of Python-level allocations. Flat = streaming works.

    python benchmarks/bench_export.py                         # CPU, test-size ViT, small synthetic file
    python benchmarks/bench_export.py --device cuda --backbone vit_base_patch16_224 --img-size 224 \
        --nodules 64 --frames 60 --size 512 --batch-size 64 --workers 8

Writes benchmarks/results/export.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import h5py
import lightning
import numpy as np
import pandas as pd
import torch

from datamodules.atomic import write_json

HEADER = [
    "annot_id",
    "ti-rads_composition",
    "ti-rads_echogenicity",
    "ti-rads_shape",
    "ti-rads_margin",
    "ti-rads_echogenicfoci",
    "ti-rads_level",
    "histopath_diagnosis",
]


def make_data(root: Path, nodules: int, frames: int, size: int, seed: int = 0) -> tuple[Path, Path]:
    """A Stanford-layout file (textured frames, an elliptic nodule moving across the sweep) + its masks.h5.

    Written block by block, so making the 4x file needs no more memory than the 1x one.
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    h5, masks = root / "dataset.hdf5", root / "masks.h5"
    n = nodules * frames
    yy, xx = np.mgrid[:size, :size]
    with h5py.File(h5, "w") as f, h5py.File(masks, "w") as m:
        img = f.create_dataset("image", (n, size, size), np.uint8, chunks=(1, size, size))
        msk = f.create_dataset("mask", (n, size, size), np.uint8, chunks=(1, size, size), compression="gzip")
        pm = m.create_dataset("mask", (n, size, size), np.uint8, chunks=(1, size, size), compression="gzip")
        ids = np.repeat([f"{i}_".encode() for i in range(nodules)], frames)
        nums = np.tile([str(j + 1).encode() for j in range(frames)], nodules)
        f["annot_id"], f["frame_num"], m["annot_id"], m["frame_num"] = ids, nums, ids, nums
        for i in range(nodules):
            cy, cx, r = (
                rng.uniform(0.3, 0.7) * size,
                rng.uniform(0.3, 0.7) * size,
                rng.uniform(0.06, 0.15) * size,
            )
            block = rng.integers(40, 120, (frames, size, size), dtype=np.uint8)
            inside = np.stack(
                [((yy - cy) ** 2 + (xx - cx - 0.002 * size * j) ** 2) < r * r for j in range(frames)]
            )
            block[inside] = 30
            sl = slice(i * frames, (i + 1) * frames)
            img[sl], msk[sl], pm[sl] = block, inside.astype(np.uint8) * 255, inside.astype(np.uint8)
    meta = pd.DataFrame(
        {
            "annot_id": [f"{i}_" for i in range(nodules)],
            "ti-rads_composition": 2,
            "ti-rads_echogenicity": 2,
            "ti-rads_shape": 0,
            "ti-rads_margin": 0,
            "ti-rads_echogenicfoci": 0,
            "ti-rads_level": "TR3",
            "histopath_diagnosis": [i % 2 for i in range(nodules)],
        },
        columns=HEADER,
    )
    meta.to_csv(root / "metadata.csv", index=False)
    return h5, masks


def make_checkpoints(root: Path, backbone: str, img_size: int) -> tuple[Path, Path]:
    """Random-init ViT and mask CNN stages saved in Lightning checkpoint format (no training needed to time)."""
    from lightning_modules.maskcnn_stage import MaskCNNStage
    from lightning_modules.vit_stage import ViTStage

    out = []
    for model, data, name in (
        (ViTStage(backbone=backbone, img_size=img_size), {"img_size": img_size}, "vit"),
        (MaskCNNStage(), {"img_size": img_size}, "maskcnn"),
    ):
        path = root / f"{name}.ckpt"
        torch.save(
            {
                "state_dict": model.state_dict(),
                "hyper_parameters": dict(model.hparams),
                "pytorch-lightning_version": lightning.__version__,
                "datamodule_hyper_parameters": data,
            },
            path,
        )
        out.append(path)
    return out[0], out[1]


class LoopTimer(lightning.Callback):
    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            self.start = time.perf_counter()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.end = time.perf_counter()
        self.batches = batch_idx + 1


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_export(args, h5: Path, masks: Path, vit: Path, maskcnn: Path, out: Path) -> dict:
    from stages.embeddings import export

    timer = LoopTimer()
    t0 = time.perf_counter()
    export(
        cine=h5,
        masks=masks,
        vit=vit,
        maskcnn=maskcnn,
        out=out,
        batch_size=args.batch_size,
        num_workers=args.workers,
        accelerator="gpu" if args.device.startswith("cuda") else "cpu",
        precision=args.precision,
        progress=False,
        callbacks=[timer],
    )
    total = time.perf_counter() - t0
    with h5py.File(out, "r") as f:
        stacks = sum(f[g]["image"].shape[0] for g in f)
    # The first batch's wait (worker start-up) is outside the loop timer; its compute is inside.
    return {
        "stacks": stacks,
        "end_to_end_s": total,
        "loop_s": timer.end - timer.start,
        "batches": timer.batches,
    }


def make_bare(args, h5: Path, masks: Path, vit_path: Path, maskcnn_path: Path):
    """A function timing one pass of the bare encoders over the export's stacks (preloaded, batched)."""
    from datamodules.stacks import PredictedMasks, build_dataset
    from datamodules.stanford import StanfordCine
    from lightning_modules.maskcnn_stage import MaskCNNStage
    from lightning_modules.vit_stage import ViTStage

    vit, vit_data = ViTStage.from_checkpoint(vit_path, map_location=args.device)
    mcnn, _ = MaskCNNStage.from_checkpoint(maskcnn_path, map_location=args.device)
    cine = StanfordCine(h5)
    ds = build_dataset(cine, PredictedMasks(masks, cine), vit_data, {}, args.img_size, args.img_size)
    items = [ds[i] for i in range(len(ds))]
    batches = [
        torch.utils.data.default_collate(items[i : i + args.batch_size])
        for i in range(0, len(items), args.batch_size)
    ]
    batches = [(b["image"].to(args.device), b["mask"].to(args.device)) for b in batches]
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(args.precision))
    dev_type = "cuda" if args.device.startswith("cuda") else "cpu"

    @torch.inference_mode()
    def one_pass() -> float:
        t = time.perf_counter()
        with torch.autocast(dev_type, dtype=dtype, enabled=dtype is not None):
            for x, m in batches:
                e = vit.net.forward_features(x)
                vit.net.forward_head(e).softmax(-1)
                s = mcnn.net.forward_features(m)
                mcnn.net.forward_head(s).softmax(-1)
                e.float().cpu(), s.float().cpu()  # the export copies results to the host too
        sync(args.device)
        return time.perf_counter() - t

    one_pass()  # warm-up
    return one_pass, len(items)


def child_memory(args) -> None:
    """Subprocess entry: export once, print JSON with peak RSS and tracemalloc peak."""
    root = Path(args.child_memory)
    tracemalloc.start()
    res = run_export(
        args,
        root / "dataset.hdf5",
        root / "masks.h5",
        root / "vit.ckpt",
        root / "maskcnn.ckpt",
        root / "embeddings.h5",
    )
    _, peak = tracemalloc.get_traced_memory()
    res.update(
        {
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "tracemalloc_peak_mib": peak / 2**20,
        }
    )
    print("RESULT " + json.dumps(res))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodules", type=int, default=16)
    p.add_argument("--frames", type=int, default=30)
    p.add_argument("--size", type=int, default=256, help="frame side in pixels")
    p.add_argument("--backbone", default="test_vit")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default=None, help="Trainer precision, e.g. bf16-mixed")
    p.add_argument(
        "--repeats", type=int, default=3, help="alternating export / bare passes (medians reported)"
    )
    p.add_argument(
        "--scales", type=int, nargs="*", default=[1, 2, 4], help="nodule multiples for the memory runs"
    )
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "export.json")
    p.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_memory:
        return child_memory(args)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        result = {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "cpus": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "args": {k: v for k, v in vars(args).items() if k not in ("out", "child_memory")},
        }
        base = tmp / "x1"
        h5, masks = make_data(base, args.nodules, args.frames, args.size)
        vit, maskcnn = make_checkpoints(base, args.backbone, args.img_size)
        run_export(args, h5, masks, vit, maskcnn, base / "warm.h5")  # warm caches / cudnn
        bare_pass, stacks = make_bare(args, h5, masks, vit, maskcnn)
        # Alternate export and bare passes so that load from other processes hits both alike; report medians.
        exports, bare = [], []
        for i in range(args.repeats):
            exports.append(run_export(args, h5, masks, vit, maskcnn, base / f"e{i}.h5"))
            bare.append(bare_pass())
        loop = statistics.median(e["loop_s"] for e in exports)
        total = statistics.median(e["end_to_end_s"] for e in exports)
        bare_s = statistics.median(bare)
        result["throughput"] = {
            "stacks": stacks,
            "export_loop_stacks_per_s": stacks / loop,
            "export_end_to_end_stacks_per_s": stacks / total,
            "bare_forward_stacks_per_s": stacks / bare_s,
            "export_loop_vs_bare": bare_s / loop,
            "export_end_to_end_vs_bare": bare_s / total,
            "runs": exports,
            "bare_s": bare,
        }
        memory = []
        for k in args.scales:
            root = tmp / f"mem{k}"
            make_data(root, args.nodules * k, args.frames, args.size, seed=k)
            make_checkpoints(root, args.backbone, args.img_size)
            cmd = [sys.executable, __file__, "--child-memory", str(root)] + [
                a
                for kv in (
                    ("--batch-size", args.batch_size),
                    ("--workers", args.workers),
                    ("--device", args.device),
                    ("--img-size", args.img_size),
                )
                for a in map(str, kv)
            ]
            if args.precision:
                cmd += ["--precision", args.precision]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            res = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
            memory.append({"scale": k, "nodules": args.nodules * k, **res})
            print(
                f"memory x{k}: {res['stacks']} stacks, peak RSS {res['peak_rss_mib']:.0f} MiB, "
                f"tracemalloc peak {res['tracemalloc_peak_mib']:.1f} MiB"
            )
        result["memory"] = memory
    t = result["throughput"]
    print(
        f"export loop {t['export_loop_stacks_per_s']:.1f} stacks/s, end to end "
        f"{t['export_end_to_end_stacks_per_s']:.1f}, bare forward {t['bare_forward_stacks_per_s']:.1f} -> "
        f"loop/bare {t['export_loop_vs_bare']:.2f}, end-to-end/bare {t['export_end_to_end_vs_bare']:.2f}"
    )
    print(f"wrote {write_json(result, args.out)}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
