"""Run lifecycle through the CLI contract, the same cases over every backend."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CORRAL, CorralCLI, alive, kill_pids

DETACHING = "setsid sleep 1000 & (sleep 1001 &); nohup sleep 1002 >/dev/null 2>&1 & sleep 1003"


# --isolation none: the payload reports its own pids, which a PID namespace would renumber
HOST_PIDS = ("--isolation", "none")

def _run_pids(corral: CorralCLI, run_id: str, want: int) -> list[int]:
    """Wait until the run's payload holds *want* processes; return every pid of the run."""
    def ready():  # type: ignore[no-untyped-def]
        info = corral.show(run_id)
        return info if info["pids"] >= want else None

    info = corral.wait_for(ready, what=f"{want} processes in run {run_id}")
    return [p["pid"] for p in info["processes"]]


@pytest.mark.parametrize("code", [0, 3])
def test_exit_status_passes_through(corral: CorralCLI, code: int) -> None:
    agent = corral.agent()
    proc = corral("run", agent, "--", "sh", "-c", f"echo hello; exit {code}")
    assert proc.returncode == code, proc.stderr
    assert "hello" in proc.stdout
    runs = corral.json("ps", "--all", "--json")
    mine = [r for r in runs if r["agent"] == agent]
    assert len(mine) == 1
    assert mine[0]["exit_code"] == code
    assert mine[0]["state"] == ("exited" if code == 0 else "failed")
    assert not corral.scopes_of(agent), "the run's cgroup must be gone after the run"


def test_exit_by_signal_is_128_plus_n(corral: CorralCLI) -> None:
    agent = corral.agent()
    proc = corral("run", agent, "--", "sh", "-c", "kill -9 $$")
    assert proc.returncode == 128 + 9
    (rec,) = [r for r in corral.json("ps", "--all", "--json") if r["agent"] == agent]
    assert rec["state"] == "killed" and rec["signal"] == 9 and rec["exit_code"] is None


def test_command_not_found_is_127_and_recorded(corral: CorralCLI) -> None:
    agent = corral.agent()
    proc = corral("run", agent, "--", "corral-no-such-command-xyz")
    assert proc.returncode == 127
    assert "corral-no-such-command-xyz" in proc.stderr
    assert not corral.scopes_of(agent)


def test_detached_children_are_contained_and_killed(corral: CorralCLI) -> None:
    agent = corral.agent()
    run_id = corral.detach(agent, "sh", "-c", DETACHING)
    pids = _run_pids(corral, run_id, want=5)
    info = corral.show(run_id)
    argvs = [" ".join(p["argv"]) for p in info["processes"]]
    for n in (1000, 1001, 1002, 1003):
        assert any(a == f"sleep {n}" for a in argvs), (n, argvs)
    assert info["unit"] == f"corral-{agent}-{run_id}.scope"
    proc = corral("kill", run_id)
    assert proc.returncode == 0, proc.stderr
    try:
        assert alive(pids) == [], "every process of the run is gone when kill returns"
    finally:
        kill_pids(alive(pids))
    rec = corral.show(run_id)
    assert rec["state"] == "killed"
    assert rec["pids"] == 0
    assert not corral.scopes_of(agent)


def test_attached_run_leftovers_are_killed_and_counted(corral: CorralCLI) -> None:
    agent = corral.agent()
    marker = f"/tmp/{agent}.pids"
    proc = corral("run", *HOST_PIDS, agent, "--", "sh", "-c",
                  f"setsid sleep 1000 & echo $! > {marker}; (sleep 1001 & echo $! >> {marker}); echo main-done")
    assert proc.returncode == 0, proc.stderr
    assert "main-done" in proc.stdout
    pids = [int(x) for x in Path(marker).read_text().split()]
    os.unlink(marker)
    try:
        assert alive(pids) == []
    finally:
        kill_pids(alive(pids))
    (rec,) = [r for r in corral.json("ps", "--all", "--json") if r["agent"] == agent]
    assert rec["leftovers_killed"] == 2
    assert rec["state"] == "exited"


def test_fork_storm_of_200_has_no_survivors(corral: CorralCLI) -> None:
    agent = corral.agent()
    run_id = corral.detach(agent, "sh", "-c", "for i in $(seq 200); do (setsid sleep 1000 &); done; "
                                              "while :; do sleep 1000 & sleep 0.01; done")
    pids = _run_pids(corral, run_id, want=201)
    assert corral("kill", run_id).returncode == 0
    try:
        assert alive(pids) == []
    finally:
        kill_pids(alive(pids))
    assert corral.show(run_id)["pids"] == 0


