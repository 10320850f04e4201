"""Detached owners forked by the fork server (corral.runs.forkserver), and the callers it
turns away: whoever differs from it in what a fork would pass on forks its own owner."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CORRAL, CorralCLI


def _status(pid: int, field: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _parent_title(pid: int) -> str:
    parent = int(_status(pid, "PPid"))
    return Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")


def _owner(corral: CorralCLI, run_id: str) -> int:
    """The owner's pid, from the run's record (``show`` lists it among the corral processes)."""
    record = json.loads((corral.tmp / "state" / "corral" / "runs" / f"{run_id}.json").read_text())
    assert record["owner_pid"], record
    return int(record["owner_pid"])


def test_detached_owners_share_one_fork_server(corral: CorralCLI) -> None:
    agent = corral.agent()
    ids = [corral.detach(agent, "sh", "-c", f"sleep 0.5; echo out{i}; exit {i}") for i in range(3)]
    owners = [_owner(corral, run_id) for run_id in ids]
    parents = {int(_status(pid, "PPid")) for pid in owners}
    assert len(parents) == 1, parents
    (server,) = parents
    title = Path(f"/proc/{server}/cmdline").read_bytes().split(b"\0")[0].decode()
    assert title.startswith("corral-forkserver "), title
    assert Path(f"/proc/{server}/environ").read_bytes() == b"", "the server keeps no caller's environment"
    for i, run_id in enumerate(ids):
        assert corral("wait", run_id, timeout=60).returncode == i
        rec = corral.show(run_id)
        assert (rec["state"], rec["exit_code"]) == ("exited" if i == 0 else "failed", i), rec
        assert f"out{i}" in corral("logs", run_id, check=True).stdout


def test_a_caller_that_differs_forks_its_own_owner(corral: CorralCLI) -> None:
    """nice and no_new_privs are what a fork passes on and the server cannot: a caller
    with either gets an owner (and a command) that has them, not the server's."""
    agent = corral.agent()
    first = corral.detach(agent, "sleep", "30")
    assert _parent_title(_owner(corral, first)).startswith("corral-forkserver ")
    niced = subprocess.run(["nice", "-n", "7", *CORRAL, "run", "-d", "--isolation", "none", agent, "--", "sleep", "30"],
                           env=corral.env, capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    owner = _owner(corral, niced)
    assert not _parent_title(owner).startswith("corral-forkserver"), "a niced caller was served"
    main = corral.show(niced)["main_pid"]
    assert Path(f"/proc/{main}/stat").read_text().rsplit(")", 1)[1].split()[16] == "7"
    if shutil.which("setpriv"):
        nnp = subprocess.run(["setpriv", "--no-new-privs", *CORRAL, "run", "-d", "--isolation", "none", agent, "--",
                              "sleep", "30"], env=corral.env, capture_output=True, text=True, timeout=60,
                             check=True).stdout.strip()
        owner = _owner(corral, nnp)
        assert _status(owner, "NoNewPrivs") == "1"
        assert not _parent_title(owner).startswith("corral-forkserver")
    assert corral("kill", agent).returncode == 0


def test_disabled_by_environment(corral: CorralCLI) -> None:
    corral.env["CORRAL_FORKSERVER"] = "0"
    agent = corral.agent()
    run_id = corral.detach(agent, "sleep", "30")
    assert not _parent_title(_owner(corral, run_id)).startswith("corral-forkserver")
    assert corral("kill", run_id).returncode == 0


def test_idle_server_exits_and_removes_its_socket(corral: CorralCLI) -> None:
    corral.env["CORRAL_FORKSERVER_IDLE"] = "0.5"
    agent = corral.agent()
    run_id = corral.detach(agent, "true")
    server = int(_status(_owner(corral, run_id), "PPid")) if corral.show(run_id)["state"] == "running" else None
    assert corral("wait", run_id, timeout=60).returncode == 0
    from corral.paths import Dirs
    from corral.runs.forkserver import socket_path

    dirs = Dirs.from_env(corral.env)
    path = socket_path(dirs.runtime, dirs.state)
    deadline = time.monotonic() + 10
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not path.exists(), "an idle server leaves no socket behind"
    if server is not None:
        assert not Path(f"/proc/{server}").exists() or "corral-forkserver" not in Path(
            f"/proc/{server}/cmdline").read_text()
    again = corral.detach(agent, "true")  # a new server for the next run
    assert corral("wait", again, timeout=60).returncode == 0


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv to be another user")
def test_another_user_cannot_reach_the_server(corral: CorralCLI) -> None:
    agent = corral.agent()
    run_id = corral.detach(agent, "sleep", "30")
    from corral.paths import Dirs
    from corral.runs.forkserver import socket_path

    dirs = Dirs.from_env(corral.env)
    path = socket_path(dirs.runtime, dirs.state)
    assert path.exists() and (path.stat().st_mode & 0o777) == 0o600
    probe = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\n"
             "try:\n    s.connect(sys.argv[1])\nexcept OSError as e:\n    print('refused', e.errno)\nelse:\n"
             "    print('connected')\n")
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", probe,
                           str(path)], capture_output=True, text=True, timeout=30, check=False)
    assert proc.stdout.startswith("refused"), (proc.stdout, proc.stderr)
    assert corral("kill", run_id).returncode == 0
