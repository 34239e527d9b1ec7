"""Random-access 3-stack ROI reads (stacks/s): the stack reader against bare h5py slicing of the same crops.

Three passes over the same random stacks, interleaved round after round:

- ``reader``: :meth:`StackDataset.read` as the ViT stage's dataset calls it, with its defaults: (nodule,
  stack) -> rows, the stack's box from the per-frame boxes computed once (``datamodules/boxes.py``), the crop
  read through ``StanfordCine.frames(box=...)``;
- ``bare``: ``image[r0:r0 + 3, y0:y1, x0:x1]`` with rows and boxes precomputed outside the timed loop, nothing
  else (the same crops);
- ``per-item boxes``: the reader with ``box_cache=False``, reading the stack's three full masks to compute its
  box at every read (the path before issue 14).

Each figure is the median over rounds of the pass's thread CPU time (decompression runs in the calling thread;
on a shared machine CPU time is not inflated by waiting for a core); wall times are in the JSON.  The ratio
``bare / reader`` is the reader's throughput as a fraction of bare h5py (1.0 = no overhead); also given as the
ratio of the two passes' fastest rounds (``_min``), the less load-sensitive figure on a shared machine.  The one-off
box pass (every frame's mask read once) is timed separately.

    python benchmarks/bench_reads.py [--h5 data/synth/stanford/dataset.hdf5] [--stacks 2000]

Without ``--h5`` it generates the issue's synthetic set (192 nodules, ~90 frames, 256 px) in a temp dir.
Writes benchmarks/results/reads.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from datamodules import boxes
from datamodules.atomic import write_json
from datamodules.stacks import StackDataset
from datamodules.stanford import StanfordCine


def _timed(fn) -> tuple[float, float]:
    c, t = time.thread_time(), time.perf_counter()
    fn()
    return time.thread_time() - c, time.perf_counter() - t


def reader_pass(ds: StackDataset, plan: np.ndarray) -> None:
    for i in plan:
        ds.read(int(i))


def bare_pass(f: h5py.File, jobs) -> None:
    image = f["image"]
    for rows, (y0, x0, y1, x1) in jobs:
        image[rows, y0:y1, x0:x1]


def bare_jobs(ds: StackDataset, plan: np.ndarray) -> list:
    """Rows (a slice when contiguous, as the reader reads them) and box of every planned stack."""
    jobs = []
    for i in plan:
        j, _, pos = ds.index[int(i)]
        nid = ds.nodule_ids[j]
        rows = np.unique(ds.cine.by_id[nid].rows[pos])
        contiguous = rows[-1] - rows[0] + 1 == rows.size
        jobs.append(
            (slice(int(rows[0]), int(rows[-1]) + 1) if contiguous else rows.tolist(), ds.roi(nid, pos))
        )
    return jobs


def measure(h5: Path, stacks: int, repeats: int, *, seed: int = 0, old: bool = True) -> dict:
    """Box pass, then ``repeats`` interleaved rounds of reader / bare / per-item passes over ``stacks`` random
    stacks; thread-CPU and wall seconds per pass (medians and all rounds)."""
    cine = StanfordCine(h5)
    boxes.clear()
    box_cpu, box_wall = _timed(lambda: boxes.boxes_for(cine, [n.annot_id for n in cine.nodules]))
    ds = StackDataset(cine, None, kind="image")
    plain = StackDataset(cine, None, kind="image", box_cache=False)
    plan = np.random.default_rng(seed).integers(0, len(ds), stacks)
    jobs = bare_jobs(ds, plan)
    passes = {"reader": lambda: reader_pass(ds, plan), "bare": lambda: bare_pass(f, jobs)}
    if old:
        passes["per_item_boxes"] = lambda: reader_pass(plain, plan)
    cpu = {k: [] for k in passes}
    wall = {k: [] for k in passes}
    with h5py.File(h5, "r") as f:
        for fn in passes.values():  # warm the page cache and h5py's chunk machinery
            fn()
        for _ in range(repeats):
            for k, fn in passes.items():
                c, w = _timed(fn)
                cpu[k].append(c)
                wall[k].append(w)
    med = {k: statistics.median(v) for k, v in cpu.items()}
    out = {
        "frames": int(sum(n.n_frames for n in cine.nodules)),
        "nodules": len(cine),
        "image_shape": list(cine.image_shape),
        "stacks": stacks,
        "repeats": repeats,
        "box_pass_cpu_s": box_cpu,
        "box_pass_wall_s": box_wall,
        "cpu_s": cpu,
        "wall_s": wall,
        "stacks_per_cpu_s": {k: stacks / v for k, v in med.items()},
        "reader_over_bare": med["bare"] / med["reader"],
        "reader_over_bare_min": min(cpu["bare"]) / min(cpu["reader"]),
        "reader_over_bare_wall": statistics.median(wall["bare"]) / statistics.median(wall["reader"]),
    }
    if old:
        out["per_item_boxes_over_bare"] = med["bare"] / med["per_item_boxes"]
        # epochs of per-item reads the one-off pass costs (one epoch = every stack read once)
        n_stacks = len(ds)
        out["box_pass_in_per_item_epochs"] = box_cpu / (med["per_item_boxes"] / stacks * n_stacks)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--h5", type=Path)
    p.add_argument("--stacks", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/reads.json"))
    args = p.parse_args()
    tmp = None
    if args.h5 is None:
        from datamodules.synth import synthesize_stanford

        tmp = tempfile.TemporaryDirectory()
        args.h5 = Path(synthesize_stanford(Path(tmp.name) / "stanford", seed=0)) / "dataset.hdf5"
    result = {
        "benchmark": "3-stack ROI reads",
        "h5": str(args.h5),
        **measure(args.h5, args.stacks, args.repeats),
        "machine": f"{platform.machine()} {platform.processor() or ''} {platform.node()}".strip(),
    }
    print(json.dumps({k: v for k, v in result.items() if k not in ("cpu_s", "wall_s")}, indent=1))
    print(f"wrote {write_json(result, args.out)}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
