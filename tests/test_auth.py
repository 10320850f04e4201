"""Auth profiles, the token store, sign-in and ``corral auth token``, against a real
OAuth 2.0 server on 127.0.0.1 (issue 6). Concurrency: test_auth_concurrency.py; the
broker: test_auth_broker.py."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from _auth_util import CORRAL, REAUTH, Env, OAuthServer, fork_worker, kill, setup_profile, wait_stopped
from corral.auth import TokenStore, add_profile, get_profile, get_token, login
from corral.auth.runauth import prepare_run_auth
from corral.auth.importers import parse_auth_json
from corral.errors import ConfigError, PermissionDenied, ProfileNotFound, SignInAgain, UsageError

pytestmark = pytest.mark.timeout(60)

@pytest.fixture
def env(tmp_path: Path, server: OAuthServer) -> Env:
    server.configure()
    return Env(tmp_path)


def _secrets_in(text: str, *secrets: str) -> list[str]:
    return [s[:8] + "..." for s in secrets if s and s in text]


# --- profiles -----------------------------------------------------------------------------


def test_auth_add_writes_a_profile_through_the_locked_writer(env: Env, server: OAuthServer) -> None:
    cfg = env.dirs.config / "config.toml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text('# my agents\n[agents.lane1]\nworkspace = "/tmp"  # keep me\n')
    proc = env.cli("auth", "add", "p1", "--token-url", server.token_url, "--client-id", "corral-test",
                   "--env-var", "OPENAI_ACCESS_TOKEN")
    assert proc.returncode == 0, proc.stderr
    text = cfg.read_text()
    assert text.startswith('# my agents\n[agents.lane1]\nworkspace = "/tmp"  # keep me\n')
    assert "[auth.p1]" in text and "\n[auth]" not in text
    assert env.cli("agents", "list").returncode == 0  # the agents' reader is not confused by [auth]
    prof = get_profile(env.dirs, "p1")
    assert (prof.token_url, prof.client_id, prof.env_var, prof.scope) == (
        server.token_url, "corral-test", "OPENAI_ACCESS_TOKEN", None)

    assert env.cli("auth", "add", "p1", "--token-url", server.token_url, "--client-id", "x").returncode == 2
    assert env.cli("auth", "add", "p1", "--update", "--scope", "openid").returncode == 0
    assert get_profile(env.dirs, "p1").scope == "openid" and get_profile(env.dirs, "p1").client_id == "corral-test"


@pytest.mark.parametrize("args", [
    ("--token-url", "http://example.com/token", "--client-id", "x"),  # a refresh token in clear text
    ("--token-url", "ftp://127.0.0.1/token", "--client-id", "x"),
    ("--token-url", "https://a.example/token", "--client-id", "x", "--env-var", "PATH"),
    ("--token-url", "https://a.example/token", "--client-id", "x", "--env-var", "1BAD"),
    ("--token-url", "https://a.example/token"),  # no client id
    ("--token-url", "https://a.example/token", "--client-id", "x", "--kind", "openclaw"),  # which provider?
    ("--token-url", "https://a.example/token", "--client-id", "x", "--kind", "openclaw", "--provider", "Bad Id"),
])
def test_auth_add_rejects_bad_input_with_exit_2(env: Env, args: tuple[str, ...]) -> None:
    proc = env.cli("auth", "add", "p1", *args)
    assert proc.returncode == 2, proc.stderr
    assert not (env.dirs.config / "config.toml").exists() or "p1" not in (env.dirs.config / "config.toml").read_text()


def test_openclaw_provider_is_read_off_the_token_url_or_given(env: Env) -> None:
    assert add_profile(env.dirs, "o1", token_url="https://auth.openai.com/oauth/token", client_id="c",
                       kind="openclaw").openclaw_provider() == "openai"
    assert add_profile(env.dirs, "o2", token_url="https://platform.claude.com/v1/oauth/token", client_id="c",
                       kind="openclaw").openclaw_provider() == "anthropic"
    assert add_profile(env.dirs, "o3", token_url="https://a.example/t", client_id="c", kind="openclaw",
                       provider="openrouter").openclaw_provider() == "openrouter"
    proc = env.cli("auth", "add", "o4", "--token-url", "https://a.example/t", "--client-id", "c", "--kind", "openclaw")
    assert proc.returncode == 2 and "--provider" in proc.stderr, proc.stderr
    assert "o4" not in (env.dirs.config / "config.toml").read_text()


def test_bad_profile_name_and_bad_table(env: Env) -> None:
    with pytest.raises(UsageError):
        add_profile(env.dirs, "../x", token_url="https://a.example/t", client_id="c")
    cfg = env.dirs.config / "config.toml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text('[auth.p1]\ntoken_url = "https://a.example/t"\nclient_id = "c"\nsecret = "no"\n')
    with pytest.raises(ConfigError, match="unknown key"):
        get_profile(env.dirs, "p1")
    assert env.cli("auth", "token", "p1").returncode == 78


def test_config_writable_by_others_is_refused_for_auth(env: Env, server: OAuthServer) -> None:
    # Whoever can write token_url can collect the refresh token.
    add_profile(env.dirs, "p1", token_url=server.token_url, client_id="corral-test")
    os.chmod(env.dirs.config / "config.toml", 0o666)
    with pytest.raises(PermissionDenied, match="writable by others"):
        get_profile(env.dirs, "p1")


def test_unknown_profile_is_exit_3_everywhere(env: Env) -> None:
    for args in (("auth", "token", "nope"), ("auth", "status", "nope")):
        proc = env.cli(*args)
        assert proc.returncode == 3 and "no auth profile 'nope'" in proc.stderr, (args, proc.stderr)
    proc = env.cli("auth", "login", "nope", "--refresh-token-stdin", input="rt-x\n")
    assert proc.returncode == 3
    with pytest.raises(ProfileNotFound) as info:
        prepare_run_auth(env.dirs, agent="a1", run_id="0000000a", grants=("nope",), owner=None)
    assert isinstance(info.value, LookupError) and info.value.exit_code == 3


# --- sign-in, token, status -----------------------------------------------------------


def test_login_stdin_then_token_refreshes_once(env: Env, server: OAuthServer) -> None:
    assert env.cli("auth", "add", "p1", "--token-url", server.token_url, "--client-id", "corral-test").returncode == 0
    assert env.cli("auth", "token", "p1").returncode == 77  # not signed in yet
    pair = server.mint()
    proc = env.cli("auth", "login", "p1", "--refresh-token-stdin", input=pair["refresh_token"] + "\n")
    assert proc.returncode == 0, proc.stderr

    first = env.cli("auth", "token", "p1")
    assert first.returncode == 0, first.stderr
    stored = env.stored("p1")
    assert first.stdout == stored["access_token"] + "\n"
    assert stored["refresh_token"] == server.stats()["newest_refresh_token"] != pair["refresh_token"]
    second = env.cli("auth", "token", "p1")
    assert second.stdout == first.stdout
    assert server.stats()["token_requests"] == 1  # the second call did not refresh

    status = env.cli("auth", "status", "--json")
    assert status.returncode == 0
    report = json.loads(status.stdout)
    entry = report["profiles"][0]
    assert entry["state"] == "valid" and entry["refresh_count"] == 1 and entry["last_refresh"]
    assert 3500 < entry["expires_in"] <= 3600
    assert report["broker"]["up"] is False
    table = env.cli("auth", "status")
    for text in (status.stdout, table.stdout + table.stderr):
        assert not _secrets_in(text, stored["access_token"], stored["refresh_token"], pair["refresh_token"])


def test_store_is_0600_in_0700_and_readable_by_others_is_refused(env: Env, server: OAuthServer) -> None:
    setup_profile(env, server)
    get_token(env.dirs, "p1")
    path = env.store_path("p1")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert not [p for p in path.parent.iterdir() if stat.S_IMODE(p.stat().st_mode) & 0o077]

    os.chmod(path, 0o644)
    for args in (("auth", "token", "p1"), ("auth", "status", "p1")):
        proc = env.cli(*args)
        assert proc.returncode == 77 and "refusing" in proc.stderr and "chmod 600" in proc.stderr, proc.stderr
    os.chmod(path, 0o600)
    os.chmod(path.parent, 0o777)
    assert env.cli("auth", "token", "p1").returncode == 77
    os.chmod(path.parent, 0o700)
    assert env.cli("auth", "token", "p1").returncode == 0


def test_reused_refresh_token_ends_in_sign_in_again_once(env: Env, server: OAuthServer) -> None:
    pair = setup_profile(env, server)
    status, body = server.refresh_directly(pair["refresh_token"])  # another tool's copy spends it
    assert status == 200
    status, body = server.refresh_directly(pair["refresh_token"])
    assert status == 401 and body["code"] == "refresh_token_reused"  # the server behaves like OpenAI's
    server.call("/reset")

    proc = env.cli("auth", "token", "p1")
    assert proc.returncode == 77
    assert REAUTH in proc.stderr and "refresh_token_reused" in proc.stderr and "another copy" in proc.stderr
    assert server.stats()["token_requests"] == 1
    proc = env.cli("auth", "token", "p1")  # known spent: fails at once, sends nothing
    assert proc.returncode == 77 and REAUTH in proc.stderr
    assert server.stats()["token_requests"] == 1
    assert json.loads(env.cli("auth", "status", "--json").stdout)["profiles"][0]["state"] == "sign-in-again"

    fresh = server.mint()
    assert env.cli("auth", "login", "p1", "--refresh-token-stdin", input=fresh["refresh_token"]).returncode == 0
    assert env.cli("auth", "token", "p1").returncode == 0


def test_unknown_refresh_token_is_invalid_grant(env: Env, server: OAuthServer) -> None:
    add_profile(env.dirs, "p1", token_url=server.token_url, client_id="corral-test")
    login(env.dirs, "p1", refresh_token="rt-never-issued")
    with pytest.raises(SignInAgain, match="invalid_grant") as info:
        get_token(env.dirs, "p1")
    assert info.value.exit_code == 77 and REAUTH in str(info.value)


def test_refresh_window_and_half_lifetime(env: Env, server: OAuthServer) -> None:
    server.configure(lifetime=2.0)
    setup_profile(env, server)
    first = get_token(env.dirs, "p1")
    assert get_token(env.dirs, "p1").access_token == first.access_token  # fresh: no refresh
    time.sleep(1.05)  # past half of a 2 s lifetime: the default 300 s window is capped there
    assert get_token(env.dirs, "p1").access_token != first.access_token
    assert server.stats()["refreshed"] == 2


def _jwt(exp: float) -> str:
    def part(obj: dict) -> str:  # type: ignore[type-arg]
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    return f"{part({'alg': 'none'})}.{part({'exp': int(exp), 'sub': 'u'})}.sig"


def test_auth_file_shapes() -> None:
    exp = time.time() + 1000
    codex = {"OPENAI_API_KEY": None, "last_refresh": "2025-01-01T00:00:00Z",
             "tokens": {"id_token": "x", "access_token": _jwt(exp), "refresh_token": "rt-c", "account_id": "a"}}
    got = parse_auth_json(codex)
    assert got.refresh_token == "rt-c" and got.access_token and abs(got.expires_at - int(exp)) < 1  # type: ignore[operator]
    claude = {"claudeAiOauth": {"accessToken": "at", "refreshToken": "rt-cl", "expiresAt": 1893456000000,
                                "scopes": ["user:inference"]}}
    got = parse_auth_json(claude)
    assert (got.refresh_token, got.expires_at, got.scope) == ("rt-cl", 1893456000.0, "user:inference")
    plain = {"access_token": "at", "refresh_token": "rt-p", "expires_at": "2030-01-01T00:00:00+00:00"}
    assert parse_auth_json(plain).expires_at == 1893456000.0
    with pytest.raises(UsageError, match="no refresh token"):
        parse_auth_json({"tokens": {"access_token": "at"}})


def test_login_from_codex_file(env: Env, server: OAuthServer, tmp_path: Path) -> None:
    add_profile(env.dirs, "p1", token_url=server.token_url, client_id="corral-test")
    pair = server.mint()
    exp = time.time() + 900
    auth_json = tmp_path / "auth.json"
    auth_json.write_text(json.dumps({"tokens": {"access_token": _jwt(exp), "refresh_token": pair["refresh_token"]},
                                     "last_refresh": "2025-01-01T00:00:00Z"}))
    original = auth_json.read_bytes()
    proc = env.cli("auth", "login", "p1", "--from-file", str(auth_json), "--keep-file")
    assert proc.returncode == 0, proc.stderr
    assert "still holds a copy" in proc.stderr and auth_json.read_bytes() == original
    proc = env.cli("auth", "login", "p1", "--from-file", str(auth_json))
    assert proc.returncode == 0, proc.stderr
    assert "moved" in proc.stderr
    left = json.loads(auth_json.read_text())["tokens"]
    assert left["access_token"] == _jwt(exp) and left["refresh_token"] != pair["refresh_token"]
    again = env.cli("auth", "login", "p1", "--from-file", str(auth_json))
    assert again.returncode == 2 and "already moved into corral" in again.stderr, again.stderr
    entry = json.loads(env.cli("auth", "status", "p1", "--json").stdout)["profiles"][0]
    assert entry["state"] == "valid" and 800 < entry["expires_in"] <= 900
    assert env.cli("auth", "token", "p1").stdout.strip() == _jwt(exp)  # still valid: no refresh
    assert server.stats().get("token_requests", 0) == 0
    assert env.cli("auth", "login", "p1").returncode == 2  # neither source given


# --- crash windows and busy ----------------------------------------------------------------


def test_marker_of_a_refresher_that_stored_is_cleared_later(env: Env, server: OAuthServer) -> None:
    setup_profile(env, server)
    refresher = fork_worker(env.dirs, "p1", stop_at="after_store")
    wait_stopped(refresher.pid)
    kill(refresher.pid)
    os.waitpid(refresher.pid, 0)
    os.close(refresher.out)
    store = TokenStore.of(env.dirs, "p1")
    assert store.read_marker() is not None  # it died before removing it
    assert json.loads(env.cli("auth", "status", "--json").stdout)["profiles"][0]["state"] == "valid"
    store.save(store.load().replace(expires_at=time.time() - 1))  # type: ignore[union-attr]
    token = get_token(env.dirs, "p1")  # the stale marker is not mistaken for a lost refresh
    assert token.access_token == env.stored("p1")["access_token"] and store.read_marker() is None
    assert server.stats()["refreshed"] == 2


def test_lost_answer_is_reported_exactly_and_in_status(env: Env, server: OAuthServer) -> None:
    setup_profile(env, server)
    refresher = fork_worker(env.dirs, "p1", stop_at="after_response")
    wait_stopped(refresher.pid)
    kill(refresher.pid)
    os.waitpid(refresher.pid, 0)
    os.close(refresher.out)
    entry = json.loads(env.cli("auth", "status", "--json").stdout)["profiles"][0]
    assert entry["state"] == "interrupted" and "answered" in entry["problem"]
    proc = env.cli("auth", "token", "p1")
    assert proc.returncode == 77
    assert f"the refresher (pid {refresher.pid}" in proc.stderr and "before it was stored" in proc.stderr
    assert REAUTH in proc.stderr
    assert server.stats()["token_requests"] == 1  # the spent token was not sent again


def test_cli_token_exits_75_while_a_refresher_hangs(env: Env, server: OAuthServer) -> None:
    setup_profile(env, server)
    refresher = fork_worker(env.dirs, "p1", stop_at="in_flight")
    try:
        wait_stopped(refresher.pid)
        started = time.monotonic()
        proc = env.cli("auth", "token", "p1", "--timeout", "0.5")
        assert time.monotonic() - started < 3
    finally:
        kill(refresher.pid)
        os.waitpid(refresher.pid, 0)
        os.close(refresher.out)
    assert proc.returncode == 75, proc.stderr
    assert f"refresher pid {refresher.pid}" in proc.stderr
    assert server.stats()["token_requests"] == 1  # only the hung one's


def test_concurrent_cli_processes_refresh_once(env: Env, server: OAuthServer) -> None:
    server.configure(latency=0.2)
    setup_profile(env, server)
    procs = [subprocess.Popen([*CORRAL, "auth", "token", "p1"], env=env.env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(12)]
    outs = [p.communicate(timeout=30) for p in procs]
    assert [p.returncode for p in procs] == [0] * 12, [o[1] for o in outs]
    assert {o[0] for o in outs} == {env.stored("p1")["access_token"] + "\n"}
    assert server.stats()["token_requests"] == 1


def test_run_env_without_a_broker(env: Env, server: OAuthServer) -> None:
    setup_profile(env, server)
    add_profile(env.dirs, "p1", env_var="OPENAI_ACCESS_TOKEN", update=True)
    run_auth = prepare_run_auth(env.dirs, agent="a1", run_id="0000000b", grants=("p1",), owner=None)
    try:
        stored = env.stored("p1")
        sock = env.dirs.runtime / "run-auth" / "0000000b" / "auth.sock"
        assert run_auth.env == {"OPENAI_ACCESS_TOKEN": stored["access_token"], "CORRAL_AUTH_PROFILE": "p1",
                                "CORRAL_AUTH_SOCKET": str(sock)}
        assert stored["refresh_token"] not in json.dumps(run_auth.env)
        assert sock.is_socket()
    finally:
        run_auth.close()
    assert not sock.parent.exists()


# --- the endpoint is pinned at sign-in (issue 12) -------------------------------------------


class _Listener:
    """A plain HTTP listener on 127.0.0.1 that records every request: where a run that can
    write config.toml would point token_url to collect refresh tokens."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.bodies: list[bytes] = []
        listener = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                listener.bodies.append(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                self.send_response(500)
                self.end_headers()

            def log_message(self, *_args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/token"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_refresh_goes_to_the_endpoint_pinned_at_sign_in(env: Env, server: OAuthServer) -> None:
    pair = setup_profile(env, server)
    assert env.stored("p1")["endpoint"]["token_url"] == server.token_url
    listener = _Listener()
    try:
        # a run (or anyone) that can write config.toml points the profile elsewhere
        config = env.dirs.config / "config.toml"
        config.write_text(config.read_text().replace(server.token_url, listener.url))
        assert get_profile(env.dirs, "p1").token_url == listener.url
        token = get_token(env.dirs, "p1")
        assert listener.bodies == []  # the refresh token never went there
        assert server.stats()["token_requests"] == 1 and token.access_token != pair["access_token"]
        assert env.stored("p1")["endpoint"]["token_url"] == server.token_url  # still pinned after the refresh
        status = env.cli("auth", "status", "--json")
        entry = json.loads(status.stdout)["profiles"][0]
        assert entry["endpoint_differs"] == ["token_url"] and entry["pinned"]["token_url"] == server.token_url
        assert "sign in again" in entry["problem"] and server.token_url in entry["problem"]
        table = env.cli("auth", "status")
        assert "token_url" in table.stderr and "pinned" in table.stderr
        # signing in again is how the new endpoint takes effect
        env.cli("auth", "login", "p1", "--refresh-token-stdin", input=server.mint()["refresh_token"] + "\n")
        assert env.stored("p1")["endpoint"]["token_url"] == listener.url
        assert env.cli("auth", "token", "p1").returncode != 0  # the listener answers 500
        assert len(listener.bodies) == 1
    finally:
        listener.close()


def test_a_credential_from_before_pinning_is_pinned_at_its_next_refresh(env: Env, server: OAuthServer) -> None:
    setup_profile(env, server)
    path = env.store_path("p1")
    data = env.stored("p1")
    del data["endpoint"]
    path.write_text(json.dumps(data))
    get_token(env.dirs, "p1")
    assert env.stored("p1")["endpoint"] == {"token_url": server.token_url, "client_id": "corral-test",
                                            "scope": None, "token_format": "form"}


def test_json_token_format_sends_a_json_body(env: Env, server: OAuthServer) -> None:
    setup_profile(env, server)
    assert env.cli("auth", "add", "p1", "--update", "--token-format", "json").returncode == 0
    assert env.cli("auth", "add", "p1", "--update", "--token-format", "xml").returncode == 2
    env.cli("auth", "login", "p1", "--refresh-token-stdin", input=server.mint()["refresh_token"] + "\n")
    assert env.stored("p1")["endpoint"]["token_format"] == "json"
    proc = env.cli("auth", "token", "p1")
    assert proc.returncode == 0, proc.stderr
    stats = server.stats()
    assert stats["token_requests"] == 1 and stats["json_requests"] == 1 and stats["refreshed"] == 1


def test_a_pinned_plain_http_url_off_loopback_is_refused(env: Env, server: OAuthServer) -> None:
    setup_profile(env, server)
    path = env.store_path("p1")
    data = env.stored("p1")
    data["endpoint"]["token_url"] = "http://192.0.2.1/token"  # a hand-edited store
    path.write_text(json.dumps(data))
    with pytest.raises(UsageError, match="loopback"):
        get_token(env.dirs, "p1")
    assert server.stats().get("token_requests", 0) == 0
    assert not (env.dirs.state / "auth" / "p1.inflight").exists()  # refused before anything was sent


def test_auth_rm_removes_the_profile_and_its_credential(env: Env, server: OAuthServer) -> None:
    add_profile(env.dirs, "p1", token_url=server.token_url, client_id="corral-test")
    pair = server.mint()
    assert env.cli("auth", "login", "p1", "--refresh-token-stdin", input=pair["refresh_token"]).returncode == 0
    assert env.cli("agents", "add", "lane", "--auth", "p1").returncode == 0
    cfg = env.dirs.config / "config.toml"
    before = cfg.read_bytes()
    proc = env.cli("auth", "rm", "p1")
    assert proc.returncode == 2 and "lane" in proc.stderr, proc.stderr
    assert cfg.read_bytes() == before and env.store_path("p1").exists(), "refused: nothing changed"
    proc = env.cli("auth", "rm", "p1", "--force")
    assert proc.returncode == 0 and "stored credential" in proc.stdout, proc.stderr
    assert "[auth.p1]" not in cfg.read_text() and not env.store_path("p1").exists()
    assert env.cli("auth", "token", "p1").returncode == 3
    assert env.cli("auth", "rm", "p1").returncode == 3


_ENOSPC_SCRIPT = r'''
import os, shutil, subprocess, sys, time, json
store, corral = sys.argv[1], sys.argv[2:]
keep = store + ".orig"
shutil.copytree(store, keep)
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", store], check=True)
for name in os.listdir(keep):
    shutil.copy2(os.path.join(keep, name), store)
env = dict(os.environ, CORRAL_AUTH_TEST_STOP_AT="after_response")
p = subprocess.Popen([*corral, "auth", "token", "p1", "--no-broker"], env=env, stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True)
for _ in range(500):
    if open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "T":
        break
    time.sleep(0.02)
try:
    with open(os.path.join(store, "filler"), "wb") as f:
        while True:
            f.write(b"x" * 4096)
except OSError:
    pass
os.kill(p.pid, 18)  # SIGCONT
out, err = p.communicate(timeout=60)
stored = json.load(open(os.path.join(store, "p1.json")))
print(json.dumps({"rc": p.returncode, "err": err, "stored_refresh": stored["refresh_token"]}))
'''


def test_a_full_token_store_after_the_answer_says_what_was_lost(env: Env, server: OAuthServer, tmp_path: Path) -> None:
    """ENOSPC in the token store once the provider has answered: the error says the new
    credential could not be saved and the old one was consumed; the store stays parseable."""
    import shutil
    import sys

    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("a private tmpfs over the token store needs root and unshare")
    pair = setup_profile(env, server)
    script = tmp_path / "enospc.py"
    script.write_text(_ENOSPC_SCRIPT)
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, str(script),
                           str(env.dirs.state / "auth"), *CORRAL], env=env.env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["rc"] == 77, result
    assert "could not be saved" in result["err"] and "consumed" in result["err"] and "sign in again" in result["err"]
    assert result["stored_refresh"] == pair["refresh_token"], "the old store is intact and parseable"
    assert server.stats()["refreshed"] == 1


def test_a_wall_clock_jump_cannot_stretch_a_tokens_life() -> None:
    """Obtained while the wall clock ran 3 h ahead, a 10-minute token must not look valid
    for 3 h once the clock is set back: the boot clock bounds it. (A clock jump cannot be
    made for real on a shared machine: the token's clocks are given.)"""
    from corral.auth.store import Token, boot_clock

    boot, clock = boot_clock()
    real = time.time()
    ahead = real + 3 * 3600
    token = Token(refresh_token="rt", access_token="at", expires_at=ahead + 600, obtained_at=ahead,
                  boot_id=boot, boot_obtained=clock)
    expiry = token.effective_expiry(real, boot_now=(boot, clock))
    assert expiry is not None and expiry <= real + 600 + 1
    assert token.effective_expiry(real, boot_now=(boot, clock + 601)) < real  # 10 min later: expired
    assert not token.valid(real + 0) or token.effective_expiry(real) <= real + 601
    # another boot: the boot clock says nothing, the wall clock is all there is
    assert token.effective_expiry(real, boot_now=("other-boot", 5.0)) == ahead + 600
    # clocks that agree change nothing
    fair = Token(refresh_token="rt", access_token="at", expires_at=real + 600, obtained_at=real, boot_id=boot,
                 boot_obtained=clock)
    assert abs(fair.effective_expiry(real, boot_now=(boot, clock)) - (real + 600)) < 1e-6
