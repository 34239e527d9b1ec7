"""``lightning``: LightningCLI in subclass mode, so ``lightning fit -c conf/<stage>.yaml`` runs any stage.

Model and data are given by ``class_path`` in the YAML (imitating torchgeo's ``main.py``).  ``args`` lets
tests drive it in-process: ``main(["fit", "-c", "conf/demo/head.yaml", "--trainer.fast_dev_run=1"])``.

One addition to the stock CLI: ``--ckpt_out PATH`` copies the fit's best checkpoint (the monitored
``ModelCheckpoint``'s best, else its last, else the final weights) to ``PATH`` atomically, so a Makefile can
name each stage's output (``runs/<exp>/fold<k>/vit.ckpt``) and later stages can depend on it.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import ArgsType, LightningCLI

from datamodules.atomic import atomic_path
from datamodules.errors import DataError


class UsnoduleCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--ckpt_out", type=str | None, default=None,
                            help="copy the best checkpoint of `fit` here when it ends")

    def after_fit(self) -> None:
        out = self.config[self.subcommand].get("ckpt_out")
        trainer = self.trainer
        if not out or trainer.interrupted:
            return
        cb = trainer.checkpoint_callback
        best = (cb.best_model_path or cb.last_model_path) if cb is not None else ""
        if best:
            if trainer.is_global_zero:
                with atomic_path(out) as tmp:
                    shutil.copyfile(best, tmp)
            return
        # Checkpointing is off: save the final weights.  Every rank must call (rank 0 writes), so the
        # temporary name is the same on all ranks.
        tmp = Path(out).with_name(f".{Path(out).name}.final.ckpt")
        trainer.save_checkpoint(tmp)
        if trainer.is_global_zero:
            os.replace(tmp, out)


def main(args: ArgsType = None) -> None:
    try:
        UsnoduleCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
