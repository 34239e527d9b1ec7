"""``usnodule synth``: write the synthetic Stanford-layout and paired BUS/CEUS data sets (the embedded default)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write synthetic data: <out>/stanford (dataset.hdf5 + metadata.csv) and <out>/paired (manifest.csv)",
        description="Synthetic thyroid ultrasound: B-mode cine sweeps in the Stanford AIMI layout and paired "
                    "BUS/CEUS clips, labels from TI-RADS features plus image-only signals. Deterministic by seed.",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("data/synth"), help="output folder (default data/synth)")
    p.add_argument("--nodules", type=int, default=192, help="Stanford-layout nodules (default 192)")
    p.add_argument("--frames", type=int, default=90, help="mean frames per cine clip (default 90)")
    p.add_argument("--size", type=int, default=256, help="frame height = width in pixels (default 256)")
    p.add_argument("--cases", type=int, default=48, help="paired BUS/CEUS cases (default 48)")
    p.add_argument("--paired-frames", type=int, default=None, help="frames per paired clip (default min(frames, 32))")
    p.add_argument("--paired-size", type=int, default=None, help="paired frame size (default min(size, 128))")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prevalence", type=float, default=None,
                   help="fraction malignant for both layouts (default 0.09 Stanford, 0.45 paired)")
    g.add_argument("--balanced", action="store_const", const=0.5, dest="prevalence", help="prevalence 0.5")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed -> same bytes)")
    p.add_argument("--workers", type=int, default=None, help="render processes (default: 2 for big sets, else 0)")
    p.add_argument("--preview", action="store_true", help="also write <out>/preview.png (a contact sheet)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from rich.progress import Progress

    from datamodules.synth import preview, synthesize

    for name in ("nodules", "frames", "size", "cases"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name} must be >= 1")
    if args.prevalence is not None and not 0.0 <= args.prevalence <= 1.0:
        raise SystemExit("error: --prevalence must be in [0, 1]")
    with Progress(transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(f"synth {name}", total=total)
            bar.update(tasks[name], completed=done)

        out = synthesize(args.out, n_nodules=args.nodules, frames=args.frames, size=args.size, n_cases=args.cases,
                         paired_frames=args.paired_frames, paired_size=args.paired_size, prevalence=args.prevalence,
                         seed=args.seed, workers=args.workers, progress=progress)  # fmt: skip
    print(f"wrote {out / 'stanford' / 'dataset.hdf5'}, {out / 'stanford' / 'metadata.csv'}, "
          f"{out / 'paired' / 'manifest.csv'}")  # fmt: skip
    if args.preview:
        print(f"wrote {preview(out, out / 'preview.png')}")
