"""``usnodule export --onnx``: every exported graph under onnxruntime against its checkpoint under PyTorch.

Tiny random-init stages saved as checkpoints the way ``BaseStage.from_checkpoint`` reads them
(tests/test_base_stage.py); the graphs run on batch and sequence sizes other than the export example's, so an
axis baked into a graph would show.  One module-scoped export (the head's ``torch.export`` takes ~30 s here).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from datamodules.errors import DataError
from lightning_modules.asycmst import AsyCMST
from lightning_modules.head_stage import HeadStage
from lightning_modules.maskcnn_stage import MaskCNNStage
from lightning_modules.seg_stage import SegStage
from lightning_modules.vit_stage import ViTStage
from stages.cli import main as usnodule

TOL = 1e-4  # the bar on probabilities
ASYCMST = dict(dim=16, depth=1, heads=2, num_frames=4, img_size=64, backbone="test_resnet", decoder_width=16)


def save(model: torch.nn.Module, path: Path, data: dict) -> Path:
    cls = type(model)
    hparams = {**model.hparams, "_class_path": f"{cls.__module__}.{cls.__name__}"}
    torch.save(
        {"state_dict": model.state_dict(), "hyper_parameters": hparams, "datamodule_hyper_parameters": data},
        path,
    )
    return path


def perturb_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics, as after training (random init has mean 0, var 1)."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("onnx")
    fold = root / "runs" / "fold0"
    fold.mkdir(parents=True)
    save(perturb_bn(SegStage(base=4, depth=3)), fold / "seg.ckpt", {"size": 32})
    save(ViTStage(backbone="test_vit", img_size=32), fold / "vit.ckpt", {"img_size": 32, "normalize": "half"})
    save(perturb_bn(MaskCNNStage(channels=(4, 8))), fold / "maskcnn.ckpt", {"img_size": 32, "buffer": 5})
    save(HeadStage(), fold / "head_stact.ckpt", {})
    asy = save(perturb_bn(AsyCMST(**ASYCMST)), root / "asycmst.ckpt", {"num_frames": 4, "img_size": 64})
    out = root / "onnx"
    usnodule(["export", "--onnx", str(out), "--fold-dir", str(fold), "--asycmst", str(asy)])
    return {"fold": fold, "asycmst": asy, "out": out}


def session(exported, name: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(exported["out"] / f"{name}.onnx"), providers=["CPUExecutionProvider"])


def test_folder_and_chain_json(exported, capsys):
    out = exported["out"]
    assert sorted(p.name for p in out.iterdir()) == [
        "asycmst.onnx",
        "chain.json",
        "head.onnx",
        "image_encoder.onnx",
        "mask_cnn.onnx",
        "seg.onnx",
    ]
    chain = json.loads((out / "chain.json").read_text())
    nets = chain["networks"]
    assert nets["seg"]["inputs"] == {"frames": ["n", 1, 32, 32]} and nets["seg"]["threshold"] == 0.5
    assert nets["image_encoder"]["mean"] == [0.5, 0.5, 0.5] and nets["image_encoder"]["buffer"] == 5
    assert nets["head"]["inputs"]["valid"] == ["batch", "stacks"] and nets["head"]["variant"] == "stact"
    assert nets["asycmst"]["inputs"]["bus"] == ["batch", 4, 3, 64, 64]
    assert nets["asycmst"]["checkpoint"] == str(exported["asycmst"].resolve())
    assert len(nets["head"]["checkpoint_sha256"]) == 64 and chain["stact_time"]
    for f in out.glob("*.onnx"):
        onnx.checker.check_model(str(f))
        graph = onnx.load(str(f)).graph
        first = graph.input[0].type.tensor_type.shape.dim[0]
        assert first.dim_param and not first.dim_value, f"{f.name}: batch axis is not dynamic"


def test_convolutional_nets_match_pytorch(exported):
    fold = exported["fold"]
    seg, _ = SegStage.from_checkpoint(fold / "seg.ckpt")
    frames = torch.rand(5, 1, 32, 32)
    (logits,) = session(exported, "seg").run(None, {"frames": frames.numpy()})
    with torch.no_grad():
        ref = torch.sigmoid(seg(frames))
    assert np.abs(1 / (1 + np.exp(-logits)) - ref.numpy()).max() <= TOL
    for name, key, cls, ckpt in (
        ("image_encoder", "image", ViTStage, "vit.ckpt"),
        ("mask_cnn", "mask", MaskCNNStage, "maskcnn.ckpt"),
    ):
        stage, _ = cls.from_checkpoint(fold / ckpt)
        x = torch.rand(7, 3, 32, 32)
        emb, prob = session(exported, name).run(None, {key: x.numpy()})
        with torch.no_grad():
            ref_emb = stage.net.forward_features(x)
            ref_prob = stage.malignant_prob(stage.net.forward_head(ref_emb))
        assert emb.shape == (7, 256) and prob.shape == (7,)
        assert np.abs(prob - ref_prob.numpy()).max() <= TOL, name
        assert np.abs(emb - ref_emb.numpy()).max() <= 1e-3, name


@pytest.mark.parametrize(("batch", "stacks"), [(1, 1), (4, 9)])
def test_head_matches_pytorch_on_any_batch_and_sequence(exported, batch, stacks):
    head, _ = HeadStage.from_checkpoint(exported["fold"] / "head_stact.ckpt")
    image, seg = torch.randn(batch, stacks, 256), torch.randn(batch, stacks, 256)
    valid = torch.ones(batch, stacks, dtype=torch.bool)
    valid[0, stacks // 2 + 1 :] = False  # a padded nodule
    (prob,) = session(exported, "head").run(
        None, {"image_emb": image.numpy(), "seg_emb": seg.numpy(), "valid": valid.numpy()}
    )
    with torch.no_grad():
        ref = head.malignant_prob(head(image, seg, valid))
    assert prob.shape == (batch,) and np.abs(prob - ref.numpy()).max() <= TOL


def test_asycmst_matches_pytorch(exported):
    stage, _ = AsyCMST.from_checkpoint(exported["asycmst"])
    bus, ceus = torch.rand(3, 4, 3, 64, 64), torch.rand(3, 4, 3, 64, 64)
    prob, logits = session(exported, "asycmst").run(None, {"bus": bus.numpy(), "ceus": ceus.numpy()})
    with torch.no_grad():
        ref = stage.malignant_prob(stage({"bus": bus, "ceus": ceus})["logits"])
    assert prob.shape == (3,) and logits.shape == (3, 2)
    assert np.abs(prob - ref.numpy()).max() <= TOL


def test_bad_inputs_one_line(exported, tmp_path):
    from stages.export import add_parser  # noqa: F401  (the command is registered)

    with pytest.raises(SystemExit) as e:
        usnodule(["export", "--onnx", str(tmp_path / "o"), "--fold-dir", str(tmp_path)])
    assert e.value.code == 2
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    from argparse import Namespace

    from stages.export import export

    args = Namespace(
        onnx=busy,
        fold_dir=exported["fold"],
        seg=None,
        vit=None,
        maskcnn=None,
        head=None,
        head_variant="stact",
        asycmst=None,
        opset=18,
        check=False,
        tolerance=1e-4,
    )
    with pytest.raises(DataError, match="is not an earlier export"):
        export(args)
    assert (busy / "notes.txt").read_text() == "mine"
