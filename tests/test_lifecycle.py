"""No work outlives its owner: owner death, supervisor death, signals, timeouts, crashes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

from conftest import CORRAL as CORRAL_ARGV, CorralCLI, alive, kill_pids

# Every process it starts appends its pid to $M: setsid, double fork, nohup, and main.
# --isolation none: the payload reports its own pids, which a PID namespace would renumber
HOST_PIDS = ("--isolation", "none")
SPAWNER = ('setsid sleep 1000 & echo $! >> "$M"; (sleep 1001 & echo $! >> "$M"); '
           'nohup sleep 1002 >/dev/null 2>&1 & echo $! >> "$M"; echo $$ >> "$M"; sleep 1003')


def _pids(marker: Path, n: int, corral: CorralCLI) -> list[int]:
    corral.wait_for(lambda: marker.exists() and len(marker.read_text().split()) >= n, what=f"{n} pids")
    return [int(x) for x in marker.read_text().split()]


def _gone_within(corral: CorralCLI, pids: list[int], seconds: float) -> float:
    t0 = time.monotonic()
    try:
        corral.wait_for(lambda: not alive(pids), timeout=seconds, what=f"all of {pids} gone")
    finally:
        kill_pids(alive(pids))
    return time.monotonic() - t0


def test_owner_sigkill_tears_down_the_run_20_trials(corral: CorralCLI, tmp_path: Path) -> None:
    agent = corral.agent()
    worst = 0.0
    for trial in range(20):
        marker = tmp_path / f"m{trial}"
        corral.env["M"] = str(marker)
        owner = corral.popen("run", *HOST_PIDS, agent, "--", "sh", "-c", SPAWNER, stdout=subprocess.DEVNULL)
        pids = _pids(marker, 4, corral)
        owner.kill()
        owner.wait()
        worst = max(worst, _gone_within(corral, pids, 2.0))
    print(f"worst teardown after owner SIGKILL: {worst * 1000:.0f} ms")
    assert all(r["state"] == "lost" for r in corral.json("ps", "--all", "--json") if r["agent"] == agent)


def test_watchdog_sigkill_tears_down_the_run(corral: CorralCLI, tmp_path: Path) -> None:
    agent = corral.agent()
    marker = tmp_path / "m"
    corral.env["M"] = str(marker)
    owner = corral.popen("run", *HOST_PIDS, agent, "--", "sh", "-c", SPAWNER, stdout=subprocess.DEVNULL)
    pids = _pids(marker, 4, corral)
    (run,) = corral.json("ps", "--json")
    info = corral.show(run["id"])
    (watchdog,) = [p["pid"] for p in info["processes"] if "corral-watchdog" in p["argv"]]
    os.kill(watchdog, signal.SIGKILL)
    assert _gone_within(corral, pids, 2.0) <= 2.0
    assert owner.wait(timeout=10) == 128 + 9
    rec = corral.show(run["id"])
    assert rec["state"] == "killed" and rec["ended_by"] == "lost-supervisor"


def test_detached_owner_sigkill_tears_down_the_run(corral: CorralCLI, tmp_path: Path) -> None:
    agent = corral.agent()
    marker = tmp_path / "m"
    corral.env["M"] = str(marker)
    run_id = corral.detach(agent, "sh", "-c", SPAWNER, opts=HOST_PIDS)
    pids = _pids(marker, 4, corral)
    owner = corral.show(run_id)["owner_pid"]  # the shared owner, or one forked for this run
    os.kill(owner, signal.SIGKILL)
    assert _gone_within(corral, pids, 2.0) <= 2.0
    corral.wait_for(lambda: corral.show(run_id)["state"] == "lost", what="state lost")


def test_detached_timeout_ends_everything_with_124(corral: CorralCLI, tmp_path: Path) -> None:
    agent = corral.agent()
    marker = tmp_path / "m"
    corral.env["M"] = str(marker)
    t0 = time.monotonic()
    run_id = corral.detach(agent, "sh", "-c", SPAWNER.replace("sleep 1003", "sleep 100"), opts=("--timeout", "2s", *HOST_PIDS))
    pids = _pids(marker, 4, corral)
    assert corral("wait", run_id, timeout=30).returncode == 124
    assert alive(pids) == []
    assert time.monotonic() - t0 < 3.0 + 1.0  # 2 s deadline, teardown, plus CLI start-up
    assert corral.show(run_id)["state"] == "timeout"


def test_sigterm_reaches_the_command(corral: CorralCLI) -> None:
    agent = corral.agent()
    owner = corral.popen("run", agent, "--", "sleep", "1000")
    corral.wait_for(lambda: corral.json("ps", "--json"), what="run up")
    owner.send_signal(signal.SIGTERM)
    assert owner.wait(timeout=10) == 128 + signal.SIGTERM
    (rec,) = [r for r in corral.json("ps", "--all", "--json") if r["agent"] == agent]
    assert rec["signal"] == signal.SIGTERM and rec["state"] == "killed"


def test_a_command_ignoring_sigterm_is_killed_after_grace(corral: CorralCLI) -> None:
    agent = corral.agent()
    owner = corral.popen("run", "--grace", "1", agent, "--", "sh", "-c", "trap '' TERM HUP; sleep 1000 & wait; wait")
    corral.wait_for(lambda: [r for r in corral.json("ps", "--json") if r["pids"] == 2], what="run up")
    t0 = time.monotonic()
    owner.send_signal(signal.SIGHUP)
    assert owner.wait(timeout=10) == 128 + 9
    assert 0.9 <= time.monotonic() - t0 < 5
    assert not corral.scopes_of(agent)


def test_keep_leftovers_lets_them_finish(corral: CorralCLI, tmp_path: Path) -> None:
    agent = corral.agent()
    done = tmp_path / "done"
    run_id = corral.detach(agent, "sh", "-c", f"(sleep 1; echo late > {done}) & echo main-exits",
                           opts=("--keep-leftovers",))
    corral.wait_for(lambda: corral.show(run_id)["state"] == "draining", what="draining")
    assert corral("wait", run_id, timeout=30).returncode == 0
    assert done.read_text().strip() == "late"
    rec = corral.show(run_id)
    assert rec["state"] == "exited" and rec["leftovers_killed"] == 0


def test_crash_at_random_points_leaves_no_ghost(corral: CorralCLI) -> None:
    agent = corral.agent()
    rng = random.Random(43367)
    for trial in range(50):
        args = ["run", *(["--detach"] if trial % 2 else []), agent, "--", "sh", "-c", "sleep 1000 & sleep 1001"]
        proc = corral.popen(*args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0, 0.25))
        proc.kill()
        proc.wait()
    time.sleep(0.5)  # let watchdogs finish what they started
    runs = [r for r in corral.json("ps", "--all", "--json") if r["agent"] == agent]
    scopes = {p.name.split("-")[-1].split(".")[0]: p for p in corral.scopes_of(agent)}
    populated = {rid for rid, p in scopes.items() if "populated 1" in (p / "cgroup.events").read_text()}
    live = {r["id"] for r in runs if r["state"] in ("starting", "running", "paused", "draining")}
    assert live == populated, "ps --all agrees with the cgroups: live exactly where populated"
    report = corral.json("gc", "--json")
    detached_live = {r["id"] for r in runs if r["detached"] and r["id"] in populated}
    left = {p.name.split("-")[-1].split(".")[0]: p for p in corral.scopes_of(agent)}
    extra = {rid: ((p / "cgroup.events").read_text().split("\n")[0], corral.show(rid)) for rid, p in left.items()
             if rid not in detached_live}
    assert not extra, f"after gc only detached runs with their owner remain: {extra}"
    assert {r["id"] for r in report["reaped"]} <= populated
    corral("kill", agent)
    assert not corral.scopes_of(agent)


def test_ctrl_c_reaches_the_command_once(corral: CorralCLI, tmp_path: Path) -> None:
    """A real terminal: Ctrl-C is delivered by the tty to the foreground group; corral must
    not deliver it a second time, and the command's own exit status comes back."""
    import pty

    agent = corral.agent()
    count = tmp_path / "ints"
    script = (f"n=0; trap 'n=$((n+1)); echo $n > {count}' INT; echo ready; "
              "while [ $n -eq 0 ]; do sleep 0.05; done; sleep 0.5; exit $((40 + n))")
    pid, fd = pty.fork()
    if pid == 0:
        os.execvpe(CORRAL_ARGV[0], [*CORRAL_ARGV, "run", agent, "--", "sh", "-c", script], corral.env)
    out = b""
    deadline = time.monotonic() + 20
    while b"ready" not in out and time.monotonic() < deadline:
        out += os.read(fd, 1024)
    os.write(fd, b"\x03")  # the terminal turns this into SIGINT for the foreground group
    while True:
        try:
            chunk = os.read(fd, 1024)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 41, out
    assert count.read_text().strip() == "1", "SIGINT reached the command exactly once"
