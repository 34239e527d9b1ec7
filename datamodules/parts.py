"""The one shape of every DataModule here: :class:`BaseDataModule`, a dataset per split part and one
DataLoader recipe (the data-side match of :class:`lightning_modules.base.BaseStage`)."""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from datamodules.errors import OptionError

# ImageNet normalisation (timm's default mean / std), for every image input of the project.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BaseDataModule(L.LightningDataModule):
    """Base of every DataModule (Stanford stacks / frames, embeddings, paired BUS + CEUS clips).

    Subclasses call ``save_hyperparameters()`` with at least ``batch_size`` and ``num_workers`` among their
    init args and fill ``self.datasets`` ("train", "val", "test", "predict") in ``setup``; this base gives the
    four dataloaders from one recipe (:meth:`_loader`): training batches shuffled, workers persistent, memory
    pinned on CUDA machines.  Its hyper-parameters are what Lightning saves in a checkpoint as
    ``datamodule_hyper_parameters``: the data settings :meth:`BaseStage.from_checkpoint
    <lightning_modules.base.BaseStage.from_checkpoint>` returns with the model.  It is LightningCLI's
    subclass-mode data base (``stages/fit.py``).
    """

    collate_fn: Callable | None = None  # a staticmethod in subclasses that pad variable-length items
    # Data for BatchNorm nets: a last training batch of one sample would crash them ("Expected more than 1
    # value per channel"), so it is dropped then, and only then (tiny sets keep all their samples).
    drop_single_last: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.datasets: dict[str, Dataset] = {}

    @property
    def device_batch_size(self) -> int:
        """Samples per batch of each process's loaders: ``batch_size`` (per device) unless a subclass derives
        it from a global batch (:class:`~datamodules.paired_video.PairedVideoDataModule`)."""
        return self.hparams.batch_size

    # Settings that must be positive integers / non-negative integers when a subclass has them.
    _positive = ("batch_size", "img_size", "size", "frames")
    _non_negative = ("num_workers", "fold")

    def check_options(self) -> None:
        """Refuse impossible settings at construction (one-line :class:`OptionError` naming the setting), not
        deep inside a DataLoader worker later.  Subclasses call it after ``save_hyperparameters()``."""
        hp = self.hparams
        for names, low in ((self._positive, 1), (self._non_negative, 0)):
            for name in names:
                value = hp.get(name)
                if value is None:
                    continue
                if isinstance(value, bool) or not isinstance(value, int):
                    raise OptionError(name, f"must be an integer, got {value!r}")
                if value < low:
                    raise OptionError(name, f"must be >= {low}, got {value}")

    def drop_last(self, part: str, data: Dataset) -> bool:
        """Whether the loader of ``part`` drops its last, incomplete batch (see ``drop_single_last``)."""
        return self.drop_single_last and part == "train" and len(data) % self.device_batch_size == 1

    def _loader(self, part: str, shuffle: bool = False, sampler: Sampler | None = None) -> DataLoader:
        hp = self.hparams
        data = self.datasets[part]
        return DataLoader(
            data,
            batch_size=self.device_batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=hp.num_workers,
            collate_fn=self.collate_fn,
            persistent_workers=hp.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=self.drop_last(part, data),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")
