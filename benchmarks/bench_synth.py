"""Synthetic data generation speed: the issue's set (192 nodules, ~90 frames, 256 x 256) -> JSON.

    python benchmarks/bench_synth.py [--nodules 192] [--frames 90] [--size 256] [--workers 0 2]

Times ``synthesize_stanford`` (render + gzip-1 HDF5 chunks) for each worker count into a temporary folder,
and the paired BUS/CEUS set once; writes ``benchmarks/results/synth.json`` and prints nodules/s.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import h5py

from datamodules.atomic import write_json
from datamodules.synth import synthesize_paired, synthesize_stanford


def _cpu() -> float:
    """CPU seconds used by this process and its finished children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodules", type=int, default=192)
    p.add_argument("--frames", type=int, default=90)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--cases", type=int, default=48)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/synth.json"))
    args = p.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for w in args.workers:
            out = Path(tmp) / f"stanford{w}"
            load = os.getloadavg()[0]
            cpu0 = _cpu()
            t = time.perf_counter()
            synthesize_stanford(
                out, n_nodules=args.nodules, frames=args.frames, size=args.size, seed=0, workers=w
            )
            dt = time.perf_counter() - t
            cpu = _cpu() - cpu0
            with h5py.File(out / "dataset.hdf5") as f:
                n_frames = int(f["image"].shape[0])
            size_mb = (out / "dataset.hdf5").stat().st_size / 2**20
            runs.append(
                {
                    "workers": w,
                    "seconds": round(dt, 2),
                    "nodules_per_s": round(args.nodules / dt, 2),
                    "frames_per_s": round(n_frames / dt, 1),
                    "frames": n_frames,
                    "file_mb": round(size_mb, 1),
                    "cpu_seconds": round(cpu, 1),  # all processes: less sensitive to other load
                    "load_avg_1m_before": round(load, 2),
                }
            )
            print(
                f"stanford workers={w}: {dt:.1f} s, {args.nodules / dt:.2f} nodules/s, "
                f"{n_frames / dt:.0f} frames/s, {cpu:.0f} CPU s (load {load:.1f}), "
                f"{n_frames} frames, {size_mb:.0f} MB"
            )
        t = time.perf_counter()
        synthesize_paired(Path(tmp) / "paired", n_cases=args.cases, seed=0)
        dt_p = time.perf_counter() - t
        print(f"paired: {args.cases} cases in {dt_p:.1f} s")
    result = {
        "benchmark": "synth", "nodules": args.nodules, "mean_frames": args.frames, "size": args.size,
        "stanford": runs, "paired": {"cases": args.cases, "seconds": round(dt_p, 2)},
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "load_avg_1m": os.getloadavg()[0]},
    }  # fmt: skip
    print(f"wrote {write_json(result, args.out)}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
