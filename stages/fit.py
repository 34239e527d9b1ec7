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
  that finds a ``last.ckpt`` written by the same experiment (same model, data, optimizer, scheduler and seed,
  and the same input files: size and mtime of every file the model and data settings name, so data rewritten
  at the same path or a refit upstream checkpoint counts as a change) resumes from it, so killing a fit and
  rerunning the same make target picks up where it stopped.  A changed config or input (the log says which
  file, in one ``notice:`` line), or a rerun after a fit that finished, starts afresh: old checkpoints are
  removed, never mixed in.
- Logging: when the config names no logger, every run logs to W&B (project ``usnodule``, group = ``--exp``,
  job_type = the stage, name = stage + fold), offline unless ``WANDB_MODE``/credentials say otherwise.  Only
  rank 0 logs (Lightning's rank-zero logger).
- Reproducible resumption: the RNG states ride along in every checkpoint (:class:`RNGState`).
- Progress: a Rich progress bar on a terminal, none when stdout is not a TTY (CI logs stay readable).
- One line when it fails: a bad input is ``error: <file or config key>: <problem>`` alone on stderr, exit
  status 2.  What Lightning prints while it starts ("Seed set to", "GPU available", "💡 Tip", warnings) is held
  until the first batch (:class:`StartUp`): printed then, or dropped, with the resume stamp and the folders
  this run made, when a bad input stops the fit before it (an unreadable or mismatched file found by the data
  module's ``setup``).  Trainer settings the machine cannot run (a GPU that is not there, more CPU processes
  than cores) are refused before the Trainer is built.
- ``--ckpt_path`` (``test``, ``validate``, ``predict``): the model is rebuilt from the checkpoint's
  hyper-parameters, as LightningCLI does, but the command line's own ``--model.init_args.*`` win over them
  (``predictions_dir``, ``method``, ``pretrained=false``); Lightning applied the checkpoint's over them.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from datamodules.atomic import atomic_path
from datamodules.errors import DataError, OptionError
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
    "lightning_modules.csasn_stage",
    "lightning_modules.transunet_stage",
    "lightning_modules.roi_stage",
    "datamodules.stacks",
    "datamodules.embeddings",
    "datamodules.paired_video",
    "datamodules.still_data",
)


def stage_name(model: LightningModule) -> str:
    """``ViTStage`` -> ``vit``; a module may set ``stage`` itself."""
    return getattr(model, "stage", None) or type(model).__name__.lower().removesuffix("stage")


# ---------------------------------------------------------------------------------------------- one-line errors
_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value")


def _tree(lines: list[tuple[int, str]]) -> list[tuple[str, list]]:
    """Indented lines -> nested ``(text, children)``."""
    out, i = [], 0
    while i < len(lines):
        indent, text = lines[i]
        j = i + 1
        while j < len(lines) and lines[j][0] > indent:
            j += 1
        out.append((text, _tree(lines[i + 1 : j])))
        i = j
    return out


def _innermost(nodes: list[tuple[str, list]], key: str) -> tuple[str, str]:
    """``(config key, problem)`` of the innermost real problem of a jsonargparse message tree: follows
    ``Parser key "x"`` and the ``class_path`` branch of a union, skips the ``Expected NoneType`` branches."""
    given = next((t.split(":", 1)[1].strip() for t, _ in nodes if t.startswith("Given value:")), None)
    expected = []
    for text, children in nodes:
        m = re.match(r'Parser key "([^"]+)":\s*(.*)', text)
        if m:
            sub = f"{key}.{m.group(1)}" if key else m.group(1)
            return (sub, m.group(2)) if m.group(2) else _innermost(children, sub)
        m = re.match(r"- Problem with given class_path '([^']+)':\s*(.*)", text)
        if m:
            sub = f"{key}.init_args" if key else "init_args"
            inner = m.group(2) or (children[0][0] if children and len(children) == 1 else "")
            if re.match(r"No module named|Import|.*has no attribute|.*not a subclass", inner):
                return f"{key}.class_path" if key else "class_path", f"{m.group(1)!r}: {inner}"
            return (sub, m.group(2)) if m.group(2) else _innermost(children, sub)
        if text.startswith("Errors:"):
            for t, ch in children:
                if t.startswith("- Problem with given class_path"):
                    return _innermost([(t, ch)], key)
            for t, ch in children:
                m = re.match(r"- Expected a <class '([^']+)'>", t)
                if m:
                    expected.append("null" if m.group(1) == "NoneType" else m.group(1))
                elif t.startswith("- "):  # an error raised while building the class
                    return key, " ".join([t[2:], *(c for c, _ in ch)])
    if expected:
        return key, f"expected {' or '.join(expected)}" + (f", got {given!r}" if given is not None else "")
    return key, " ".join(t for t in _flat(nodes) if not t.startswith(_NOISE))


