"""``usnodule synth``: write the synthetic Stanford-layout and paired BUS/CEUS sets (the embedded default), and
with ``--stills N`` a still-image set with carcinoma subtypes (``<out>/stills``).

``--only stanford,paired`` writes just the named folders (the same bytes as a full run: each layout draws from
its own seeded streams); the Makefile renders the sets as separate steps, so the demo starts on the cine set
while the paired clips are being drawn, and generates the still images only for the targets that read them.
``--only preview`` writes just ``<out>/preview.png`` from the sets already there.

A non-empty ``<out>/stanford``, ``<out>/paired`` or ``<out>/stills`` that synth did not write (no ``.usnodule-synth`` marker) is
refused with one line and exit status 2 before anything is written; ``--overwrite`` replaces it anyway.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stages.options import seed


def _int_at_least(low: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


ONLY_CHOICES = ("stanford", "paired", "stills", "preview")


def _only(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [n for n in names if n not in ONLY_CHOICES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"choose from {','.join(ONLY_CHOICES)} (comma-separated), got {text!r}"
        )
    return names


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write synthetic data: <out>/stanford (dataset.hdf5, metadata.csv), <out>/paired (manifest.csv), "
        "optionally <out>/stills (--stills N), each with the generator's truth.csv",
        description="Synthetic thyroid ultrasound: B-mode cine sweeps in the Stanford AIMI layout and paired "
                    "BUS/CEUS clips, labels from TI-RADS features plus image-only signals; with --stills N, still "
                    "images with carcinoma subtypes (benign, PTC, FTC, MTC) for CSASN. "
                    "Deterministic by seed. Each folder also gets truth.csv (clean risk, its TI-RADS and hidden "
                    "parts, the hidden signals, the label), which no training stage reads; "
                    "`usnodule report --truth` uses it for reference rows.",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("data/synth"), help="output folder (default data/synth)")
    p.add_argument(
        "--nodules", type=_int_at_least(1), default=192, help="Stanford-layout nodules (default 192)"
    )
    p.add_argument(
        "--frames", type=_int_at_least(1), default=90, help="mean frames per cine clip (default 90)"
    )
    p.add_argument(
        "--size", type=_int_at_least(16), default=256, help="frame height = width in pixels (default 256)"
    )
    p.add_argument("--cases", type=_int_at_least(1), default=48, help="paired BUS/CEUS cases (default 48)")
    p.add_argument(
        "--paired-frames",
        type=_int_at_least(1),
        default=None,
        help="frames per paired clip (default min(frames, 32))",
    )
    p.add_argument(
        "--paired-size",
        type=_int_at_least(16),
        default=None,
        help="paired frame size (default min(size, 128))",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--prevalence",
        type=_fraction,
        default=None,
        help="fraction malignant for both layouts (default 0.09 Stanford, 0.45 paired)",
    )
    g.add_argument("--balanced", action="store_const", const=0.5, dest="prevalence", help="prevalence 0.5")
    p.add_argument(
        "--paired-prevalence",
        type=_fraction,
        default=None,
        help="fraction malignant of the paired set alone (default: --prevalence, else 0.45)",
    )
    p.add_argument(
        "--label-noise",
        type=float,
        default=1.0,
        help="scale of the label model's logistic noise (default 1; below 1 labels follow the planted signals "
        "more closely, and truth.csv's ceiling rises with them)",
    )
    p.add_argument("--seed", type=seed, default=0, help="random seed (same seed -> same bytes)")
    p.add_argument(
        "--workers",
        type=_int_at_least(0),
        default=None,
        help="render processes (default: 2 for big sets, else 0)",
    )
    p.add_argument(
        "--only",
        type=_only,
        default=None,
        help="write only these of stanford,paired,stills,preview (comma-separated; default: stanford and paired, "
        "stills with --stills N); the same bytes as a full run",
    )
    p.add_argument("--preview", action="store_true", help="also write <out>/preview.png (a contact sheet)")
    p.add_argument(
        "--stills",
        type=_int_at_least(0),
        default=0,
        help="also write <out>/stills: N still images with carcinoma subtypes (benign, PTC, FTC, MTC) for "
        "CSASN, PNG images + masks, manifest.csv (with a subtype column) and truth.csv (the generator's subtype "
        "posterior); default 0 (none); the other layouts are the same bytes either way",
    )
    p.add_argument(
        "--stills-size",
        type=_int_at_least(16),
        default=None,
        help="still image height = width in pixels (default min(size, 128))",
    )
    p.add_argument(
        "--stills-malignant",
        type=_fraction,
        default=None,
        help="malignant share of the stills (PTC + FTC + MTC; FTC and MTC 5%% of all each; default 0.4)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace <out>/stanford, <out>/paired (and <out>/stills) even if they hold files synth did not write (without it "
        "such a folder is refused; synth's own earlier output, marked by a .usnodule-synth file, is always "
        "replaced)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from rich.progress import Progress

    from datamodules.errors import OptionError
    from datamodules.synth import preview, synthesize

    only = args.only or ("stanford", "paired", *(("stills",) if args.stills else ()))
    layouts = tuple(n for n in only if n != "preview")
    if "stills" in layouts and not args.stills:
        raise OptionError("--only", "stills needs --stills N (how many still images)")
    out = args.out
    if layouts:
        with Progress(transient=True) as bar:
            tasks: dict[str, int] = {}

            def progress(name: str, done: int, total: int) -> None:
                if name not in tasks:
                    tasks[name] = bar.add_task(f"synth {name}", total=total)
                bar.update(tasks[name], completed=done)

            synthesize(args.out, n_nodules=args.nodules, frames=args.frames, size=args.size,
                       n_cases=args.cases, paired_frames=args.paired_frames, paired_size=args.paired_size,
                       prevalence=args.prevalence, label_noise=args.label_noise,
                       paired_prevalence=args.paired_prevalence,
                       seed=args.seed, workers=args.workers, progress=progress,
                       overwrite=args.overwrite, n_stills=args.stills, stills_size=args.stills_size,
                       stills_malignant=args.stills_malignant, only=layouts)  # fmt: skip
    files = {
        "stanford": ("dataset.hdf5", "metadata.csv"),
        "paired": ("manifest.csv",),
        "stills": ("manifest.csv",),
    }
    for name in layouts:
        print(f"wrote {', '.join(str(out / name / f) for f in files[name])}; generator truth (read by no stage, "
              f"only `report --truth`): {out / name / 'truth.csv'}")  # fmt: skip
    if args.preview or "preview" in only:
        print(f"wrote {preview(out, out / 'preview.png')}")
