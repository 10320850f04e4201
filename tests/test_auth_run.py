"""`corral run --auth PROFILE` and an agent's `auth =`: the run gets an access token only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _auth_util import CORRAL, Env, OAuthServer, setup_profile


def test_run_with_auth_sees_an_access_token_and_no_refresh_token(backend: str, tmp_path: Path,
                                                                 server: OAuthServer) -> None:
    server.configure()
    env = Env(tmp_path)
    env.env["CORRAL_BACKEND"] = backend
    pair = setup_profile(env, server, "p1")
    dump = tmp_path / "env.txt"
    files = tmp_path / "files.txt"
    store = env.dirs.state / "auth"
    assert pair["refresh_token"] in "".join(p.read_text() for p in store.iterdir() if p.is_file()), \
        "outside the run the store holds the refresh token"
    # inside: its environment, and every file under the state dir it can read
    script = (f"env > {dump}; find {env.dirs.state} -type f -readable -exec cat {{}} + > {files} 2>/dev/null; "
              f"ls -la {store} >> {files} 2>&1; true")
    proc = env.cli("run", "--auth", "p1", "authrun", "--", "sh", "-c", script)
    assert proc.returncode == 0, proc.stderr
    seen = dump.read_text()
    assert "CORRAL_ACCESS_TOKEN=" in seen and "CORRAL_AUTH_PROFILE=p1" in seen
    assert pair["refresh_token"] not in seen
    assert pair["refresh_token"] not in files.read_text(), "the token store is hidden from the run"
    assert store.is_dir() and any(store.iterdir()), "and still there for corral outside the run"
    # an agent that names the profile in its config gets the same, without the flag
    assert env.cli("agents", "add", "authagent", "--auth", "p1").returncode == 0
    proc = env.cli("run", "authagent", "--", "sh", "-c", f"env > {dump}")
    assert proc.returncode == 0, proc.stderr
    assert "CORRAL_AUTH_PROFILE=p1" in dump.read_text() and pair["refresh_token"] not in dump.read_text()


def test_run_with_unknown_profile_exits_3(backend: str, tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.env["CORRAL_BACKEND"] = backend
    proc = env.cli("run", "--auth", "nosuch", "authrun", "--", "true")
    assert proc.returncode == 3 and "nosuch" in proc.stderr


# --- grants: a run gets the profiles it was granted, and no others (issue 12) ----------------


def _two_profiles(backend: str, tmp_path: Path, server: OAuthServer) -> Env:
    server.configure()
    env = Env(tmp_path)
    env.env["CORRAL_BACKEND"] = backend
    setup_profile(env, server, "pa", expired=False)
    setup_profile(env, server, "pb", expired=False)
    return env


def test_a_run_gets_its_granted_profile_and_not_another(backend: str, tmp_path: Path, server: OAuthServer) -> None:
    env = _two_profiles(backend, tmp_path, server)
    out = tmp_path / "out"
    out.mkdir()
    os.chmod(out, 0o777)
    corral_cmd = " ".join(CORRAL)
    # No broker service runs: the run's own socket (served by its owner) answers.
    script = (f"{corral_cmd} auth token pa > {out}/a 2> {out}/a.err; echo $? > {out}/a.rc; "
              f"{corral_cmd} auth token pb > {out}/b 2> {out}/b.err; echo $? > {out}/b.rc")
    proc = env.cli("run", "--auth", "pa", "grants", "--", "sh", "-c", script)
    assert proc.returncode == 0, proc.stderr
    assert (out / "a.rc").read_text().strip() == "0", (out / "a.err").read_text()
    assert (out / "a").read_text().strip() == env.stored("pa")["access_token"]
    assert (out / "b.rc").read_text().strip() == "77"
    refusal = (out / "b.err").read_text()
    assert "not granted auth profile 'pb'" in refusal and "grants" in refusal and "--auth pb" in refusal, refusal
    assert (out / "b").read_text() == ""
    # outside runs, both
    for name in ("pa", "pb"):
        outside = env.cli("auth", "token", name)
        assert outside.returncode == 0 and outside.stdout.strip() == env.stored(name)["access_token"], outside.stderr


def test_a_run_with_no_grants_is_told_so(backend: str, tmp_path: Path, server: OAuthServer) -> None:
    """Its store and config are hidden: the answer names the missing grant, not a
    missing profile or sign-in."""
    env = _two_profiles(backend, tmp_path, server)
    corral_cmd = " ".join(CORRAL)
    proc = env.cli("run", "nogrant", "--", "sh", "-c", f"{corral_cmd} auth token pa")
    assert proc.returncode == 77, (proc.stdout, proc.stderr)
    assert "granted no auth profile" in proc.stderr and "--auth pa" in proc.stderr, proc.stderr
    assert "sign in again" not in proc.stderr


def test_the_broker_service_checks_the_peers_run(backend: str, tmp_path: Path, server: OAuthServer) -> None:
    """A run that reaches the broker service's socket itself (isolation none: nothing is
    hidden) is still served only its grants: the broker asks the kernel which run the
    peer is in."""
    env = _two_profiles(backend, tmp_path, server)
    sock = env.dirs.runtime / "broker.sock"
    broker = subprocess.Popen([*CORRAL, "broker"], env=env.env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        out = tmp_path / "out"
        out.mkdir()
        ask = ("import json, socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
               "s.sendall(json.dumps({'op': 'token', 'profile': sys.argv[2]}).encode() + b'\\n'); "
               "print(s.makefile().readline().strip())")
        script = (f"{sys.executable} -c \"{ask}\" {sock} pa > {out}/a; "
                  f"{sys.executable} -c \"{ask}\" {sock} pb > {out}/b")
        proc = env.cli("run", "--isolation", "none", "--auth", "pa", "grants", "--", "sh", "-c", script)
        assert proc.returncode == 0, proc.stderr
        granted, refused = json.loads((out / "a").read_text()), json.loads((out / "b").read_text())
        assert granted["ok"] and granted["access_token"] == env.stored("pa")["access_token"]
        assert not refused["ok"] and refused["exit_code"] == 77 and "not granted auth profile 'pb'" in refused["error"]
        # the same socket, from outside any run
        outside = env.cli("auth", "token", "pb")
        assert outside.returncode == 0 and outside.stdout.strip() == env.stored("pb")["access_token"]
    finally:
        broker.terminate()
        broker.wait(10)
