"""The loader plumbing every DataModule here shares: a dataset per split part, one DataLoader recipe."""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader, Dataset


class PartsDataModule(L.LightningDataModule):
    """Subclasses fill ``self.datasets`` ("train", "val", "test", "predict") in ``setup`` and expect
    ``batch_size`` and ``num_workers`` among their hyper-parameters; training batches are shuffled."""

    collate_fn: Callable | None = None  # a staticmethod in subclasses that pad variable-length items
    # Data for BatchNorm nets: a last training batch of one sample would crash them ("Expected more than 1
    # value per channel"), so it is dropped then, and only then (tiny sets keep all their samples).
    drop_single_last: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.datasets: dict[str, Dataset] = {}

    def _loader(self, part: str, shuffle: bool = False) -> DataLoader:
        hp = self.hparams
        data = self.datasets[part]
        drop_last = self.drop_single_last and part == "train" and len(data) % hp.batch_size == 1
        return DataLoader(data, batch_size=hp.batch_size, shuffle=shuffle, num_workers=hp.num_workers,
                          collate_fn=self.collate_fn, persistent_workers=hp.num_workers > 0,
                          pin_memory=torch.cuda.is_available(), drop_last=drop_last)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")
