"""``python -m stages.step``: one line per finished step, the command's output in a log, failures loud.

Each test runs the runner as make does (a subprocess) on a tiny Python child; no torch in the child.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from stages.step import parse_result, summary

ROOT = Path(__file__).resolve().parents[1]


def _step(tmp: Path, code: str, *opts: str, name: str = "vit") -> tuple[subprocess.CompletedProcess, Path]:
    log = tmp / "logs" / "step.log"  # parent folder does not exist yet: the runner creates it
    cmd = [
        sys.executable,
        "-m",
        "stages.step",
        "--name",
        name,
        "--log",
        str(log),
        *opts,
        "--",
        sys.executable,
        "-c",
        code,
    ]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60), log


def test_success_prints_one_line_with_the_last_result(tmp_path):
    code = (
        "import sys\nprint('chatty tip')\nprint('a warning', file=sys.stderr)\n"
        "print('RESULT val/loss=9')\nprint('RESULT val/auroc=0.81234567 epochs=3')\nprint('RESULT broken')"
    )
    r, log = _step(tmp_path, code, "--fold", "0")
    assert r.returncode == 0 and r.stderr == ""
    lines = r.stdout.splitlines()
    assert len(lines) == 1
    words = lines[0].split()
    assert words[:3] == ["vit", "fold", "0"] and words[4] == "s"
    assert words[5:] == ["val/auroc", "0.8123", "epochs", "3"]  # last well-formed RESULT line, 4 digits
    text = log.read_text()
    assert "chatty tip" in text and "a warning" in text and "RESULT val/auroc=0.81234567" in text
    assert "chatty tip" not in r.stdout


def test_no_fold_column_without_a_fold_and_no_metric_without_result(tmp_path):
    r, _ = _step(tmp_path, "print('hello')", name="report")
    assert r.returncode == 0
    line = r.stdout.rstrip("\n")
    assert "fold" not in line and line.split()[0] == "report" and line.endswith(" s")


def test_result_is_taken_from_this_run_only(tmp_path):
    _step(tmp_path, "print('RESULT cases=30')")
    r, log = _step(tmp_path, "print('second run')")
    assert "cases" not in r.stdout
    text = log.read_text()
    assert text.count("==== ") == 4 and "RESULT cases=30" in text and "second run" in text  # appended


def test_failure_prints_the_tail_and_log_path_and_keeps_the_exit_code(tmp_path):
    code = "import sys\nfor i in range(30): print(f'line {i}')\nprint('boom', file=sys.stderr)\nsys.exit(3)"
    r, log = _step(tmp_path, code, "--fold", "2")
    assert r.returncode == 3
    assert r.stdout == ""
    head, *tail = r.stderr.splitlines()
    assert head == f"FAILED vit fold 2 (exit 3) -- last lines of {log}:"
    assert len(tail) == 20 and tail[-1].endswith("boom") and tail[0].endswith("line 11")
    assert "line 10" not in r.stderr


def test_a_missing_command_fails_with_127(tmp_path):
    log = tmp_path / "x.log"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.step",
            "--name",
            "data",
            "--log",
            str(log),
            "--",
            str(tmp_path / "no-such-program"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        r.returncode == 127 and r.stderr.startswith("FAILED data (exit 127)") and "cannot start" in r.stderr
    )


@pytest.mark.skipif(os.name != "posix", reason="process groups and signals")
def test_ctrl_c_reaches_the_command_and_the_runner_exits_interrupted(tmp_path):
    log, pid_file = tmp_path / "logs" / "long.log", tmp_path / "child.pid"
    code = (
        f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "try:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n    print('child got SIGINT')\n    raise"
    )
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stages.step",
            "--name",
            "vit",
            "--fold",
            "1",
            "--log",
            str(log),
            "--",
            sys.executable,
            "-c",
            code,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)  # only the runner: the child is in its own process group
    out, err = p.communicate(timeout=30)
    assert p.returncode == -signal.SIGINT  # died of SIGINT, as make expects of an interrupted child
    assert f"INTERRUPTED vit fold 1 (SIGINT) -- log: {log}" in err
    assert "child got SIGINT" in log.read_text()
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


def test_child_env_is_quiet_unless_set(tmp_path):
    code = "import os; print('RESULT silent=' + os.environ['WANDB_SILENT'] + ' unbuf=' + os.environ['PYTHONUNBUFFERED'])"
    r, _ = _step(tmp_path, code)
    assert r.stdout.split()[-4:] == ["silent", "true", "unbuf", "1"]


def test_the_runner_imports_only_the_standard_library():
    code = (
        "import sys, stages.step\n"
        "heavy = {m.split('.')[0] for m in sys.modules} & {'torch', 'lightning', 'numpy', 'wandb', 'rich'}\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_parse_and_format():
    assert parse_result(["RESULT a=1", "noise", "RESULT b=0.5 c=x", "RESULT d", "  RESULT e=2"]) == [
        ("e", "2")
    ]
    assert parse_result(["RESULTS a=1", "RESULT =1"]) == []
    line = summary("head_vit_self", "4", 3.04, [("val/loss", "0.123456"), ("n", "12")])
    assert line.split() == ["head_vit_self", "fold", "4", "3.0", "s", "val/loss", "0.1235", "n", "12"]
    # the seconds column lines up with or without a fold
    assert summary("data", None, 1.0, []).index(" s") == summary("vit", "0", 1.0, []).index(" s")


def test_fit_result_line_is_the_monitored_best():
    from stages.fit import result_line

    def trainer(cb, metrics=None):
        return SimpleNamespace(checkpoint_callback=cb, callback_metrics=metrics or {}, logged_metrics={})

    best = SimpleNamespace(monitor="val/loss", best_model_score=0.25)
    assert result_line(trainer(best)) == "RESULT val/loss=0.25"
    unscored = SimpleNamespace(monitor="val/dice", best_model_score=None)
    assert result_line(trainer(unscored, {"val/dice": 0.5})) == "RESULT val/dice=0.5"
    assert result_line(trainer(unscored)) is None
    assert result_line(trainer(SimpleNamespace(monitor=None, best_model_score=None))) is None
    assert result_line(trainer(None)) is None


@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")
def test_makefile_runs_steps_through_the_runner_unless_verbose(tmp_path):
    from tests.test_makefile import _bump, _dry, _tree

    v = _tree(tmp_path)
    _bump(tmp_path / "conf" / "head.yaml")
    (cmd,) = _dry("train-head", v)
    assert (
        f"-m stages.step --log {tmp_path}/runs/logs/head_stact_fold0.log --name head_stact --fold 0 -- "
        in cmd
    )
    (cmd,) = _dry("train-head", {**v, "VERBOSE": 1})
    assert "stages.step" not in cmd and "fit -c" in cmd
