"""ONNX graphs of the inference path: what ``usnodule export --onnx OUT`` writes.

One ``.onnx`` file per network, and ``chain.json`` beside them saying how they chain and how each input is
prepared (the data settings the checkpoints were trained with), so a server needs no Python code of ours:

==================  ===============================================  ============================================
file                inputs                                           outputs
==================  ===============================================  ============================================
``seg.onnx``        ``frames`` (N, 1, s, s) float, [0, 1]            ``mask_logits`` (N, 1, s, s)
``image_encoder``   ``image`` (N, 3, h, w) float, ROI 3-stacks,      ``embedding`` (N, 256), ``prob`` (N,)
                    normalised                                       (the ViT's per-stack probability)
``mask_cnn``        ``mask`` (N, 3, h', w') float, mask 3-stacks     ``embedding`` (N, 256), ``prob`` (N,)
``head``            ``image_emb``, ``seg_emb`` (B, S, 256) float,    ``prob`` (B,) malignant probability
                    ``valid`` (B, S) bool (False = padding)
``asycmst``         ``bus``, ``ceus`` (B, T, 3, H, W) float          ``prob`` (B,), ``logits`` (B, 2)
==================  ===============================================  ============================================

Axes N (frames or stacks), B (nodules or cases) and S (stacks per nodule) are dynamic; AsyCMST's T is fixed by
its learned positional embeddings (``num_frames``), and H, W of every network by its training size.  The
convolutional nets and AsyCMST go through PyTorch's TorchScript tracer (``dynamo=False``, seconds), the head
through ``torch.export`` (``dynamo=True``, needs ``onnxscript``): see :func:`export_graph`.  Mask thresholding, ROI boxes and 3-stack building stay outside the
graphs (they are data-dependent indexing, not tensor algebra); ``chain.json`` spells them out.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from datamodules.files import file_digest
from datamodules.parts import IMAGENET_MEAN, IMAGENET_STD

OPSET = 18  # the dynamo exporter's own opset; onnxruntime >= 1.14 runs it
FORMAT = "usnodule-onnx/1"
FILES = {
    "seg": "seg.onnx",
    "image_encoder": "image_encoder.onnx",
    "mask_cnn": "mask_cnn.onnx",
    "head": "head.onnx",
    "asycmst": "asycmst.onnx",
}


# ---------------------------------------------------------------------------------------------- graphs
class SegGraph(nn.Module):
    """MSU-Net: ``frames (N,1,s,s)`` in [0, 1] -> ``mask_logits (N,1,s,s)``."""

    def __init__(self, seg: nn.Module) -> None:
        super().__init__()
        self.net = seg.net

    def forward(self, frames: Tensor) -> Tensor:
        return self.net(frames)


class EncoderGraph(nn.Module):
    """ViT or mask CNN stage: a 3-stack batch -> ``(embedding (N,256), prob (N,))`` (timm's
    ``forward_features`` / ``forward_head``, as :class:`lightning_modules.export.EmbeddingExport` calls them)."""

    def __init__(self, stage: nn.Module) -> None:
        super().__init__()
        self.net = stage.net

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        emb = self.net.forward_features(x)
        return emb, self.net.forward_head(emb).float().softmax(-1)[:, 1]


class HeadGraph(nn.Module):
    """Attention head (any variant): ``(image_emb, seg_emb, valid)`` -> ``prob (B,)``."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, image_emb: Tensor, seg_emb: Tensor, valid: Tensor) -> Tensor:
        return self.head(image_emb, seg_emb, valid).float().softmax(-1)[:, 1]


class AsyCMSTGraph(nn.Module):
    """AsyCMST: ``(bus, ceus)`` -> ``(prob (B,), logits (B,2))``, routed to the net's upper / lower branch as
    the stage's ``streams`` say (paper: upper = CEUS, lower = BUS)."""

    def __init__(self, stage: nn.Module) -> None:
        super().__init__()
        self.net, self.streams = stage.net, tuple(stage.streams)

    def forward(self, bus: Tensor, ceus: Tensor) -> tuple[Tensor, Tensor]:
        clips = {"bus": bus, "ceus": ceus}
        upper, lower = (clips[s] for s in self.streams)
        logits = self.net.forward_head(self.net.forward_features(upper, lower))
        return logits.float().softmax(-1)[:, 1], logits


