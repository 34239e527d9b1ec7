import subprocess
import sys

import pytest

from stages.cli import COMMANDS, main


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert f"usage: usnodule {command}" in capsys.readouterr().out


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(c in out for c in COMMANDS)


def test_entry_points_return_none(tmp_path):
    from stages.fit import main as fit_main

    assert (
        main(
            [
                "synth",
                "--out",
                str(tmp_path / "s"),
                "--nodules",
                "6",
                "--frames",
                "6",
                "--size",
                "32",
                "--cases",
                "4",
                "--prevalence",
                "0.5",
            ]
        )
        is None
    )
    assert (
        fit_main(
            [
                "fit",
                "--model=tests.toy.ToyStage",
                "--data=tests.toy.ToyData",
                "--trainer.logger=false",
                "--trainer.max_epochs=1",
                f"--trainer.default_root_dir={tmp_path}",
            ]
        )
        is None
    )


def test_python_m_stages_is_the_same_cli():
    out = subprocess.run(
        [sys.executable, "-m", "stages", "split", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "usage: usnodule split" in out
