"""CSASN: subtype items, subtype-stratified folds, each module's shapes and gradients, the channel-then-spatial
order, the ablation switches, the dynamic class-weight rule, multi-class metrics against scikit-learn, one tiny
fit with its prediction file and both reports."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from sklearn import metrics as skm

from datamodules.errors import DataError
from datamodules.still_data import StillDataModule, StillDataset
from datamodules.stills import read_manifest
from lightning_modules.csasn_stage import CSASNStage, multiclass_metrics
from lightning_modules.nets.csasn import (
    ChannelAttention,
    ChannelSpatialAttention,
    CSASNNet,
    ResidualMultiscaleClassifier,
    SpatialAttention,
)
from lightning_modules.nets.csasn_losses import (
    SHAPE_TARGETS,
    DynamicClassWeights,
    frequency_weights,
    mask_shape_targets,
    recall_target,
)
from tests.test_stills import box, save, texture, write_manifest_csv

ROOT = Path(__file__).resolve().parents[1]
SUBTYPES = ["benign", "PTC", "FTC", "MTC"]
COLUMNS = ("image", "mask", "label", "patient_id", "subtype")
TINY = dict(
    cnn_backbone="test_efficientnet",
    vit_backbone="test_vit",
    img_size=32,
    fusion_dim=8,
    hidden_dim=16,
    reduction=2,
    spatial_kernel=3,
    depth=1,
    dropout=0.0,
)


def subtype_set(root: Path, counts=(9, 3, 3, 3), **override) -> Path:
    """One image per patient, ``counts`` images of benign / PTC / FTC / MTC (label from the subtype);
    ``override``: ``{row index: {column: value}}`` as keyword ``rows``."""
    entries, n = [], 0
    for s, c in zip(SUBTYPES, counts, strict=True):
        for _ in range(c):
            name = f"c{n:02d}"
            save(root / "img" / f"{name}.png", texture(n))
            save(root / "msk" / f"{name}.png", box(4, 4, 16, 20))
            entries.append({"image": f"img/{name}.png", "mask": f"msk/{name}.png", "label": int(s != "benign"),
                            "patient_id": f"P{n}", "subtype": s})  # fmt: skip
            n += 1
    for i, change in override.get("rows", {}).items():
        entries[i].update(change)
    return write_manifest_csv(root / "manifest.csv", entries, COLUMNS)


@pytest.fixture(scope="module")
def stills(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny subtype set and its 3 folds stratified by subtype (``usnodule split --stratify subtype``)."""
    from stages.cli import main

    root = tmp_path_factory.mktemp("stills")
    manifest = subtype_set(root)
    main(["split", str(manifest), "-k", "3", "--stratify", "subtype", "--out", str(root / "splits.json")])
    return manifest, root / "splits.json"


# ---------------------------------------------------------------------------------------------- data


def test_items_carry_the_subtype_index_of_the_fixed_list(stills):
    manifest, splits = stills
    cases = read_manifest(manifest)
    ds = StillDataset(cases, img_size=16, subtypes=SUBTYPES)
    assert [int(ds[i]["subtype"]) for i in range(len(ds))] == [SUBTYPES.index(c.subtype) for c in cases]
    assert "subtype" not in StillDataset(cases, img_size=16)[0]  # binary models: no key
    # the list fixes the indices: another order gives other indices, the same for every fold
    other = ["MTC", "FTC", "PTC", "benign"]
    assert int(StillDataset(cases, img_size=16, subtypes=other)[0]["subtype"]) == 3
    dm = StillDataModule(manifest, splits=splits, fold=1, img_size=16, subtypes=SUBTYPES, batch_size=4)
    dm.setup("fit")
    batch = next(iter(dm.test_dataloader()))
    assert batch["subtype"].dtype == torch.long and set(batch) >= {"image", "label", "subtype", "index"}


