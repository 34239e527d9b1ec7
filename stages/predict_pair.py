"""``usnodule predict-pair``: AsyCMST's malignancy probability of new BUS + CEUS pairs, with overlays of its
cross-modal attention.

  usnodule predict-pair --ckpt runs/demo/asycmst/fold0/asycmst.ckpt --bus bus.mp4 --ceus ceus.mp4
  usnodule predict-pair --ckpt CKPT --bus a_bus.dcm b_bus.dcm --ceus a_ceus.dcm b_ceus.dcm \\
      --bus-mask a_mask.npy b_mask.npy --overlay overlays/
  usnodule predict-pair --ckpt CKPT --pairs data/xjtu/manifest.csv --cases 17 42 --out pairs.csv

Pairs come as --bus/--ceus files (the i-th BUS with the i-th CEUS; any clip datamodules.clips reads: video,
DICOM, frame folder, .npy/.npz, HDF5) or as a paired manifest (case_id,patient_id,label,bus,ceus[,bus_mask], as
`usnodule synth` and `usnodule import asycmst` write it).  The checkpoint is an AsyCMST fit (`lightning fit -c
conf/asycmst.yaml --ckpt_out ...`); its saved data settings (frames, size, roi) are applied exactly as the
datamodule applies them to a test case (lightning_modules/asycmst_predict.py).

ROI: a checkpoint trained on crops around the BUS nodule (data.roi, e.g. the demo's 1.15) needs the BUS mask to
crop a new pair the same way: give --bus-mask (or a bus_mask column).  Without it the whole frame is used (as
the datamodule does for an unannotated clip), the roi column says `missing` and a warning line says how many
pairs were predicted off the trained input; no box is guessed.

Output CSV columns: case_id, label (the manifest's; blank for --bus/--ceus), bus, ceus, bus_mask, n_frames,
frames (the sampled frame positions), roi (annotated | none | missing | empty), prob_malignant, pred
(prob_malignant >= --threshold), overlay.  --overlay DIR writes DIR/<case_id>.png per pair: the frames the
model saw and the attention each stream paid the other (last cross-modal stage, heads averaged), captured in
the same forward pass as the probability.  The CSV and DIR appear only when every pair succeeded; a DIR that
holds files predict-pair did not write is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from pathlib import Path

from datamodules.errors import DataError
from stages.options import count, fraction, output_file, positive_int

COLUMNS = (
    "case_id",
    "label",
    "bus",
    "ceus",
    "bus_mask",
    "n_frames",
    "frames",
    "roi",
    "prob_malignant",
    "pred",
    "overlay",
)
MARKER = ".usnodule-predict-pair"  # marks an overlay folder this command wrote (and may replace)


def pair_cases(bus: list[Path], ceus: list[Path], masks: list[Path] | None):
    """``--bus``/``--ceus``/``--bus-mask`` -> unlabelled cases (label -1) named after the BUS file."""
    from datamodules.clips import split_h5_spec
    from datamodules.paired import PairedCase

    if len(bus) != len(ceus):
        raise DataError(None, f"--bus names {len(bus)} clip(s) but --ceus {len(ceus)}: give one CEUS per BUS")
    if masks is not None and len(masks) != len(bus):
        raise DataError(None, f"--bus-mask names {len(masks)} mask(s) for {len(bus)} BUS clip(s)")
    cases, seen = [], set()
    for i, (b, c) in enumerate(zip(bus, ceus, strict=True)):
        file, key = split_h5_spec(b)
        name = file.stem + (f"_{key.strip('/').replace('/', '_')}" if key else "")
        case_id = name if name not in seen else f"{name}_{i + 1}"
        seen.add(case_id)
        cases.append(PairedCase(case_id, case_id, -1, b, c, None if masks is None else masks[i]))
    return cases


def manifest_cases(manifest: Path, ids: list[str] | None):
    """The manifest's cases (validated by ``read_manifest``), or those named by ``--cases``, in that order."""
    from datamodules.paired import read_manifest

    cases = read_manifest(manifest)
    if not ids:
        return cases
    by_id = {c.case_id: c for c in cases}
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise DataError(manifest, f"--cases {', '.join(unknown[:3])}: not in the manifest")
    return [by_id[i] for i in ids]