def test_ps_counts_and_usage(corral: CorralCLI) -> None:
    agent = corral.agent()
    run_id = corral.detach(agent, "sh", "-c", "sleep 1000 & sleep 1000 & sleep 1000 & wait")
    _run_pids(corral, run_id, want=4)
    runs = {r["id"]: r for r in corral.json("ps", "--json")}
    rec = runs[run_id]
    for key in ("id", "agent", "state", "unit", "backend", "main_pid", "pids", "memory_bytes", "cpu_usec",
                "started_at", "ended_at", "exit_code", "signal", "session", "argv", "cwd"):
        assert key in rec, key
    assert rec["state"] == "running"
    assert rec["pids"] == 4
    assert rec["backend"] == corral.backend
    assert rec["memory_bytes"] and rec["memory_bytes"] > 100_000
    assert rec["cpu_usec"] is None or rec["cpu_usec"] >= 0
    assert rec["started_at"].endswith("Z") and rec["ended_at"] is None
    table = corral("ps", check=True).stdout
    assert run_id in table and agent in table
    corral("kill", run_id, check=True)
    assert run_id not in {r["id"] for r in corral.json("ps", "--json")}
    assert run_id in {r["id"] for r in corral.json("ps", "--all", "--json")}


def test_detach_logs_wait(corral: CorralCLI) -> None:
    agent = corral.agent()
    run_id = corral.detach(agent, "sh", "-c", "echo to-out; echo to-err >&2; sleep 0.3; exit 5")
    waited = corral("wait", run_id, timeout=30)
    assert waited.returncode == 5
    logs = corral("logs", run_id, check=True).stdout
    assert "to-out" in logs and "to-err" in logs
    rec = corral.show(run_id)
    assert rec["state"] == "failed" and rec["exit_code"] == 5
    assert not corral.scopes_of(agent)


def test_logs_follow_ends_with_the_run(corral: CorralCLI) -> None:
    agent = corral.agent()
    run_id = corral.detach(agent, "sh", "-c", "for i in 1 2 3; do echo line$i; sleep 0.2; done")
    out = corral("logs", "--follow", run_id, timeout=30, check=True).stdout
    assert out.split() == ["line1", "line2", "line3"]


def test_pause_and_resume(corral: CorralCLI, tmp_path: Path) -> None:
    agent = corral.agent()
    ticks = tmp_path / "ticks"
    run_id = corral.detach(agent, "sh", "-c", f"while :; do echo x >> {ticks}; sleep 0.02; done")
    corral.wait_for(lambda: ticks.exists() and ticks.stat().st_size > 0, what="first tick")
    corral("pause", run_id, check=True)
    assert corral.show(run_id)["state"] == "paused"
    size = ticks.stat().st_size
    time.sleep(0.5)
    assert ticks.stat().st_size == size, "a paused run does not make progress"
    corral("resume", run_id, check=True)
    assert corral.show(run_id)["state"] == "running"
    corral.wait_for(lambda: ticks.stat().st_size > size, what="progress after resume")
    corral("kill", run_id, check=True)


def test_stop_sends_term_then_kills(corral: CorralCLI) -> None:
    agent = corral.agent()
    polite = corral.detach(agent, "sleep", "1000")
    stubborn = corral.detach(agent, "sh", "-c", "trap '' TERM; sleep 1000 & wait; sleep 1000")
    _run_pids(corral, stubborn, want=2)
    t0 = time.monotonic()
    proc = corral("stop", agent, "--grace", "1")
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - t0 < 10
    assert corral.show(polite)["state"] == "killed"
    assert corral.show(stubborn)["state"] == "killed"
    assert not corral.scopes_of(agent)
    # it says what it sent, and that the stubborn one came to SIGKILL and the polite one did not
    # (counts include a sandbox's own helpers, which get the signals too)
    for rid in (polite, stubborn):
        assert re.search(rf"^corral: {rid}: SIGTERM to [1-9]\d* process\(es\); SIGKILL after 1s if any are left$",
                         proc.stderr, re.M), proc.stderr
    assert re.search(rf"^corral: {stubborn}: [2-9]\d* process\(es\) still running after 1s: SIGKILL$", proc.stderr, re.M)
    assert not re.search(rf"^corral: {polite}: .*still running", proc.stderr, re.M), proc.stderr


def test_timeout_ends_whole_run_with_124(corral: CorralCLI) -> None:
    agent = corral.agent()
    marker = f"/tmp/{agent}.pid"
    t0 = time.monotonic()
    proc = corral("run", "--timeout", "1s", *HOST_PIDS, agent, "--", "sh", "-c", f"setsid sleep 100 & echo $! > {marker}; sleep 100")
    elapsed = time.monotonic() - t0
    assert proc.returncode == 124, proc.stderr
    assert elapsed < 10
    pid = int(Path(marker).read_text())
    os.unlink(marker)
    assert alive([pid]) == []
    (rec,) = [r for r in corral.json("ps", "--all", "--json") if r["agent"] == agent]
    assert rec["state"] == "timeout"


