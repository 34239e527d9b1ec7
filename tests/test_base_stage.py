"""BaseStage / BaseDataModule: the one reload path, and LightningCLI's subclass-mode bases."""

from __future__ import annotations

import re

import pytest
import torch

from datamodules.errors import DataError
from lightning_modules.base import BaseStage
from lightning_modules.head_stage import HeadStage
from lightning_modules.maskcnn_stage import MaskCNNStage

STAGES = (
    "lightning_modules.vit_stage.ViTStage",
    "lightning_modules.seg_stage.SegStage",
    "lightning_modules.maskcnn_stage.MaskCNNStage",
    "lightning_modules.head_stage.HeadStage",
    "lightning_modules.asycmst.AsyCMST",
)
DATA = (
    "datamodules.stacks.StackDataModule",
    "datamodules.stacks.FrameDataModule",
    "datamodules.embeddings.EmbeddingDataModule",
    "datamodules.paired_video.PairedVideoDataModule",
)


def _known(text: str, base: str) -> list[str]:
    """The "known subclasses" jsonargparse lists for the ``base`` argument in ``--help``."""
    flat = " ".join(text.split())
    pattern = (
        rf"any subclass of {base}\. \(type: Optional\[{base}\], default: null, "
        r"known subclasses: ([^)]*)\)"
    )
    m = re.search(pattern, flat)
    assert m, f"no subclass list for {base}"
    return [s.strip() for s in m.group(1).split(",")]


def test_fit_help_lists_the_project_stages_only(capsys):
    from stages.fit import main

    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    models, data = _known(out, "BaseStage"), _known(out, "BaseDataModule")
    assert set(STAGES) <= set(models) and set(DATA) <= set(data)
    project = ("lightning_modules.", "datamodules.", "tests.")  # tests.toy once a test imported it
    assert all(c.startswith(project) for c in models + data), models + data


def test_from_checkpoint_returns_model_and_data_settings(tmp_path):
    model = MaskCNNStage(channels=(4, 8))
    path = tmp_path / "m.ckpt"
    hparams = {**model.hparams, "_class_path": "lightning_modules.maskcnn_stage.MaskCNNStage"}
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": hparams,
            "datamodule_hyper_parameters": {"img_size": 16, "buffer": 3},
        },
        path,
    )
    for cls in (MaskCNNStage, BaseStage):  # BaseStage: the class LightningCLI recorded
        again, data = cls.from_checkpoint(path)
        assert type(again) is MaskCNNStage and not again.training
        assert data == {"img_size": 16, "buffer": 3}
        torch.testing.assert_close(again.state_dict(), model.state_dict())
    # a checkpoint of another stage, and a missing file: one line each
    with pytest.raises(DataError, match="not a HeadStage checkpoint") as e:
        HeadStage.from_checkpoint(path)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="checkpoint not found"):
        HeadStage.from_checkpoint(tmp_path / "missing.ckpt")
