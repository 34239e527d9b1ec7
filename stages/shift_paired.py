"""``usnodule shift-paired``: a paired BUS/CEUS set as another scanner records it, for the cross-data-set transfer
study (AsyCMST Sec. 4.3; :mod:`datamodules.domain_shift` says what each setting does).

Two sources: ``--like DIR`` draws a fresh synthetic paired set with DIR's generator settings (its
``.usnodule-synth`` marker) and another seed (default DIR's + 1: other nodules, other patients), then shifts it;
``--manifest CSV`` shifts the clips of an existing paired manifest, real or synthetic (same cases).  The output
folder appears only when complete; a non-empty folder this command did not write is refused (``--overwrite``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stages.options import positive_int, seed


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "shift-paired",
        help="write a paired BUS/CEUS set as another scanner records it (gain, display map, PSF, frame rate)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--like", type=Path, help="draw a new synthetic paired set with this folder's settings")
    src.add_argument("--manifest", type=Path, help="shift the cases of this paired manifest.csv")
    p.add_argument("--out", type=Path, required=True, help="output folder (manifest.csv, clips, shift.json)")
    p.add_argument(
        "--seed", type=seed, default=None, help="--like: generator seed (default: the source's + 1)"
    )
    p.add_argument(
        "--cases", type=positive_int, default=None, help="--like: number of cases (default: the source's)"
    )
    p.add_argument("--gain", type=_positive_float, default=1.0, help="gray levels multiplied (default 1)")
    p.add_argument(
        "--gamma", type=_positive_float, default=1.0, help="display map 255 (x/255)^gamma (default 1)"
    )
    p.add_argument(
        "--psf", type=_non_negative_float, default=0.0, help="Gaussian blur sigma in pixels (default 0)"
    )
    p.add_argument("--frame-step", type=positive_int, default=1, help="keep every k-th frame (default 1)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty --out this command did not write"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from datamodules.domain_shift import Shift, draw_like, shift_manifest

    shift = Shift(gain=args.gain, gamma=args.gamma, psf=args.psf, frame_step=args.frame_step)
    if args.like is not None:
        manifest = draw_like(
            args.like, args.out, shift, seed=args.seed, n_cases=args.cases, overwrite=args.overwrite
        )
    else:
        manifest = shift_manifest(args.manifest, args.out, shift, overwrite=args.overwrite)
    print(f"wrote {manifest} ({shift})")