def test_killing_the_attached_owner_kills_the_run(corral: CorralCLI, tmp_path: Path) -> None:
    agent = corral.agent()
    marker = tmp_path / "pids"
    owner = corral.popen("run", *HOST_PIDS, agent, "--", "sh", "-c",
                         f"setsid sleep 1000 & echo $! >> {marker}; (sleep 1001 & echo $! >> {marker}); "
                         f"echo $$ >> {marker}; sleep 1002", stdout=subprocess.DEVNULL)
    corral.wait_for(lambda: marker.exists() and len(marker.read_text().split()) == 3, what="run started")
    pids = [int(x) for x in marker.read_text().split()]
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    t0 = time.monotonic()
    try:
        corral.wait_for(lambda: not alive(pids), timeout=2.0, what="teardown after the owner died")
    finally:
        kill_pids(alive(pids))
    assert time.monotonic() - t0 <= 2.0
    corral.wait_for(lambda: not corral.scopes_of(agent) or all(
        "populated 0" in (s / "cgroup.events").read_text() for s in corral.scopes_of(agent)), what="scope empty")
    (rec,) = [r for r in corral.json("ps", "--all", "--json") if r["agent"] == agent]
    assert rec["state"] == "lost"


def test_limits_are_read_back(corral: CorralCLI) -> None:
    agent = corral.agent()
    run_id = corral.detach(agent, "sleep", "1000", opts=("--memory-max", "200M", "--tasks-max", "64"))
    limits = corral.show(run_id)["limits"]
    assert limits["requested"] == {"memory_max": 200 * 1024 * 1024, "tasks_max": 64}
    for key, want in (("memory_max", 200 * 1024 * 1024), ("tasks_max", 64)):
        entry = limits["effective"][key]
        assert entry["requested"] == want
        if entry["enforced"]:
            assert entry["effective"] == want
        else:
            assert "not enforced" in entry["note"]
        if corral.backend == "systemd":
            assert entry["unit"] == want, "the manager holds the limit it was given"
    text = corral("show", run_id, check=True).stdout
    assert "limit memory_max" in text
    corral("kill", run_id, check=True)


def test_unknown_run_id_exits_3(corral: CorralCLI) -> None:
    for args in (("show", "deadbeef"), ("kill", "deadbeef"), ("wait", "deadbeef"), ("logs", "deadbeef"),
                 ("pause", "deadbeef"), ("stop", "deadbeef")):
        proc = corral(*args)
        assert proc.returncode == 3, (args, proc.returncode, proc.stderr)
        assert "deadbeef" in proc.stderr


@pytest.mark.parametrize("name", ["../x", "a b", "", "x" * 300, "a-b", "a/b", ".hidden", "a\nb"])
def test_invalid_agent_names_exit_2_and_create_nothing(corral: CorralCLI, name: str) -> None:
    def entries() -> set[str]:  # an earlier test's shared owner comes and goes on its own
        found = os.listdir(corral.slice_dir()) if corral.slice_dir().exists() else []
        return {e for e in found if not e.startswith("corral-ownerd-")}

    before = entries()
    proc = corral("run", name, "--", "true")
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "agent name" in proc.stderr
    assert entries() == before
    runs_dir = Path(corral.env["XDG_STATE_HOME"]) / "corral" / "runs"
    assert not runs_dir.exists() or not list(runs_dir.iterdir())


@pytest.mark.parametrize("args", [
    ("--memory-max", "lots"), ("--cpu-quota", "-5%"), ("--tasks-max", "0"), ("--timeout", "soon"),
    ("--env", "NOEQUALS"), ("--cwd", "/no/such/dir"),
])
def test_invalid_values_exit_2(corral: CorralCLI, args: tuple[str, str]) -> None:
    agent = corral.agent()
    proc = corral("run", *args, agent, "--", "true")
    assert proc.returncode == 2, (args, proc.returncode, proc.stderr)
    assert not corral.scopes_of(agent)


def test_run_prefix_and_agent_targets(corral: CorralCLI) -> None:
    agent = corral.agent()
    a = corral.detach(agent, "sleep", "1000")
    b = corral.detach(agent, "sleep", "1000")
    assert corral.show(a[:6])["id"] == a
    proc = corral("kill", agent)
    assert proc.returncode == 0
    assert f"{a}: killed" in proc.stdout and f"{b}: killed" in proc.stdout
    assert not corral.scopes_of(agent)


def test_doctor_names_the_backend(corral: CorralCLI) -> None:
    report = corral.json("doctor", "--json")
    assert report["chosen"] == corral.backend
    names = {b["name"]: b for b in report["backends"]}
    assert names[corral.backend]["usable"] is True
    text = corral("doctor", check=True).stdout
    assert f"chosen: {corral.backend}" in text


