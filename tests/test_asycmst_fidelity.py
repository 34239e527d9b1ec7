"""AsyCMST against the paper and the authors' model (issue 13, items 1-5): ``block: official``, pretrained
encoders (never downloaded here: timm's loader is monkeypatched), the auxiliary tasks under the stream swap,
model selection on val/auroc, and the global batch."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import timm.models._builder
import torch
import yaml

from datamodules.errors import DataError
from datamodules.paired_video import PairedVideoDataModule, device_batch
from lightning_modules import base
from lightning_modules.asycmst import AsyCMST, aux_branches
from lightning_modules.nets.asycmst import AsyCMSTNet
from lightning_modules.nets.asycmst_official import JointSelfAttention, OfficialFusion, OfficialLayer
from stages.fit import main
from tests.test_paired_video import write_paired_set

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(dim=16, depth=2, heads=2, num_frames=4, img_size=64, backbone="test_resnet", decoder_width=16)
PAPER_CONF = ROOT / "conf/asycmst.yaml"


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _clips(b: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, 3, 64, 64, generator=g), torch.randn(b, 4, 3, 64, 64, generator=g)


# -- item 2: block: official -------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["asymmetric", "symmetric", "none"])
def test_official_block_shapes(strategy):
    net = AsyCMSTNet(**TINY, block="official", strategy=strategy, mlp_ratio=2.0).eval()
    c, b = _clips()
    out = net(c, b, masks=True)
    assert out["logits"].shape == (2, 2) and out["sort_scores"].shape == (2, 4)
    assert out["mask_logits"].shape == (8, 1, 64, 64)
    assert net.forward_features(c, b).shape == (2, 16)
    maps = net.attention_maps(c, b)
    if strategy == "none":
        assert maps == {} and all(layer.cross is None for layer in net.fusion.layers_c)
    else:
        assert maps["c_to_b_frames"].shape == (2, 4, 4) and maps["b_to_c_positions"].shape == (2, 4, 4)
        torch.testing.assert_close(maps["b_to_c_frames"].sum(-1), torch.ones(2, 4))


def test_official_defaults_relu_2048_dropout_post_norm():
    fusion = AsyCMSTNet(**TINY, block="official").fusion
    layer = fusion.layers_b[0]
    assert layer.ffn[0].out_features == 2048 and isinstance(layer.ffn[1], torch.nn.ReLU)
    assert layer.ffn[2].p == 0.1 and layer.self_attn.dropout == 0.1
    assert fusion.pos.shape == (1, 4, 4, 16)  # one table shared by both streams
    # explicit values override the block's own
    layer = AsyCMSTNet(**TINY, block="official", mlp_ratio=3.0, dropout=0.0).fusion.layers_b[0]
    assert layer.ffn[0].out_features == 48 and layer.ffn[2].p == 0.0
    # post-norm: every layer's output is LayerNorm'd (unit weight, zero bias at init)
    x = torch.randn(2, 4, 4, 16) * 5 + 3
    y = OfficialLayer(dim=16, heads=2, pattern="temporal", hidden=32, dropout=0.0)(
        x, torch.randn(2, 4, 4, 16)
    )
    torch.testing.assert_close(y.mean(-1), torch.zeros(2, 4, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(-1, unbiased=False), torch.ones(2, 4, 4), atol=1e-3, rtol=0)


def test_joint_self_attention_sees_every_token():
    attn = JointSelfAttention(dim=8, heads=2).eval()
    x = torch.randn(1, 3, 4, 8, requires_grad=True)
    (g,) = torch.autograd.grad(attn(x)[0, 0, 0].sum(), x)
    assert (g.abs().sum(-1) > 0).all()  # token (t=0, n=0) depends on all T x N tokens, not a row or a column


def test_official_update_order_lower_branch_first():
    """In each stage the upper branch's cross-attention reads the lower branch's updated tokens."""
    fusion = OfficialFusion(dim=16, depth=1, heads=2, num_frames=4, n_tokens=4, hidden=32, dropout=0.0).eval()
    seen = {}
    fusion.layers_b[0].register_forward_hook(lambda m, args, out: seen.update(b_out=out, b_other=args[1]))
    fusion.layers_c[0].register_forward_hook(lambda m, args, out: seen.update(c_other=args[1]))
    f_c, f_b = torch.randn(2, 4, 4, 16), torch.randn(2, 4, 4, 16)
    fusion(f_c, f_b)
    assert torch.equal(seen["c_other"], seen["b_out"])
    assert torch.equal(seen["b_other"], f_c + fusion.pos)


def test_block_switch_changes_the_model():
    torch.manual_seed(0)
    ours = AsyCMSTNet(**TINY)
    torch.manual_seed(0)
    official = AsyCMSTNet(**TINY, block="official")
    assert any(k.startswith("stsa_c.") for k in ours.state_dict())
    assert not any(k.startswith("stsa_c.") for k in official.state_dict())
    assert any(k.startswith("fusion.layers_b.0.self_attn.") for k in official.state_dict())
    assert n_params(ours) != n_params(official)
    c, b = _clips()
    assert not torch.allclose(ours.eval()(c, b)["logits"], official.eval()(c, b)["logits"])
    stage = AsyCMST(**TINY, block="official")
    assert stage.net.block == "official" and stage.hparams["block"] == "official"
    with pytest.raises(ValueError, match="block must be one of"):
        AsyCMSTNet(**TINY, block="vivit")


def _official_layer_params(d: int, ffn: int, cross: bool) -> int:
    attn = 4 * d * d + 4 * d  # Q, K, V and output projections with biases
    return attn + (attn + 2 * d if cross else 0) + (d * ffn + ffn + ffn * d + d) + 4 * d


def test_parameter_counts_at_paper_size():
    """Paper size (D 384, L 6, M 6, T 16, 224 px), on the meta device: no memory, no weights."""
    with torch.device("meta"):
        ours = AsyCMSTNet()
        official = AsyCMSTNet(block="official")
        authors = AsyCMSTNet(block="official", share_encoders=True, fss=False, ns=False)  # their public model
    assert round(n_params(ours) / 1e6, 1) == 73.4
    encoders, heads = n_params(official.encoder_c) + n_params(official.encoder_b), 384 * 2 + 2
    aux = n_params(official.sorter) + n_params(official.decoder)
    transformer = 16 * 49 * 384 + 2 * 6 * _official_layer_params(384, 2048, cross=True)
    assert n_params(official) == encoders + aux + transformer + heads
    assert n_params(authors) == n_params(authors.encoder_c) + transformer + heads
    assert round(n_params(authors) / 1e6, 1) == 44.8  # the authors' ~44.8 M
    assert round(n_params(official) / 1e6, 1) == 56.6


# -- item 1: pretrained encoders -----------------------------------------------------------------------------------
def test_paper_config_starts_from_torchvision_imagenet_weights():
    model = yaml.safe_load(PAPER_CONF.read_text())["model"]["init_args"]
    assert model["pretrained"] is True and model["backbone"] == "resnet18.tv_in1k"
    assert "checkpoint_path" in model and model["checkpoint_path"] is None


def test_pretrained_uses_timm_loader_never_downloads(monkeypatch):
    calls = []

    def fake_load(model, pretrained_cfg=None, **kwargs):
        calls.append(pretrained_cfg)
        for p in model.parameters():
            torch.nn.init.constant_(p, 0.5)

    monkeypatch.setattr(timm.models._builder, "load_pretrained", fake_load)
    stage = AsyCMST(**{**TINY, "backbone": "resnet18.tv_in1k"}, pretrained=True)
    assert len(calls) == 2 and all(cfg["tag"] == "tv_in1k" for cfg in calls)  # both encoders
    assert all(bool((p == 0.5).all()) for p in stage.net.encoder_b.body.parameters())


def test_pretrained_without_network_is_one_line(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nsecond line")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", offline)
    with pytest.raises(DataError) as err:
        AsyCMST(**TINY, pretrained=True)
    message = str(err.value)
    assert "\n" not in message and "checkpoint_path" in message and "could not fetch" in message


def test_checkpoint_path_loads_local_weights_and_reload_skips_it(tmp_path, monkeypatch):
    src = timm.create_model("test_resnet", pretrained=False)  # a full model with its ImageNet classifier
    path = tmp_path / "weights.pth"
    torch.save(src.state_dict(), path)
    stage = AsyCMST(**TINY, checkpoint_path=str(path))
    key = "conv1.0.weight"
    for encoder in (stage.net.encoder_c, stage.net.encoder_b):
        torch.testing.assert_close(dict(encoder.body.named_parameters())[key], src.state_dict()[key])
    with pytest.raises(DataError, match="missing.pth: encoder checkpoint not found"):
        AsyCMST(**TINY, checkpoint_path=str(tmp_path / "missing.pth"))
    # a trained checkpoint reloads without fetching its starting point again
    ckpt = tmp_path / "asycmst.ckpt"
    hparams = {**dict(stage.hparams), "pretrained": True, "checkpoint_path": str(tmp_path / "gone.pth")}
    torch.save({"hyper_parameters": hparams, "state_dict": stage.state_dict()}, ckpt)
    monkeypatch.setattr(timm.models._builder, "load_pretrained", lambda *a, **k: pytest.fail("fetched"))
    model, _ = AsyCMST.from_checkpoint(ckpt)
    torch.testing.assert_close(model.net.encoder_b.proj.weight, stage.net.encoder_b.proj.weight)


# -- item 3: the stream swap keeps the auxiliary tasks on their modality ----------------------------------------
def test_aux_branches():
    assert aux_branches(("ceus", "bus")) == {"fss_branch": "c", "ns_branch": "b"}
    assert aux_branches(("bus", "ceus")) == {"fss_branch": "b", "ns_branch": "c"}
    assert aux_branches(("bus", "ceus"), "branch") == {"fss_branch": "c", "ns_branch": "b"}
    assert aux_branches(("bus", "bus")) == {"fss_branch": "c", "ns_branch": "b"}
    with pytest.raises(ValueError, match="aux_tasks"):
        AsyCMST(**TINY, aux_tasks="upper")


@pytest.mark.parametrize("aux_tasks", ["modality", "branch"])
def test_swap_aux_heads_read_their_modality(aux_tasks):
    """With ``streams: [bus, ceus]`` the sort scores depend on the CEUS clip only and the masks on the BUS clip
    only (``modality``); ``branch`` keeps the old wiring (FSS on the upper branch, which then gets BUS)."""
    torch.manual_seed(0)
    model = AsyCMST(**TINY, streams=("bus", "ceus"), aux_tasks=aux_tasks).eval()
    bus, ceus = _clips()
    base = {"bus": bus, "ceus": ceus}
    frames = torch.ones(2, 4, dtype=torch.bool)

    def run(batch):
        with torch.no_grad():
            return model(batch, mask_frames=frames)

    out = run(base)
    new_bus, new_ceus = run({**base, "bus": bus + 1.0}), run({**base, "ceus": ceus + 1.0})
    sorts_ceus = not torch.allclose(out["sort_scores"], new_ceus["sort_scores"])
    sorts_bus = not torch.allclose(out["sort_scores"], new_bus["sort_scores"])
    masks_bus = not torch.allclose(out["mask_logits"], new_bus["mask_logits"])
    masks_ceus = not torch.allclose(out["mask_logits"], new_ceus["mask_logits"])
    if aux_tasks == "modality":
        assert sorts_ceus and not sorts_bus and masks_bus and not masks_ceus
    else:
        assert sorts_bus and not sorts_ceus and masks_ceus and not masks_bus
    # the attention directions did swap: the upper branch (spatial C->B queries) now receives BUS
    assert model.streams == ("bus", "ceus") and model.net.strategy == "asymmetric"


# -- item 5: the global batch ----------------------------------------------------------------------------------------
def test_device_batch_from_global_batch():
    assert device_batch(32) == 32
    assert device_batch(32, devices=4) == 8
    assert device_batch(32, devices=4, num_nodes=2) == 4
    assert device_batch(32, devices=2, accumulate=2) == 8
    with pytest.raises(DataError, match="does not split evenly over 3 device"):
        device_batch(32, devices=3)
    with pytest.raises(DataError, match="split evenly"):
        device_batch(32, devices=8, num_nodes=8)


class _FakeTrainer:
    def __init__(self, devices: int, nodes: int, accumulate: int = 1):
        self.num_devices, self.num_nodes, self.accumulate_grad_batches = devices, nodes, accumulate


def test_datamodule_derives_per_device_batch(tmp_path, caplog):
    manifest, splits = write_paired_set(tmp_path, n=8, frames=4)
    kw = dict(splits=splits, fold=0, frames=4, size=64, augment=False)
    dm = PairedVideoDataModule(manifest, global_batch_size=8, batch_size=32, **kw)
    dm.trainer = _FakeTrainer(devices=4, nodes=1)
    with caplog.at_level("INFO"):
        dm.setup("fit")
    assert dm.device_batch_size == 2 and dm.train_dataloader().batch_size == 2
    assert "Global batch 8 clips per optimiser step = 2 per device x 4 device(s)" in caplog.text
    plain = PairedVideoDataModule(manifest, batch_size=3, **kw)
    plain.trainer = _FakeTrainer(devices=2, nodes=1)
    plain.setup("fit")
    assert plain.device_batch_size == 3 and plain.val_dataloader().batch_size == 3
    assert yaml.safe_load(PAPER_CONF.read_text())["data"]["init_args"]["global_batch_size"] == 32


# -- item 4: model selection on val/auroc ----------------------------------------------------------------------------
def test_paper_config_selects_on_val_auroc(tmp_path, monkeypatch):
    """A tiny fit from conf/asycmst.yaml: checkpoint and early stopping monitor val/auroc (max), and the copied
    best checkpoint is the epoch with the highest val/auroc, not the one with the lowest val/loss.  The AUROC of
    the three validation epochs is scripted (0.5, 0.9, 0.7) so that the two criteria disagree."""
    real, scripted = base.binary_metrics, iter([0.5, 0.9, 0.7])

    def binary_metrics(prob, label, threshold=0.5):
        return {**real(prob, label, threshold), "auroc": torch.tensor(next(scripted))}

    monkeypatch.setattr(base, "binary_metrics", binary_metrics)
    callbacks = yaml.safe_load(PAPER_CONF.read_text())["trainer"]["callbacks"]
    monitors = {cb["class_path"].rsplit(".", 1)[1]: cb["init_args"] for cb in callbacks}
    for name in ("ModelCheckpoint", "EarlyStopping"):
        assert monitors[name]["monitor"] == "val/auroc" and monitors[name]["mode"] == "max"

    manifest, splits = write_paired_set(tmp_path / "data", n=12, frames=4)
    out = tmp_path / "best.ckpt"
    main(
        [
            "fit", "-c", str(PAPER_CONF),
            f"--data.init_args.manifest={manifest}", f"--data.init_args.splits={splits}",
            "--data.init_args.frames=4", "--data.init_args.size=64", "--data.init_args.num_workers=0",
            "--data.init_args.global_batch_size=4", "--data.init_args.augment=false",
            *[f"--model.init_args.{k}={v}" for k, v in {**TINY, "depth": 1}.items()],
            "--model.init_args.pretrained=false",
            "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.precision=32",
            "--trainer.max_epochs=3", "--trainer.limit_train_batches=1", "--trainer.num_sanity_val_steps=0",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}",
            "--optimizer.lr=0.01", f"--ckpt_out={out}",
        ]
    )  # fmt: skip
    rows = list(csv.DictReader(open(next(tmp_path.glob("lightning_logs/*/metrics.csv")), newline="")))
    auroc = {int(r["epoch"]): float(r["val/auroc"]) for r in rows if r.get("val/auroc")}
    loss = {int(r["epoch"]): float(r["val/loss"]) for r in rows if r.get("val/loss")}
    assert auroc == pytest.approx({0: 0.5, 1: 0.9, 2: 0.7})
    assert min(loss, key=loss.get) != 1  # selecting on val/loss would have kept another epoch
    ckpt = torch.load(out, map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 1
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert state["monitor"] == "val/auroc"
    assert float(state["best_model_score"]) == pytest.approx(0.9)