def test_split_stratified_by_subtype_puts_each_rare_subtype_in_every_test_fold(stills):
    manifest, splits = stills
    doc = json.loads(splits.read_text())
    assert doc["stratify"] == "subtype"
    subtype = {c.case_id: c.subtype for c in read_manifest(manifest)}
    for fold in doc["folds"]:
        assert sorted(subtype[i] for i in fold["test"] if subtype[i] != "benign") == ["FTC", "MTC", "PTC"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"subtype": "ATC"}, "has subtype 'ATC'; expected one of"),
        ({"subtype": ""}, "has no subtype"),
        ({"label": "1"}, "subtype 'benign' is benign but its label is 1"),
    ],
)
def test_bad_subtypes_are_one_line_errors_naming_the_manifest(tmp_path, change, message):
    manifest = subtype_set(tmp_path, counts=(2, 1, 1, 1), rows={0: change})
    dm = StillDataModule(manifest, fold=None, splits=None, img_size=16, subtypes=SUBTYPES)
    with pytest.raises(DataError, match=message) as e:
        dm.setup("fit")
    assert str(manifest) in str(e.value) and "\n" not in str(e.value)
    malignant_as_benign = subtype_set(tmp_path / "b", counts=(2, 1, 1, 1), rows={3: {"label": "0"}})
    with pytest.raises(DataError, match="subtype 'FTC' is malignant but its label is 0"):
        StillDataModule(malignant_as_benign, splits=None, fold=None, subtypes=SUBTYPES).setup("fit")


# ---------------------------------------------------------------------------------------------- modules


def test_each_module_shapes_and_gradients():
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    assert ChannelAttention(8, 2)(x).shape == (2, 8, 1, 1)
    assert SpatialAttention(3)(x).shape == (2, 1, 4, 4)
    refine = ChannelSpatialAttention(8, 2, 3)
    y = refine(x)
    assert y.shape == x.shape
    head = ResidualMultiscaleClassifier(8, 16, scales=(1, 2, 4), depth=2)
    z = head(y)
    assert z.shape == (2, 16)
    z.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for m in (refine, head):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())

    net = CSASNNet(**TINY, num_subtypes=4)
    img = torch.randn(3, 3, 32, 32)
    maps = net.forward_branches(img)
    assert {k: tuple(v.shape) for k, v in maps.items()} == {"cnn": (3, 8, 2, 2), "vit": (3, 8, 2, 2)}
    assert net.forward_fusion(img).shape == (3, 8, 2, 2)
    assert net.forward_features(img).shape == (3, 16)
    out = net(img)
    assert out["subtype"].shape == (3, 4) and out["malignant"].shape == (3, 2)
    (out["subtype"].sum() + out["malignant"].sum()).backward()
    for name in ("cnn", "vit", "cnn_proj", "vit_proj", "fuse", "refine", "classifier", "subtype_head"):
        grads = [p.grad for p in getattr(net, name).parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), name
        assert sum(g.abs().sum() for g in grads) > 0, name


def test_refinement_is_channel_first_then_spatial_on_the_channel_refined_map():
    refine = ChannelSpatialAttention(8, 2, 3)
    order, seen = [], {}

    def hook(name):
        def fn(module, args, output):
            order.append(name)
            seen[name] = (args[0], output)

        return fn

    refine.channel.register_forward_hook(hook("channel"))
    refine.spatial.register_forward_hook(hook("spatial"))
    x = torch.randn(2, 8, 5, 5)
    y = refine(x)
    assert order == ["channel", "spatial"]
    mc = seen["channel"][1]
    torch.testing.assert_close(seen["channel"][0], x)
    torch.testing.assert_close(seen["spatial"][0], mc * x)  # the spatial map reads F' = M_c(F) * F
    torch.testing.assert_close(y, seen["spatial"][1] * mc * x)
    parallel = refine.spatial(x) * mc * x  # spatial on F instead: another result, so the order matters
    assert not torch.allclose(y, parallel)


def _outputs(net: CSASNNet, img: torch.Tensor) -> dict[str, torch.Tensor]:
    return net.eval()(img)


