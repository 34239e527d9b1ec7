"""Where `make demo`'s wall time goes (issue 14 item 5), from the step logs of one run.

Every demo step writes ``runs/<exp>/logs/<step>[_fold<k>].log`` with a start line (``==== <date> <time> ...``)
and an end line (``==== exit 0 after <s> s``); point it at the logs of one run (a fresh ``EXP``: reruns append). This prints, per stage, the steps, their summed and min-max
seconds, and the run's shape: wall time from the first start to the last end, the summed step seconds
(what two cores share), and the seconds during which only one step ran (a core idle).

    .venv/bin/python benchmarks/demo_time.py runs/demo/logs [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import re
from datetime import datetime
from pathlib import Path

START = re.compile(r"^==== (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) ")
END = re.compile(r"^==== exit \d+ after ([\d.]+) s")
FOLD = re.compile(r"_fold\d+$")


def read_steps(logs: Path) -> list[dict]:
    """Every (start, end) pair of every log: a log appended to by a rerun holds several."""
    steps = []
    for path in sorted(logs.glob("*.log")):
        start = None
        for line in path.read_text(errors="replace").splitlines():
            if m := START.match(line):
                start = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp()
            elif (m := END.match(line)) and start is not None:
                stage = FOLD.sub("", path.stem)
                steps.append({"step": path.stem, "stage": stage, "start": start, "s": float(m.group(1))})
                start = None
    return steps


def summarise(steps: list[dict]) -> dict:
    t0 = min(s["start"] for s in steps)
    spans = [(s["start"] - t0, s["start"] - t0 + s["s"]) for s in steps]
    wall = max(e for _, e in spans)
    # seconds covered by exactly one running step (1 s grid: the logs' start times have 1 s resolution)
    busy = [sum(a <= t < b for a, b in spans) for t in range(int(wall) + 1)]
    stages: dict[str, list[float]] = {}
    for s in steps:
        stages.setdefault(s["stage"], []).append(s["s"])
    return {
        "wall_s": round(wall, 1),
        "step_s": round(sum(s["s"] for s in steps), 1),
        "one_step_running_s": sum(n == 1 for n in busy),
        "steps": len(steps),
        "stages": {
            k: {"steps": len(v), "sum_s": round(sum(v), 1), "min_s": min(v), "max_s": max(v)}
            for k, v in sorted(stages.items(), key=lambda kv: -sum(kv[1]))
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", type=Path)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    out = summarise(read_steps(a.logs))
    print("| stage | steps | seconds (sum) | per step |\n| --- | --- | --- | --- |")
    for name, v in out["stages"].items():
        print(f"| {name} | {v['steps']} | {v['sum_s']:.0f} | {v['min_s']:.1f}-{v['max_s']:.1f} |")
    print(
        f"\nwall {out['wall_s']:.0f} s from the first step's start to the last one's end; steps sum to "
        f"{out['step_s']:.0f} s ({out['step_s'] / out['wall_s']:.2f} running at once on average); "
        f"{out['one_step_running_s']} s with a single step running"
    )
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
