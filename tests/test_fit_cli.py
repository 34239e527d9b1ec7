import pytest
import torch

from stages.fit import main, stage_name
from tests.toy import ToyStage

BASE = [
    "--model=tests.toy.ToyStage",
    "--data=tests.toy.ToyData",
    "--trainer.accelerator=cpu",
    "--trainer.enable_model_summary=false",
    "--seed_everything=7",
    "--trainer.logger=false",
]


def _fit(root, *extra):
    main(["fit", *BASE, f"--trainer.default_root_dir={root}", *extra])


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def test_ckpt_out_is_the_best_checkpoint(tmp_path):
    out = tmp_path / "out" / "toy.ckpt"
    _fit(tmp_path / "run", "--trainer.max_epochs=2", f"--ckpt_out={out}")
    ckpt = torch.load(out, map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 1 and "net.0.weight" in ckpt["state_dict"]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert not list(out.parent.glob(".*partial*"))


def test_killed_fit_resumes_to_the_same_weights(tmp_path):
    _fit(tmp_path / "straight", "--trainer.max_epochs=4", f"--ckpt_out={tmp_path / 'a.ckpt'}")
    with pytest.raises(RuntimeError, match="simulated kill"):
        _fit(
            tmp_path / "killed",
            "--trainer.max_epochs=4",
            "--trainer.callbacks+=tests.toy.Crash",
            "--trainer.callbacks.init_args.at_epoch=2",
            f"--ckpt_out={tmp_path / 'b.ckpt'}",
        )
    assert not (tmp_path / "b.ckpt").exists()  # a killed fit leaves no output checkpoint
    last = torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["epoch"] == 1
    _fit(tmp_path / "killed", "--trainer.max_epochs=4", f"--ckpt_out={tmp_path / 'b.ckpt'}")
    a, b = _weights(tmp_path / "a.ckpt"), _weights(tmp_path / "b.ckpt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.load(tmp_path / "b.ckpt", weights_only=False)["epoch"] == 3


def test_changed_config_or_finished_fit_starts_afresh(tmp_path, capsys):
    with pytest.raises(RuntimeError):
        _fit(
            tmp_path / "r",
            "--trainer.max_epochs=3",
            "--trainer.callbacks+=tests.toy.Crash",
            "--trainer.callbacks.init_args.at_epoch=1",
        )
    _fit(tmp_path / "r", "--trainer.max_epochs=3", "--model.init_args.hidden=16")  # another experiment
    assert "resuming" not in capsys.readouterr().err
    assert _weights(tmp_path / "r" / "checkpoints" / "last.ckpt")["net.0.weight"].shape[0] == 16
    _fit(tmp_path / "r", "--trainer.max_epochs=3", "--model.init_args.hidden=16")  # finished: rerun is fresh
    assert "resuming" not in capsys.readouterr().err


def test_stage_name():
    assert stage_name(ToyStage()) == "toy"


def test_wandb_offline_run_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    import wandb

    wandb.teardown()  # the settings singleton keeps the first run's mode (conftest: disabled) until torn down
    main(
        [
            "fit",
            *BASE[:-1],
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_epochs=1",
            "--exp=unit",
            "--data.fold=3",
        ]
    )
    wandb.finish()  # in-process fits leave the run open; the next WandbLogger would reuse it
    wandb.teardown()  # and its settings singleton keeps offline mode for later tests (they would write runs)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert (runs[0] / "files" / "config.yaml").is_file() or list(runs[0].glob("*.wandb"))