def test_ablation_switches_change_what_is_built_and_computed():
    torch.manual_seed(0)
    full = CSASNNet(**TINY).eval()
    names = {n.split(".")[0] for n, _ in full.named_parameters()}
    assert {"cnn", "vit", "cnn_proj", "vit_proj", "refine"} <= names
    img = torch.randn(2, 3, 32, 32)
    ref = _outputs(full, img)
    expect_missing = {
        "use_cnn": {"cnn", "cnn_proj"},
        "use_vit": {"vit", "vit_proj"},
        "use_refinement": {"refine"},
    }
    for switch, missing in expect_missing.items():
        net = CSASNNet(**TINY, **{switch: False})
        got = {n.split(".")[0] for n, _ in net.named_parameters()}
        assert got == names - missing, switch
        # same weights wherever the shapes agree: the outputs differ only through the switch
        state = {k: v for k, v in full.state_dict().items() if k in net.state_dict()}
        state = {k: v for k, v in state.items() if v.shape == net.state_dict()[k].shape}
        net.load_state_dict(state, strict=False)
        out = _outputs(net, img)
        assert not torch.allclose(out["subtype"], ref["subtype"]), switch
    fuse_in = {s: CSASNNet(**TINY, **{s: False}).fuse[0].in_channels for s in ("use_cnn", "use_vit")}
    assert fuse_in == {"use_cnn": 8, "use_vit": 8} and full.fuse[0].in_channels == 16
    # without refinement the classifier reads the fused map itself
    bare = CSASNNet(**TINY, use_refinement=False).eval()
    bare.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("refine.")})
    torch.testing.assert_close(bare.forward_features(img), full.classifier(full.forward_fusion(img)))
    with pytest.raises(ValueError, match="at least one branch"):
        CSASNNet(**TINY, use_cnn=False, use_vit=False)


# ---------------------------------------------------------------------------------------------- loss


def test_dynamic_weights_follow_their_formula_and_move_to_the_worst_class():
    w = DynamicClassWeights(4, "dynamic", momentum=0.5, eps=0.1)
    torch.testing.assert_close(w.weight, torch.ones(4))
    # rows = true class: recalls 0.9, 0.5, 0.0 (FTC never found), 1.0
    cm = torch.tensor([[9, 1, 0, 0], [4, 4, 0, 0], [3, 0, 0, 0], [0, 0, 0, 2]])
    recall = torch.tensor([0.9, 0.5, 0.0, 1.0], dtype=torch.float64)
    t = 1 / (recall + 0.1)
    t = t * 4 / t.sum()
    torch.testing.assert_close(recall_target(cm.diagonal(), cm.sum(1), w.weight), t)
    new = w.step(cm)
    torch.testing.assert_close(new.double(), 0.5 * torch.ones(4, dtype=torch.float64) + 0.5 * t)
    assert int(new.argmax()) == 2 and int(new.argmin()) == 3  # the worst class weighs most, the best least
    assert float(new.mean()) == pytest.approx(1.0)
    # another epoch where MTC (now) is never found: its weight rises, FTC's falls
    before = new.clone()
    after = w.step(torch.tensor([[9, 1, 0, 0], [4, 4, 0, 0], [0, 0, 3, 0], [0, 0, 2, 0]]))
    assert after[3] > before[3] and after[2] < before[2]
    # a class absent from the epoch keeps its target = its weight
    absent = torch.tensor([[5, 0, 0, 0], [0, 5, 0, 0], [0, 0, 5, 0], [0, 0, 0, 0]])
    t = recall_target(absent.diagonal(), absent.sum(1), after)
    raw = torch.tensor([1 / 1.1, 1 / 1.1, 1 / 1.1, float(after[3])], dtype=torch.float64)
    torch.testing.assert_close(t, raw * 4 / raw.sum())
    # the weighted loss is F.cross_entropy with these weights
    logits, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 2, 2])
    torch.testing.assert_close(w(logits, y), F.cross_entropy(logits, y, weight=w.weight))


def test_static_modes_do_not_move():
    none = DynamicClassWeights(3, "none")
    assert torch.equal(none.step(torch.tensor([[1, 0, 0], [1, 0, 0], [1, 0, 0]])), torch.ones(3))
    freq = DynamicClassWeights(3, "frequency")
    freq.set_frequency([6, 3, 1])
    expect = torch.tensor([1 / 6, 1 / 3, 1.0])
    torch.testing.assert_close(freq.weight, expect * 3 / expect.sum())
    torch.testing.assert_close(frequency_weights([6, 3, 1]).float(), freq.weight)
    assert torch.equal(freq.step(torch.eye(3, dtype=torch.long)), freq.weight)
    with pytest.raises(ValueError, match="class weighting"):
        DynamicClassWeights(3, "focal")


