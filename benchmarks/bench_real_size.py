"""The non-fit stages at the Stanford frame size (802 x 1054): frames/s and peak RSS at 1x and 2x the frames
(issue 14, item 3).  Memory must stay flat: a stage whose peak RSS grows with the number of frames holds
something per frame.

The file.  ``usnodule synth`` renders square frames only (``--size`` = height = width), and rendering one
1054 x 1054 frame costs ~2.4 s on the project's 2-core VM (80 minutes for 2,000 frames), so the file is made
from a square synthetic set at ``--render-size`` (default 256): every frame bilinearly resized to 802 x 1054,
masks by nearest neighbour, then fresh speckle-like noise added per pixel (normal, sigma ``--noise``) so that
gzip finds no more redundancy than in a rendered frame (the resize alone would smooth the speckle and make
decompression, the cost of every read, cheaper than at the real size).  Chunked one frame per chunk, gzip-1,
as the generator writes.  The 2x file holds every nodule of the 1x file twice (new ids ``<id>dup``): same
pixels, twice the frames.

Stages, each in a child process of its own (its ``ru_maxrss`` is the stage's peak RSS):

- ``masks``: ``usnodule masks`` (:func:`stages.masks.predict_masks`) with a random-init MSU-Net
  (``SegStage(base=4, depth=3)``, 64 px): reading full frames, resizing, the net, upsampling to 802 x 1054,
  writing ``masks.h5``;
- ``embeddings``: ``usnodule embeddings`` (:func:`stages.embeddings.export`) with random-init ``test_vit``
  (32 px) and mask CNN (32 px): ROI stacks of the frames, full-frame mask stacks, the nets, the writer;
- ``reads``: random 3-stack ROI reads (``benchmarks/bench_reads.py``: the stack reader against bare h5py).

The nets are tiny on purpose: the figures are the stages' frame-size costs (HDF5 decompression, resizing,
boxes, writing), not the paper-size nets' FLOPs, which do not depend on the frame size.

    python benchmarks/bench_real_size.py                    # 2,000 frames (and 4,000), the issue's size
    python benchmarks/bench_real_size.py --frames 400       # what fits a shared 2-core machine quickly

Writes benchmarks/results/real_size.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from datamodules.atomic import write_json

HEIGHT, WIDTH = 802, 1054
FRAMES_PER_NODULE = 90


def _write_frames(dst: h5py.File, name: str, n: int):
    return dst.create_dataset(
        name, shape=(n, HEIGHT, WIDTH), dtype=np.uint8, chunks=(1, HEIGHT, WIDTH), compression="gzip",
        compression_opts=1, shuffle=False,
    )  # fmt: skip


def make_file(root: Path, frames: int, *, render_size: int, noise: float, seed: int = 0) -> Path:
    """A Stanford-layout file of about ``frames`` frames at 802 x 1054 (module docstring); returns its path."""
    import pandas as pd
    import torch
    import torch.nn.functional as F

    from datamodules.synth import synthesize_stanford

    square = synthesize_stanford(
        root / "square",
        n_nodules=max(1, round(frames / FRAMES_PER_NODULE)),
        frames=min(frames, FRAMES_PER_NODULE),
        size=render_size,
        seed=seed,
    )
    out = root / "real"
    out.mkdir()
    rng = np.random.default_rng(seed)
    with h5py.File(square / "dataset.hdf5", "r") as src, h5py.File(out / "dataset.hdf5", "w") as dst:
        n = len(src["image"])
        dst["annot_id"], dst["frame_num"] = src["annot_id"][()], src["frame_num"][()]
        image, mask = _write_frames(dst, "image", n), _write_frames(dst, "mask", n)
        for r0 in range(0, n, 16):
            img = torch.from_numpy(src["image"][r0 : r0 + 16]).float()[:, None]
            img = F.interpolate(img, size=(HEIGHT, WIDTH), mode="bilinear", align_corners=False)[:, 0].numpy()
            img += rng.normal(0.0, noise, img.shape).astype(np.float32)
            image[r0 : r0 + len(img)] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
            m = torch.from_numpy(src["mask"][r0 : r0 + 16])[:, None]
            mask[r0 : r0 + len(m)] = F.interpolate(m, size=(HEIGHT, WIDTH), mode="nearest")[:, 0].numpy()
    shutil.copy(square / "metadata.csv", out / "metadata.csv")
    pd.read_csv(out / "metadata.csv")  # readable
    shutil.rmtree(square)
    return out / "dataset.hdf5"


def double_file(src_h5: Path, out_dir: Path) -> Path:
    """Every nodule of ``src_h5`` twice (ids ``<id>dup`` for the copies), rows streamed frame by frame."""
    import pandas as pd

    out_dir.mkdir()
    with h5py.File(src_h5, "r") as src, h5py.File(out_dir / "dataset.hdf5", "w") as dst:
        n = len(src["image"])
        ids = src["annot_id"][()]
        dst["annot_id"] = np.concatenate([ids, np.array([i.rstrip(b"_") + b"dup_" for i in ids])])
        dst["frame_num"] = np.concatenate([src["frame_num"][()]] * 2)
        for key in ("image", "mask"):
            ds = _write_frames(dst, key, 2 * n)
            for r in range(n):
                frame = src[key][r]
                ds[r] = frame
                ds[n + r] = frame
    meta = pd.read_csv(src_h5.with_name("metadata.csv"), dtype=str)
    dup = meta.copy()
    dup["annot_id"] = [a.rstrip("_") + "dup_" for a in dup["annot_id"]]
    pd.concat([meta, dup]).to_csv(out_dir / "metadata.csv", index=False)
    return out_dir / "dataset.hdf5"


# ---------------------------------------------------------------------------------------------- stages (child)
def _ckpt(model, path: Path, data_hparams: dict) -> Path:
    """A Lightning-format checkpoint of a random-init stage, without a Trainer (as the tests write them)."""
    import lightning
    import torch

    torch.save(
        {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
         "pytorch-lightning_version": lightning.__version__, "datamodule_hyper_parameters": data_hparams},
        path,
    )  # fmt: skip
    return path


def stage_masks(h5: Path, work: Path) -> dict:
    from lightning_modules.seg_stage import SegStage
    from stages.masks import predict_masks

    seg = _ckpt(SegStage(base=4, depth=3), work / "seg.ckpt", {"size": 64})
    t = time.perf_counter()
    predict_masks(cine=h5, seg=seg, out=work / "masks.h5", batch_size=16, progress=False)
    return {"seconds": time.perf_counter() - t}


def stage_embeddings(h5: Path, work: Path) -> dict:
    from lightning_modules.maskcnn_stage import MaskCNNStage
    from lightning_modules.vit_stage import ViTStage
    from stages.embeddings import export

    vit = _ckpt(
        ViTStage(backbone="test_vit", img_size=32),
        work / "vit.ckpt",
        {"img_size": 32, "buffer": 5, "normalize": "half"},
    )
    maskcnn = _ckpt(MaskCNNStage(channels=(4, 8)), work / "maskcnn.ckpt", {"img_size": 32})
    t = time.perf_counter()
    export(
        cine=h5, masks=work / "masks.h5", vit=vit, maskcnn=maskcnn, out=work / "embeddings.h5",
        batch_size=32, accelerator="cpu", progress=False,
    )  # fmt: skip
    return {"seconds": time.perf_counter() - t}


def stage_reads(h5: Path, work: Path, stacks: int = 200) -> dict:
    from benchmarks.bench_reads import measure

    r = measure(h5, stacks, 3)
    return {k: v for k, v in r.items() if k not in ("cpu_s", "wall_s")}


STAGES = {"masks": stage_masks, "embeddings": stage_embeddings, "reads": stage_reads}


def child(stage: str, h5: Path, work: Path) -> None:
    import torch

    torch.manual_seed(0)
    c = time.process_time()
    r = STAGES[stage](h5, work)
    r["cpu_s"] = time.process_time() - c
    r["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(r), flush=True)


def run_stage(stage: str, h5: Path, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", stage, "--h5", str(h5), "--work", str(work)]
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not lines:
        raise RuntimeError(f"{stage} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=2000, help="frames of the 1x file (the 2x file has twice)")
    p.add_argument("--render-size", type=int, default=256)
    p.add_argument("--noise", type=float, default=12.0)
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/real_size.json"))
    p.add_argument("--child", choices=list(STAGES), help=argparse.SUPPRESS)
    p.add_argument("--h5", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.h5, args.work)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        files = {"1x": make_file(root / "1x", args.frames, render_size=args.render_size, noise=args.noise)}
        files["2x"] = double_file(files["1x"], root / "2x")
        made_s = time.perf_counter() - t
        rows = []
        for scale, h5 in files.items():
            with h5py.File(h5, "r") as f:
                n = len(f["image"])
            for stage in args.stages:
                r = run_stage(stage, h5, h5.parent)
                r.update(scale=scale, stage=stage, frames=n, file_mib=h5.stat().st_size / 2**20)
                if "seconds" in r:
                    r["frames_per_s"] = n / r["seconds"]
                rows.append(r)
                print(json.dumps(r), flush=True)
    peak = {s: [r["peak_rss_mib"] for r in rows if r["stage"] == s] for s in args.stages}
    result = {
        "benchmark": "non-fit stages at 802 x 1054",
        "frame_shape": [HEIGHT, WIDTH],
        "frames_1x": args.frames,
        "render_size": args.render_size,
        "noise": args.noise,
        "file_seconds": made_s,
        "rows": rows,
        "peak_rss_2x_over_1x": {s: v[1] / v[0] for s, v in peak.items() if len(v) == 2},
        "machine": f"{platform.machine()} {platform.processor() or ''} {platform.node()}".strip(),
    }
    print(f"wrote {write_json(result, args.out)}")


if __name__ == "__main__":
    main()