def check_overlay_dir(path: Path) -> None:
    """A folder this command may (re)place: absent, empty, or an earlier predict-pair overlay folder."""
    if path.exists() and not path.is_dir():
        raise DataError(path, "--overlay names a file; give a folder")
    if path.is_dir() and any(path.iterdir()) and not (path / MARKER).is_file():
        raise DataError(path, "holds files predict-pair did not write: choose another --overlay folder")


def safe_name(case_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", case_id).strip(".") or "case"


def montage(pred, path: Path, streams: tuple[str, str], threshold: float) -> Path:
    """One pair's overlay PNG (:func:`lightning_modules.asycmst_overlay.save_montage`)."""
    import cv2

    from datamodules.clips import read_clip
    from lightning_modules.asycmst_overlay import save_montage
    from lightning_modules.asycmst_predict import ROI_STATES

    middle = [int(pred.indices[len(pred.indices) // 2])]
    bus, ceus = read_clip(pred.case.bus, middle)[0], read_clip(pred.case.ceus, middle)[0]
    if ceus.shape != bus.shape:  # the dataset brings CEUS onto the BUS grid; so does the picture
        ceus = cv2.resize(ceus, (bus.shape[1], bus.shape[0]))
    verdict = "malignant" if pred.prob >= threshold else "benign"
    layer = "" if pred.layer is None else f"; attention of cross-modal stage {pred.layer}, mean over heads"
    title = (
        f"{pred.case.case_id}: P(malignant) = {pred.prob:.3f} ({verdict} at {threshold:g}); "
        f"{len(pred.indices)} of {pred.n_frames} frames{layer}\n{ROI_STATES[pred.roi]}"
    )
    return save_montage(
        path,
        title=title,
        frames={"bus": pred.bus, "ceus": pred.ceus},
        full={"bus": bus, "ceus": ceus},
        box=pred.box,
        indices=pred.indices,
        attention=pred.attention,
        streams=streams,
    )


def predict_pair(args: argparse.Namespace):
    """Predict every pair; write the CSV (and overlays) only when all succeeded. Returns the table."""
    import pandas as pd
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from datamodules.atomic import atomic_path
    from datamodules.clips import split_h5_spec
    from lightning_modules.asycmst_predict import load_asycmst, predict_pairs

    if (args.pairs is None) == (args.bus is None and args.ceus is None):
        raise DataError(None, "give either --pairs MANIFEST or --bus FILE... --ceus FILE...")
    if args.pairs is not None:
        if args.bus_mask is not None:
            raise DataError(None, "--bus-mask goes with --bus/--ceus; a manifest has its bus_mask column")
        cases = manifest_cases(args.pairs, args.cases)
    else:
        if args.cases is not None:
            raise DataError(None, "--cases picks ids of a --pairs manifest; with --bus/--ceus name the files")
        if args.bus is None or args.ceus is None:
            raise DataError(None, "--bus and --ceus go together (one CEUS clip per BUS clip)")
        cases = pair_cases(args.bus, args.ceus, args.bus_mask)
    for case in cases:  # a typo fails before the checkpoint is loaded
        for clip in (case.bus, case.ceus, case.bus_mask):
            if clip is not None and not split_h5_spec(clip)[0].exists():
                raise DataError(clip, "does not exist")
    if args.overlay is not None:
        check_overlay_dir(args.overlay)
    stage, settings = load_asycmst(args.ckpt, args.device)
    streams = tuple(stage.streams)
    bar = Progress(
        TextColumn("predict-pair"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not sys.stdout.isatty(),
    )
    rows = []
    overlay = atomic_path(args.overlay) if args.overlay is not None else contextlib.nullcontext()
    with atomic_path(args.out) as tmp_csv, overlay as tmp_dir, bar:
        if tmp_dir is not None:
            tmp_dir.mkdir(parents=True)
            (tmp_dir / MARKER).write_text("written by usnodule predict-pair\n")
        task = bar.add_task("predict-pair", total=len(cases))
        names: set[str] = set()
        for pred in predict_pairs(
            stage,
            settings,
            cases,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            attention=tmp_dir is not None,
        ):
            case, png = pred.case, ""
            if tmp_dir is not None:
                name = base = safe_name(case.case_id)
                while name in names:  # two ids that differ only in characters a file name cannot hold
                    name = f"{base}_{len(names)}"
                names.add(name)
                montage(pred, tmp_dir / f"{name}.png", streams, args.threshold)
                png = str(args.overlay / f"{name}.png")
            rows.append(
                {
                    "case_id": case.case_id,
                    "label": "" if case.label < 0 else case.label,
                    "bus": str(case.bus),
                    "ceus": str(case.ceus),
                    "bus_mask": "" if case.bus_mask is None else str(case.bus_mask),
                    "n_frames": pred.n_frames,
                    "frames": " ".join(str(int(i)) for i in pred.indices),
                    "roi": pred.roi,
                    "prob_malignant": pred.prob,
                    "pred": int(pred.prob >= args.threshold),
                    "overlay": png,
                }
            )
            bar.advance(task)
        table = pd.DataFrame(rows, columns=list(COLUMNS))
        table.to_csv(tmp_csv, index=False, float_format="%.6g")
    off = table[table["roi"].isin(["missing", "empty"])]
    if len(off):
        print(
            f"warning: {len(off)} of {len(table)} pair(s) predicted on whole frames, but the checkpoint was "
            f"trained on crops of {settings.roi:g}x the BUS nodule box (roi column; give --bus-mask or a "
            "bus_mask column for the trained input)",
            file=sys.stderr,
        )
    return table


def show(table, threshold: float) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"AsyCMST predictions (malignant if prob >= {threshold:g})")
    for col in ("case", "frames", "roi", "prob", "pred"):
        t.add_column(col, justify="left" if col in ("case", "roi") else "right", overflow="fold")
    for r in table.itertuples(index=False):
        verdict = "malignant" if r.pred else "benign"
        t.add_row(str(r.case_id), str(r.n_frames), r.roi, f"{r.prob_malignant:.3f}", verdict)
    Console().print(t)


# ---------------------------------------------------------------------------------------------- CLI
def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict-pair",
        help="AsyCMST malignancy probability of new BUS + CEUS pairs, with cross-modal attention overlays",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ckpt", type=Path, required=True, help="AsyCMST checkpoint (lightning fit --ckpt_out)")
    p.add_argument("--bus", type=Path, nargs="+", default=None, help="BUS clip(s)")
    p.add_argument("--ceus", type=Path, nargs="+", default=None, help="CEUS clip(s), in the order of --bus")
    p.add_argument(
        "--bus-mask",
        type=Path,
        nargs="+",
        default=None,
        help="BUS mask clip(s), in the order of --bus: the ROI crop of a checkpoint trained with data.roi",
    )
    p.add_argument("--pairs", type=Path, default=None, help="paired manifest CSV instead of --bus/--ceus")
    p.add_argument("--cases", nargs="+", default=None, help="with --pairs: only these case ids")
    p.add_argument(
        "--out",
        type=output_file,
        default=Path("pair_predictions.csv"),
        help="output CSV (default pair_predictions.csv)",
    )
    p.add_argument("--overlay", type=Path, default=None, help="folder for one attention PNG per pair")
    p.add_argument("--threshold", type=fraction, default=0.5, help="decision threshold on prob_malignant")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=positive_int, default=4, help="pairs per forward pass")
    p.add_argument("--num-workers", type=count, default=0, help="DataLoader workers reading the clips")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    table = predict_pair(args)
    show(table, args.threshold)
    print(f"wrote {args.out}" + (f" and {args.overlay}/" if args.overlay is not None else ""))