def test_runs_of_another_state_dir_are_not_ours(corral: CorralCLI, tmp_path: Path) -> None:
    """A second state dir (another user, checkout or test) neither sees nor touches the
    first one's runs, through ps, kill --all, kill AGENT, kill ID or gc; --all-users
    reaches them and says whose they are."""
    agent = corral.agent()
    run_id = corral.detach(agent, "sleep", "1000")
    (tmp_path / "other").mkdir()
    other = CorralCLI(corral.backend, tmp_path / "other")
    assert run_id not in {r["id"] for r in other.json("ps", "--json")}
    assert other("kill", "--all").returncode == 0
    assert other("kill", run_id).returncode == 3
    assert other("kill", agent).returncode == 3
    assert other.json("gc", "--json")["reaped"] == []
    assert corral.show(run_id)["state"] == "running", "untouched by the other state dir"
    everyone = {r["id"]: r for r in other.json("ps", "--all-users", "--json")}
    assert everyone[run_id]["state"] == "foreign" and everyone[run_id]["agent"] == agent
    assert "another corral state dir" in everyone[run_id]["problem"] and "uid" in everyone[run_id]["problem"]
    assert other("kill", "--all-users").returncode == 0
    corral.wait_for(lambda: not corral.scopes_of(agent), what="killed through --all-users")


def test_our_run_without_its_record_is_found_with_all_users(corral: CorralCLI) -> None:
    agent = corral.agent()
    run_id = corral.detach(agent, "sleep", "1000")
    os.unlink(Path(corral.env["XDG_STATE_HOME"]) / "corral" / "runs" / f"{run_id}.json")
    assert run_id not in {r["id"] for r in corral.json("ps", "--json")}
    runs = {r["id"]: r for r in corral.json("ps", "--all-users", "--json")}
    assert run_id in runs and runs[run_id]["adopted"] is True and runs[run_id]["agent"] == agent
    assert corral("kill", "--all-users").returncode == 0
    assert not corral.scopes_of(agent)


def test_a_name_that_is_an_agent_and_a_run_id_prefix_asks_which(corral: CorralCLI) -> None:
    bystander = corral.agent()
    run_id = corral.detach(bystander, "sleep", "1000")
    name = run_id[:4]  # hex digits make a valid agent name
    corral.agents.append(name)
    own = corral.detach(name, "sleep", "1000")
    proc = corral("kill", name)
    assert proc.returncode == 2 and "--agent" in proc.stderr and "--id" in proc.stderr, proc.stderr
    assert corral.show(run_id)["state"] == "running", "the bystander lives"
    assert corral("kill", "--agent", name).returncode == 0
    assert corral.show(own)["state"] == "killed" and corral.show(run_id)["state"] == "running"
    assert corral("kill", "--id", run_id[:4]).returncode == 0
    assert corral.show(run_id)["state"] == "killed"


def test_gc_reaps_a_run_whose_owner_is_gone(corral: CorralCLI) -> None:
    agent = corral.agent()
    run_id = corral.detach(agent, "sh", "-c", "sleep 1000 & sleep 1000 & wait")
    info = corral.wait_for(lambda: (i := corral.show(run_id))["pids"] == 3 and i, what="run up")
    owner = [info["owner_pid"]]  # corral's shared owner
    watchdog = [p["pid"] for p in info["processes"] if p["role"] == "corral" and "corral-watchdog" in p["argv"]]
    payload = [p["pid"] for p in info["processes"] if p["role"] != "corral"]
    assert owner and watchdog
    # Crash corral by hand: stop the watchdog first (so it cannot react), then kill the owner.
    os.kill(watchdog[0], signal.SIGSTOP)
    os.kill(owner[0], signal.SIGKILL)
    corral.wait_for(lambda: not alive(owner), what="owner gone")
    assert alive(payload) == payload, "without gc, orphaned work is still there"
    report = corral.json("gc", "--json")
    try:
        assert [r["id"] for r in report["reaped"]] == [run_id]
        assert report["reaped"][0]["processes_killed"] == 3
        assert alive(payload) == []
    finally:
        kill_pids(alive(payload + watchdog))
    assert corral.show(run_id)["state"] == "lost"
    assert not corral.scopes_of(agent)
    again = corral.json("gc", "--json")
    assert again["reaped"] == []


def test_a_process_that_left_the_cgroup_is_reported(corral: CorralCLI, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("moving a process into another cgroup here needs root")
    agent = corral.agent()
    elsewhere = corral.slice_dir().parent / f"test-escape-{agent}"
    elsewhere.mkdir()
    pidfile = tmp_path / "escapee"
    try:
        run_id = corral.detach(agent, "sh", "-c",
                               f"sh -c 'echo $$ > {elsewhere}/cgroup.procs; echo $$ > {pidfile}; exec sleep 1000' & "
                               "sleep 1000", opts=("--isolation", "none"))  # an escape needs no isolation
        corral.wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), what="escapee")
        escapee = int(pidfile.read_text())
        proc = corral("kill", run_id)
        assert proc.returncode == 1
        assert f"pid {escapee}" in proc.stderr and "left the run's cgroup" in proc.stderr
        assert alive([escapee]) == [escapee], "reported, not killed behind the user's back"
    finally:
        (elsewhere / "cgroup.kill").write_text("1")
        corral.wait_for(lambda: "populated 0" in (elsewhere / "cgroup.events").read_text(), what="escapee gone")
        elsewhere.rmdir()