def test_stage_loss_is_the_weighted_sum_and_no_dynamic_is_plain_ce():
    stage = CSASNStage(**TINY, subtype_weight=0.7, malignant_weight=0.3)
    stage.class_weights.weight.copy_(torch.tensor([0.5, 1.0, 1.5, 1.0]))
    batch = {
        "image": torch.randn(4, 3, 32, 32),
        "label": torch.tensor([0, 1, 1, 1]),
        "subtype": torch.tensor([0, 1, 2, 3]),
        "index": torch.arange(4),
    }
    stage.eval()
    parts, out = stage.losses(batch)
    sub = F.cross_entropy(out["subtype"], batch["subtype"], weight=stage.class_weights.weight)
    mal = F.cross_entropy(out["malignant"], batch["label"])
    torch.testing.assert_close(parts["loss"], 0.7 * sub + 0.3 * mal)
    plain = CSASNStage(**TINY, class_weighting="none").eval()
    plain.net.load_state_dict(stage.net.state_dict())
    p2, _ = plain.losses(batch)
    torch.testing.assert_close(p2["loss_subtype"], F.cross_entropy(out["subtype"], batch["subtype"]))
    assert not torch.allclose(p2["loss_subtype"], parts["loss_subtype"])
    with pytest.raises(KeyError, match="subtype"):
        stage.losses({k: v for k, v in batch.items() if k != "subtype"})


def test_balanced_decision_divides_by_the_training_prior_and_predicts_rare_classes():
    batch = {"image": torch.randn(5, 3, 32, 32)}
    plain = CSASNStage(**TINY).eval()
    balanced = CSASNStage(**TINY, decision="balanced").eval()
    balanced.load_state_dict(plain.state_dict())
    prior = torch.tensor([0.6, 0.3, 0.05, 0.05])
    balanced.class_prior.copy_(prior)
    with torch.no_grad():
        out = plain(batch["image"])
        p, mal = plain.probabilities(out)
        q, mal_b = balanced.probabilities(out)
    torch.testing.assert_close(p, out["subtype"].softmax(dim=1))  # argmax: the plain softmax
    expected = (p / prior) / (p / prior).sum(dim=1, keepdim=True)  # the docstring's formula
    torch.testing.assert_close(q, expected)
    torch.testing.assert_close(mal_b, mal)  # the malignancy head is not touched
    # benign at 0.5 against its share 0.6, MTC at 0.12 against 0.05: argmax says benign, balanced says MTC
    logits = {"subtype": torch.tensor([[0.5, 0.3, 0.08, 0.12]]).log(), "malignant": torch.zeros(1, 2)}
    assert int(plain.probabilities(logits)[0].argmax()) == 0
    assert int(balanced.probabilities(logits)[0].argmax()) == 3
    # a uniform prior (the state of a checkpoint saved before the rule existed) changes nothing
    state = {k: v for k, v in balanced.state_dict().items() if k != "class_prior"}
    ckpt = {"state_dict": state}
    balanced.on_load_checkpoint(ckpt)
    balanced.load_state_dict(ckpt["state_dict"])
    torch.testing.assert_close(balanced.class_prior, torch.full((4,), 0.25))
    torch.testing.assert_close(balanced.probabilities(out)[0], p)
    with pytest.raises(ValueError, match="decision"):
        CSASNStage(**TINY, decision="bayes")


def test_mask_channel_replaces_the_last_input_channel_with_the_mask():
    image = torch.randn(2, 3, 32, 32)
    mask = (torch.rand(2, 1, 32, 32) > 0.5).float()
    batch = {"image": image, "mask": mask, "label": torch.tensor([0, 1]), "subtype": torch.tensor([0, 3])}
    batch["index"] = torch.arange(2)
    off = CSASNStage(**TINY).eval()
    on = CSASNStage(**TINY, mask_channel=True).eval()
    on.load_state_dict(off.state_dict())
    assert off.inputs(batch) is image
    x = on.inputs(batch)
    torch.testing.assert_close(x[:, :2], image[:, :2])
    torch.testing.assert_close(x[:, 2:], mask)
    with torch.no_grad():
        out_on, out_off = on.losses(batch)[1], off.losses(batch)[1]
        flipped = on.losses({**batch, "mask": 1 - mask})[1]
    assert not torch.allclose(out_on["subtype"], out_off["subtype"])  # the net sees the mask ...
    assert not torch.allclose(out_on["subtype"], flipped["subtype"])  # ... and its content
    with pytest.raises(KeyError, match="mask"):
        on.inputs({"image": image})


