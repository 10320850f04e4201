"""Latency of `corral agents add` under N-way contention (issue 4's closing note).

    python bench/config_contention.py [--procs 64] [--rounds 3]

Two numbers per round:

- *end to end*: N ``corral agents add laneK`` processes started at once, each timed from
  Popen to exit (interpreter start and imports included: on 2 cores that dominates);
- *in process*: N processes that have already imported corral wait at a start line, then
  each runs the same command through ``corral.cli.main.main`` and times only that call; the
  time it spent waiting for the config lock is reported too (from corral's debug log).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CORRAL = [sys.executable, "-m", "corral.cli.main"]

START = "# bench config\n[corral]  # budget\nmemory_max = \"64G\"\n"

_CHILD = r"""
import logging, re, sys, time
from corral.cli.main import main
waits = []
class Grab(logging.Handler):
    def emit(self, record):
        m = re.search(r"acquired after ([0-9.]+) ms", record.getMessage())
        if m:
            waits.append(float(m.group(1)))
log = logging.getLogger("corral"); log.setLevel(logging.DEBUG); log.addHandler(Grab())
sys.stdin.read()
t0 = time.perf_counter()
try:
    main(["agents", "add", sys.argv[1], "--memory-max", "1G"])
except SystemExit as e:
    code = e.code
print(f"{(time.perf_counter() - t0) * 1e3:.3f} {waits[0] if waits else -1:.3f} {code}", file=sys.stderr)
"""


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def fresh_env(root: Path) -> dict[str, str]:
    (root / "config" / "corral").mkdir(parents=True)
    (root / "config" / "corral" / "config.toml").write_text(START)
    return dict(os.environ, XDG_CONFIG_HOME=str(root / "config"), XDG_STATE_HOME=str(root / "state"),
                PYTHONDONTWRITEBYTECODE="1")


def end_to_end(procs: int, root: Path) -> list[float]:
    env = fresh_env(root)
    started = []
    for n in range(procs):
        started.append((time.perf_counter(), subprocess.Popen([*CORRAL, "agents", "add", f"lane{n}", "--memory-max",
                                                                "1G"], env=env, stdout=subprocess.DEVNULL)))
    out = []
    for t0, p in started:
        assert p.wait() == 0
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def in_process(procs: int, root: Path) -> tuple[list[float], list[float]]:
    env = fresh_env(root)
    children = [subprocess.Popen([sys.executable, "-c", _CHILD, f"lane{n}"], env=env, stdin=subprocess.PIPE,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for n in range(procs)]
    time.sleep(max(2.0, procs * 0.06))  # every child imported and waiting at the start line
    for c in children:
        assert c.stdin is not None
        c.stdin.close()
    total, waits = [], []
    for c in children:
        c.wait()
        assert c.stderr is not None
        ms, wait, code = c.stderr.read().split()[-3:]
        assert code in ("0", "None"), code
        total.append(float(ms))
        waits.append(float(wait))
    return total, waits


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--procs", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rows = []
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            e2e = end_to_end(args.procs, Path(a))
            total, waits = in_process(args.procs, Path(b))
        rows.append({"round": r, "e2e_p50": pct(e2e, .5), "e2e_p99": pct(e2e, .99),
                     "call_p50": pct(total, .5), "call_p99": pct(total, .99),
                     "lock_wait_p50": pct(waits, .5), "lock_wait_p99": pct(waits, .99),
                     "held_mean": statistics.mean(t - w for t, w in zip(total, waits))})
    print(f"| {args.procs}-way `corral agents add` | p50 | p99 |")
    print("|---|---|---|")
    for key, label in (("e2e", "process start to exit"), ("call", "in process (cli.main call)"),
                       ("lock_wait", "of which waiting for the lock")):
        p50 = statistics.median(row[f"{key}_p50"] for row in rows)
        p99 = statistics.median(row[f"{key}_p99"] for row in rows)
        print(f"| {label} | {p50:.0f} ms | {p99:.0f} ms |")
    print(json.dumps(rows), file=sys.stderr)


if __name__ == "__main__":
    main()
