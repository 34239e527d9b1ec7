"""Step start-up: a pipeline step forked by the warm server (``stages.warm``) against the same step started cold.

The step is ``usnodule report --help`` through ``python -m stages.step``, as make runs every step: it imports
what every stage imports (torch, Lightning via the CLI modules) and does no work, so its wall time *is* the
start-up a CPU-size fit pays.  Both arms run the same commands back to back; the ratio cold/warm is the figure
(the server's own one-off import is reported beside it).

    python benchmarks/bench_warm.py [--runs 5]

Writes benchmarks/results/warm.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from datamodules.atomic import write_json
from stages.warm import ENV

ROOT = Path(__file__).resolve().parents[1]
USNODULE = Path(sys.executable).parent / "usnodule"


def _steps(n: int, env: dict[str, str], log: Path) -> list[float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "stages.step",
                "--name",
                "bench",
                "--log",
                str(log),
                "--",
                str(USNODULE),
                "report",
                "--help",
            ],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
        )
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    env = {k: v for k, v in os.environ.items() if k != ENV}
    with tempfile.TemporaryDirectory() as tmp:
        log, sock = Path(tmp) / "bench.log", str(Path(tmp) / "sock")
        cold = _steps(args.runs, env, log)
        t = time.perf_counter()
        server = subprocess.Popen(
            [sys.executable, "-m", "stages.warm", "--serve", sock],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        while not os.path.exists(sock):
            time.sleep(0.02)
        ready = time.perf_counter() - t
        try:
            warm = _steps(args.runs, {**env, ENV: sock}, log)
        finally:
            server.terminate()
            server.wait()
    med = statistics.median
    result = {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "runs": args.runs,
        "cold_s": cold,
        "warm_s": warm,
        "server_ready_s": ready,
        "median_cold_s": med(cold),
        "median_warm_s": med(warm),
        "ratio_cold_over_warm": med(cold) / med(warm),
    }
    out = ROOT / "benchmarks" / "results" / "warm.json"
    write_json(result, out)
    print(
        f"step start-up: cold {med(cold):.2f} s, warm {med(warm):.2f} s (x{med(cold) / med(warm):.0f}); "
        f"server ready in {ready:.1f} s"
    )


if __name__ == "__main__":
    main()