def _ellipse(ry: float, rx: float, size: int = 64) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size) - size / 2, torch.arange(size) - size / 2, indexing="ij")
    return (((yy / ry) ** 2 + (xx / rx) ** 2) < 1).float()


def test_mask_shape_targets_measure_aspect_elongation_area_and_outline():
    disc, wide, tall = _ellipse(20, 20), _ellipse(12, 20), _ellipse(20, 12)
    targets, valid = mask_shape_targets(torch.stack([disc, wide, tall, torch.zeros(64, 64)])[:, None])
    assert valid.tolist() == [True, True, True, False]
    t = targets.numpy()
    assert abs(t[0, 0]) < 0.01 and abs(t[0, 1]) < 0.01  # a disc: as tall as wide, not elongated
    assert t[1, 0] == pytest.approx(np.log(12 / 20), abs=0.03)  # 0.5 log(var_y / var_x) = log(12 / 20)
    assert t[2, 0] == pytest.approx(-t[1, 0], abs=1e-5) and t[2, 1] == pytest.approx(t[1, 1], abs=1e-5)
    assert t[1, 1] == pytest.approx(np.log(20 / 12), abs=0.03)  # elongation ignores the orientation
    assert t[0, 2] == pytest.approx(np.log(float(disc.sum()) / 64**2), abs=1e-5)
    assert abs(t[3]).sum() == 0  # an empty mask: zeros, flagged invalid
    # a lobulated outline is long for its area: larger isoperimetric ratio than the disc of the same size
    yy, xx = torch.meshgrid(torch.arange(64) - 32.0, torch.arange(64) - 32.0, indexing="ij")
    lobed = (torch.hypot(yy, xx) < 20 * (1 + 0.25 * torch.cos(6 * torch.atan2(yy, xx)))).float()
    assert float(mask_shape_targets(lobed[None])[0][0, 3]) > t[0, 3] + 0.2


def test_mask_shape_targets_equal_their_formulas_on_rectangles():
    """Pixels as unit squares: an h x w rectangle's descriptors are exact (docstring of mask_shape_targets)."""
    masks = torch.zeros(3, 1, 40, 40)
    masks[0, 0, 5:17, 8:28] = 1  # 12 x 20: wider than tall
    masks[1, 0, 3:33, 10:20] = 1  # 30 x 10: taller than wide
    masks[2, 0, 10:20, 10:20] = 1  # a 10 px square
    t, valid = mask_shape_targets(masks)
    assert valid.all()
    for row, (h, w) in enumerate(((12, 20), (30, 10), (10, 10))):
        want = [
            np.log(h / w),
            abs(np.log(h / w)),
            np.log(h * w / 40**2),
            np.log((2 * h + 2 * w) ** 2 / (4 * np.pi * h * w)),
        ]
        np.testing.assert_allclose(t[row].numpy(), want, atol=1e-5)
    # a rotated ellipse: elongation (rotation-free) kept, aspect (vertical vs horizontal) gone at 45 degrees
    yy, xx = torch.meshgrid(torch.arange(64) - 31.5, torch.arange(64) - 31.5, indexing="ij")
    u, v = (yy + xx) / 2**0.5, (yy - xx) / 2**0.5
    diagonal = (((u / 24) ** 2 + (v / 12) ** 2) < 1).float()
    td = mask_shape_targets(diagonal[None])[0][0]
    assert abs(float(td[0])) < 0.01 and float(td[1]) == pytest.approx(np.log(2), abs=0.03)
    assert mask_shape_targets(torch.ones(1, 1, 1, 3))[1].tolist() == [False]  # under 4 pixels: no shape


