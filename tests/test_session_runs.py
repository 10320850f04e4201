"""`corral run --session`: the lease through the CLI, over every backend."""

from __future__ import annotations

import os
import re
import select
import subprocess
import time
from pathlib import Path

from conftest import CorralCLI


def _wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 30) -> None:
    """Read the process's stderr until *needle* shows (corral says 'waiting' once queued)."""
    deadline = time.monotonic() + timeout
    seen = b""
    while needle.encode() not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {needle!r} from corral: {seen!r}"
        ready, _, _ = select.select([proc.stderr], [], [], left)
        if ready:
            chunk = os.read(proc.stderr.fileno(), 4096)
            assert chunk, f"corral exited before {needle!r}: {seen!r}"
            seen += chunk


def test_runs_on_one_session_take_turns_in_arrival_order(corral: CorralCLI, tmp_path: Path) -> None:
    agent = corral.agent()
    log = tmp_path / "log"
    go = tmp_path / "go"
    procs = []
    for i in range(8):
        hold = f"while [ ! -e {go} ]; do sleep 0.02; done; " if i == 0 else "sleep 0.1; "
        script = f'echo "start {i} $(date +%s.%N)" >> {log}; {hold}echo "end {i} $(date +%s.%N)" >> {log}'
        proc = corral.popen("run", "--session", "shared", agent, "--", "sh", "-c", script,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(proc)
        if i == 0:
            corral.wait_for(lambda: log.exists(), what="first holder running")
        else:
            _wait_for_line(proc, "waiting")  # queued: its arrival is now fixed
    go.touch()
    for p in procs:
        assert p.wait(timeout=60) == 0
        p.stderr.close()
    events = [line.split() for line in log.read_text().splitlines()]
    kinds = [(kind, int(i)) for kind, i, _t in events]
    # strictly one at a time: start i, end i, start j, end j, ...
    assert all(kinds[k][0] == "start" and kinds[k + 1] == ("end", kinds[k][1]) for k in range(0, 16, 2)), kinds
    assert [i for kind, i in kinds if kind == "start"] == list(range(8)), "arrival order"


def test_busy_session_with_zero_timeout_exits_75_naming_the_holder(corral: CorralCLI) -> None:
    agent = corral.agent()
    holder = corral.detach(agent, "sleep", "1000", opts=("--session", "k1"))
    t0 = time.monotonic()
    proc = corral("run", "--session", "k1", "--lock-timeout", "0", agent, "--", "true")
    assert proc.returncode == 75
    assert time.monotonic() - t0 < 5
    assert holder in proc.stderr and f"corral stop {holder}" in proc.stderr
    # other sessions never contend
    assert corral("run", "--session", "k2", "--lock-timeout", "0", agent, "--", "true").returncode == 0
    corral("kill", holder, check=True)
    assert corral("run", "--session", "k1", "--lock-timeout", "0", agent, "--", "true").returncode == 0


def test_lease_waits_for_the_previous_runs_leftovers(corral: CorralCLI, tmp_path: Path) -> None:
    agent = corral.agent()
    # keep-leftovers: the run's main ends, its setsid child lives on for ~1.5 s in the run's cgroup
    first = corral.detach(agent, "sh", "-c", "setsid sleep 1.5 & exit 0", opts=("--session", "s", "--keep-leftovers"))
    corral.wait_for(lambda: corral.show(first)["state"] == "draining", what="draining")
    sessions = corral.json("sessions", "list", "--json")
    (mine,) = [s for s in sessions if s["agent"] == agent]
    assert mine["state"] in ("held", "draining")
    t0 = time.monotonic()
    proc = corral("run", "--session", "s", agent, "--", "true", timeout=30)
    waited = time.monotonic() - t0
    assert proc.returncode == 0
    assert waited > 0.8, "not granted while the previous run's child was alive"
    assert corral.show(first)["state"] == "exited"


def test_a_lease_wait_shows_progress_on_a_terminal(corral: CorralCLI) -> None:
    """On a terminal the wait is one line redrawn in place with the time waited, then a
    line saying how long it took; piped, the line comes once (no redraws in a log)."""
    import pty

    agent = corral.agent()
    holder = corral.detach(agent, "sleep", "3", opts=("--session", "k"))
    master, slave = pty.openpty()
    try:
        proc = corral.popen("run", "--session", "k", agent, "--", "true", stdin=slave, stdout=slave, stderr=slave)
        os.close(slave)
        screen = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the last writer closed the pty
                break
            if not chunk:
                break
            screen += chunk
        assert proc.wait(timeout=30) == 0
    finally:
        os.close(master)
    text = screen.decode(errors="replace")
    assert "\r\x1b[Kcorral: waiting 0s: " in text and holder in text, text
    assert "\r\x1b[Kcorral: waiting 2s: " in text, "redrawn as the seconds pass"
    assert re.search(r"\r\x1b\[Kcorral: waited [23]s: ", text), text
    # piped: once, no escapes
    holder = corral.detach(agent, "sleep", "1", opts=("--session", "k"))
    piped = corral("run", "--session", "k", agent, "--", "true", timeout=30)
    assert piped.returncode == 0
    assert piped.stderr.count("corral: waiting: ") == 1 and "\x1b" not in piped.stderr, piped.stderr