# ---------------------------------------------------------------------------------------------- export
def export_graph(
    graph: nn.Module,
    example: tuple[Tensor, ...],
    path: Path,
    inputs: dict[str, dict[int, str]],
    outputs: dict[str, dict[int, str]],
    opset: int = OPSET,
    *,
    dynamo: bool = False,
) -> None:
    """``graph`` on ``example`` to ONNX at ``path``; ``inputs``/``outputs``: name -> its dynamic axes.

    ``dynamo=False``: the TorchScript tracer (seconds; enough for the convolutional nets and AsyCMST, whose
    attention is plain SDPA).  ``dynamo=True``: ``torch.export`` (needs ``onnxscript``; tens of seconds), for
    the head: the tracer records the key length of ``nn.MultiheadAttention``'s cross-attention as a constant
    (its packed key/value projection is reshaped with Python ints), so a traced head only runs on the example's
    number of stacks.
    """
    graph = graph.eval()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # nn.MultiheadAttention's fused inference kernel (_native_multi_head_attention) has no ONNX form: trace the
    # plain path it computes the same attention with
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # the legacy exporter's deprecation notice, and the tracer's notes on Python-side shape checks (the
            # nets check shapes with Python ``if``s; the traced graph keeps the branch the example took)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", UserWarning)
            kwargs: dict[str, Any] = {"dynamic_axes": {**inputs, **outputs}, "do_constant_folding": True}
            if dynamo:
                dims: dict[str, Any] = {}
                shapes = tuple(
                    {i: dims.setdefault(name, torch.export.Dim(name)) for i, name in axes.items()}
                    for axes in inputs.values()
                )
                kwargs = {
                    "dynamic_shapes": shapes,
                    "verbose": False,
                    "optimize": True,
                    "external_data": False,
                }
            quiet = io.StringIO()  # the dynamo exporter's progress lines and onnxscript's optimiser notes
            with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                torch.onnx.export(
                    graph,
                    example,
                    str(path),
                    dynamo=dynamo,
                    opset_version=opset,
                    input_names=list(inputs),
                    output_names=list(outputs),
                    **kwargs,
                )
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _io(shape: tuple, names: dict[int, str]) -> list:
    return [names.get(i, int(n)) for i, n in enumerate(shape)]


def _stack_text(data: dict) -> str:
    """Which 3 frames of a clip one stack holds (``datamodules.stacks.stack_positions``), in words."""
    if data.get("stack_frames", "adjacent") == "spread":
        where = "3 frames a third of the sweep apart (of S = n // 3 stacks, stack s holds frames s, s+S, s+2S"
    else:
        where = "3 consecutive frames (non-overlapping stacks in frame order"
    return where + "; a trailing 1-2 frames dropped, a clip of < 3 frames repeats its last)"


