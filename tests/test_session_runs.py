"""`corral run --session`: the lease through the CLI, over every backend."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from conftest import CorralCLI


def test_runs_on_one_session_take_turns_in_arrival_order(corral: CorralCLI, tmp_path: Path) -> None:
    agent = corral.agent()
    log = tmp_path / "log"
    procs = []
    for i in range(8):
        script = f'echo "start {i} $(date +%s.%N)" >> {log}; sleep 0.2; echo "end {i} $(date +%s.%N)" >> {log}'
        procs.append(corral.popen("run", "--session", "shared", agent, "--", "sh", "-c", script,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(0.05)  # distinct arrivals
    for p in procs:
        assert p.wait(timeout=60) == 0
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
