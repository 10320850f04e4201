"""What a fork server for detached owners would save (issue 16, item 4): an experiment,
not a feature. Run: ``.venv/bin/python bench/owner_memory.py [N ...]``.

A parent imports the owner's modules once (``gc.freeze()``: the collector then leaves
their pages alone), then forks N children. Each child does what a detached owner does
between events: a log pump thread reading a pipe into a rotating log file
(``corral.runs.output``), and a poll loop that reads /proc and serialises a record. After
a few seconds every process's PSS and private dirty memory is read from
/proc/PID/smaps_rollup; "per run" charges each child its own PSS plus 1/N of the
parent's, which is what N runs would cost corral.
"""

from __future__ import annotations

import gc
import json
import os
import select
import sys
import tempfile
import time
from pathlib import Path

gc.disable()
import corral.linux.cgroup  # noqa: E402,F401 - the owner's modules, loaded once in the parent
import corral.linux.procs  # noqa: E402,F401
import corral.records  # noqa: E402,F401
import corral.runs.detach  # noqa: E402,F401
import corral.runs.meter  # noqa: E402,F401
import corral.runs.output  # noqa: E402,F401
import corral.runs.supervise  # noqa: E402,F401

gc.freeze()


def rollup(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2] == "kB":
            out[parts[0].rstrip(":")] = int(parts[1])
    return out


def child(read_fd: int, log_dir: str, *, pump_thread: bool) -> None:
    from corral.runs.output import LogFile, OutputPump

    log = LogFile(Path(log_dir) / f"{os.getpid()}.log", 1 << 20)
    pump = OutputPump({read_fd: "stdout"}, log, None)
    if pump_thread:
        pump.start()
    record = {"id": "x" * 12, "agent": "lane1", "argv": ["sleep", "1000"], "env": {}}
    t0 = time.monotonic()
    while time.monotonic() - t0 < 4:
        select.select([], [], [], 0.2)
        json.dumps(record)
        Path("/proc/self/stat").read_text()
    time.sleep(60)
    os._exit(0)


def measure(n: int, *, pump_thread: bool) -> tuple[float, float, float]:
    """(per run PSS, child private dirty, parent PSS), MiB."""
    with tempfile.TemporaryDirectory() as log_dir:
        kids = []
        for _ in range(n):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(w)
                child(r, log_dir, pump_thread=pump_thread)
            os.close(r)
            kids.append((pid, w))
        for _, w in kids:
            os.write(w, b"a line of output\n" * 100)
        time.sleep(5)
        parent = rollup(os.getpid())
        rolls = [rollup(pid) for pid, _ in kids]
        for pid, w in kids:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            os.close(w)
    total = parent["Pss"] + sum(r["Pss"] for r in rolls)
    private = sum(r["Private_Dirty"] for r in rolls) / n
    return total / n / 1024, private / 1024, parent["Pss"] / 1024


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [10, 40]
    print("| runs | log pump | per run PSS, MiB | a child's private dirty, MiB | the parent's PSS, MiB |")
    print("|---|---|---|---|---|")
    for n in sizes:
        for thread in (True, False):
            per_run, private, parent = measure(n, pump_thread=thread)
            print(f"| {n} | {'thread' if thread else 'none'} | {per_run:.2f} | {private:.2f} | {parent:.2f} |")


if __name__ == "__main__":
    main()
