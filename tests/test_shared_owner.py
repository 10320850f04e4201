"""Detached runs owned by corral's shared owner (corral.runs.shared_owner, .ownerd), and
the callers it turns away: whoever differs from it in what a fork would pass on gets an
owner of its own."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CORRAL, CorralCLI, alive


def _status(pid: int, field: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _title(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")


def _owner(corral: CorralCLI, run_id: str) -> int:
    """The owner's pid, from the run's record."""
    record = json.loads((corral.tmp / "state" / "corral" / "runs" / f"{run_id}.json").read_text())
    assert record["owner_pid"], record
    return int(record["owner_pid"])


def _shared(pid: int) -> bool:
    return _title(pid).startswith("corral-ownerd ")


def _socket(corral: CorralCLI) -> Path:
    from corral.paths import Dirs
    from corral.runs.shared_owner import socket_path

    dirs = Dirs.from_env(corral.env)
    saved = dict(os.environ)
    os.environ.update(corral.env)  # the key counts what picks the backend, as the CLI sees it
    try:
        return socket_path(dirs.runtime, dirs.state, corral.backend)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_detached_runs_share_one_owner_outside_their_scopes(corral: CorralCLI) -> None:
    agent = corral.agent()
    ids = [corral.detach(agent, "sh", "-c", f"sleep 0.5; echo out{i}; echo err{i} >&2; exit {i}") for i in range(3)]
    owners = {_owner(corral, run_id) for run_id in ids}
    assert len(owners) == 1, owners
    (owner,) = owners
    assert _shared(owner), _title(owner)
    names = {entry.split(b"=", 1)[0].decode() for entry in Path(f"/proc/{owner}/environ").read_bytes().split(b"\0")
             if entry}
    from corral.runs.shared_owner import BACKEND_ENV

    assert names <= set(BACKEND_ENV), f"the owner keeps no caller's environment: {names}"
    # Its own cgroup in corral.slice: neither the caller's nor any run's.
    cgroup = Path(f"/proc/{owner}/cgroup").read_text().strip().rpartition("::")[2]
    assert "/corral.slice/corral-ownerd-" in cgroup and cgroup.endswith(".scope"), cgroup
    for run_id in ids:
        roles = [(p["role"], p["argv"]) for p in corral.show(run_id)["processes"]]
        assert not any(p["pid"] == owner for p in corral.show(run_id)["processes"]), roles
    for i, run_id in enumerate(ids):
        assert corral("wait", run_id, timeout=60).returncode == i
        rec = corral.show(run_id)
        assert (rec["state"], rec["exit_code"]) == ("exited" if i == 0 else "failed", i), rec
        out = corral("logs", run_id, check=True).stdout
        assert f"out{i}" in out and f"err{i}" in out, out
    assert alive([owner]) == [owner], "an owner with no run waits for the next a few seconds"


def test_owner_sigkill_kills_every_run_it_owns(corral: CorralCLI) -> None:
    agent = corral.agent()
    ids = [corral.detach(agent, "sh", "-c", "setsid sleep 1000 & sleep 1001", opts=("--isolation", "none"))
           for _ in range(2)]
    owner = _owner(corral, ids[0])
    assert _shared(owner) and _owner(corral, ids[1]) == owner
    pids = corral.wait_for(lambda: [p["pid"] for r in ids for p in corral.show(r)["processes"]
                                    if p["role"] != "corral"] if all(corral.show(r)["pids"] == 3 for r in ids) else [],
                           what="both runs' processes")
    os.kill(owner, signal.SIGKILL)
    corral.wait_for(lambda: alive(pids) == [], timeout=5, what="every run's processes killed by its watchdog")
    for run_id in ids:
        corral.wait_for(lambda r=run_id: corral.show(r)["state"] == "lost", what="state lost")
    again = corral.detach(agent, "true")  # a new owner for the next run
    assert corral("wait", again, timeout=60).returncode == 0
    assert _owner(corral, again) != owner


def test_runs_outlive_the_cgroup_of_the_caller_that_started_the_owner(corral: CorralCLI) -> None:
    """A logout or a stopped service ends the cgroup of the `corral run -d` in it: the
    shared owner it started lives in a cgroup of its own, so the run goes on."""
    agent = corral.agent()
    if corral.backend == "cgroupfs":
        from corral.linux.cgroup import find_cgroup2_mount

        root = Path(os.environ.get("CORRAL_CGROUP_ROOT") or find_cgroup2_mount() or "/sys/fs/cgroup")
        caller = root / f"test-caller-{agent}"
        caller.mkdir()
        join = f"echo $$ > {caller}/cgroup.procs && exec \"$@\""
        argv = ["sh", "-c", join, "sh"]
    else:
        user = ["--user"] if os.geteuid() != 0 else []
        argv = ["systemd-run", *user, "--quiet", "--scope", f"--unit=test-caller-{agent}"]
    try:
        proc = subprocess.run([*argv, *CORRAL, "run", "-d", agent, "--", "sleep", "1000"], env=corral.env,
                              capture_output=True, text=True, timeout=60, check=True)
        run_id = proc.stdout.strip()
        main = corral.show(run_id)["main_pid"]
        if corral.backend == "cgroupfs":
            (caller / "cgroup.kill").write_text("1")
        else:
            subprocess.run(["systemctl", *(["--user"] if os.geteuid() != 0 else []), "stop",
                            f"test-caller-{agent}.scope"], check=False, capture_output=True, timeout=30)
        time.sleep(0.5)
        assert alive([main]) == [main], "the run died with its caller's cgroup"
        assert corral.show(run_id)["state"] == "running"
        assert corral("kill", run_id).returncode == 0
        assert alive([main]) == []
    finally:
        if corral.backend == "cgroupfs":
            (caller / "cgroup.kill").write_text("1")
            corral.wait_for(lambda: not (caller / "cgroup.procs").read_text().strip(), what="caller cgroup empty")
            caller.rmdir()


def test_kill_0_in_a_run_reaches_neither_the_owner_nor_other_runs(corral: CorralCLI) -> None:
    agent = corral.agent()
    other = corral.detach(agent, "sleep", "1000", opts=("--isolation", "none"))
    owner = _owner(corral, other)
    victim = corral.detach(agent, "sh", "-c", "sleep 0.2; kill -TERM 0; sleep 5", opts=("--isolation", "none"))
    assert _owner(corral, victim) == owner
    assert corral("wait", victim, timeout=60).returncode == 128 + signal.SIGTERM
    assert alive([owner]) == [owner]
    assert corral.show(other)["state"] == "running"
    assert corral("kill", other).returncode == 0


def test_sigterm_lets_the_owner_finish_its_runs(corral: CorralCLI) -> None:
    """As when corral.slice is stopped: no new run is taken, the ones it has are owned to
    their end and recorded, then it exits."""
    agent = corral.agent()
    run_id = corral.detach(agent, "sh", "-c", "sleep 1; echo done")
    owner = _owner(corral, run_id)
    os.kill(owner, signal.SIGTERM)
    corral.wait_for(lambda: not _socket(corral).exists(), what="socket removed at once")
    newer = corral.detach(agent, "true")
    assert _owner(corral, newer) != owner, "a stopping owner took a new run"
    assert corral("wait", run_id, timeout=60).returncode == 0
    assert "done" in corral("logs", run_id, check=True).stdout
    corral.wait_for(lambda: alive([owner]) == [], what="owner gone after its last run")
    assert corral("wait", newer, timeout=60).returncode == 0


def test_a_caller_that_differs_gets_its_own_owner(corral: CorralCLI) -> None:
    """nice and no_new_privs are what a fork passes on and the owner cannot: a caller with
    either gets an owner (and a command) that has them, not the shared one's."""
    agent = corral.agent()
    first = corral.detach(agent, "sleep", "30")
    assert _shared(_owner(corral, first))
    niced = subprocess.run(["nice", "-n", "7", *CORRAL, "run", "-d", "--isolation", "none", agent, "--", "sleep", "30"],
                           env=corral.env, capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    assert not _shared(_owner(corral, niced)), "a niced caller was served"
    main = corral.show(niced)["main_pid"]
    assert Path(f"/proc/{main}/stat").read_text().rsplit(")", 1)[1].split()[16] == "7"
    if shutil.which("setpriv"):
        nnp = subprocess.run(["setpriv", "--no-new-privs", *CORRAL, "run", "-d", "--isolation", "none", agent, "--",
                              "sleep", "30"], env=corral.env, capture_output=True, text=True, timeout=60,
                             check=True).stdout.strip()
        owner = _owner(corral, nnp)
        assert _status(owner, "NoNewPrivs") == "1"
        assert not _shared(owner)
    assert corral("kill", agent).returncode == 0


def test_the_callers_umask_reaches_the_command(corral: CorralCLI, tmp_path: Path) -> None:
    agent = corral.agent()
    made = tmp_path / "made"
    proc = subprocess.run(["sh", "-c", 'umask 027 && exec "$@"', "sh", *CORRAL, "run", "-d", "--isolation", "none",
                           agent, "--", "touch", str(made)], env=corral.env, capture_output=True, text=True,
                          timeout=60, check=True)
    run_id = proc.stdout.strip()
    assert corral("wait", run_id, timeout=60).returncode == 0
    assert _shared(_owner(corral, run_id))
    assert made.stat().st_mode & 0o777 == 0o640


def test_disabled_by_environment(corral: CorralCLI) -> None:
    corral.env["CORRAL_SHARED_OWNER"] = "0"
    agent = corral.agent()
    run_id = corral.detach(agent, "sleep", "30")
    owner = _owner(corral, run_id)
    assert not _shared(owner)
    assert any(p["pid"] == owner for p in corral.show(run_id)["processes"]), "a forked owner sits in its scope"
    assert corral("kill", run_id).returncode == 0


def test_idle_owner_exits_and_removes_its_socket_and_cgroup(corral: CorralCLI) -> None:
    corral.env["CORRAL_OWNERD_IDLE"] = "0.5"
    agent = corral.agent()
    run_id = corral.detach(agent, "sleep", "0.3")
    owner = _owner(corral, run_id)
    cgroup = Path(f"/proc/{owner}/cgroup").read_text().strip().rpartition("::")[2]
    assert corral("wait", run_id, timeout=60).returncode == 0
    path = _socket(corral)
    corral.wait_for(lambda: not path.exists(), what="socket removed")
    corral.wait_for(lambda: alive([owner]) == [] or not _shared(owner), what="owner exited")
    from corral.linux.cgroup import find_cgroup2_mount

    mount = Path(find_cgroup2_mount() or "/sys/fs/cgroup")
    corral.wait_for(lambda: not (mount / cgroup.lstrip("/")).exists(), what="its cgroup removed")
    again = corral.detach(agent, "true")  # a new owner for the next run
    assert corral("wait", again, timeout=60).returncode == 0


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv to be another user")
def test_another_user_cannot_reach_the_owner(corral: CorralCLI) -> None:
    agent = corral.agent()
    run_id = corral.detach(agent, "sleep", "30")
    path = _socket(corral)
    assert path.exists() and (path.stat().st_mode & 0o777) == 0o600
    probe = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\n"
             "try:\n    s.connect(sys.argv[1])\nexcept OSError as e:\n    print('refused', e.errno)\nelse:\n"
             "    print('connected')\n")
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", probe,
                           str(path)], capture_output=True, text=True, timeout=30, check=False)
    assert proc.stdout.startswith("refused"), (proc.stdout, proc.stderr)
    assert corral("kill", run_id).returncode == 0