def _flat(nodes: list[tuple[str, list]]) -> list[str]:
    return [x for t, ch in nodes for x in (t, *_flat(ch))]


def config_error(message: str) -> str:
    """A jsonargparse error message (nested, 5-20 lines) as one line: ``<config key>: <problem>``."""
    lines = [(len(x) - len(x.lstrip()), x.strip()) for x in message.splitlines() if x.strip()]
    try:
        key, problem = _innermost(_tree(lines), "")
    except Exception:  # an unforeseen layout: all of it, folded into one line
        key, problem = "", ""
    problem = re.sub(r"<class '([^']+)'>", r"\1", " ".join((problem or message).split()))
    return f"{key}: {problem}" if key and problem else problem


class OneLineParser(LightningArgumentParser):
    """LightningCLI's parser, but a config error (unknown key, wrong type, YAML syntax, a class that cannot be
    built) is one line on stderr and exit status 2; the usage is printed by ``--help`` only."""

    def error(self, message: str, ex: Exception | None = None):
        from jsonargparse._common import debug_mode_active  # JSONARGPARSE_DEBUG: jsonargparse's own error

        if not self.exit_on_error or debug_mode_active():
            return super().error(message, ex)
        sys.stderr.write(f"error: {config_error(message)} (see --help)\n")
        self.exit(2)


def _unwrap(e: BaseException, config: dict) -> DataError:
    """The one-line error behind an exception of jsonargparse's instantiation: a :class:`DataError` raised by a
    model or data module (an :class:`OptionError` gets its config key), else the innermost message."""
    text = str(e)
    where = "model" if "BaseStage" in text.split("Errors:")[0] else "data" if "DataModule" in text else ""
    seen = set()
    cause = e
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OptionError) and where:
            return DataError(f"{where}.init_args.{cause.path}", cause.problem)
        if isinstance(cause, DataError):
            return cause
        cause = cause.__cause__ or cause.__context__
    key, problem = _innermost(_tree([(len(x) - len(x.lstrip()), x.strip()) for x in text.splitlines()]), "")
    problem = " ".join((problem or text).split())
    return DataError(f"{where}.init_args" if where else None, problem)


# ---------------------------------------------------------------------------------------------- start-up output
class _Held(io.TextIOBase):
    """``sys.stderr`` while :class:`StartUp` holds it: text is kept in order with the held log records, and goes
    straight to the real stream once released (for whatever kept a reference to it meanwhile)."""

    def __init__(self, startup: StartUp, real) -> None:
        self.startup, self.real = startup, real

    def write(self, text: str) -> int:
        if self.startup.holding:
            self.startup.items.append(text)
        else:
            self.real.write(text)
        return len(text)

    def flush(self) -> None:
        if not self.startup.holding:
            self.real.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:  # C-level writers (subprocesses) use the real stream
        return self.real.fileno()

    @property
    def encoding(self):
        return getattr(self.real, "encoding", "utf-8")


class _HoldRecords(logging.Handler):
    def __init__(self, startup: StartUp) -> None:
        super().__init__()
        self.startup = startup

    def emit(self, record: logging.LogRecord) -> None:
        self.startup.items.append(record)


