"""StackClassifier (timm backbone + 2-layer head) and MaskCNN: shapes, embeddings, frozen backbone, local weights."""

from __future__ import annotations

import pytest
import timm
import torch

from datamodules.errors import DataError
from lightning_modules.nets.mask_cnn import MaskCNN
from lightning_modules.nets.vit_stack import StackClassifier


@pytest.fixture(scope="module")
def net():
    return StackClassifier(backbone="test_vit", img_size=32)


def test_shapes_and_embed(net):
    x = torch.randn(3, 3, 32, 32)
    assert net(x).shape == (3, 2)
    emb = net.forward_features(x)
    assert emb.shape == (3, 256)
    torch.testing.assert_close(net.forward_head(emb), net(x))  # logits = last layer of the 256-d hidden layer


def test_frozen_backbone_only_head_trains(net):
    assert all(not p.requires_grad for p in net.backbone.parameters())
    assert all(p.requires_grad for p in [*net.fc1.parameters(), *net.fc2.parameters()])
    net.train()
    assert not net.backbone.training and net.fc1.training
    unfrozen = StackClassifier(backbone="test_vit", img_size=32, freeze_backbone=False)
    assert all(p.requires_grad for p in unfrozen.backbone.parameters())


def test_checkpoint_path_loads_local_weights(tmp_path):
    src = timm.create_model("test_vit", pretrained=False, img_size=32)  # with an ImageNet-style classifier
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    net = StackClassifier(backbone="test_vit", img_size=32, checkpoint_path=str(path))
    torch.testing.assert_close(net.backbone.patch_embed.proj.weight, src.patch_embed.proj.weight)
    # nets import nothing from datamodules: the net raises FileNotFoundError, the stage the one-line DataError
    with pytest.raises(FileNotFoundError, match="not found"):
        StackClassifier(backbone="test_vit", img_size=32, checkpoint_path=str(tmp_path / "missing.pth"))
    from lightning_modules.vit_stage import ViTStage

    with pytest.raises(DataError, match="missing.pth: backbone checkpoint not found"):
        ViTStage(backbone="test_vit", img_size=32, checkpoint_path=str(tmp_path / "missing.pth"))


def test_mask_cnn_shapes():
    net = MaskCNN()
    x = (torch.rand(4, 3, 40, 48) > 0.5).float()
    assert net(x).shape == (4, 2)
    assert net.forward_features(x).shape == (4, 256)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) == 2


@pytest.mark.parametrize(
    ("backbone", "takes"),
    [
        ("test_vit", True),
        ("vit_small_r26_s32_224", True),
        ("test_resnet", False),
        ("test_byobnet", True),
        ("test_efficientnet", False),
        ("test_convnext", False),
    ],
)
def test_any_timm_family_builds_at_the_data_size(backbone, takes):
    """ViT, hybrid and CNN backbones all build with the data's ``img_size``; only models that take it get it."""
    from lightning_modules.nets.vit_stack import takes_img_size

    assert takes_img_size(backbone) is takes
    net = StackClassifier(backbone=backbone, img_size=64, freeze_backbone=False)
    assert net(torch.randn(2, 3, 64, 64)).shape == (2, 2)
    if hasattr(net.backbone, "patch_embed"):  # ViT position tables sized for 64 px, not the model's default
        assert net.backbone.patch_embed.img_size == (64, 64)


def test_a_constructor_error_other_than_img_size_still_raises():
    from lightning_modules.nets.vit_stack import takes_img_size

    with pytest.raises(RuntimeError, match="Unknown model"):
        takes_img_size("no_such_model_anywhere")