BAD_INPUTS = [
    ("wait", "{run}", "--timeout", "nan"),
    ("stop", "{run}", "--grace", "nan"),
    ("stop", "{run}", "--grace", "inf"),
    ("stop", "{run}", "--grace", "-5"),
    ("stop", "{run}", "--grace", "1e30"),
    ("run", "--lock-timeout", "inf", "--session", "s", "{agent}", "--", "true"),
    ("run", "--lock-timeout", "1e300", "--session", "s", "{agent}", "--", "true"),
    ("run", "--grace", "-5", "{agent}", "--", "true"),
    ("run", "--memory-max", "99999999999T", "{agent}", "--", "true"),
    ("run", "--tasks-max", str(2 ** 70), "{agent}", "--", "true"),
    ("run", "--tasks-max", "1.5", "{agent}", "--", "true"),
    ("run", "--cpu-quota", "0.00001%", "{agent}", "--", "true"),
    ("run", "--session", "", "{agent}", "--", "true"),
    ("run", "--env", "A B=1", "{agent}", "--", "true"),
    ("run", "{agent}", "--", ""),
]


@pytest.mark.parametrize("args", BAD_INPUTS, ids=[" ".join(a) for a in BAD_INPUTS])
def test_bad_input_is_exit_2_with_a_message(corral: CorralCLI, args: tuple[str, ...]) -> None:
    agent = corral.agent()
    run_id = corral.detach(agent, "sleep", "1000") if "{run}" in args else ""
    proc = corral(*(a.format(run=run_id, agent=agent) for a in args))
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and proc.stderr.strip(), proc.stderr
    if run_id:
        assert corral.show(run_id)["state"] == "running", "a refused command touched nothing"
        corral("kill", run_id)


