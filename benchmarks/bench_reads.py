"""Random-access 3-stack ROI reads (stacks/s): ``StanfordCine`` against bare h5py slicing of the same rows.

The baseline knows the rows and boxes in advance and does nothing but ``ds[r0:r0 + 3, y0:y1, x0:x1]``; the
reader resolves (nodule, stack) -> rows, validates mask values and computes the ROI box from the masks, as
the ViT stage's dataset does.  The ratio reader/bare is what matters (1.0 = no overhead).

    python benchmarks/bench_reads.py [--h5 data/synth/stanford/dataset.hdf5] [--stacks 2000]

Without ``--h5`` it generates the issue's synthetic set (192 nodules, ~90 frames, 256 px) in a temp dir.
Writes benchmarks/results/reads.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from datamodules.atomic import write_json
from datamodules.stanford import StanfordCine, bbox_from_mask

BUFFER = 5


def _plan(ds: StanfordCine, n: int, seed: int) -> list[tuple[str, int]]:
    rng = np.random.default_rng(seed)
    stacks = [(nod.annot_id, s) for nod in ds.nodules for s in range(nod.n_frames // 3)]
    return [stacks[i] for i in rng.integers(0, len(stacks), n)]


def reader_pass(ds: StanfordCine, plan) -> float:
    t = time.perf_counter()
    h, w = ds.image_shape
    for annot_id, s in plan:
        idx = np.arange(3 * s, 3 * s + 3)
        box = bbox_from_mask(ds.masks(annot_id, idx).max(0))
        if box is not None:
            box = (
                max(box[0] - BUFFER, 0),
                max(box[1] - BUFFER, 0),
                min(box[2] + BUFFER, h),
                min(box[3] + BUFFER, w),
            )
        ds.frames(annot_id, idx, box=box)
    return time.perf_counter() - t


def bare_pass(h5_path: Path, jobs) -> float:
    with h5py.File(h5_path, "r") as f:
        image, mask = f["image"], f["mask"]
        t = time.perf_counter()
        for rows, box in jobs:
            mask[rows]
            image[rows, box[0] : box[2], box[1] : box[3]]
        return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--h5", type=Path)
    p.add_argument("--stacks", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/reads.json"))
    args = p.parse_args()
    tmp = None
    if args.h5 is None:
        from datamodules.synth import synthesize_stanford

        tmp = tempfile.TemporaryDirectory()
        args.h5 = Path(synthesize_stanford(Path(tmp.name) / "stanford", seed=0)) / "dataset.hdf5"
    ds = StanfordCine(args.h5)
    plan = _plan(ds, args.stacks, seed=0)
    # The bare baseline gets rows and boxes for free (precomputed outside the timed loop).
    jobs = []
    h, w = ds.image_shape
    for annot_id, s in plan:
        rows = ds.by_id[annot_id].rows[3 * s : 3 * s + 3]
        box = bbox_from_mask(ds.masks(annot_id, np.arange(3 * s, 3 * s + 3)).max(0)) or (0, 0, h, w)
        box = (
            max(box[0] - BUFFER, 0),
            max(box[1] - BUFFER, 0),
            min(box[2] + BUFFER, h),
            min(box[3] + BUFFER, w),
        )
        jobs.append(
            (
                slice(int(rows.min()), int(rows.max()) + 1)
                if np.all(np.diff(rows) == 1)
                else sorted(rows.tolist()),
                box,
            )
        )
    reader = min(reader_pass(ds, plan) for _ in range(args.repeats))
    bare = min(bare_pass(args.h5, jobs) for _ in range(args.repeats))
    result = {
        "benchmark": "3-stack ROI reads",
        "h5": str(args.h5),
        "frames": int(sum(n.n_frames for n in ds.nodules)),
        "nodules": len(ds),
        "image_shape": list(ds.image_shape),
        "stacks": args.stacks,
        "reader_stacks_per_s": args.stacks / reader,
        "bare_h5py_stacks_per_s": args.stacks / bare,
        "reader_over_bare_throughput": bare / reader,
        "machine": f"{platform.machine()} {platform.processor() or ''} {platform.node()}".strip(),
    }
    print(json.dumps(result, indent=1))
    print(f"wrote {write_json(result, args.out)}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