class StartUp:
    """What a fit prints and writes before its first batch, held until that batch: Lightning's info lines (its
    ``lightning.pytorch`` / ``lightning.fabric`` loggers), anything on ``sys.stderr`` (warnings, W&B, the
    ``resuming from`` / ``notice:`` lines), and the folders and resume stamp it creates.  :meth:`release` (the
    first batch, or the end of a run) prints what was held; :meth:`discard` (a one-line error before the first
    batch) drops it and removes what it created, so the error line is all that is left.  One per process; a
    spawned DDP process never holds anything."""

    LOGGERS = ("lightning.pytorch", "lightning.fabric")

    def __init__(self) -> None:
        self.holding = False
        self.pid = None
        self.items: list = []
        self.made: list[Path] = []

    def start(self) -> None:
        if self.holding:
            return
        self.holding, self.pid, self.items, self.made = True, os.getpid(), [], []
        self._stderr = sys.stderr
        sys.stderr = _Held(self, self._stderr)
        self._loggers = []
        for name in self.LOGGERS:
            log = logging.getLogger(name)
            self._loggers.append((log, log.handlers[:], log.propagate))
            log.handlers, log.propagate = [_HoldRecords(self)], False

    def made_dir(self, path: Path) -> None:
        """``mkdir -p path``, remembering the folders that did not exist (removed by :meth:`discard`)."""
        new = [p for p in (path, *path.parents) if not p.exists()]
        path.mkdir(parents=True, exist_ok=True)
        if self.holding:
            self.made.extend(reversed(new))  # in the order they were made

    def made_file(self, path: Path) -> None:
        if self.holding:
            self.made.append(path)

    def _stop(self) -> bool:
        if not self.holding or os.getpid() != self.pid:
            return False
        self.holding = False
        if sys.stderr.__class__ is _Held:
            sys.stderr = self._stderr
        for log, handlers, propagate in self._loggers:
            log.handlers, log.propagate = handlers, propagate
        return True

    def release(self) -> None:
        """Print what was held, in order (log records through the handlers Lightning's loggers had)."""
        if not self._stop():
            return
        for item in self.items:
            if isinstance(item, str):
                sys.stderr.write(item)
            else:
                logging.getLogger(item.name).handle(item)
        sys.stderr.flush()
        self.items, self.made = [], []

    def discard(self) -> None:
        """Drop what was held and remove the files and (empty) folders this start-up made."""
        if not self._stop():
            return
        for path in reversed(self.made):
            try:
                path.rmdir() if path.is_dir() else path.unlink()
            except OSError:  # a folder something else wrote into stays
                pass
        self.items, self.made = [], []


STARTUP = StartUp()


class ReleaseStartUp(Callback):
    """Prints what :data:`STARTUP` held once the first batch (of any loop) has run."""

    def _release(self, *args, **kwargs) -> None:
        STARTUP.release()

    on_train_batch_end = on_validation_batch_end = on_test_batch_end = on_predict_batch_end = _release


def check_trainer_settings(trainer_cfg: dict) -> None:
    """Trainer settings this machine cannot run, as one line before the Trainer is built: more CPU processes
    (``devices``) than CPU cores when there is no GPU (Lightning would start them all, each with its share of two
    cores, and fail or crawl minutes later).  A GPU asked for where there is none is refused by Lightning itself
    (``MisconfigurationException``, one line in :func:`main`)."""
    accelerator = trainer_cfg.get("accelerator") or "auto"
    devices = trainer_cfg.get("devices", "auto")
    if not isinstance(accelerator, str) or accelerator not in ("auto", "cpu"):
        return
    if accelerator == "auto":
        from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator, XLAAccelerator

        if any(a.is_available() for a in (CUDAAccelerator, MPSAccelerator, XLAAccelerator)):
            return
    n = devices if isinstance(devices, int) else int(devices) if str(devices).strip().isdigit() else None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if n is not None and n > cores:
        where = "no GPU is available" if accelerator == "auto" else "accelerator is cpu"
        raise DataError(
            "trainer.devices",
            f"{n} processes on CPU ({where}), but this machine has {cores} CPU cores: "
            f"set trainer.devices to at most {cores}, or run where the GPUs are",
        )


