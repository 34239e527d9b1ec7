"""Explanations of trained models: Grad-CAM++ maps, montages of them, and t-SNE of the fused features.

Grad-CAM++ (Chattopadhyay et al., WACV 2018) comes from the maintained ``grad-cam`` package (module
``pytorch_grad_cam``): its ``GradCAMPlusPlus`` registers the hooks, weighs the target layer's channels (Eq. 19
of the paper), applies the ReLU, min-max scales every map to [0, 1] and resizes it to the input (bilinear).
What this module adds is the choice of target layer and the wiring of our two models into the library's
``model(input) -> logits`` shape:

- **STACT-Time image encoder** (:class:`~lightning_modules.nets.vit_stack.StackClassifier`): a 3-stack
  ``(B, 3, h, w)`` in, logits out.  ViTs (timm models with ``patch_embed`` and ``blocks``): the first LayerNorm
  of the last block (``blocks[-1].norm1``, the library's documented ViT choice: the last block's output tokens
  reach a class-token head only through the class token, so their gradients are zero there), with a
  ``reshape_transform`` that drops the prefix (class / register) tokens and lays the patch tokens back on their
  grid.  CNNs: the last stage timm lists in ``feature_info`` (``layer4`` of a ResNet, ``blocks.6`` of
  MobileNetV2), or the deepest one whose map still has 2 x 2 cells when the input is small (the demo's
  ``test_byobnet`` at 32 px: ``stages.2``, stride 16; its stride-32 ``final_conv`` is a single cell).
- **AsyCMST** (:class:`~lightning_modules.nets.asycmst.AsyCMSTNet`): one map per frame and per branch.  The
  library explains one input tensor, so :class:`BranchLogits` makes the logits a function of one branch's
  frames ``(B*T, 3, H, W)`` while the other branch's frame features are held at their values (the encoders read
  each frame on its own, so this is exact); the target layer is that branch's frame encoder's last backbone
  stage (``layer4`` of the ResNet-18, ``layer3`` for the demo's stride-16 ResNet-10t).  With
  ``share_encoders`` the one encoder is hooked once per pass, for the branch being explained.

Choices the method leaves open (ours): the map is for one class per case (the predicted one unless asked
otherwise), the same for every frame or stack of the case; each frame's map is scaled to [0, 1] on its own (the
library's rule), so a montage shows *where* in each frame, not how much one frame counts against another.
Models are put in eval mode (BatchNorm on running statistics, no dropout) and their parameters made to require
gradients (the paper ViT's backbone is frozen: without this no gradient would reach the target layer).

t-SNE (scikit-learn): 2-D embedding of one feature vector per case, Euclidean, PCA initialisation, perplexity
``min(30, (n - 1) / 3)`` (at least 1: scikit-learn needs it below the number of cases), seeded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange
from torch import Tensor, nn

from datamodules.atomic import atomic_path
from lightning_modules.wandb_media import CLASSES, to_uint8


class NoTargetLayer(ValueError):
    """The model has no layer Grad-CAM++ can read a map from (no timm ``feature_info``, or a stage whose output
    is not a ``(B, C, h, w)`` map); the command turns it into its one error line."""


# t-SNE / montage colours: benign, malignant (matplotlib's tab:blue and tab:red)
LABEL_COLOURS = ("#1f77b4", "#d62728")


# ---------------------------------------------------------------------------------------------- target layers
def is_vit(backbone: nn.Module) -> bool:
    """A timm vision transformer (token sequence out of every block): has ``patch_embed`` and ``blocks``."""
    return hasattr(backbone, "patch_embed") and hasattr(backbone, "blocks")


def last_stage(model: nn.Module, size: Sequence[int] | None = None, min_cells: int = 2) -> nn.Module:
    """The deepest stage timm's ``feature_info`` names (a whole model's list of dicts, or a ``features_only``
    model's ``FeatureInfo``, whose modules are registered with ``.`` -> ``_``) whose map still has at least
    ``min_cells`` x ``min_cells`` cells for an input of ``size`` (h, w): at 224 px that is the last stage (7 x 7
    for a ResNet); at the demo's 32 px the stride-32 last stage is one cell, a map with nothing to show, so an
    earlier one is taken.  ``size=None``: the last stage."""
    info = getattr(model, "feature_info", None)
    if info is None:
        raise NoTargetLayer(
            f"{type(model).__name__} has no timm feature_info: no Grad-CAM target layer known"
        )
    if hasattr(info, "module_name"):
        names, strides = info.module_name(), info.reduction()
    else:
        names, strides = [f["module"] for f in info], [f["reduction"] for f in info]
    pick = len(names) - 1
    if size is not None:
        while pick > 0 and min(int(s) // int(strides[pick]) for s in size) < min_cells:
            pick -= 1
    name = names[pick]
    for candidate in (name, name.replace(".", "_")):
        try:
            return model.get_submodule(candidate)
        except AttributeError:
            continue
    raise NoTargetLayer(
        f"{type(model).__name__}: feature_info names {name!r}, which is not one of its modules"
    )


def vit_tokens_to_map(backbone: nn.Module) -> Callable[[Tensor], Tensor]:
    """``reshape_transform`` of a timm ViT: ``(B, prefix + h*w, C) -> (B, C, h, w)``, prefix tokens dropped."""
    prefix = int(getattr(backbone, "num_prefix_tokens", 1))
    grid = tuple(getattr(backbone.patch_embed, "grid_size", ()) or ())

    def reshape(tokens: Tensor) -> Tensor:
        x = tokens[:, prefix:]
        n = x.shape[1]
        h, w = grid if len(grid) == 2 and grid[0] * grid[1] == n else (int(round(n**0.5)),) * 2
        if h * w != n:
            raise NoTargetLayer(f"cannot lay {n} patch tokens on a grid (prefix tokens: {prefix})")
        return rearrange(x, "b (h w) c -> b c h w", h=h, w=w)

    return reshape


def check_feature_map(tokens: Tensor) -> Tensor:
    """``reshape_transform`` of a CNN stage: the activation must already be a ``(B, C, h, w)`` map (a layer
    that is not, e.g. a channels-last Swin stage, would give a meaningless map: refuse it)."""
    if tokens.ndim != 4:
        raise NoTargetLayer(f"the Grad-CAM target layer gives {tuple(tokens.shape)}, not a (B, C, h, w) map")
    return tokens


def stack_target(
    backbone: nn.Module, size: Sequence[int] | None = None
) -> tuple[nn.Module, Callable[[Tensor], Tensor]]:
    """``(target layer, reshape_transform)`` of a STACT-Time image-encoder backbone for inputs of ``size``
    (module docstring)."""
    if is_vit(backbone):
        return backbone.blocks[-1].norm1, vit_tokens_to_map(backbone)
    return last_stage(backbone, size), check_feature_map


# ---------------------------------------------------------------------------------------------- Grad-CAM++
def gradcam_pp(
    model: nn.Module,
    layer: nn.Module,
    inputs: Tensor,
    classes: Sequence[int],
    reshape: Callable[[Tensor], Tensor] | None = None,
) -> np.ndarray:
    """Grad-CAM++ maps of ``model`` (``inputs -> (B', K)`` logits) at ``layer`` for one class per output row.

    Returns ``(N, H, W)`` float32 in [0, 1], ``N`` = the layer's batch (``B`` for images; ``B*T`` for
    :class:`BranchLogits`), ``H, W`` = the input's.  ``pytorch_grad_cam`` does the work; the model is left in
    eval mode with gradients on.
    """
    from pytorch_grad_cam import GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model.eval().requires_grad_(True)
    cam = GradCAMPlusPlus(model=model, target_layers=[layer], reshape_transform=reshape)
    try:
        with torch.enable_grad():
            maps = cam(input_tensor=inputs, targets=[ClassifierOutputTarget(int(c)) for c in classes])
        if not cam.activations_and_grads.gradients:  # no gradient reached the layer: the map would be garbage
            raise RuntimeError(f"no gradient reached the Grad-CAM target layer {type(layer).__name__}")
    finally:
        cam.activations_and_grads.release()  # not `with cam:`: its __exit__ swallows IndexError
    return np.asarray(maps, dtype=np.float32)


def stack_cams(net: nn.Module, images: Tensor, classes: Sequence[int]) -> np.ndarray:
    """``(B, h, w)`` maps of a :class:`StackClassifier` on 3-stacks ``images`` ``(B, 3, h, w)``."""
    layer, reshape = stack_target(net.backbone, images.shape[-2:])
    return gradcam_pp(net, layer, images, classes, reshape)


class BranchLogits(nn.Module):
    """AsyCMST logits as a function of one branch's frames (module docstring).

    ``branch``: ``"c"`` (upper) or ``"b"`` (lower); ``fixed``: the other branch's frame features
    ``(B, T, N, D)``; ``frames``: T.  Input ``(B*T, 3, H, W)`` in ``(b t)`` order, output ``(B, K)`` logits.
    """

    def __init__(self, net: nn.Module, branch: str, fixed: Tensor, frames: int) -> None:
        super().__init__()
        if branch not in ("c", "b"):
            raise ValueError(f"branch must be 'c' or 'b', got {branch!r}")
        self.net, self.branch, self.frames = net, branch, frames
        self.encoder = net.encoder_c if branch == "c" else net.encoder_b
        self.register_buffer("fixed", fixed.detach(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        f = self.encoder(rearrange(x, "(b t) c h w -> b t c h w", t=self.frames))
        f_c, f_b = (f, self.fixed) if self.branch == "c" else (self.fixed, f)
        return self.net.forward_head(self.net.forward_fusion(f_c, f_b))


def clip_cams(net: nn.Module, c: Tensor, b: Tensor, classes: Sequence[int]) -> dict[str, np.ndarray]:
    """``{"c": (B, T, H, W), "b": (B, T, H, W)}`` maps of an :class:`AsyCMSTNet` on the upper / lower clips
    ``(B, T, 3, H, W)``, for one class per clip."""
    net.eval()
    with torch.no_grad():
        fixed = {"c": net.encoder_b(b), "b": net.encoder_c(c)}  # the *other* branch's features
    out = {}
    for branch, clip in (("c", c), ("b", b)):
        model = BranchLogits(net, branch, fixed[branch], clip.shape[1])
        frames = rearrange(clip, "b t c h w -> (b t) c h w")
        maps = gradcam_pp(model, last_stage(model.encoder.body), frames, classes, check_feature_map)
        out[branch] = rearrange(maps, "(b t) h w -> b t h w", b=clip.shape[0])
    return out


# ---------------------------------------------------------------------------------------------- pictures
def overlay(frame: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8: the gray ``frame`` (any range, min-max scaled) with the map as a JET heat map
    (the library's ``show_cam_on_image``, half and half)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    gray = to_uint8(frame).astype(np.float32) / 255.0
    return show_cam_on_image(np.repeat(gray[..., None], 3, axis=-1), cam, use_rgb=True, image_weight=0.5)


def save_montage(
    rows: Sequence[tuple[str, np.ndarray, np.ndarray]],
    path: str | Path,
    title: str,
    columns: Sequence[str] | None = None,
) -> Path:
    """One PNG: for each ``(name, frames (T, H, W), maps (T, H, W))`` a row of the frames and a row of the
    frames with their maps; ``columns`` titles the columns.  Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_cols = max(len(frames) for _, frames, _ in rows)
    width = max(1.25 * n_cols + 0.6, 4.2)  # room for the two title lines when a nodule has few stacks
    fig, axes = plt.subplots(
        2 * len(rows), n_cols, figsize=(width, 1.35 * 2 * len(rows) + 0.6), dpi=100, squeeze=False
    )
    for r, (name, frames, maps) in enumerate(rows):
        for j in range(n_cols):
            top, bottom = axes[2 * r, j], axes[2 * r + 1, j]
            if j < len(frames):
                top.imshow(to_uint8(frames[j]), cmap="gray", interpolation="nearest")
                bottom.imshow(overlay(frames[j], maps[j]), interpolation="nearest")
            if r == 0 and columns is not None and j < len(columns):
                top.set_title(columns[j], fontsize=8)
            for ax in (top, bottom):
                ax.set_xticks([])
                ax.set_yticks([])
                if j >= len(frames):
                    ax.axis("off")
        axes[2 * r, 0].set_ylabel(name, fontsize=8)
        axes[2 * r + 1, 0].set_ylabel(f"{name}\nGrad-CAM++", fontsize=8)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- t-SNE
def tsne(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """``(n, 2)`` t-SNE of ``(n, d)`` features (module docstring for the settings); ``n >= 2``."""
    from sklearn.manifold import TSNE

    x = np.asarray(features, dtype=np.float32)
    n = len(x)
    if n < 2:
        raise ValueError(f"t-SNE needs at least 2 cases, got {n}")
    perplexity = max(1.0, min(30.0, (n - 1) / 3))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def save_tsne(points: np.ndarray, labels: Sequence[int], path: str | Path, title: str) -> list[str]:
    """Scatter of ``points`` ``(n, 2)``, one dot per case coloured by its label (benign blue, malignant red),
    written atomically; returns the colour of each dot (what the picture shows, for the tests)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = np.asarray(labels, dtype=int)
    colours = [LABEL_COLOURS[y] for y in labels]
    fig, ax = plt.subplots(figsize=(4.2, 4.0), dpi=100)
    for y, name in enumerate(CLASSES):
        sel = labels == y
        if sel.any():
            ax.scatter(
                *points[sel].T, s=14, c=LABEL_COLOURS[y], label=f"{name} (n={int(sel.sum())})", alpha=0.8
            )
    ax.set(xticks=[], yticks=[], xlabel="t-SNE 1", ylabel="t-SNE 2")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return colours


# ---------------------------------------------------------------------------------------------- W&B
def log_wandb(run: Any, media: dict[str, list[tuple[Path, str]]]) -> None:
    """``{key: [(png, caption), ...]}`` as W&B images into ``run`` (as :mod:`lightning_modules.wandb_media`
    logs its media: one ``run.log`` of ``wandb.Image`` lists)."""
    import wandb

    run.log(
        {key: [wandb.Image(str(p), caption=c) for p, c in items] for key, items in media.items() if items}
    )
