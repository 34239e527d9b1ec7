"""``lightning``: LightningCLI in subclass mode, so ``lightning fit -c conf/<stage>.yaml`` runs any stage.

Model and data are given by ``class_path`` in the YAML (imitating torchgeo's ``main.py``).  The subclass-mode
bases are the project's own :class:`~lightning_modules.base.BaseStage` and
:class:`~datamodules.parts.BaseDataModule`, so ``lightning fit --help`` lists the project's stages and data
modules (those of :data:`STAGE_MODULES`, imported for help only), and a ``class_path`` of anything else is
refused.  ``args`` lets
tests drive it in-process: ``main(["fit", "-c", "conf/demo/head.yaml", "--trainer.fast_dev_run=1"])``.

What this CLI adds to the stock one, all overridable from the command line:

- ``--ckpt_out PATH``: when ``fit`` ends, copy its best checkpoint (the monitored ``ModelCheckpoint``'s best,
  else its last, else the final weights) to ``PATH`` atomically, so the Makefile can name each stage's output
  (``runs/<exp>/fold<k>/vit.ckpt``) and later stages can depend on it.
- ``--resume true`` (default): checkpoints go to ``<default_root_dir>/checkpoints`` with ``last.ckpt``; a fit
  that finds a ``last.ckpt`` written by the same experiment (same model, data, optimizer, scheduler and seed)
  resumes from it, so killing a fit and rerunning the same make target picks up where it stopped.  A changed
  config, or a rerun after a fit that finished (inputs changed upstream), starts afresh: old checkpoints
  are removed, never mixed in.
- Logging: when the config names no logger, every run logs to W&B (project ``usnodule``, group = ``--exp``,
  job_type = the stage, name = stage + fold), offline unless ``WANDB_MODE``/credentials say otherwise.  Only
  rank 0 logs (Lightning's rank-zero logger).
- Reproducible resumption: the RNG states ride along in every checkpoint (:class:`RNGState`).
- Progress: a Rich progress bar on a terminal, none when stdout is not a TTY (CI logs stay readable).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import sys
from pathlib import Path

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import ArgsType, LightningCLI

from datamodules.atomic import atomic_path
from datamodules.errors import DataError
from datamodules.parts import BaseDataModule
from lightning_modules.base import BaseStage
from lightning_modules.callbacks import RNGState
from lightning_modules.wandb_media import WandbSaveConfig

# The parts of a config that define "the same experiment" for resuming; trainer settings (epochs, devices,
# precision) may change between a run and its resumption.
_EXPERIMENT_KEYS = ("model", "data", "optimizer", "lr_scheduler", "seed_everything")

# Modules whose stages and data modules `lightning fit --help` lists (jsonargparse knows a subclass once it is
# imported).  Imported for help only: together they pull in timm, albumentations and OpenCV (~2-4 s), which a
# fit of one stage does not all need; a fit imports its own classes from the config's class_path.
STAGE_MODULES = (
    "lightning_modules.vit_stage",
    "lightning_modules.seg_stage",
    "lightning_modules.maskcnn_stage",
    "lightning_modules.head_stage",
    "lightning_modules.asycmst",
    "datamodules.stacks",
    "datamodules.embeddings",
    "datamodules.paired_video",
    "datamodules.still_data",
)


def stage_name(model: LightningModule) -> str:
    """``ViTStage`` -> ``vit``; a module may set ``stage`` itself."""
    return getattr(model, "stage", None) or type(model).__name__.lower().removesuffix("stage")


class UsnoduleCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--ckpt_out",
            type=str | None,
            default=None,
            help="copy the best checkpoint of `fit` here when it ends",
        )
        parser.add_argument("--exp", type=str, default="default", help="experiment name (W&B group)")
        parser.add_argument(
            "--resume",
            type=bool,
            default=True,
            help="resume from <default_root_dir>/checkpoints/last.ckpt of the same experiment",
        )

    def _sub(self) -> dict:
        return self.config[self.subcommand] if self.subcommand else self.config

    def instantiate_trainer(self, **kwargs) -> Trainer:
        cfg = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer_cfg = cfg["trainer"]
        if trainer_cfg.get("logger") in (None, True) and not trainer_cfg.get("fast_dev_run"):
            kwargs["logger"] = self._wandb_logger(trainer_cfg)
        callbacks = list(trainer_cfg.get("callbacks") or [])
        if not any(isinstance(c, RNGState) for c in callbacks):
            callbacks.append(RNGState())
        # lr per step on the dashboards; LearningRateMonitor raises without a logger, so only when there is one.
        has_logger = kwargs.get("logger", trainer_cfg.get("logger")) is not False
        if has_logger and not any(isinstance(c, LearningRateMonitor) for c in callbacks):
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        if trainer_cfg.get("enable_progress_bar") is not False:
            if sys.stdout.isatty():
                if not any(isinstance(c, RichProgressBar) for c in callbacks):
                    callbacks.append(RichProgressBar())
            else:
                kwargs["enable_progress_bar"] = False
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)

    def _wandb_logger(self, trainer_cfg: dict):
        from lightning.pytorch.loggers import WandbLogger

        fold = self._sub()["data"]["init_args"].get("fold")
        stage = stage_name(self.model)
        name = stage if fold is None else f"{stage}-fold{fold}"
        root = Path(trainer_cfg.get("default_root_dir") or ".")
        root.mkdir(parents=True, exist_ok=True)
        # The user's WANDB_MODE wins (online / offline / disabled -- the tests set disabled); unset: online with
        # credentials, else offline.  Never offline=True when WANDB_MODE is set: WandbLogger then overwrites it
        # with "dryrun" for the rest of the process.
        offline = os.environ.get("WANDB_MODE") is None and not os.environ.get("WANDB_API_KEY")
        return WandbLogger(
            project="usnodule",
            group=self._sub().get("exp"),
            job_type=stage,
            name=name,
            save_dir=str(root),
            offline=offline,
        )

    # ---------------------------------------------------------------------------------------- resume
    def _experiment_hash(self) -> str:
        cfg = self._sub()
        doc = {k: cfg.get(k) for k in _EXPERIMENT_KEYS}
        text = json.dumps(doc, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def before_fit(self) -> None:
        trainer = self.trainer
        ckpt_dir = Path(trainer.default_root_dir) / "checkpoints"
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint):
                if cb.dirpath is None:
                    cb.dirpath = str(ckpt_dir)
                if cb.save_last is None:
                    cb.save_last = True
        cfg = self.config_init[self.subcommand]
        if not self._sub().get("resume") or cfg.get("ckpt_path") is not None or trainer.fast_dev_run:
            return
        stamp = ckpt_dir / "experiment.sha"
        current = self._experiment_hash()
        last = ckpt_dir / "last.ckpt"
        if last.is_file() and stamp.is_file() and stamp.read_text().strip() == current:
            cfg["ckpt_path"] = str(last)
            print(f"resuming from {last}", file=sys.stderr)
            return
        if trainer.is_global_zero:
            if ckpt_dir.exists():  # another experiment's checkpoints: set aside, never resumed into
                shutil.rmtree(ckpt_dir)
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            stamp.write_text(current)
        trainer.strategy.barrier("usnodule-resume")

    def after_fit(self) -> None:
        trainer = self.trainer
        if trainer.interrupted:
            return
        line = result_line(trainer)
        if line and trainer.is_global_zero:  # the key metric for `python -m stages.step` (one line per step)
            print(line, flush=True)
        stamp = Path(trainer.default_root_dir) / "checkpoints" / "experiment.sha"
        if trainer.is_global_zero and stamp.is_file():  # finished: a rerun starts afresh, never resumes
            stamp.unlink()
        out = self._sub().get("ckpt_out")
        if not out:
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


def result_line(trainer: Trainer) -> str | None:
    """``RESULT <monitor>=<best score>`` of the fit's monitored checkpoint callback, falling back to the last
    logged value of the monitored key; ``None`` without a monitor or a value."""
    cb = trainer.checkpoint_callback
    monitor = getattr(cb, "monitor", None)
    if not monitor:
        return None
    score = getattr(cb, "best_model_score", None)
    if score is None:
        score = trainer.callback_metrics.get(monitor, trainer.logged_metrics.get(monitor))
    if score is None:
        return None
    value = float(score)
    return f"RESULT {monitor}={value:.6g}"


def main(args: ArgsType = None) -> None:
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, list | tuple) and any(
        a in ("-h", "--help") or str(a).split("=")[0].endswith(".help") for a in argv
    ):
        for name in STAGE_MODULES:
            importlib.import_module(name)
    try:
        UsnoduleCLI(
            BaseStage,
            BaseDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=WandbSaveConfig,  # config.yaml as before, and the resolved config into W&B
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
