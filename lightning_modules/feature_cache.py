"""Frozen backbone, computed once (issue 14, item 1): the fit-time side of :mod:`datamodules.feature_cache`.

:class:`FrozenFeatureCache` is the callback a stage with a frozen encoder returns from ``configure_callbacks``.
At the start of ``fit`` it computes (or finds) the encoder's pooled features of every training and validation
item and hands the data module's loaders :class:`~datamodules.feature_cache.FeatureDataset`\\ s in their place,
so each epoch trains the head on features instead of running the encoder; at the end of the fit the original
datasets are put back (a later ``validate`` / ``test`` reads images again).  A part is cached only when its
crops never change: a dataset with an augmentation transform keeps the image path (training with ``augment:
true``; its validation part is still cached).

Where it applies in this project (checked per stage, issue 14):

- **ViT stage** (``lightning_modules/vit_stage.py``): at paper size ViT-B/16 is frozen (``freeze_backbone:
  true``) and the crops are not augmented: cached by default (``feature_cache: true``; ``false`` turns it off).
  The demo trains the whole network (``freeze_backbone: false``), so nothing is cached there.
- **Mask CNN**: its two conv layers train; nothing frozen.
- **CSASN**: both branches train (and ``augment: true``).
- **Two-stage ROI ResNet-18**: the whole ResNet trains, ``augment: true``.  TransUNet, MSU-Net and AsyCMST
  train their encoders too.  The attention head already trains on exported embeddings (``usnodule
  embeddings``), the same idea done as a pipeline step.

Files: ``<default_root_dir>/feature_cache/{train,val}.h5`` (beside the run's checkpoints), keyed as
:mod:`datamodules.feature_cache` says.  Randomness: the passes run inside Lightning's ``isolate_rng`` so the
global RNG (shuffling, dropout) is where it would be without the cache, which is what makes the trained weights
equal the uncached path's.  The features are computed under the trainer's precision context (autocast for the
mixed precisions), as the training step would compute them.

DDP: global rank 0 checks or builds the files while the other ranks wait, then every rank loads them and checks
that the stored key is the one rank 0 used (the broadcast key); ``default_root_dir`` must be on a filesystem all
nodes see (as for the checkpoints), else the other nodes stop with one line saying so.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import timm
import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor, nn

from datamodules import feature_cache as fc
from datamodules.errors import DataError

PARTS = ("train", "val")


def module_digest(module: nn.Module, **settings: Any) -> str:
    """SHA-256 of a module: its class, ``settings`` (the constructor arguments that shape it) and every tensor
    of its state dict (name, dtype, shape, bytes)."""
    h = hashlib.sha256(f"{type(module).__module__}.{type(module).__qualname__}".encode())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def cacheable(data: Any) -> bool:
    """Whether a dataset's items can be replaced by features: it reads raw stacks (``read`` / ``item`` /
    ``keys``), says how it preprocesses them, and has no augmentation."""
    return (
        all(hasattr(data, a) for a in ("read", "item", "keys", "settings", "item_names"))
        and getattr(data, "transform", None) is None
    )


class FrozenFeatureCache(L.Callback):
    """Train the head of a frozen-encoder stage on cached encoder features (module docstring).

    The stage must have ``net.forward_backbone(images) -> (B, D)`` pooled features, ``net.freeze_backbone``,
    and a ``logits`` that accepts ``{"features": ...}`` batches.  ``encoder_settings``: the constructor
    settings that shape the encoder (backbone name, image size, extra kwargs), part of the key.
    """

    def __init__(self, encoder_settings: dict[str, Any] | None = None) -> None:
        self.encoder_settings = dict(encoder_settings or {})
        self._originals: dict[str, Any] = {}
        self.report: dict[str, dict] = {}  # per part: what happened, rows, seconds (the benchmark reads it)

    # -- hooks -------------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        net = pl_module.net
        datasets = getattr(trainer.datamodule, "datasets", None)
        if not getattr(net, "freeze_backbone", False) or not isinstance(datasets, dict):
            return  # nothing frozen, or loaders given directly (no datamodule to hand features to)
        parts = [p for p in PARTS if cacheable(datasets.get(p))]
        if trainer.limit_val_batches == 0 and "val" in parts:
            parts.remove("val")
        skipped = [p for p in PARTS if p in datasets and not cacheable(datasets[p])]
        if skipped:
            rank_zero_info(f"feature cache: not for {', '.join(skipped)} (augmentation on: its crops change)")
        if not parts:
            return
        encoder = module_digest(net.backbone, **self.encoder_settings)
        hp = trainer.datamodule.hparams
        batch_size = int(getattr(trainer.datamodule, "device_batch_size", None) or hp.get("batch_size", 32))
        workers = int(hp.get("num_workers", 0))
        folder = Path(trainer.default_root_dir) / "feature_cache"
        for part in parts:
            data = datasets[part]
            key = {
                "encoder": encoder,
                "settings": {
                    **data.settings(),
                    "precision": str(trainer.precision),
                    "device": pl_module.device.type,
                    "torch": torch.__version__,
                    "timm": timm.__version__,
                },
                "items": fc.names_digest(data.item_names()),
            }
            path = folder / f"{part}.h5"
            t0 = time.perf_counter()
            feats = self._features(trainer, pl_module, path, data, key, batch_size, workers)
            self.report[part] = {**self.report.get(part, {}), "seconds": time.perf_counter() - t0}
            self._originals[part] = data
            datasets[part] = fc.FeatureDataset(data, feats)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore(trainer)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore(trainer)

    # -- parts -------------------------------------------------------------------------------------------------
    def _features(self, trainer, pl_module, path: Path, data, key: dict, batch_size: int, workers: int):
        full = None
        if trainer.is_global_zero:
            with isolate_rng():  # shuffles and dropout draw as they would without the cache
                feats, full, what = fc.cached_features(
                    path,
                    data,
                    key,
                    self._encoder(trainer, pl_module),
                    batch_size=batch_size,
                    num_workers=workers,
                )
            self.report[path.stem] = {"what": what, "rows": len(feats)}
            rank_zero_info(f"feature cache: {path} {what}, {len(feats)} rows")
        if trainer.world_size == 1:
            return feats
        full = trainer.strategy.broadcast(full, src=0)
        trainer.strategy.barrier("feature-cache")
        if not trainer.is_global_zero:
            if fc.read_key(path) != full:
                raise DataError(
                    path,
                    "the feature cache rank 0 wrote is not visible here: put trainer.default_root_dir on a "
                    "filesystem every node shares, or set model.init_args.feature_cache: false",
                )
            feats = fc.load(path)
        return feats

    @staticmethod
    def _encoder(trainer: L.Trainer, pl_module: L.LightningModule):
        net, device = pl_module.net, pl_module.device

        def encode(images: Tensor) -> Tensor:
            # As the training loop hands a batch to the step: on the device, converted by the precision plugin
            # (half for the "-true" precisions), under its forward context (autocast for the mixed ones).
            plugin = trainer.precision_plugin
            images = plugin.convert_input(images.to(device, non_blocking=True))
            with torch.inference_mode(), plugin.forward_context():
                return net.forward_backbone(images)

        return encode

    def _restore(self, trainer: L.Trainer) -> None:
        datasets = getattr(trainer.datamodule, "datasets", None)
        for part, data in self._originals.items():
            if isinstance(datasets, dict):
                datasets[part] = data
        self._originals = {}