def test_shape_weight_adds_the_shape_head_and_its_weighted_loss():
    batch = {
        "image": torch.randn(4, 3, 32, 32),
        "mask": torch.stack([_ellipse(r, 10, 32) for r in (4, 6, 8, 10)])[:, None],
        "label": torch.tensor([0, 1, 1, 1]),
        "subtype": torch.tensor([0, 1, 2, 3]),
        "index": torch.arange(4),
    }
    off = CSASNStage(**TINY, mask_channel=True)
    assert off.net.shape_head is None and off.shape_norm is None
    assert not any("shape" in k for k in off.state_dict())  # checkpoints from before the switch still load
    parts_off = off.losses(batch)[0]
    assert "loss_shape" not in parts_off and "shape" not in off(batch["image"])
    torch.testing.assert_close(parts_off["loss"], parts_off["loss_subtype"] + parts_off["loss_malignant"])
    on = CSASNStage(**TINY, mask_channel=True, shape_weight=0.5)
    on.train()
    parts, out = on.losses(batch)
    assert out["shape"].shape == (4, len(SHAPE_TARGETS))
    target = mask_shape_targets(batch["mask"])[0]
    z = (target - target.mean(0)) / torch.sqrt(target.var(0, unbiased=False) + 1e-5)  # BatchNorm, training
    torch.testing.assert_close(parts["loss_shape"], F.mse_loss(out["shape"], z))
    torch.testing.assert_close(
        parts["loss"], parts["loss_subtype"] + parts["loss_malignant"] + 0.5 * parts["loss_shape"]
    )
    parts["loss"].backward()
    assert on.net.shape_head.weight.grad.abs().sum() > 0  # the head learns ...
    assert on.net.classifier.proj.weight.grad.abs().sum() > 0  # ... through the shared features
    # prediction ignores the head: the same probabilities as a stage without it, given the same weights
    off.load_state_dict({k: v for k, v in on.state_dict().items() if "shape" not in k})
    on.eval(), off.eval()
    with torch.no_grad():
        x = off.inputs(batch)
        torch.testing.assert_close(on.probabilities(on(x))[0], off.probabilities(off(x))[0])
    with pytest.raises(KeyError, match="mask"):
        on.shape_loss(out["shape"], {"image": batch["image"]})
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="shape_weight: must be >= 0"):
            CSASNStage(**TINY, shape_weight=bad)
    # no mask in the batch (e.g. every image without one): the shape term is 0, the rest of the loss unchanged
    empty = {**batch, "mask": torch.zeros_like(batch["mask"])}
    parts = on.losses(empty)[0]
    assert float(parts["loss_shape"].detach()) == 0.0
    torch.testing.assert_close(parts["loss"], parts["loss_subtype"] + parts["loss_malignant"])


def test_class_sampling_draws_each_subtype_in_proportion_to_its_count_to_the_power(tmp_path):
    """class_sampling alpha: a subtype of N_c training images is drawn with probability ~ N_c ** (1 - alpha)."""
    m = subtype_set(tmp_path, counts=(16, 4, 1, 4))
    for alpha in (0.5, 1.0):
        dm = StillDataModule(
            manifest=m, splits=None, fold=None, img_size=16, subtypes=SUBTYPES, class_sampling=alpha
        )
        dm.setup("fit")
        sub = torch.tensor(dm.datasets["train"].subtype_index)
        sampler = dm.train_dataloader().sampler
        torch.manual_seed(0)
        picks = torch.tensor([i for _ in range(400) for i in sampler])  # 400 epochs of 25 draws
        counts = torch.tensor([16.0, 4.0, 1.0, 4.0])
        want = (
            counts ** (1 - alpha) / (counts ** (1 - alpha)).sum()
        )  # 0.5: 4 / 2 / 1 / 2 of 9; 1: a quarter each
        share = torch.bincount(sub[picks], minlength=4).double() / len(picks)
        torch.testing.assert_close(share, want.double(), atol=0.015, rtol=0)