class UsnoduleCLI(LightningCLI):
    def instantiate_classes(self) -> None:
        """As LightningCLI's, with an error while building the model, data or trainer as one line, and a model
        built for another input size than the data's refused."""
        try:
            super().instantiate_classes()
        except DataError:
            raise
        except (ValueError, TypeError) as e:
            raise _unwrap(e, self.config) from None
        model_size = self.model.hparams.get("img_size") if hasattr(self.model, "hparams") else None
        data_hp = getattr(self.datamodule, "hparams", {}) or {}
        key = next((k for k in ("img_size", "size") if data_hp.get(k) is not None), None)
        if model_size is not None and key and data_hp[key] != model_size:
            raise DataError(
                f"data.init_args.{key}",
                f"{data_hp[key]} differs from model.init_args.img_size {model_size}: set both to the same size",
            )

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

    def parse_arguments(self, parser, args) -> None:
        argv = sys.argv[1:] if args is None else args
        self._argv = (
            [str(a) for a in argv] if isinstance(argv, list | tuple) else []
        )  # dict / Namespace: none
        super().parse_arguments(parser, args)
        STARTUP.start()  # the command line is good: hold Lightning's start-up lines (StartUp)

    def _parse_ckpt_path(self) -> None:
        """LightningCLI fills the model settings from a ``--ckpt_path`` checkpoint's hyper-parameters (so ``test``
        rebuilds the trained network), over the command line too: ``lightning test --ckpt_path X
        --model.init_args.predictions_dir=D`` wrote into the checkpoint's folder, ``pretrained=false`` kept its
        ``true``.  Here the command line's own ``--model.init_args.*`` arguments are applied again afterwards, so
        they win over the checkpoint (the YAML's values do not)."""
        super()._parse_ckpt_path()
        overrides = model_overrides(getattr(self, "_argv", []))
        sub = self.config.get("subcommand")
        if overrides and sub and self.config[sub].get("ckpt_path"):
            model = {"class_path": self.config[sub]["model"]["class_path"], "init_args": overrides}
            self.config = self.parser.parse_object({sub: {"model": model}}, self.config)

    def instantiate_trainer(self, **kwargs) -> Trainer:
        cfg = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer_cfg = cfg["trainer"]
        check_trainer_settings(trainer_cfg)
        if trainer_cfg.get("logger") in (None, True) and not trainer_cfg.get("fast_dev_run"):
            kwargs["logger"] = self._wandb_logger(trainer_cfg)
        callbacks = list(trainer_cfg.get("callbacks") or [])
        if not any(isinstance(c, RNGState) for c in callbacks):
            callbacks.append(RNGState())
        callbacks.append(ReleaseStartUp())
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
        STARTUP.made_dir(root)
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

    def _input_files(self) -> dict[str, list[int]]:
        """Identity (size, mtime_ns) of every input file the model and data settings name, by resolved path."""
        cfg = self._sub()
        return input_files(*(((cfg.get(k) or {}).get("init_args") or {}) for k in ("model", "data")))

    def _stamp(self) -> dict:
        return {"config": self._experiment_hash(), "inputs": self._input_files()}

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
        current = self._stamp()
        last = ckpt_dir / "last.ckpt"
        before = read_stamp(stamp) if last.is_file() else None
        if before == current:
            cfg["ckpt_path"] = str(last)
            print(f"resuming from {last}", file=sys.stderr)
            return
        if before is not None and before.get("config") == current["config"] and trainer.is_global_zero:
            changed = sorted(set(before.get("inputs", {}).items()) ^ set(current["inputs"].items()))
            what = changed[0][0] if changed else "an input file"
            print(
                f"notice: {what} changed since {last} was written: starting afresh, not resuming",
                file=sys.stderr,
            )
        if trainer.is_global_zero:
            if ckpt_dir.exists():  # another experiment's checkpoints: set aside, never resumed into
                shutil.rmtree(ckpt_dir)
            STARTUP.made_dir(ckpt_dir)
            stamp.write_text(json.dumps(current, sort_keys=True))
            STARTUP.made_file(stamp)
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


