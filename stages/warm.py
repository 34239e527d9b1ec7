"""``python -m stages.warm -- make ...``: run a command with a warm Python beside it, so each step starts in ms.

Every step of the chain is its own ``lightning fit`` / ``usnodule`` process, and on a CPU-size run importing
torch + Lightning (~10 s on the 2-core VM, `BENCHMARKS.md` "Warm start") costs more than most steps compute.
This module starts a server that imports them once and, for each step :mod:`stages.step` hands it, forks a
child that runs the step's console script with the step's argv, environment, working directory and
stdin/stdout/stderr (the file descriptors travel over a Unix socket).  The steps stay separate processes with
separate logs, exit codes and process groups; only the import is shared.  ``USNODULE_WARM`` names the socket.

Protocol, one connection per step: the client sends ``{"argv", "cwd", "env"}`` as JSON with its fds 0, 1, 2
(``SCM_RIGHTS``); the server forks a *handler*, which forks the *worker* (own process group), replies
``pid <worker pid>``, waits for it and replies ``exit <n>`` or ``signal <n>`` -- a real wait status, so a
worker killed by a signal reads as such.  The client forwards signals to the worker's process group.

Only console scripts of the server's interpreter go through it (``#!`` line naming ``sys.executable``:
``.venv/bin/lightning``, ``.venv/bin/usnodule``); anything else, a client whose ``PYTHONPATH`` differs, a
server not (yet) listening, runs as a normal subprocess -- the warm path is an optimisation, never required.

Choices, where a fork is not a fresh process:
- the server imports with ``OMP_NUM_THREADS`` (OpenBLAS, MKL) set to 1 and runs no torch op: a thread pool does
  not survive ``fork``; it logs its thread count after preloading.  The worker sets torch's thread count from
  the step's ``OMP_NUM_THREADS`` (unset: one per CPU it may use); NumPy's BLAS stays single-threaded;
- the worker reseeds ``random`` and NumPy's global generator from the OS (a fresh process would; torch's
  default generator has a fixed seed in any fresh process, so it is left alone);
- the worker makes ``sys.stdout``/``sys.stderr`` line-buffered (write-through with ``PYTHONUNBUFFERED``) and
  runs the ``atexit`` handlers before it exits, as an interpreter would;
- modules are imported when the server starts: code edited while it runs is not seen (it lives for one make).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENV = "USNODULE_WARM"
# What every step imports; a module that fails to import is skipped (logged), the step then imports it itself.
# ``pkg.*``: the package and every module in it.
PRELOAD = (
    "torch",
    "lightning.pytorch",
    "lightning.pytorch.cli",
    "timm",
    "h5py",
    "sklearn.metrics",
    "stages.*",
    "lightning_modules.*",
    "datamodules.*",
)
_MAX_REQUEST = 1 << 20
_POOL_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


# ---------------------------------------------------------------------------------------------- client
def warm_script(argv: list[str], interpreter: str) -> bool:
    """Whether ``argv[0]`` is a console script of ``interpreter`` (its first line is ``#!<interpreter>``)."""
    try:
        with open(argv[0], "rb") as f:
            first = f.readline(4096)
    except OSError:
        return False
    words = first[2:].decode(errors="replace").split() if first.startswith(b"#!") else []
    return len(words) == 1 and os.path.realpath(words[0]) == os.path.realpath(interpreter)


class WarmChild:
    """A step run by the warm server: ``pid`` (its process group too) and ``wait()`` like ``Popen``'s."""

    def __init__(self, conn: socket.socket, reply, pid: int):
        self._conn, self._file, self.pid, self.returncode = conn, reply, pid, None

    @classmethod
    def start(
        cls, path: str, argv: list[str], env: dict[str, str], fds: tuple[int, int, int]
    ) -> WarmChild | None:
        """Hand ``argv`` to the server at ``path``; ``None`` when there is no server or it does not take it."""
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(path)
            reply = conn.makefile("rb")
            hello = json.loads(reply.readline())
            if not warm_script(argv, hello["python"]) or env.get("PYTHONPATH") != hello["pythonpath"]:
                conn.close()
                return None
            request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": env}).encode()
            socket.send_fds(conn, [request], list(fds))
            conn.shutdown(socket.SHUT_WR)
            words = reply.readline().split()
        except (OSError, ValueError, KeyError):
            conn.close()
            return None
        if len(words) != 2 or words[0] != b"pid":
            conn.close()
            return None
        return cls(conn, reply, int(words[1]))

    def wait(self) -> int:
        """The worker's status: its exit code, or ``-N`` when signal N killed it (as ``Popen.returncode``)."""
        if self.returncode is None:
            words = self._file.readline().split()
            self._file.close()
            self._conn.close()
            if len(words) == 2 and words[0] in (b"exit", b"signal"):
                self.returncode = int(words[1]) * (1 if words[0] == b"exit" else -1)
            else:  # the handler died: nothing to report, so say so loudly
                self.returncode = -int(signal.SIGKILL)
        return self.returncode


# ---------------------------------------------------------------------------------------------- server
def _log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} warm[{os.getpid()}]: {msg}", file=sys.stderr, flush=True)


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return -1


def _run_worker(request: dict) -> int:
    """In the worker: become the step (env, cwd, argv, fds already in place) and run its console script."""
    import atexit
    import random
    import runpy

    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True, write_through=unbuffered)
    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if "torch" in sys.modules:  # the server imported torch single-threaded; give the step what it asked for
        sys.modules["torch"].set_num_threads(
            int(threads) if threads.isdigit() and int(threads) > 0 else len(os.sched_getaffinity(0))
        )
    sys.argv = list(request["argv"])
    code = 0
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 -- report it as the interpreter would, then exit 1
        import traceback

        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return code


