"""``usnodule export --onnx OUT``: a trained fold's inference path as ONNX graphs, for serving without PyTorch.

STACT-Time (``--fold-dir runs/<exp>/fold<k>``, or each checkpoint by name): four graphs, seg.onnx (MSU-Net),
image_encoder.onnx (ViT), mask_cnn.onnx (mask CNN), head.onnx (attention head, --head-variant).  AsyCMST
(``--asycmst runs/<exp>/asycmst/fold<k>/asycmst.ckpt``, or a --fold-dir holding asycmst.ckpt): asycmst.onnx.
One run may export both.

OUT is a folder: one .onnx per network and chain.json, which names each file's inputs and outputs (with the
dynamic axes: batch, and the number of stacks for the head), the checkpoint and its SHA-256, the preprocessing
each input needs (sizes, ROI buffer, normalisation, mask threshold, read from the checkpoints) and how the
STACT-Time graphs chain: frames -> seg -> masks -> 3-stacks -> image_encoder + mask_cnn -> head -> prob.
Thresholding the masks, ROI boxes and stack building are data-dependent indexing and stay outside the graphs
(`usnodule predict` is the reference implementation).

After writing, every graph is run under onnxruntime next to its checkpoint under PyTorch on random inputs of
two other batch / sequence sizes, and the largest differences are printed (--no-check skips this; the export
fails when a probability differs by more than --tolerance).  OUT appears only when complete; an existing OUT
is replaced only when it is an earlier export (holds chain.json).  Checkpoints of another fold than the
``fold<k>`` folder they are in, or of two folds, are refused (:func:`datamodules.provenance.check_fold_checkpoints`).
Needs the `onnx` extra: pip install 'usnodule[onnx]' (onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from datamodules.errors import DataError
from datamodules.files import FOLD_CHECKPOINTS, resolve_checkpoints
from datamodules.provenance import check_fold_checkpoints
from stages.options import add_checkpoint_options


def stact_checkpoints(args: argparse.Namespace) -> dict[str, Path] | None:
    """The four STACT-Time checkpoints (explicit paths win over --fold-dir), or None when none is asked for."""
    given = {k: getattr(args, k) for k in ("seg", "vit", "maskcnn", "head")}
    fold = args.fold_dir
    if all(v is None for v in given.values()) and (
        fold is None or not (fold / FOLD_CHECKPOINTS["seg"]).exists()
    ):
        return None
    paths = resolve_checkpoints(fold_dir=fold, head_variant=args.head_variant, **given)
    check_fold_checkpoints(paths, fold)  # one fold's four stages, fitted on each other's outputs
    return paths


def export(args: argparse.Namespace) -> dict[str, float]:
    from datamodules.atomic import atomic_path
    from lightning_modules import onnx_export

    stact = stact_checkpoints(args)
    # onnxscript: torch.export's ONNX translator, used for the head only (onnx_export.export_graph)
    for module in ("onnx", "onnxscript") if stact is not None else ("onnx",):
        if importlib.util.find_spec(module) is None:
            raise DataError(None, f"ONNX export needs {module}: pip install 'usnodule[onnx]'")
    asycmst = args.asycmst
    if asycmst is None and args.fold_dir is not None and (args.fold_dir / "asycmst.ckpt").is_file():
        asycmst = args.fold_dir / "asycmst.ckpt"
    if stact is None and asycmst is None:
        where = args.fold_dir or "the options"
        raise DataError(
            where, "no checkpoint to export (seg/vit/maskcnn/head_<variant>.ckpt or asycmst.ckpt)"
        )
    if asycmst is not None and not asycmst.is_file():
        raise DataError(asycmst, "checkpoint not found (AsyCMST)")
    out = args.onnx
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "chain.json").is_file())):
        raise DataError(out, "exists and is not an earlier export (no chain.json): choose another --onnx")
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        networks = {}
        if stact is not None:
            networks.update(onnx_export.export_stact(stact, tmp, args.opset))
        if asycmst is not None:
            networks.update(onnx_export.export_asycmst(asycmst, tmp, args.opset))
        onnx_export.write_chain(tmp, networks, args.opset)
        diffs = {}
        if args.check:
            if importlib.util.find_spec("onnxruntime") is None:
                raise DataError(
                    None, "the check needs onnxruntime: pip install 'usnodule[onnx]' (or --no-check)"
                )
            diffs = onnx_export.check(tmp)
            worst = {k: v for k, v in diffs.items() if k.endswith("prob") and v > args.tolerance}
            if worst:
                raise DataError(
                    out, f"onnxruntime differs from PyTorch by more than {args.tolerance:g}: {worst}"
                )
    return diffs


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a trained fold (STACT-Time, AsyCMST) to ONNX for serving",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--onnx", type=Path, required=True, help="output folder (*.onnx + chain.json)")
    add_checkpoint_options(
        p, "runs/<exp>/fold<k> (seg, vit, maskcnn, head_<variant>.ckpt) or runs/<exp>/asycmst/fold<k>"
    )
    p.add_argument("--asycmst", type=Path, default=None, help="AsyCMST checkpoint")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument(
        "--no-check", dest="check", action="store_false", help="skip the onnxruntime vs PyTorch check"
    )
    p.add_argument(
        "--tolerance", type=float, default=1e-4, help="largest probability difference the check accepts"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    diffs = export(args)
    for key, value in diffs.items():
        print(f"  {key}: max |onnxruntime - PyTorch| = {value:.2g}")
    files = sorted(p.name for p in args.onnx.iterdir())
    print(f"wrote {args.onnx}: {', '.join(files)}")
    print(f"RESULT max_prob_diff={max((v for k, v in diffs.items() if k.endswith('prob')), default=0):.2g}")
