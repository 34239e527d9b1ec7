"""Stage-1 image encoder of STACT-Time (sec. 2.3, "Image Encoder"): a timm backbone on 3-stack frame instances.

Three adjacent frames in the RGB channels -> backbone pooled features -> Linear(256) -> activation -> Linear(2).
The paper fine-tunes only "the last two fully connected layers" of an ImageNet ViT and takes the 256-d "last
hidden layer" as the stack embedding (``forward_features``). The paper does not name the activation between
the two layers; we use GELU (the ViT's own MLP activation), configurable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
from torch import Tensor, nn

from lightning_modules.nets import WeightsUnavailable

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "identity": nn.Identity}


def make_activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {name!r}")
    return _ACTIVATIONS[name]()


def create_backbone(
    name: str,
    *,
    pretrained: bool = False,
    checkpoint_path: str | Path | None = None,
    img_size: int | None = None,
    in_chans: int = 3,
    **kwargs: Any,
) -> nn.Module:
    """timm backbone without classifier (``num_classes=0``): any timm family (ViT, hybrid, CNN).

    ``img_size`` reaches only models whose constructor takes it (ViT-like models size their position
    embeddings by it); CNNs are size-agnostic, so for them it is dropped and the data's ``img_size`` alone sets
    the input side.  ``pretrained=True`` downloads timm's weights (needs a network); ``checkpoint_path`` instead
    loads a local weights file (timm/ImageNet state dict, .pth/.bin/.safetensors) through timm's own loader,
    which drops the ImageNet classifier and resamples ViT position embeddings when ``img_size`` differs.
    Neither: random init.  A missing ``checkpoint_path`` is a ``FileNotFoundError`` (``<path>: backbone
    checkpoint not found``; the stage turns it into the one-line ``DataError`` of the command lines).
    """
    if checkpoint_path is not None:
        path = Path(checkpoint_path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: backbone checkpoint not found")
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    else:
        kwargs["pretrained"] = pretrained
    kwargs.update(num_classes=0, in_chans=in_chans)
    if img_size is not None and takes_img_size(name):
        kwargs["img_size"] = img_size
    return timm_model(name, downloads=checkpoint_path is None and pretrained, **kwargs)


def timm_model(name: str, *, downloads: bool, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, **kwargs)``; when it ``downloads`` weights and that fails (no network), a
    one-line :class:`WeightsUnavailable` that says what to set instead of the download library's traceback."""
    try:
        return timm.create_model(name, **kwargs)
    except Exception as e:
        if downloads and _is_download_error(e):
            raise WeightsUnavailable(
                f"true needs timm's {name} weights, which could not be downloaded ({type(e).__name__}: no "
                "network?); without a network set checkpoint_path: to a local weights file (or pretrained: "
                "false for random init)"
            ) from None
        raise


def _is_download_error(e: BaseException) -> bool:
    """Whether ``e`` comes from fetching weights: an OS / connection error, or any error of the download
    libraries timm uses (huggingface_hub, its HTTP clients, torch.hub's urllib)."""
    if isinstance(e, OSError | ConnectionError | TimeoutError):
        return True
    root = type(e).__module__.split(".")[0]
    return root in {"huggingface_hub", "httpx", "httpcore", "requests", "urllib3", "urllib"}


def takes_img_size(name: str) -> bool:
    """Whether timm model ``name`` accepts ``img_size``: built on the meta device (no memory, no weights), so
    the answer comes from the model's own constructor rather than a list of families."""
    import torch

    with torch.device("meta"):
        try:
            timm.create_model(name, pretrained=False, num_classes=0, img_size=224)
        except TypeError as e:
            if "img_size" in str(e):
                return False
            raise
    return True


class StackClassifier(nn.Module):
    """timm backbone + two-layer head on (B, 3, h, w) 3-stacks -> (B, num_classes) logits.

    ``freeze_backbone=True`` (paper): backbone parameters get ``requires_grad=False`` and the backbone stays in
    eval mode even when the module is put in train mode, so dropout/BN statistics of the frozen part do not
    move either. ``forward_features`` returns the ``hidden_dim`` (256) hidden layer after its activation (the
    stack embedding), ``forward_head`` the logits on it.
    """

    def __init__(
        self,
        *,
        backbone: str = "vit_base_patch16_224",
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        img_size: int | None = None,
        hidden_dim: int = 256,
        num_classes: int = 2,
        activation: str = "gelu",
        dropout: float = 0.0,
        freeze_backbone: bool = True,
        backbone_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = create_backbone(
            backbone,
            pretrained=pretrained,
            checkpoint_path=checkpoint_path,
            img_size=img_size,
            **(backbone_kwargs or {}),
        )
        self.fc1 = nn.Linear(self.backbone.num_features, hidden_dim)
        self.act = make_activation(activation)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_dim, num_classes)
        self.freeze_backbone = freeze_backbone
        self.backbone.requires_grad_(not freeze_backbone)
        if freeze_backbone:
            self.backbone.eval()

    def train(self, mode: bool = True) -> StackClassifier:
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def forward_backbone(self, x: Tensor) -> Tensor:
        """Backbone pooled features (B, num_features) via timm ``forward_features`` + ``forward_head``."""
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)

    def forward_hidden(self, pooled: Tensor) -> Tensor:
        """The 256-d hidden layer from the backbone's pooled features (the cached-feature path starts here)."""
        return self.act(self.fc1(pooled))

    def forward_features(self, x: Tensor) -> Tensor:
        """The 256-d "last hidden layer" stack embedding (paper sec. 2.3): the pre-logit features."""
        return self.forward_hidden(self.forward_backbone(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Logits from :meth:`forward_features` (``pre_logits``: the features after the head's dropout)."""
        x = self.dropout(x)
        return x if pre_logits else self.fc2(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
