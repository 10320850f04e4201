"""`corral run --auth PROFILE` and an agent's `auth =`: the run gets an access token only."""

from __future__ import annotations

from pathlib import Path

import pytest

from _auth_util import Env, OAuthServer, setup_profile


@pytest.fixture(scope="module")
def server():  # type: ignore[no-untyped-def]
    srv = OAuthServer()
    yield srv
    srv.stop()


def test_run_with_auth_sees_an_access_token_and_no_refresh_token(tmp_path: Path, server: OAuthServer) -> None:
    server.configure()
    env = Env(tmp_path)
    env.env["CORRAL_BACKEND"] = "cgroupfs"
    pair = setup_profile(env, server, "p1")
    dump = tmp_path / "env.txt"
    proc = env.cli("run", "--auth", "p1", "authrun", "--", "sh", "-c", f"env > {dump}")
    assert proc.returncode == 0, proc.stderr
    seen = dump.read_text()
    assert "CORRAL_ACCESS_TOKEN=" in seen and "CORRAL_AUTH_PROFILE=p1" in seen
    assert pair["refresh_token"] not in seen
    # an agent that names the profile in its config gets the same, without the flag
    assert env.cli("agents", "add", "authagent", "--auth", "p1").returncode == 0
    proc = env.cli("run", "authagent", "--", "sh", "-c", f"env > {dump}")
    assert proc.returncode == 0, proc.stderr
    assert "CORRAL_AUTH_PROFILE=p1" in dump.read_text() and pair["refresh_token"] not in dump.read_text()


def test_run_with_unknown_profile_exits_3(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.env["CORRAL_BACKEND"] = "cgroupfs"
    proc = env.cli("run", "--auth", "nosuch", "authrun", "--", "true")
    assert proc.returncode == 3 and "nosuch" in proc.stderr