@pytest.mark.parametrize(
    "option, message",
    [
        ("--data.init_args.class_sampling=2", "error: data.init_args.class_sampling: must be in [0, 1]"),
        ("--data.init_args.roi_min_side=-0.5", "error: data.init_args.roi_min_side: must be in [0, 1]"),
        ("--model.init_args.shape_weight=-1", "error: model.init_args.shape_weight: must be >= 0"),
    ],
)
def test_round3_options_out_of_range_are_one_line_errors(stills, tmp_path, capsys, option, message):
    from stages.fit import main

    with pytest.raises(SystemExit) as e:
        main(["fit", *_fit_args(stills, tmp_path / "run", option)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(message) and err.count("\n") == 1
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("*.ckpt"))


# ---------------------------------------------------------------------------------------------- metrics


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_multiclass_metrics_match_sklearn():
    rng = np.random.default_rng(3)
    y = np.array([0] * 10 + [1] * 6 + [2] * 3 + [3] * 3)
    prob = rng.dirichlet(np.ones(4), len(y))
    prob[np.arange(len(y)), y] += rng.uniform(0, 0.6, len(y))  # better than chance, not perfect
    prob /= prob.sum(1, keepdims=True)
    pred = prob.argmax(1)
    got = multiclass_metrics(torch.tensor(prob), torch.tensor(y), SUBTYPES)
    rec = skm.recall_score(y, pred, average=None, zero_division=0)
    prec = skm.precision_score(y, pred, average=None, zero_division=0)
    for i, s in enumerate(SUBTYPES):
        assert float(got[f"recall_{s}"]) == pytest.approx(rec[i])
        assert float(got[f"precision_{s}"]) == pytest.approx(prec[i])
        assert float(got[f"auroc_{s}"]) == pytest.approx(skm.roc_auc_score(y == i, prob[:, i]), abs=1e-6)
    assert float(got["macro_f1"]) == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert float(got["balanced_acc"]) == pytest.approx(skm.balanced_accuracy_score(y, pred))
    ovr = skm.roc_auc_score(y, prob, multi_class="ovr", average="macro")
    assert float(got["macro_auroc"]) == pytest.approx(ovr, abs=1e-6)
    np.testing.assert_array_equal(got["confusion"].numpy(), skm.confusion_matrix(y, pred))
    # a class absent from the targets: its AUROC is undefined, balanced accuracy averages the present ones
    keep = y != 3
    part = multiclass_metrics(torch.tensor(prob[keep]), torch.tensor(y[keep]), SUBTYPES)
    assert np.isnan(float(part["auroc_MTC"]))
    assert float(part["balanced_acc"]) == pytest.approx(skm.balanced_accuracy_score(y[keep], pred[keep]))
    assert float(part["macro_f1"]) == pytest.approx(skm.f1_score(y[keep], pred[keep], average="macro"))
    # the report computes the same numbers from the prediction file's columns
    from stages.report_multiclass import fold_metrics

    frame = pd.DataFrame({"subtype": [SUBTYPES[i] for i in y[keep]]})
    for i, s in enumerate(SUBTYPES):
        frame[f"p_{s}"] = prob[keep, i]
    for name, value in fold_metrics(frame, SUBTYPES).items():
        assert value == pytest.approx(float(part[name]), abs=1e-6, nan_ok=True), name


# ---------------------------------------------------------------------------------------------- fit


def _fit_args(stills, root: Path, *extra: str) -> list[str]:
    manifest, splits = stills
    return [
        "-c", str(ROOT / "conf" / "demo" / "csasn.yaml"),
        f"--data.init_args.manifest={manifest}", f"--data.init_args.splits={splits}", "--data.init_args.fold=0",
        "--data.init_args.img_size=32", "--model.init_args.img_size=32", "--data.init_args.batch_size=6",
        "--trainer.max_epochs=2", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={root}", "--model.init_args.test_after_fit=true",
        f"--model.init_args.predictions_dir={root}", *extra,
    ]  # fmt: skip


def test_tiny_fit_writes_predictions_both_reports_read(stills, tmp_path, capsys):
    from stages.cli import main as usnodule
    from stages.fit import main

    fold = tmp_path / "runs" / "fold0"
    main(["fit", *_fit_args(stills, fold), f"--ckpt_out={fold / 'csasn.ckpt'}"])
    with open(fold / "predictions_csasn.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == [
        "annot_id",
        "subtype",
        "pred_subtype",
        *(f"p_{s}" for s in SUBTYPES),
        "label",
        "prob",
    ]
    test_ids = json.loads(stills[1].read_text())["folds"][0]["test"]
    assert sorted(r["annot_id"] for r in rows) == sorted(test_ids)
    for r in rows:
        assert sum(float(r[f"p_{s}"]) for s in SUBTYPES) == pytest.approx(1.0, abs=1e-4)
        assert r["label"] == str(int(r["subtype"] != "benign")) and 0 <= float(r["prob"]) <= 1
    assert (fold / "confusion_test.png").stat().st_size > 1000
    # the dynamic weights moved during the fit and were saved; the stage reloads
    model, data = CSASNStage.from_checkpoint(fold / "csasn.ckpt")
    assert not torch.allclose(model.class_weights.weight, torch.ones(4))
    assert float(model.class_weights.weight.mean()) == pytest.approx(1.0, abs=1e-5)
    # the training part's class shares were counted at fit start and saved (decision: balanced reads them)
    sub_of = {r.case_id: r.subtype for r in read_manifest(stills[0])}
    train = [sub_of[c] for c in json.loads(stills[1].read_text())["folds"][0]["train"]]
    shares = torch.tensor([train.count(s) / len(train) for s in SUBTYPES])
    torch.testing.assert_close(model.class_prior, shares)
    assert data["subtypes"] == SUBTYPES
    # the multi-class report and the shared binary report read the same file
    usnodule(
        [
            "report-multiclass",
            "--runs",
            str(tmp_path / "runs"),
            "--out",
            str(tmp_path / "rep"),
            "--title",
            "CSASN",
        ]
    )
    table = pd.read_csv(tmp_path / "rep" / "results_multiclass.csv")
    assert table["method"].tolist() == ["csasn"] and "recall_FTC_mean" in table
    assert (tmp_path / "rep" / "confusion_csasn.png").is_file()
    assert "Pooled confusion matrix: csasn" in (tmp_path / "rep" / "results_multiclass.md").read_text()
    usnodule(["report", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "bin"), "--n-boot", "20"])
    assert pd.read_csv(tmp_path / "bin" / "results.csv")["method"].tolist() == ["csasn"]


