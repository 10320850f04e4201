"""`corral run --auth PROFILE` and an agent's `auth =`: the run gets an access token only."""

from __future__ import annotations

from pathlib import Path


from _auth_util import Env, OAuthServer, setup_profile


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
