"""W&B media of the stages: ROC curve, confusion matrix, prediction table, sample images, attention maps, config.

Every function takes the W&B run from :func:`wandb_run`, which is ``None`` unless one of the module's loggers is a
``WandbLogger`` *and* this is global rank 0 *and* the sanity check is over *and* W&B is not disabled -- so a fit
without a logger, with a CSV logger, on another DDP rank or in the tests (``WANDB_MODE=disabled``) does no W&B
work at all. Media are logged against ``trainer/global_step``, the x-axis ``WandbLogger`` defines for metrics.
``wandb`` and matplotlib are imported only when something is logged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor

CLASSES = ("benign", "malignant")
STEP_KEY = "trainer/global_step"


def wandb_run(module: Any) -> Any | None:
    """The W&B run of ``module``'s trainer when media should be logged from this process, else ``None``."""
    trainer = getattr(module, "_trainer", None)
    if trainer is None or trainer.sanity_checking or not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            run = logger.experiment
            return None if getattr(run, "disabled", False) else run
    return None


def nodule_names(module: Any, stage: str, ids: Tensor) -> list[str]:
    """annot_ids of dataset indices ``ids`` when the datamodule's ``datasets[stage]`` knows them, else the index."""
    trainer = getattr(module, "_trainer", None)
    dm = getattr(trainer, "datamodule", None) if trainer is not None else None
    known = getattr(getattr(dm, "datasets", {}).get(stage), "nodule_ids", None)
    idx = [int(i) for i in ids]
    if known is not None and all(0 <= i < len(known) for i in idx):
        return [str(known[i]) for i in idx]
    return [str(i) for i in idx]


def _log(run: Any, media: dict[str, Any], step: int) -> None:
    run.log({**media, STEP_KEY: step})


def log_classification(
    run: Any, stage: str, names: Sequence[str], prob: Tensor, label: Tensor, step: int, threshold: float = 0.5
) -> None:
    """``<stage>/roc`` (W&B ROC chart, malignant class), ``<stage>/confusion_matrix`` at ``threshold`` and
    ``<stage>/predictions`` (table: nodule, label, prob, pred) from per-nodule scores."""
    import wandb

    p = prob.detach().float().cpu().numpy()
    y = label.detach().long().cpu().numpy()
    pred = (p >= threshold).astype(int)
    table = wandb.Table(
        columns=["nodule", "label", "prob", "pred"],
        data=[[n, int(a), float(b), int(c)] for n, a, b, c in zip(names, y, p, pred, strict=True)],
    )
    media = {
        f"{stage}/predictions": table,
        f"{stage}/confusion_matrix": wandb.plot.confusion_matrix(
            y_true=y.tolist(),
            preds=pred.tolist(),
            class_names=list(CLASSES),
            title=f"{stage} confusion matrix (threshold {threshold:g})",
        ),
    }
    if len(np.unique(y)) == 2:  # a ROC curve needs both classes
        media[f"{stage}/roc"] = wandb.plot.roc_curve(
            y.tolist(),
            np.stack([1 - p, p], 1).tolist(),
            labels=list(CLASSES),
            classes_to_plot=[1],
            title=f"{stage} ROC (nodule level)",
        )
    _log(run, media, step)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Min-max scale an array to uint8 for display (inputs are normalised differently per stage)."""
    x = np.asarray(x, np.float32)
    lo, hi = float(x.min()), float(x.max())
    return ((x - lo) / (hi - lo if hi > lo else 1.0) * 255).round().astype(np.uint8)


def log_stacks(run: Any, key: str, batch: dict[str, Tensor], prob: Tensor, step: int, k: int = 4) -> None:
    """The first ``k`` 3-frame stacks of a batch (``image`` (B,3,h,w)) as images, the three frames side by side
    (ROI crops for the ViT stage, predicted masks for the mask CNN), captioned with label and probability."""
    import wandb

    image = batch["image"][:k].detach().float().cpu().numpy()
    images = []
    for i, stack in enumerate(image):
        strip = np.concatenate(list(stack), axis=1)  # (h, 3w): frames t, t+1, t+2
        cap = [f"{name} {int(batch[name][i])}" for name in ("nodule", "stack", "label") if name in batch]
        images.append(wandb.Image(to_uint8(strip), caption=", ".join([*cap, f"p={float(prob[i]):.2f}"])))
    _log(run, {key: images}, step)


def log_mask_overlays(
    run: Any,
    key: str,
    image: Tensor,
    pred: Tensor,
    target: Tensor | None,
    step: int,
    k: int = 4,
    captions: Sequence[str] | None = None,
) -> None:
    """Frames (B,1,H,W) with the predicted (and ground-truth) masks (B,1,H,W) {0,1} as W&B mask overlays."""
    import wandb

    labels = {0: "background", 1: "nodule"}
    images = []
    for i in range(min(k, len(image))):
        masks = {
            "prediction": {
                "mask_data": pred[i, 0].detach().cpu().numpy().astype(np.uint8),
                "class_labels": labels,
            }
        }
        if target is not None:
            masks["ground_truth"] = {
                "mask_data": target[i, 0].detach().cpu().numpy().astype(np.uint8),
                "class_labels": labels,
            }
        images.append(
            wandb.Image(
                to_uint8(image[i, 0].detach().float().cpu().numpy()),
                masks=masks,
                caption=None if captions is None else captions[i],
            )
        )
    _log(run, {key: images}, step)


def attention_figure(maps: dict[str, Tensor], length: int, title: str) -> np.ndarray:
    """One heatmap per attention block (query stack x key stack, first ``length`` stacks) as an RGB array."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(maps), figsize=(3.2 * len(maps), 3.0), dpi=80, squeeze=False)
    for ax, (name, w) in zip(axes[0], maps.items(), strict=True):
        im = ax.imshow(w[:length, :length].detach().float().cpu().numpy(), vmin=0, cmap="viridis")
        ax.set(title=name, xlabel="key stack", ylabel="query stack")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return rgb


def log_attention(
    run: Any, key: str, maps: dict[str, Tensor], valid: Tensor, step: int, captions: Sequence[str], k: int = 2
) -> None:
    """Attention weights ``maps`` (name -> (B, S, S), averaged over heads) of the first ``k`` samples."""
    import wandb

    if not maps:
        return
    images = []
    for i in range(min(k, len(valid))):
        length = int(valid[i].sum())
        images.append(
            wandb.Image(
                attention_figure({n: w[i] for n, w in maps.items()}, length, captions[i]), caption=captions[i]
            )
        )
    _log(run, {key: images}, step)


class WandbSaveConfig(SaveConfigCallback):
    """LightningCLI's ``SaveConfigCallback`` (writes ``config.yaml``) that also puts the resolved config into
    the W&B run's config (rank 0 only, as ``SaveConfigCallback.setup`` calls ``save_config`` there)."""

    def save_config(self, trainer: Any, pl_module: Any, stage: str) -> None:
        import yaml

        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers:
            return
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in loggers:
            run = logger.experiment
            if not getattr(run, "disabled", False):
                run.config.update({"cli": config}, allow_val_change=True)
