"""corral top: frames for scripts (--once, -n, --json) and the full-screen view in a real
terminal (tmux), against real runs on every backend."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import CORRAL, CorralCLI
from corral.linux.cgroup import CgroupDir, parse_pressure
from corral.runs.top import SORT_KEYS, Point, RunRow, sort_rows, sparkline

BUSY = ("sh", "-c", "while :; do :; done")
# 200 MiB, each page written: untouched zeros would be no memory at all
BIG = ("python3", "-c", ("b = bytearray(200 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\n"
                         "import time; time.sleep(1000)"))


def top_json(corral: CorralCLI, *args: str) -> list[dict[str, Any]]:
    out = corral("top", "--json", *args, check=True).stdout
    return [json.loads(line) for line in out.splitlines()]


def by_id(frame: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in frame["runs"]}


# --- frames for scripts ------------------------------------------------------------------------


def test_once_json_busy_idle_paused(corral: CorralCLI) -> None:
    a = corral.agent()
    busy = corral.detach(a, *BUSY)
    idle = corral.detach(a, "sleep", "1000")
    paused = corral.detach(a, "sleep", "1000")
    corral("pause", paused, check=True)
    [frame] = top_json(corral, "--once", "-d", "1s")
    runs = by_id(frame)
    assert {busy, idle, paused} <= set(runs), frame
    assert frame["interval"] >= 0.9  # two samples a delay apart: a real delta
    # A spinning shell: its share depends on what else the machine runs (a loaded 2-CPU
    # host gave it 11%), so no absolute bar beyond "clearly busy", and the highest.
    cpu = {rid: runs[rid]["cpu_percent"] for rid in (busy, idle, paused)}
    assert cpu[busy] > 3 and cpu[busy] > 3 * max(cpu[idle], cpu[paused]), cpu
    assert cpu[busy] == max(r["cpu_percent"] for r in runs.values())
    assert runs[paused]["state"] == "paused" and runs[idle]["state"] == "running"
    for r in runs.values():
        assert r["agent"] == a and r["pids"] >= 1 and r["argv"]
        assert r["memory_source"] in ("cgroup", "pss", "rss") and r["memory_bytes"] > 0
        assert set(r["pressure"]) == {"cpu", "memory", "io"}
        assert r["age_seconds"] >= 0
    assert frame["host"]["cpus"] >= 1 and frame["host"]["memory_available"] > 0
    # sorted by CPU (the default): the busy run first
    assert frame["runs"][0]["id"] == busy

    text = corral("top", "--once", "-d", "0.2", check=True).stdout
    for rid in (busy, idle, paused):
        assert rid in text
    assert text.splitlines()[0].startswith("corral top ")
    assert text.splitlines()[1].split()[:5] == ["ID", "AGENT", "STATE", "PIDS", "CPU%"]


def test_iterations_sort_and_agent_filter(corral: CorralCLI) -> None:
    a, b = corral.agent(), corral.agent()
    ra = corral.detach(a, "sleep", "1000")
    rb = corral.detach(b, *BIG)
    corral.wait_for(lambda: (by_id(top_json(corral, "--once", "-d", "0.2")[0]).get(rb) or {})
                    .get("memory_bytes", 0) > 150 << 20, timeout=30, what="the big run's memory")

    frames = top_json(corral, "-n", "2", "-d", "0.3")
    assert len(frames) == 2
    assert all({ra, rb} <= set(by_id(f)) for f in frames)
    t0, t1 = (time.mktime(time.strptime(f["time"][:19], "%Y-%m-%dT%H:%M:%S")) for f in frames)
    assert t1 >= t0

    [mem] = top_json(corral, "--once", "-d", "0.2", "--sort", "mem", "--agent", a, "--agent", b)
    assert [r["id"] for r in mem["runs"]] == [rb, ra]
    [agent] = top_json(corral, "--once", "-d", "0.2", "--sort", "agent", "--agent", a, "--agent", b)
    assert [r["agent"] for r in agent["runs"]] == sorted([a, b])

    [only] = top_json(corral, "--once", "-d", "0.2", "--agent", a)
    assert [r["id"] for r in only["runs"]] == [ra]

    bad = corral("top", "--once", "--sort", "size")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    for args in (("--agent", "no-dash"), ("-d", "0.01"), ("-n", "0"), ("--once", "-n", "3"), ("-d", "soon")):
        got = corral("top", *args)
        assert got.returncode == 2, (args, got.stderr)
        assert "Traceback" not in got.stderr


def test_piped_without_once_is_one_frame(corral: CorralCLI) -> None:
    """A script piping `corral top` gets one frame and an exit, never a hang."""
    a = corral.agent()
    rid = corral.detach(a, "sleep", "1000")
    got = corral("top", "-d", "0.2", timeout=30)
    assert got.returncode == 0, got.stderr
    assert rid in got.stdout and got.stdout.count("corral top ") == 1
    got = corral("top", "--json", "-d", "0.2", timeout=30)
    assert len(got.stdout.splitlines()) == 1 and rid in by_id(json.loads(got.stdout))


def test_head_closes_the_pipe(corral: CorralCLI) -> None:
    proc = subprocess.run(f"{shlex.join([*CORRAL, 'top', '-n', '50', '-d', '0.1', '--json'])} | head -n 1",
                          shell=True, env=corral.env, capture_output=True, text=True, timeout=60, check=False)
    assert len(proc.stdout.splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr


# --- pieces ------------------------------------------------------------------------------------


def test_pressure_files() -> None:
    got = parse_pressure("some avg10=1.50 avg60=0.25 avg300=0.00 total=12\nfull avg10=0.00 avg60=0.00 "
                         "avg300=0.00 total=0\n")
    assert got["some"]["avg10"] == 1.5 and got["full"]["total"] == 0
    assert CgroupDir(Path("/nonexistent/cgroup")).pressure("cpu") is None


def test_sparkline_and_sort() -> None:
    pts = [Point(t, cpu, mem) for t, cpu, mem in ((0.0, 0.0, 10), (30.0, 50.0, 20), (59.0, 100.0, 40))]
    line = sparkline(pts, "cpu", now=59.5, width=6)  # 10 s a cell
    assert line == "\u2581  \u2585 \u2588", line
    assert sparkline(pts, "cpu", now=60.5, width=6)[0] == " "  # more than a minute old: gone
    ascii_line = sparkline(pts, "mem", now=59.5, width=6, blocks="_.-:=+*#")
    assert ascii_line.isascii() and ascii_line[-1] == "#"
    assert sparkline([], "cpu", now=1.0, width=4) == "    " and sparkline(pts, "cpu", now=1.0, width=0) == ""

    def row(rid: str, cpu: float | None, mem: int | None, age: float) -> RunRow:
        return RunRow(id=rid, agent="z" + rid, state="running", unit="", pids=1, cpu_percent=cpu, cpu_usec=None,
                      memory_bytes=mem, memory_source="pss", pressure={}, started_at=None, age=age, argv=())

    rows = [row("a", None, 5, 1), row("b", 10.0, None, 3), row("c", 20.0, 1, 2)]
    assert [r.id for r in sort_rows(rows, "cpu")] == ["c", "b", "a"]  # unknown last
    assert [r.id for r in sort_rows(rows, "mem")] == ["a", "c", "b"]
    assert [r.id for r in sort_rows(rows, "age")] == ["b", "c", "a"]  # oldest first
    from corral.cli.top import SORT_KEYS as CLI_KEYS

    assert CLI_KEYS == SORT_KEYS


def test_ps_does_not_import_top() -> None:
    """corral ps pays nothing for top: neither curses nor the sampler is imported."""
    code = ("import sys, corral.cli.main\n"
            "sys.argv = ['corral', 'ps', '--help']\n"
            "try:\n    corral.cli.main.main()\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m in ('curses', '_curses', 'corral.runs.top', 'corral.cli.top_screen')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


# --- the full-screen view, in a real terminal --------------------------------------------------


class Tmux:
    """A tmux server of our own (-L: its own socket, never the user's default server)."""

    def __init__(self) -> None:
        self.name = f"corral-top-{uuid.uuid4().hex[:8]}"

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["tmux", "-L", self.name, "-f", "/dev/null", *args], capture_output=True, text=True,
                              timeout=30, check=False)

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "top").stdout

    def wait(self, corral: CorralCLI, predicate: Callable[[str], bool], what: str) -> str:
        """The screen, once *predicate* holds for it (polled; generous timeout)."""
        seen: list[str] = []

        def check() -> bool:
            seen[:] = [self.screen()]
            return predicate(seen[0])

        try:
            corral.wait_for(check, timeout=30, what=what)
        except AssertionError as err:
            raise AssertionError(f"{err}; the screen:\n{seen[0] if seen else ''}") from None
        return seen[0]

    def keys(self, *keys: str) -> None:
        got = self("send-keys", "-t", "top", *keys)
        assert got.returncode == 0, got.stderr

    def kill(self) -> None:
        self("kill-server")


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (make deps installs it)")
    t = Tmux()
    yield t
    t.kill()