def input_files(*settings: dict) -> dict[str, tuple[int, int]]:
    """``{resolved path: (size, mtime_ns)}`` of every existing file named by a string in ``settings`` (nested
    dicts and lists too): the HDF5, metadata, splits, masks, embeddings, manifests and upstream checkpoints
    of a fit.  A Stanford HDF5 given without ``metadata`` brings the ``metadata.csv`` beside it.  Part of the
    resume stamp: a file rewritten at the same path (other data, a refit upstream stage) changes it."""
    found: dict[str, tuple[int, int]] = {}

    def visit(value) -> None:
        if hasattr(value, "as_dict"):  # jsonargparse's Namespace
            value = value.as_dict()
        if isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, list | tuple):
            for v in value:
                visit(v)
        elif isinstance(value, str | os.PathLike) and str(value) and len(str(value)) < 4096:
            try:
                path = Path(value)
                if path.is_file():
                    st = path.stat()
                    found[str(path.resolve())] = (st.st_size, st.st_mtime_ns)
            except (OSError, ValueError):  # not a path at all (an option value with odd characters)
                pass

    for s in settings:
        s = s.as_dict() if hasattr(s, "as_dict") else s
        visit(s)
        h5 = s.get("h5") if isinstance(s, dict) else None
        if h5 and s.get("metadata") is None:
            visit(str(Path(h5).with_name("metadata.csv")))
    return found


def read_stamp(path: Path) -> dict | None:
    """The resume stamp written by a fit in progress; None when there is none or it is of an older format (a
    plain config hash, which says nothing of the inputs: such a fit is not resumed)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    doc["inputs"] = {k: tuple(v) for k, v in (doc.get("inputs") or {}).items()}
    return doc


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


def model_overrides(argv: list[str]) -> dict:
    """``{key: value}`` (nested at dots) of the ``--model.init_args.<key>=<value>`` / ``--model.init_args.<key> <value>``
    arguments in ``argv``, values read as YAML (as jsonargparse reads them)."""
    import yaml

    out = {}
    prefix = "--model.init_args."
    for i, a in enumerate(argv):
        if not a.startswith(prefix):
            continue
        key, eq, value = a[len(prefix) :].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                continue
            value = argv[i + 1]
        *parents, leaf = key.split(".")  # backbone_args.channels -> {"backbone_args": {"channels": ...}}
        node = out
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = yaml.safe_load(value) if value != "" else None
    return out


def check_config_files(argv: list) -> None:
    """A config file named by ``-c``/``--config`` that is not valid YAML: one line naming the file, the line
    and the problem (jsonargparse's own message names neither the file nor, always, the line)."""
    import yaml

    argv = [str(a) for a in argv]
    for i, a in enumerate(argv):
        name = (
            a.split("=", 1)[1]
            if a.startswith("--config=")
            else argv[i + 1]
            if a in ("-c", "--config") and i + 1 < len(argv)
            else None
        )
        if name is None or not Path(name).is_file():
            continue
        try:
            yaml.safe_load(Path(name).read_text())
        except UnicodeDecodeError:
            raise DataError(name, "not a text file (a YAML config was expected)") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            what = getattr(e, "problem", None) or str(e)
            raise DataError(name, f"YAML syntax error at {where}{what}") from None


def main(args: ArgsType = None) -> None:
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, list | tuple) and any(
        a in ("-h", "--help") or str(a).split("=")[0].endswith(".help") for a in argv
    ):
        for name in STAGE_MODULES:
            importlib.import_module(name)
    try:
        if isinstance(argv, list | tuple):
            check_config_files(list(argv))
        UsnoduleCLI(
            BaseStage,
            BaseDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=WandbSaveConfig,  # config.yaml as before, and the resolved config into W&B
            save_config_kwargs={"overwrite": True},
            parser_class=OneLineParser,
            args=args,
        )
    except BaseException as e:
        line = error_line(e)
        if line is None:  # not a bad input: everything held is printed before the traceback
            STARTUP.release()
            raise
        STARTUP.discard()
        print(line, file=sys.stderr)
        raise SystemExit(2) from None
    STARTUP.release()


def error_line(e: BaseException) -> str | None:
    """The one ``error:`` line for an exception that a bad input causes, or None."""
    if isinstance(e, DataError):
        return f"error: {' '.join(str(e).split())}"
    if isinstance(
        e, MisconfigurationException
    ):  # a Trainer setting this machine cannot run (devices, precision)
        return f"error: trainer: {' '.join(str(e).split())}"
    if isinstance(e, OSError) and (e.filename is not None or e.errno is not None):
        reason = e.strerror or str(e)
        return f"error: {e.filename}: {reason}" if e.filename else f"error: {reason}"
    return None
