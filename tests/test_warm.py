"""``stages.warm``: steps forked by a warm server behave as the fresh processes they replace.

The server here preloads only ``decimal`` and ``numpy`` (seconds, not torch's ten); each step is a tiny console
script of this interpreter run through ``python -m stages.step`` exactly as make runs it.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages.warm import ENV, warm_script

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(os.name != "posix", reason="fork, Unix sockets and process groups")


def _script(tmp: Path, body: str, name: str = "tool") -> Path:
    """A console script of this interpreter, as pip writes them into .venv/bin."""
    path = tmp / name
    path.write_text(f"#!{sys.executable}\nimport os, sys\n{body}\n")
    path.chmod(0o755)
    return path


def _sigint_default() -> None:
    """A shell without job control starts background jobs with SIGINT ignored, and children inherit that (a
    CI run launched with `&`): Ctrl-C must reach these processes as it does from a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("warm")
    sock = str(folder / "sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "stages.warm", "--serve", sock, "--preload", "decimal,numpy"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        process_group=0,
        preexec_fn=_sigint_default,
    )
    deadline = time.monotonic() + 60
    while not os.path.exists(sock) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.path.exists(sock), proc.stdout.read() if proc.poll() is not None else "server did not start"
    yield sock
    proc.terminate()
    proc.wait(10)


def _step(tmp: Path, cmd: list[str], sock: str | None, name: str = "t", **env: str):
    log = tmp / "logs" / f"{name}.log"
    full_env = {**os.environ, **env}
    full_env.pop(ENV, None)
    if sock:
        full_env[ENV] = sock
    r = subprocess.run(
        [sys.executable, "-m", "stages.step", "--name", name, "--log", str(log), "--", *map(str, cmd)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=full_env,
    )
    return r, log


def test_a_step_runs_forked_with_its_own_argv_env_cwd_and_exit_code(server, tmp_path):
    tool = _script(
        tmp_path,
        "print('warm', 'decimal' in sys.modules, os.getpgid(0) == os.getpid())\n"
        "print('argv', sys.argv[1:], 'cwd', os.getcwd(), 'env', os.environ.get('HUE'))\n"
        "print('RESULT n=7')\nsys.exit(int(sys.argv[1]))",
    )
    r, log = _step(tmp_path, [tool, "0", "b c"], server, HUE="blue")
    assert r.returncode == 0 and r.stdout.split()[-2:] == ["n", "7"]
    text = log.read_text()
    assert "warm True True" in text  # preloaded module present; own process group
    assert f"argv ['0', 'b c'] cwd {ROOT} env blue" in text
    r, log = _step(tmp_path, [tool, "3"], server, name="fails")
    assert r.returncode == 3 and r.stderr.startswith("FAILED fails (exit 3)")


def test_without_a_server_or_for_other_programs_steps_run_cold(server, tmp_path):
    tool = _script(tmp_path, "print('warm', 'decimal' in sys.modules)")
    r, log = _step(tmp_path, [tool], str(tmp_path / "no-such-socket"))
    assert r.returncode == 0 and "warm False" in log.read_text()
    r, log = _step(tmp_path, ["sh", "-c", "echo shell $$"], server, name="sh")
    assert r.returncode == 0 and "shell" in log.read_text()
    other = tmp_path / "other"  # a script of another interpreter is not forked from this one
    other.write_text("#!/bin/sh\necho other\n")
    other.chmod(0o755)
    assert not warm_script([str(other)], sys.executable)
    assert warm_script([str(_script(tmp_path, "pass", "mine"))], sys.executable)


def test_exceptions_and_signals_read_as_in_a_fresh_process(server, tmp_path):
    boom = _script(tmp_path, "raise RuntimeError('boom')", "boom")
    r, log = _step(tmp_path, [boom], server, name="boom")
    assert r.returncode == 1 and "RuntimeError: boom" in log.read_text()
    killed = _script(tmp_path, "import signal; os.kill(os.getpid(), signal.SIGKILL)", "killed")
    r, _ = _step(tmp_path, [killed], server, name="killed")
    assert r.returncode == 128 + signal.SIGKILL and "(signal SIGKILL)" in r.stderr


def test_each_step_draws_fresh_random_numbers(server, tmp_path):
    draw = _script(
        tmp_path, "import random, numpy\nprint('RESULT r=%s n=%s' % (random.random(), numpy.random.random()))"
    )
    lines = [_step(tmp_path, [draw], server, name=f"d{i}")[0].stdout.split() for i in range(2)]
    assert lines[0][-3] != lines[1][-3] and lines[0][-1] != lines[1][-1]


def test_ctrl_c_reaches_a_warm_step(server, tmp_path):
    pid_file, log = tmp_path / "child.pid", tmp_path / "logs" / "long.log"
    tool = _script(
        tmp_path,
        f"import time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "try:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n    print('child got SIGINT')\n"
        "    raise",
        "long",
    )
    p = subprocess.Popen(
        [sys.executable, "-m", "stages.step", "--name", "long", "--log", str(log), "--", str(tool)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, ENV: server},
        preexec_fn=_sigint_default,
    )
    deadline = time.monotonic() + 120
    while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == -signal.SIGINT and "INTERRUPTED long (SIGINT)" in err
    assert "child got SIGINT" in log.read_text()
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


def test_the_wrapper_passes_the_exit_status_and_leaves_nothing_behind(tmp_path):
    out = tmp_path / "sock.txt"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.warm",
            "--preload",
            "decimal",
            "--wait",
            "30",
            "--",
            "sh",
            "-c",
            f'echo "${ENV}" > {out}; test -S "${ENV}" && exit 4',
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 4  # the socket was listening while the command ran
    sock = Path(out.read_text().strip())
    assert not sock.parent.exists()  # server stopped, socket and its folder removed
