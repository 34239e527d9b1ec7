"""``python -m stages.step``: run one pipeline step quietly -- its output to a log, one summary line to the terminal.

    python -m stages.step --name vit --fold 0 --log runs/demo/logs/vit_fold0.log -- lightning fit -c ...

The command's stdout and stderr are appended to ``--log`` (parent folders created; each run starts with a
``==== <time> <step>: <command>`` header).  When it ends:

- success: one aligned line, ``  vit           fold 0      41.2 s   val/loss 0.412``: step, fold (blank without
  ``--fold``), wall seconds, and the key metric -- the pairs of the last line ``RESULT <key>=<value> ...`` the
  command printed in this run;
- failure (on stderr): ``FAILED vit fold 0 (exit 2) -- last lines of <log>:`` and the last ``--tail`` lines of
  this run's output, and this process exits with the command's status (128 + N if a signal N killed it);
- Ctrl-C / SIGTERM / SIGHUP: the signal goes to the command's process group (a second one kills it), the log
  path is printed, and this process dies of the same signal once the command has ended.

The child runs in its own process group with stdin from /dev/null -- forked by the warm server of
:mod:`stages.warm` when ``USNODULE_WARM`` names one (no import cost), else a new process -- and with
``WANDB_SILENT=true`` and ``PYTHONUNBUFFERED=1`` unless set (quieter W&B; a crash log that ends where the crash
did).  Only the standard
library is imported here: this wraps every step, so it must start in a few tens of milliseconds.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

from stages.warm import ENV as WARM_ENV
from stages.warm import WarmChild

NAME_WIDTH = 16  # the longest step name, head_cine_trans, and a space
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def parse_result(lines) -> list[tuple[str, str]]:
    """``[(key, value), ...]`` of the last well-formed ``RESULT k=v [k=v ...]`` line, ``[]`` if none."""
    found: list[tuple[str, str]] = []
    for line in lines:
        words = line.split()
        if len(words) < 2 or words[0] != "RESULT":
            continue
        pairs = [w.partition("=") for w in words[1:]]
        if all(sep and key and value for key, sep, value in pairs):
            found = [(key, value) for key, _, value in pairs]
    return found


def fmt_value(text: str) -> str:
    """Integers as they are, other numbers to 4 significant digits, anything else unchanged."""
    try:
        int(text)
        return text
    except ValueError:
        pass
    try:
        return f"{float(text):.4g}"
    except ValueError:
        return text


def summary(name: str, fold: str | None, seconds: float, result: list[tuple[str, str]]) -> str:
    """The one success line: name, fold column (blank without a fold), seconds, metric pairs."""
    fold_col = f"fold {fold}" if fold is not None else ""
    metric = "  ".join(f"{k} {fmt_value(v)}" for k, v in result)
    return f"  {name:<{NAME_WIDTH}}{fold_col:<8}{seconds:8.1f} s   {metric}".rstrip()


def label(name: str, fold: str | None) -> str:
    return name if fold is None else f"{name} fold {fold}"


def _run_lines(log: Path, offset: int) -> list[str]:
    """This run's part of the log (from byte ``offset``), as text lines."""
    with open(log, "rb") as f:
        f.seek(offset)
        return f.read().decode("utf-8", "replace").splitlines()


def _tail(lines: list[str], n: int) -> list[str]:
    return list(deque(lines, maxlen=n)) if n > 0 else []


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("WANDB_SILENT", "true")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _start(cmd: list[str], log) -> subprocess.Popen | WarmChild:
    """The step's process: forked by the warm server when one runs (``stages.warm``), else a subprocess."""
    env = _child_env()
    server = os.environ.get(WARM_ENV)
    if server:
        with open(os.devnull, "rb") as null:
            child = WarmChild.start(server, cmd, env, (null.fileno(), log.fileno(), log.fileno()))
        if child is not None:
            return child
    return subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, process_group=0
    )


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _signame(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return str(num)


def run_step(
    cmd: list[str], *, name: str, log: Path, fold: str | None = None, tail: int = 20, out=None, err=None
) -> int:
    """Run ``cmd`` as described in the module docstring; returns the exit status to exit with (negative: this
    step was interrupted by that signal).  The success line goes to ``out``, failures to ``err``."""
    out, err = out or sys.stdout, err or sys.stderr
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    received: list[int] = []
    with open(log, "ab") as f:
        offset = f.tell()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        f.write(f"==== {stamp} {label(name, fold)}: {shlex.join(cmd)}\n".encode())
        f.flush()
        start = time.monotonic()
        child: subprocess.Popen | WarmChild | None = None

        def forward(signum, _frame) -> None:
            received.append(signum)
            if child is not None:  # first signal: pass it on; a second one: kill the whole group
                _killpg(child.pid, signum if len(received) == 1 else signal.SIGKILL)

        previous = {s: signal.signal(s, forward) for s in FORWARDED}
        try:
            try:
                child = _start(cmd, f)
            except OSError as e:
                f.write(f"cannot start: {e}\n".encode())
                code = 127 if isinstance(e, FileNotFoundError) else 126
            else:
                if received:  # a signal came while it was starting
                    _killpg(child.pid, received[0])
                code = child.wait()  # a handled signal does not interrupt the wait (PEP 475)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        seconds = time.monotonic() - start
        f.write(f"==== exit {code} after {seconds:.1f} s\n".encode())
    if received:
        print(
            f"INTERRUPTED {label(name, fold)} ({_signame(received[0])}) -- log: {log}", file=err, flush=True
        )
        return -received[0]
    lines = _run_lines(log, offset)
    if code == 0:
        print(summary(name, fold, seconds, parse_result(lines)), file=out, flush=True)
        return 0
    why = f"signal {_signame(-code)}" if code < 0 else f"exit {code}"
    body = _tail(lines[:-1], tail)  # without the closing "==== exit" line
    print(f"FAILED {label(name, fold)} ({why}) -- last lines of {log}:", file=err)
    for line in body:
        print(f"  | {line}", file=err)
    err.flush()
    return code if code > 0 else 128 - code


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--" not in argv:
        print(
            "usage: python -m stages.step --name NAME [--fold K] --log FILE [--tail N] -- COMMAND...",
            file=sys.stderr,
        )
        raise SystemExit(2)
    cut = argv.index("--")
    p = argparse.ArgumentParser(
        prog="python -m stages.step",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--name", required=True, help="step name shown in the summary line")
    p.add_argument("--fold", default=None, help="fold shown in the summary line (none: no fold column)")
    p.add_argument("--log", type=Path, required=True, help="log file the command's output is appended to")
    p.add_argument("--tail", type=int, default=20, help="log lines shown when the command fails (default 20)")
    args = p.parse_args(argv[:cut])
    cmd = argv[cut + 1 :]
    if not cmd:
        p.error("no command after --")
    code = run_step(cmd, name=args.name, log=args.log, fold=args.fold, tail=args.tail)
    if code < 0:  # interrupted: die of the same signal, so make (or a shell) sees an interrupted child
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        code = 128 - code
    raise SystemExit(code)


if __name__ == "__main__":
    main()