def test_the_command_gets_its_callers_open_file_limit(corral: CorralCLI) -> None:
    """The owner raises its own soft limit (it holds fds for every run), not its runs'."""
    import resource

    agent = corral.agent()
    run_id = corral.detach(agent, "sh", "-c", "ulimit -n; ulimit -Hn", opts=("--isolation", "none"))
    assert corral("wait", run_id, timeout=60).returncode == 0
    assert _shared(_owner(corral, run_id))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    out = corral("logs", run_id, check=True).stdout.split()
    assert out[:2] == [str(soft), str(hard) if hard != resource.RLIM_INFINITY else "unlimited"], out


def test_an_owner_at_its_open_file_limit_turns_callers_away(corral: CorralCLI) -> None:
    """Callers whose hard limit keeps the owner small: once it is full they fork their own
    owners, and every run starts."""
    agent = corral.agent()
    ids = []
    for _ in range(12):
        proc = subprocess.run(["sh", "-c", 'ulimit -n 120 && exec "$@"', "sh", *CORRAL, "run", "-d", "--isolation",
                               "none", agent, "--", "sleep", "1000"], env=corral.env, capture_output=True, text=True,
                              timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr
        ids.append(proc.stdout.strip())
    owners = [_owner(corral, run_id) for run_id in ids]
    shared = {pid for pid in owners if _shared(pid)}
    assert len(shared) == 1, owners
    assert 0 < owners.count(next(iter(shared))) < len(ids), "the owner took some, then turned the rest away"
    assert all(corral.show(run_id)["state"] == "running" for run_id in ids)
    assert corral("kill", agent).returncode == 0


def test_a_command_that_cannot_start_is_failed_not_lost(corral: CorralCLI) -> None:
    """Its exec fails after the gate: the owner ends the run itself and tells the watchdog
    so, which then leaves no `.lost` note saying that the run's owner died."""
    agent = corral.agent()
    corral.detach(agent, "sleep", "30")  # the shared owner is up
    proc = corral("run", "-d", "--isolation", "none", agent, "--", "/nonexistent/command")
    assert proc.returncode == 127, proc.stderr
    runs = corral.tmp / "state" / "corral" / "runs"
    assert not list(runs.glob("*.lost"))
    failed = [r for r in corral.json("ps", "--all", "--json") if r["state"] == "failed"]
    assert [r["ended_by"] for r in failed] == ["spawn-failed"], failed
    assert not list(runs.glob("*.lost"))
    assert corral("kill", agent).returncode == 0