def _handle(conn: socket.socket) -> None:
    """In the handler (a fork of the server): read the request, fork the worker, report its pid and status."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    msg, fds, _, _ = socket.recv_fds(conn, _MAX_REQUEST, 3)
    if len(fds) != 3:
        return
    while chunk := conn.recv(_MAX_REQUEST):  # the client closes its side after the request
        msg += chunk
    request = json.loads(msg.decode())
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            conn.close()
            os.setpgid(0, 0)
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
                os.close(fd)
            code = _run_worker(request)
        finally:
            os._exit(code & 0xFF)
    for fd in fds:
        os.close(fd)
    try:
        os.setpgid(pid, pid)
    except OSError:  # the worker already did (or already exec'd/exited)
        pass
    conn.sendall(f"pid {pid}\n".encode())
    _, status = os.waitpid(pid, 0)
    reply = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}"
    try:
        conn.sendall(f"{reply}\n".encode())
    except OSError:  # the client went away
        pass


def _expand(names: tuple[str, ...]) -> list[str]:
    """``pkg.*`` -> ``pkg`` and its modules (found without importing them); other names as they are."""
    import importlib.util
    import pkgutil

    out = []
    for name in names:
        if not name.endswith(".*"):
            out.append(name)
            continue
        pkg = name[:-2]
        spec = importlib.util.find_spec(pkg)
        out.append(pkg)
        if spec and spec.submodule_search_locations:
            out += [
                f"{pkg}.{m.name}"
                for m in pkgutil.iter_modules(spec.submodule_search_locations)
                if m.name not in ("__main__", "warm", "step")
            ]
    return out


def serve(path: str, preload: tuple[str, ...] = PRELOAD) -> None:
    """Import ``preload``, then serve steps on the Unix socket ``path`` until SIGTERM."""
    import gc
    import importlib

    start = time.monotonic()
    for var in _POOL_VARS:  # no thread pools in the server: they would not survive the fork (see _run_worker)
        os.environ[var] = "1"
    names = _expand(preload)
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 -- a step that needs it will import it and fail loudly itself
            _log(f"preload {name} failed: {e!r}")
    gc.collect()
    gc.freeze()  # the imported objects stay shared: no refcount-free pass dirties their pages in each fork
    _log(f"imported {len(names)} modules in {time.monotonic() - start:.1f} s; {_threads()} thread(s)")
    hello = (
        json.dumps({"python": sys.executable, "pythonpath": os.environ.get("PYTHONPATH")}).encode() + b"\n"
    )
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # handlers are reaped by the kernel
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = f"{path}.{os.getpid()}"
    server.bind(tmp)
    server.listen(64)
    os.replace(tmp, path)  # clients see a socket only once it listens
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        while True:
            conn, _ = server.accept()
            if os.fork() == 0:
                code = 0
                try:
                    server.close()
                    conn.sendall(hello)
                    _handle(conn)
                except BaseException:  # noqa: BLE001
                    import traceback

                    traceback.print_exc()
                    code = 1
                finally:
                    os._exit(code)
            conn.close()
    finally:
        server.close()


# ---------------------------------------------------------------------------------------------- wrapper
def run_with_server(
    cmd: list[str], log: Path | None = None, ready_timeout: float = 0.0, preload: tuple[str, ...] = PRELOAD
) -> int:
    """Start a server, run ``cmd`` with ``USNODULE_WARM`` naming it, stop the server; ``cmd``'s exit status.

    Steps that start before the server listens run cold; ``ready_timeout`` > 0 waits up to that long first.
    """
    folder = tempfile.mkdtemp(prefix="usnodule-warm-")
    path = os.path.join(folder, "sock")
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 -- closed below
    server = subprocess.Popen(
        [sys.executable, "-m", "stages.warm", "--serve", path, "--preload", ",".join(preload)],
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
        process_group=0,
    )
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline and not os.path.exists(path) and server.poll() is None:
        time.sleep(0.05)
    previous = signal.getsignal(signal.SIGINT)
    try:
        child = subprocess.Popen(cmd, env={**os.environ, ENV: path})
        signal.signal(
            signal.SIGINT, signal.SIG_IGN
        )  # Ctrl-C reaches cmd (same process group); clean up after it
        return child.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        if log:
            out.close()
        for name in os.listdir(folder):
            os.unlink(os.path.join(folder, name))
        os.rmdir(folder)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m stages.warm",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--log", type=Path, help="the server's own log (what it imported, in how long)")
    p.add_argument(
        "--wait", type=float, default=0.0, help="wait up to this many seconds for the server first"
    )
    p.add_argument(
        "--preload", default=",".join(PRELOAD), help="modules to import (pkg.* = with its modules)"
    )
    p.add_argument("--serve", metavar="SOCKET", help=argparse.SUPPRESS)  # the server itself
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:cut])
    preload = tuple(n for n in args.preload.split(",") if n)
    if args.serve:
        serve(args.serve, preload)
        return
    cmd = argv[cut + 1 :]
    if not cmd:
        p.error("no command after --")
    if args.log:
        args.log.parent.mkdir(parents=True, exist_ok=True)
    code = run_with_server(cmd, args.log, args.wait, preload)
    if code < 0:
        print(f"warm: {shlex.join(cmd)} died of signal {-code}", file=sys.stderr)
        code = 128 - code
    raise SystemExit(code)


if __name__ == "__main__":
    main()
