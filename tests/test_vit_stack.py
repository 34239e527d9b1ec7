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
    emb = net.embed(x)
    assert emb.shape == (3, 256)
    torch.testing.assert_close(net.fc2(emb), net(x))  # logits = last layer of the 256-d hidden layer


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
    with pytest.raises(DataError, match="not found"):
        StackClassifier(backbone="test_vit", img_size=32, checkpoint_path=str(tmp_path / "missing.pth"))


def test_mask_cnn_shapes():
    net = MaskCNN()
    x = (torch.rand(4, 3, 40, 48) > 0.5).float()
    assert net(x).shape == (4, 2)
    assert net.embed(x).shape == (4, 256)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) == 2