def export_stact(paths: dict[str, Path], out: Path, opset: int = OPSET) -> dict[str, Any]:
    """Export the four STACT-Time stages of a fold (``paths``: seg, vit, maskcnn, head checkpoints) into
    ``out``; returns their ``chain.json`` entries."""
    from datamodules.embeddings import refuse_crossfitted_head
    from datamodules.stacks import NORMALIZE
    from lightning_modules.head_stage import HeadStage
    from lightning_modules.maskcnn_stage import MaskCNNStage
    from lightning_modules.seg_stage import SegStage
    from lightning_modules.vit_stage import ViTStage

    seg, seg_data = SegStage.from_checkpoint(paths["seg"])
    vit, vit_data = ViTStage.from_checkpoint(paths["vit"])
    maskcnn, mask_data = MaskCNNStage.from_checkpoint(paths["maskcnn"])
    head, head_data = HeadStage.from_checkpoint(paths["head"])
    refuse_crossfitted_head(paths["head"], head_data)
    seg_size = int(seg_data.get("size") or 256)
    img_size = vit.input_size(vit_data)
    mask_size = int(mask_data.get("img_size") or img_size)
    mean, std = NORMALIZE[vit_data.get("normalize", "imagenet")]
    n, b, s = {0: "n"}, {0: "batch"}, {0: "batch", 1: "stacks"}
    x_seg = torch.rand(2, 1, seg_size, seg_size)
    x_img = torch.rand(2, 3, img_size, img_size)
    x_mask = torch.rand(2, 3, mask_size, mask_size)
    dim = int(head.hparams.get("dim", 256))
    x_head = (
        torch.randn(2, 3, dim),
        torch.randn(2, 3, dim),
        torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool),
    )
    export_graph(SegGraph(seg), (x_seg,), out / FILES["seg"], {"frames": n}, {"mask_logits": n}, opset)
    export_graph(
        EncoderGraph(vit),
        (x_img,),
        out / FILES["image_encoder"],
        {"image": n},
        {"embedding": n, "prob": n},
        opset,
    )
    export_graph(
        EncoderGraph(maskcnn),
        (x_mask,),
        out / FILES["mask_cnn"],
        {"mask": n},
        {"embedding": n, "prob": n},
        opset,
    )
    export_graph(
        HeadGraph(head),
        x_head,
        out / FILES["head"],
        {"image_emb": s, "seg_emb": s, "valid": s},
        {"prob": b},
        opset,
        dynamo=True,
    )
    threshold = float(seg.hparams.get("threshold", 0.5))
    return {
        "seg": {
            "file": FILES["seg"],
            "checkpoint": str(paths["seg"].resolve()),
            "checkpoint_sha256": file_digest(paths["seg"]),
            "inputs": {"frames": _io(x_seg.shape, n)},
            "outputs": {"mask_logits": _io(x_seg.shape, n)},
            "preprocess": f"gray frame (H, W) uint8 -> resize to {seg_size}x{seg_size} (bilinear, antialiased) "
            "-> / 255",
            "postprocess": f"resize mask_logits to (H, W) (bilinear), sigmoid, > {threshold:g} -> mask",
            "size": seg_size,
            "threshold": threshold,
        },
        "image_encoder": {
            "file": FILES["image_encoder"],
            "checkpoint": str(paths["vit"].resolve()),
            "checkpoint_sha256": file_digest(paths["vit"]),
            "inputs": {"image": _io(x_img.shape, n)},
            "outputs": {"embedding": ["n", dim], "prob": ["n"]},
            "preprocess": _stack_text(vit_data) + " as channels, cropped to the union of the three masks' "
            f"boxes grown by {vit_data.get('buffer', 5)} px (fallback: the clip's union box, then the full "
            f"frame), resized to {img_size}x{img_size} (bilinear, antialiased), / 255, then (x - mean) / std",
            "size": img_size,
            "buffer": int(vit_data.get("buffer", 5)),
            "stack_frames": vit_data.get("stack_frames", "adjacent"),
            "mean": None if mean is None else list(mean),
            "std": None if std is None else list(std),
        },
        "mask_cnn": {
            "file": FILES["mask_cnn"],
            "checkpoint": str(paths["maskcnn"].resolve()),
            "checkpoint_sha256": file_digest(paths["maskcnn"]),
            "inputs": {"mask": _io(x_mask.shape, n)},
            "outputs": {"embedding": ["n", dim], "prob": ["n"]},
            "preprocess": "the masks {0, 1} of "
            + _stack_text(mask_data)
            + " as channels, "
            + ("cropped as the image, " if mask_data.get("mask_roi") else "full frame (not cropped), ")
            + f"resized to {mask_size}x{mask_size} (bilinear, antialiased)",
            "size": mask_size,
            "mask_roi": bool(mask_data.get("mask_roi", False)),
            "stack_frames": mask_data.get("stack_frames", "adjacent"),
        },
        "head": {
            "file": FILES["head"],
            "checkpoint": str(paths["head"].resolve()),
            "checkpoint_sha256": file_digest(paths["head"]),
            "variant": head.variant,
            "inputs": {
                "image_emb": ["batch", "stacks", dim],
                "seg_emb": ["batch", "stacks", dim],
                "valid": ["batch", "stacks"],
            },
            "outputs": {"prob": ["batch"]},
            "preprocess": "image_encoder and mask_cnn embeddings of a nodule's stacks in frame order; pad "
            "nodules of a batch to the longest with valid = False",
        },
    }


def export_asycmst(path: Path, out: Path, opset: int = OPSET) -> dict[str, Any]:
    """Export an AsyCMST checkpoint into ``out``; returns its ``chain.json`` entry."""
    from lightning_modules.asycmst import AsyCMST

    stage, data = AsyCMST.from_checkpoint(path)
    t, size = int(stage.net.num_frames), int(stage.net.img_size)
    clip = torch.rand(2, t, 3, size, size)
    b = {0: "batch"}
    export_graph(
        AsyCMSTGraph(stage),
        (clip, clip.flip(0)),
        out / FILES["asycmst"],
        {"bus": b, "ceus": b},
        {"prob": b, "logits": b},
        opset,
    )
    return {
        "asycmst": {
            "file": FILES["asycmst"],
            "checkpoint": str(Path(path).resolve()),
            "checkpoint_sha256": file_digest(path),
            "inputs": {"bus": ["batch", t, 3, size, size], "ceus": ["batch", t, 3, size, size]},
            "outputs": {"prob": ["batch"], "logits": ["batch", 2]},
            "streams": list(stage.streams),
            "preprocess": f"{t} frames sampled from each clip as in training, gray -> 3 channels, resized to "
            f"{size}x{size}, / 255, then (x - mean) / std with ImageNet mean {IMAGENET_MEAN} and std {IMAGENET_STD} "
            f"(data settings of the fit below; 'roi' crops around the BUS nodule box)",
            "data": {k: v for k, v in data.items() if isinstance(v, str | int | float | bool | list | None)},
        }
    }