def test_screen_in_tmux(corral: CorralCLI, tmux: Tmux) -> None:
    a = corral.agent()
    small = corral.detach(a, "sleep", "1000")
    big = corral.detach(a, *BIG)  # started second: the younger of the two
    corral.wait_for(lambda: (by_id(top_json(corral, "--once", "-d", "0.2")[0]).get(big) or {})
                    .get("memory_bytes", 0) > 150 << 20, timeout=30, what="the big run's memory")

    env = {k: corral.env[k] for k in ("XDG_STATE_HOME", "XDG_CONFIG_HOME", "XDG_RUNTIME_DIR", "CORRAL_BACKEND",
                                      "CORRAL_CGROUP_ROOT", "PATH", "HOME", "LANG", "PYTHONDONTWRITEBYTECODE")
           if k in corral.env}
    top = shlex.join(["env", *(f"{k}={v}" for k, v in env.items()), *CORRAL, "top", "-d", "0.5",
                      "--agent", a])
    got = tmux("new-session", "-d", "-s", "top", "-x", "200", "-y", "20", f"{top}; echo top exited $?; sleep 600")
    assert got.returncode == 0, got.stderr

    def screen_with(*words: str, what: str) -> str:
        return tmux.wait(corral, lambda s: all(w in s for w in words), what)

    first = screen_with(small, big, "q quit", what="both runs on the screen")
    assert "top exited" not in first
    # it redraws on its own: the clock and the ages move on
    tmux.wait(corral, lambda s: s != first, "a redraw")

    def order(screen: str) -> list[str]:
        return [rid for line in screen.splitlines() for rid in (small, big) if line[1:].startswith(rid)]

    tmux.keys("T")  # age, oldest first: the small run on top
    screen_with("sort age", what="sort by age")
    tmux.wait(corral, lambda s: order(s) == [small, big], "age order")
    tmux.keys("M")  # memory, the largest first: the big run on top
    screen_with("sort mem", what="sort by memory")
    tmux.wait(corral, lambda s: order(s) == [big, small], "memory order")

    # a tiny window must not kill it
    tmux("resize-window", "-t", "top", "-x", "20", "-y", "5")
    tiny = tmux.wait(corral, lambda s: s.startswith("corral top") and len(s.splitlines()) <= 5, "a 20x5 redraw")
    assert max(len(line) for line in tiny.splitlines()) <= 20
    tmux("resize-window", "-t", "top", "-x", "200", "-y", "20")
    assert "top exited" not in screen_with("q quit", big, what="the full size again")

    tmux.keys("Up", "Up", "Up")  # to the top line: the big run
    tmux.wait(corral, lambda s: any(line.startswith(">" + big) for line in s.splitlines()), "the big run selected")
    tmux.keys("k")
    screen_with(f"kill run {big} ({a})? [y/N]", what="the kill confirmation")
    assert corral.show(big)["state"] == "running"  # nothing happens before the y
    tmux.keys("y")
    screen_with(f"killed {big} ({a})", what="the kill reported on the status line")
    corral.wait_for(lambda: corral.show(big)["state"] == "killed", timeout=30, what="the big run killed")
    tmux.wait(corral, lambda s: big not in s.split("killed")[0], "the killed run gone")
    assert corral.show(small)["state"] == "running"

    # n (anything but y) cancels
    tmux.keys("k")
    screen_with(f"kill run {small}", what="the second confirmation")
    tmux.keys("n")
    screen_with("cancelled", what="the cancel")
    assert corral.show(small)["state"] == "running"

    tmux.keys("q")
    screen_with("top exited 0", what="q to quit with exit 0")


def test_screen_without_utf8(corral: CorralCLI, tmux: Tmux) -> None:
    """A C locale: ASCII sparklines and arrows, no crash."""
    a = corral.agent()
    rid = corral.detach(a, *BUSY)
    env = {k: corral.env[k] for k in ("XDG_STATE_HOME", "XDG_CONFIG_HOME", "XDG_RUNTIME_DIR", "CORRAL_BACKEND",
                                      "CORRAL_CGROUP_ROOT", "PATH", "HOME", "PYTHONDONTWRITEBYTECODE")
           if k in corral.env}
    top = shlex.join(["env", "LC_ALL=C", "LANG=C", *(f"{k}={v}" for k, v in env.items()), *CORRAL, "top",
                      "-d", "0.3", "--agent", a])
    got = tmux("new-session", "-d", "-s", "top", "-x", "160", "-y", "10", f"{top}; echo top exited $?; sleep 600")
    assert got.returncode == 0, got.stderr
    screen = tmux.wait(corral, lambda s: "up/dn select" in s and rid in s and "#" in s, "an ASCII screen")
    assert all(ord(c) < 128 for c in screen), screen
    tmux.keys("q")
    tmux.wait(corral, lambda s: "top exited 0" in s, "exit 0")