def test_data_and_model_subtypes_must_agree(stills, tmp_path, capsys):
    from stages.fit import main

    args = _fit_args(
        stills, tmp_path, "--model.init_args.subtypes=[benign,PTC,MTC,FTC]", "--trainer.fast_dev_run=1"
    )
    with pytest.raises(SystemExit) as e:
        main(["fit", *args])
    assert e.value.code == 2
    assert "differ from the model's" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- make


@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")
def test_make_targets_fit_every_fold_then_report(tmp_path):
    """``make -n csasn-ablation`` (print only) on a scratch tree: the split stratified by subtype, the full
    model and the four ablations per fold with their switch, both reports; nothing again once all exist."""
    (tmp_path / "stills").mkdir()
    (tmp_path / "conf").mkdir()
    for f in ("stills/manifest.csv", "conf/csasn.yaml", "stamp"):
        (tmp_path / f).write_text("")
    var = {"FOLDS": 2, "STAMP": tmp_path / "stamp", "RUNS": tmp_path / "runs", "REPORT": tmp_path / "rep",
           "CONF": tmp_path / "conf", "STILLS_MANIFEST": tmp_path / "stills" / "manifest.csv", "VERBOSE": 1}  # fmt: skip

    def dry(target: str) -> list[str]:
        cmd = ["make", "-n", "-C", str(ROOT), target, *(f"{k}={v}" for k, v in var.items())]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=tmp_path).stdout
        return [line for line in out.splitlines() if line.strip() and not line.startswith("make")]

    lines = dry("csasn-ablation")
    assert sum("split" in x and "--stratify subtype" in x for x in lines) == 1
    fits = [x for x in lines if "lightning fit" in x]
    assert len(fits) == 2 * 5
    for switch in ("use_cnn=false", "use_vit=false", "use_refinement=false", "class_weighting=none"):
        assert sum(switch in x for x in fits) == 2, switch
    assert any("usnodule report --runs" in x and "csasn_ablation" in x for x in lines)
    assert any("usnodule report-multiclass --runs" in x for x in lines)
    # once every prediction file exists (newer than its inputs), only the reports are left to do
    for k in range(2):
        for m in ("csasn", "csasn_no_effnet", "csasn_no_vit", "csasn_no_refine", "csasn_no_dynamic"):
            for d in ("csasn", "csasn_ablation") if m == "csasn" else ("csasn_ablation",):
                path = tmp_path / "runs" / d / f"fold{k}" / f"predictions_{m}.csv"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("")
    (tmp_path / "stills" / "splits_subtype.json").write_text("")
    for p in (tmp_path / "runs").rglob("*.csv"):
        p.touch()
    assert not any("lightning fit" in x or "split" in x for x in dry("csasn-ablation"))
    assert not any("lightning fit" in x for x in dry("csasn"))