def test_a_deleted_working_directory_is_exit_2(corral: CorralCLI, tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    gone.mkdir()
    agent = corral.agent()
    proc = subprocess.Popen(["sh", "-c", f'cd {gone} && rmdir {gone} && "$@"', "sh", *CORRAL, "run", agent, "--",
                             "true"], env=corral.env, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "no longer exists" in err and "Traceback" not in err, err
    proc = subprocess.run(["sh", "-c", f'mkdir {gone} && cd {gone} && rmdir {gone} && "$@"', "sh", *CORRAL, "agents",
                           "add", agent, "--workspace", "."], env=corral.env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "no longer exists" in proc.stderr, proc.stderr


@pytest.mark.parametrize("line", ["max_runs = inf", "tasks_max = 1.5", "max_runs = 1e400"])
def test_bad_numbers_in_config_are_exit_78(corral: CorralCLI, line: str) -> None:
    agent = corral.agent()
    config = Path(corral.env["XDG_CONFIG_HOME"]) / "corral" / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(f"[agents.{agent}]\n{line}\n")
    proc = corral("run", agent, "--", "true")
    assert proc.returncode == 78 and "Traceback" not in proc.stderr and agent in proc.stderr, proc.stderr


@pytest.mark.parametrize("content", [
    '{"argv": 5}', '{"cgroup": null}', '{"started_at": 5}', '[1, 2]', '{}', '{garbage', '"x"', '{"id": 5}',
    '{"cgroup": "/sys/fs/cgroup/unified"}', '{"cgroup": "/sys/fs/cgroup/x/../corral.slice"}',
])
def test_a_live_run_with_a_bad_record_is_listed_and_killable(corral: CorralCLI, content: str) -> None:
    agent = corral.agent()
    run_id = corral.detach(agent, "sleep", "1000")
    path = Path(corral.env["XDG_STATE_HOME"]) / "corral" / "runs" / f"{run_id}.json"
    if content.startswith("{\"") and content != '{"id": 5}':
        good = json.loads(path.read_text())
        good.update(json.loads(content))
        content = json.dumps(good)
    path.write_text(content)
    for args in (("ps",), ("ps", "--all"), ("ps", "--json")):
        proc = corral(*args)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        assert run_id in proc.stdout, "the live cgroup is not hidden by its bad record"
    listed = {r["id"]: r for r in corral.json("ps", "--json")}[run_id]
    assert listed["state"] == "unknown" and str(path) in listed["problem"]
    proc = corral("kill", run_id)
    assert proc.returncode == 0, proc.stderr
    assert not corral.scopes_of(agent)
    gc = corral("gc", "--json")
    assert gc.returncode == 0 and "Traceback" not in gc.stderr, gc.stderr


def test_a_full_state_dir_does_not_take_the_commands_status(corral: CorralCLI, tmp_path: Path) -> None:
    """The state filesystem fills while an attached run works (a tiny tmpfs, in a private
    mount namespace of this test only): the caller still gets the command's 3, the run's
    cgroup is gone, and listing still works."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("a private tmpfs over the state dir needs root and unshare")
    agent = corral.agent()
    state = Path(corral.env["XDG_STATE_HOME"])
    script = (f'mount -t tmpfs -o size=256k tmpfs {state} || exit 97; '
              f'"$@" run {agent} -- sh -c "sleep 1; exit 3" & p=$!; sleep 0.6; '
              f'dd if=/dev/zero of={state}/filler bs=4k 2>/dev/null; wait $p; echo "status $?"; '
              f'"$@" ps --all --json > {tmp_path}/ps.json; echo "ps $?"')
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *CORRAL],
                          env=corral.env, capture_output=True, text=True, timeout=120)
    assert "status 3" in proc.stdout and "ps 0" in proc.stdout, (proc.stdout, proc.stderr)
    assert "could not be written" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert agent in (tmp_path / "ps.json").read_text()
    assert not corral.scopes_of(agent)


def test_records_are_private_and_gc_sweeps_dead_writers_temp_files(corral: CorralCLI) -> None:
    agent = corral.agent()
    corral("run", "--env", "TOKEN=secret", agent, "--", "true", check=True)
    runs = Path(corral.env["XDG_STATE_HOME"]) / "corral" / "runs"
    assert runs.stat().st_mode & 0o777 == 0o700
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in runs.iterdir()), [oct(p.stat().st_mode) for p in runs.iterdir()]
    old, new = runs / ".deadbeef.json.abc.tmp", runs / ".cafef00d.json.def.tmp"
    old.write_text("{")
    new.write_text("{")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    report = corral.json("gc", "--json")
    assert report["swept_temps"] == [old.name] and not old.exists() and new.exists(), "a live writer's is kept"


def test_timeout_sends_sigterm_to_the_whole_run_then_sigkill_after_the_grace(corral: CorralCLI, tmp_path: Path) -> None:
    """As systemd's RuntimeMaxSec: every process gets SIGTERM at the deadline (a trap can
    clean up); what ignores it is SIGKILLed after --grace, with a word, and counted."""
    agent = corral.agent()
    out = tmp_path / "out"
    out.mkdir()
    os.chmod(out, 0o777)
    proc = corral("run", "--timeout", "1s", "--grace", "1s", agent, "--", "sh", "-c",
                  f"trap 'echo cleaned > {out}/main; exit 5' TERM; "
                  f"sh -c \"trap 'echo daemon-cleaned > {out}/d; exit 0' TERM; while :; do sleep 0.1; done\" & "
                  "while :; do sleep 0.1; done")
    assert proc.returncode == 124, proc.stderr
    assert (out / "main").read_text().strip() == "cleaned" and (out / "d").read_text().strip() == "daemon-cleaned"
    assert "SIGTERM to all its processes" in proc.stderr and "did not end" not in proc.stderr, proc.stderr
    agent2 = corral.agent()
    proc = corral("run", "--timeout", "1s", "--grace", "1s", agent2, "--", "sh", "-c",
                  "trap '' TERM; sh -c \"trap '' TERM; sleep 100\" & sh -c \"trap '' TERM; sleep 100\" & "
                  "while :; do sleep 0.1; done")
    assert proc.returncode == 124, proc.stderr
    assert "did not end within 1s of SIGTERM" in proc.stderr, proc.stderr
    (rec,) = [r for r in corral.json("ps", "--all", "--json") if r["agent"] == agent2]
    assert rec["state"] == "timeout" and rec["leftovers_killed"] >= 2, rec
    assert not corral.scopes_of(agent2)


def test_a_second_ctrl_c_kills_at_once(corral: CorralCLI) -> None:
    agent = corral.agent()
    owner = corral.popen("run", "--grace", "30s", agent, "--", "sh", "-c", "trap '' INT TERM; sleep 1000",
                         stderr=subprocess.PIPE, text=True)
    corral.wait_for(lambda: corral.json("ps", "--json"), what="run up")
    owner.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert owner.poll() is None, "the first one only forwards it (the command ignores it)"
    t0 = time.monotonic()
    owner.send_signal(signal.SIGINT)
    _, err = owner.communicate(timeout=10)
    assert time.monotonic() - t0 < 5, "not after the 30 s grace"
    assert "second SIGINT, killing it now" in err, err
    assert not corral.scopes_of(agent)


def test_a_detached_owner_shows_no_secret_in_its_command_line(corral: CorralCLI) -> None:
    agent = corral.agent()
    run_id = corral.detach(agent, "sleep", "1000", opts=("--env", "API_TOKEN=hunter2-secret"))
    shared = corral.show(run_id)["owner_pid"]
    cmdline = Path(f"/proc/{shared}/cmdline").read_bytes()
    assert cmdline.startswith(b"corral-ownerd "), cmdline
    assert b"hunter2" not in cmdline and b"hunter2" not in Path(f"/proc/{shared}/environ").read_bytes()
    corral.env["CORRAL_SHARED_OWNER"] = "0"  # an owner of its own, forked by the CLI
    forked_id = corral.detach(agent, "sleep", "1000", opts=("--env", "API_TOKEN=hunter2-secret"))
    info = corral.show(forked_id)
    owners = [p for p in info["processes"] if p["role"] == "corral" and "corral-owner" in " ".join(p["argv"])]
    assert [p["pid"] for p in owners] == [info["owner_pid"]], info["processes"]
    cmdline = Path(f"/proc/{owners[0]['pid']}/cmdline").read_bytes()
    assert b"hunter2" not in cmdline and cmdline.startswith(f"corral-owner {forked_id}".encode()), cmdline
    assert corral("kill", agent).returncode == 0


def test_an_owners_death_is_on_record_and_its_cgroup_gone_without_ps_or_gc(corral: CorralCLI) -> None:
    """SIGKILL a detached run's owner: its watchdog kills the run and notes the time; the
    next corral command of any kind (here `agents list`) records it as lost and, on
    cgroupfs, removes the empty scope directories."""
    agent = corral.agent()
    run_id = corral.detach(agent, "sh", "-c", "sleep 1000 & sleep 1000")
    info = corral.show(run_id)
    owner = info["owner_pid"]  # corral's shared owner
    os.kill(owner, signal.SIGKILL)
    runs = Path(corral.env["XDG_STATE_HOME"]) / "corral" / "runs"
    corral.wait_for(lambda: (runs / f"{run_id}.lost").exists(), what="the watchdog's note")
    record = json.loads((runs / f"{run_id}.json").read_text())
    assert record["state"] == "running", "not yet merged: nobody has run corral since"
    corral.wait_for(lambda: corral("agents", "list").returncode == 0 and not (runs / f"{run_id}.lost").exists(),
                    what="the note settled by a command that is not ps or gc")
    record = json.loads((runs / f"{run_id}.json").read_text())
    assert record["state"] == "lost" and record["ended_by"] == "lost-owner" and record["ended_at"], record
    assert not corral.scopes_of(agent), "no empty scope directories left behind"


def test_the_command_line_after_the_agent_is_the_commands_own(corral: CorralCLI) -> None:
    """As systemd-run and docker run: options end at the command, whatever it looks like."""
    agent = corral.agent()
    for argv in (["ls", "-la", "/usr"], ["grep", "--help"], ["sh", "-c", 'echo "$1"', "x", "--timeout=3"],
                 ["env", "--memory-max", "1G"], ["sh", "-c", "exit 4", "--", "-d"]):
        bare = subprocess.run(argv, capture_output=True, text=True)
        got = corral("run", "--isolation", "none", agent, *argv)
        assert (got.returncode, got.stdout) == (bare.returncode, bare.stdout), (argv, got.stderr)
    # corral's own options: before the agent, or between it and a `--`
    assert corral("run", "--timeout", "1s", agent, "sleep", "5").returncode == 124
    assert corral("run", agent, "--timeout", "1s", "--", "sleep", "5").returncode == 124
    bogus = corral("run", agent, "--no-such-option", "--", "true")
    assert bogus.returncode == 2 and "No such option" in bogus.stderr
    missing = corral("run")
    assert missing.returncode == 2 and "Usage: corral run [OPTIONS] AGENT [--] COMMAND" in missing.stderr


def test_an_agent_that_is_not_configured_is_named_in_one_line(corral: CorralCLI) -> None:
    agent = corral.agent()
    corral("agents", "add", agent, check=True)
    typo = agent[:-1] + ("x" if agent[-1] != "x" else "y")
    proc = corral("run", typo, "true")
    assert proc.returncode == 0
    notes = [line for line in proc.stderr.splitlines() if "not a configured agent" in line]
    assert len(notes) == 1 and f"did you mean {agent!r}" in notes[0], proc.stderr
    assert "not a configured agent" not in corral("run", agent, "true").stderr


def test_several_targets_ps_filters_and_quiet_ids(corral: CorralCLI) -> None:
    a, b = corral.agent(), corral.agent()
    ra, rb = corral.detach(a, "sleep", "60"), corral.detach(b, "sleep", "60")
    assert corral("ps", a, "-q", check=True).stdout.split() == [ra]
    assert sorted(corral("ps", a, b, "-q", check=True).stdout.split()) == sorted([ra, rb])
    assert [r["id"] for r in corral.json("show", "--json", ra, rb)] == [ra, rb]
    assert corral("pause", ra, rb[:6], check=True).stdout.split(": paused\n")
    assert corral("resume", ra, rb, check=True).returncode == 0
    waiting = corral.popen("wait", "--timeout", "1m", ra, rb)
    killed = corral("kill", ra, rb, check=True)
    assert killed.stdout.count("killed, 0 processes left") == 2, killed.stdout
    assert waiting.wait(30) == 137
    stop = corral("stop", "--grace", "30s", ra)
    assert stop.returncode == 0 and "already ended" in stop.stdout
    line = [ln for ln in corral("ps", "-a", a, check=True).stdout.splitlines() if ra in ln][0]
    assert "sleep 60" in line and "ago" in line


def test_bash_completion_offers_live_run_ids(corral: CorralCLI) -> None:
    agent = corral.agent()
    rid = corral.detach(agent, "sleep", "60")
    script = corral("completion", "bash", check=True).stdout
    assert "_CORRAL_COMPLETE" in script
    corral_bin = str(Path(sys.executable).parent / "corral")
    probe = (f'{script}\n'
             f'COMP_WORDS=(corral show ""); COMP_CWORD=2; _corral_completion corral "" show; printf "%s\\n" "${{COMPREPLY[@]}}"')
    out = subprocess.run(["bash", "-c", probe], env={**corral.env, "PATH": f"{Path(corral_bin).parent}:/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=30)
    assert rid in out.stdout.split(), (out.stdout, out.stderr)
    corral("kill", rid, check=True)


def test_a_limit_this_machine_does_not_enforce_is_a_warning_or_with_strict_limits_a_refusal(
        corral: CorralCLI, tmp_path: Path) -> None:
    agent = corral.agent()
    proc = corral("run", "--memory-max", "300M", agent, "true")
    assert proc.returncode == 0, proc.stderr
    (rec,) = [r for r in corral.json("ps", "--all", "--json") if r["agent"] == agent]
    enforced = corral.show(rec["id"])["limits"]["effective"]["memory_max"]["enforced"]
    warned = [ln for ln in proc.stderr.splitlines() if "warning: --memory-max 300.0M" in ln]
    assert len(warned) == (0 if enforced else 1), proc.stderr
    marker = tmp_path / "ran"
    strict = corral("run", "--strict-limits", "--memory-max", "300M", agent, "sh", "-c", f"touch {marker}")
    if enforced:
        assert strict.returncode == 0 and marker.exists()
    else:
        assert strict.returncode == 1 and "--strict-limits" in strict.stderr and not marker.exists(), strict.stderr
        assert not corral.scopes_of(agent)
    # The same from the config: strict_limits = true on the agent, --no-strict-limits over it.
    corral("agents", "add", agent, "--memory-max", "300M", check=True)
    corral("agents", "set", agent, "strict_limits=yes", check=True)
    assert corral.json("agents", "show", agent, "--json")["strict_limits"] is True
    from_config = corral("run", agent, "sh", "-c", f"touch {marker}")
    assert from_config.returncode == (0 if enforced else 1), from_config.stderr
    assert marker.exists() == enforced
    overridden = corral("run", "--no-strict-limits", agent, "sh", "-c", f"touch {marker}")
    assert overridden.returncode == 0 and marker.exists(), overridden.stderr
    bad = corral("agents", "set", agent, "strict_limits=maybe")
    assert bad.returncode == 2 and "true or false" in bad.stderr


def test_listing_imports_only_what_it_needs(corral: CorralCLI) -> None:
    """ps and kill --all read the cgroup tree and the records: no D-Bus library (the bus is
    opened on first use, to start or stop a unit), no TOML writer, no logging, no psutil."""
    agent = corral.agent()
    run_id = corral.detach(agent, "sleep", "30")
    heavy = ("pystemd", "tomlkit", "logging", "psutil", "curses")
    code = ("import sys, corral.cli.main\n"
            "sys.argv = ['corral', *sys.argv[1:]]\n"
            "try:\n    corral.cli.main.main()\nexcept SystemExit:\n    pass\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r}), file=sys.stderr)")
    try:
        for args in (("ps", "--json"), ("ps", "--all")):
            proc = subprocess.run([sys.executable, "-c", code, *args], env=corral.env, capture_output=True, text=True,
                                  timeout=60)
            assert run_id in proc.stdout, (args, proc.stdout, proc.stderr)
            assert proc.stderr.strip().splitlines()[-1] == "[]", (args, proc.stderr)
    finally:
        corral("kill", run_id)


def test_a_configured_run_reads_its_config_without_tomlkit(corral: CorralCLI) -> None:
    """`corral run` reads config.toml with the stdlib's tomllib (tomlkit is for edits);
    the agent's settings still apply."""
    agent = corral.agent()
    conf = Path(corral.env["XDG_CONFIG_HOME"]) / "corral" / "config.toml"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(f'# a comment\n[agents.{agent}]\nenv = {{ FROM_CONFIG = "yes" }}\n')
    code = ("import sys, corral.cli.main\n"
            "sys.argv = ['corral', *sys.argv[1:]]\n"
            "try:\n    corral.cli.main.main()\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'tomlkit'), file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code, "run", agent, "--", "sh", "-c", "echo $FROM_CONFIG"],
                          env=corral.env, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "yes", (proc.stdout, proc.stderr)
    assert proc.stderr.strip().splitlines()[-1] == "[]", proc.stderr
    conf.write_text(f"[agents.{agent}\n")  # malformed: still exit 78 with the line and column
    proc = corral("run", agent, "--", "true")
    assert proc.returncode == 78 and f"{conf}:1:" in proc.stderr and "line 1, column" in proc.stderr, proc.stderr
