"""A toy LightningModule / DataModule pair to test the CLI plumbing without a real stage."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback
from torch.utils.data import DataLoader, TensorDataset

from datamodules.parts import BaseDataModule
from lightning_modules.base import BaseStage


class ToyData(BaseDataModule):
    def __init__(
        self,
        n: int = 64,
        batch_size: int = 8,
        fold: int | None = None,
        seed: int = 0,
        source: str | None = None,
    ):
        """``source``: a text file holding an integer added to the seed (an input file, as the real data's)."""
        super().__init__()
        if source is not None:
            seed += int(open(source).read())
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=g)
        self.y = (self.x[:, 0] > 0).long()
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size)


class ToyStage(BaseStage):
    def __init__(self, hidden: int = 8):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 2)
        )

    def training_step(self, batch, _):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val/loss", torch.nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class Crash(Callback):
    """Simulates a killed fit: raises after ``at_epoch`` epochs have been checkpointed."""

    def __init__(self, at_epoch: int = 2):
        self.at_epoch = at_epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.at_epoch:
            raise RuntimeError("simulated kill")