def write_chain(out: Path, networks: dict[str, Any], opset: int = OPSET) -> Path:
    """``out/chain.json``: the files, their inputs/outputs and how STACT-Time's four chain."""
    chain = {
        "format": FORMAT,
        "opset": opset,
        "torch": torch.__version__,
        "networks": networks,
    }
    if "head" in networks:
        chain["stact_time"] = [
            "frames of a clip -> seg -> masks (postprocess)",
            "3-stacks of frames cropped around the masks -> image_encoder -> embedding per stack",
            "3-stacks of masks -> mask_cnn -> embedding per stack",
            "both embedding sequences of the clip (S stacks, frame order) -> head -> prob (malignant)",
            "image_encoder's prob averaged over stacks = the CineCNN-AvePool baseline (prob_avepool)",
        ]
    path = out / "chain.json"
    path.write_text(json.dumps(chain, indent=2) + "\n")
    return path


# ---------------------------------------------------------------------------------------------- check
def _inputs(name: str, entry: dict[str, Any], batch: int, stacks: int) -> dict[str, Tensor]:
    """Random inputs for network ``name`` of ``chain.json`` with ``batch`` rows and ``stacks`` stacks (sizes
    other than the export example's, so that a baked-in axis shows)."""
    g = torch.Generator().manual_seed(batch * 100 + stacks)
    out = {}
    for key, shape in entry["inputs"].items():
        dims = [{"n": batch, "batch": batch, "stacks": stacks}.get(d, d) for d in shape]
        if key == "valid":
            x = torch.ones(*dims, dtype=torch.bool)
            x[0, dims[1] // 2 + 1 :] = False  # padding in the first row
        elif key.endswith("_emb"):
            x = torch.randn(*dims, generator=g)
        else:
            x = torch.rand(*dims, generator=g)
        out[key] = x
    return out


@torch.no_grad()
def _reference(name: str, stage: nn.Module, x: dict[str, Tensor]) -> dict[str, Tensor]:
    """What the PyTorch stage computes for the network's outputs, by the stage's own methods."""
    if name == "seg":
        return {"mask_prob": torch.sigmoid(stage(x["frames"]))}
    if name in ("image_encoder", "mask_cnn"):
        (image,) = x.values()
        emb = stage.net.forward_features(image)
        return {"embedding": emb, "prob": stage.malignant_prob(stage.net.forward_head(emb))}
    if name == "head":
        return {"prob": stage.malignant_prob(stage(x["image_emb"], x["seg_emb"], x["valid"]))}
    return {"prob": stage.malignant_prob(stage({"bus": x["bus"], "ceus": x["ceus"]})["logits"])}


def check(
    folder: str | os.PathLike, sizes: tuple[tuple[int, int], ...] = ((1, 1), (3, 5))
) -> dict[str, float]:
    """Run every network of an export under onnxruntime and its checkpoint under PyTorch on the same random
    inputs (each ``(batch, stacks)`` of ``sizes``); returns the largest absolute difference per network and
    output (``seg``: on the mask probabilities, ``sigmoid(mask_logits)``)."""
    import onnxruntime as ort

    from lightning_modules.base import BaseStage

    folder = Path(folder)
    chain = json.loads((folder / "chain.json").read_text())
    diffs: dict[str, float] = {}
    for name, entry in chain["networks"].items():
        stage, _ = BaseStage.from_checkpoint(entry["checkpoint"])
        session = ort.InferenceSession(str(folder / entry["file"]), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        for batch, stacks in sizes:
            x = _inputs(name, entry, batch, stacks)
            got = dict(zip(names, session.run(None, {k: v.numpy() for k, v in x.items()}), strict=True))
            if "mask_logits" in got:
                got["mask_prob"] = torch.sigmoid(torch.from_numpy(got.pop("mask_logits"))).numpy()
            for key, ref in _reference(name, stage, x).items():
                d = float((torch.from_numpy(got[key]) - ref.float()).abs().max())
                diffs[f"{name}/{key}"] = max(d, diffs.get(f"{name}/{key}", 0.0))
    return diffs
