"""The real agent CLIs under corral's auth adapters (issue 12): codex, Claude Code and
openclaw from npm (``make agent-clis`` puts them in .agent-clis/), against the test provider of
_auth_server.py, which plays both the OAuth token endpoint (rotating refresh tokens,
refresh_token_reused on a second use) and the model backend (401 for an expired token).

Host tier only: the CLIs' behaviour does not depend on the backend, and the containers
see no npm packages."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from _auth_util import Env, OAuthServer

REPO = Path(__file__).resolve().parent.parent
BIN = REPO / ".agent-clis" / "node_modules" / ".bin"
CODEX, CLAUDE, OPENCLAW = BIN / "codex", BIN / "claude", BIN / "openclaw"
NODE_BIN = next((REPO / ".agent-clis" / "node" / "node_modules").glob("node-linux-*/bin"), Path("/nonexistent"))

pytestmark = pytest.mark.skipif(not (CODEX.exists() and CLAUDE.exists() and OPENCLAW.exists()),
                                reason="the agent CLIs are not installed (make agent-clis)")


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def id_token(account: str) -> str:
    """An id_token as ChatGPT sign-in leaves it (codex checks its shape, not a signature)."""
    claims = {"email": "dev@example.com", "sub": "auth0|user-42", "exp": int(time.time()) + 3600,
              "https://api.openai.com/auth": {"chatgpt_account_id": account, "chatgpt_plan_type": "pro",
                                              "chatgpt_user_id": "user-42", "user_id": "user-42"}}
    return f"{_b64({'alg': 'RS256', 'typ': 'JWT'})}.{_b64(claims)}.c2ln"


def codex_user(env: Env, server: OAuthServer, *, lifetime: float) -> tuple[Path, dict]:
    """A user who signed codex in with ChatGPT: ~/.codex/auth.json and a config.toml that
    points codex at the test provider. Returns (HOME, the minted pair)."""
    home = env.root / "home"
    codex_home = home / ".codex"
    codex_home.mkdir(parents=True)
    server.call("/config", {"lifetime": lifetime, "jwt": True})  # OpenAI's access tokens carry exp
    pair = server.mint()
    server.call("/config", {"lifetime": 3600})  # what corral's refresh gets lasts
    server.call("/reset")
    pair["id_token"] = id_token("acct-42")
    auth = {"auth_mode": "chatgpt", "OPENAI_API_KEY": None,
            "tokens": {"id_token": pair["id_token"], "access_token": pair["access_token"],
                       "refresh_token": pair["refresh_token"], "account_id": "acct-42"},
            "last_refresh": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (codex_home / "auth.json").write_text(json.dumps(auth))
    (codex_home / "config.toml").write_text(f"""
chatgpt_base_url = "{server.base}/backend-api/"
model_provider = "fake"
model = "gpt-5"

[model_providers.fake]
name = "fake"
base_url = "{server.base}/v1"
wire_api = "responses"
requires_openai_auth = true
supports_websockets = false
""")
    env.env.update(HOME=str(home), PATH=f"{BIN}:{os.environ['PATH']}")
    return home, pair


def import_codex(env: Env, server: OAuthServer, home: Path, pair: dict, signin: str = "file") -> None:
    """Sign profile cx in from codex's auth.json (id_token and account id kept), or with
    the bare refresh token on stdin (corral then makes up an id_token for codex)."""
    assert env.cli("auth", "add", "cx", "--kind", "codex", "--token-url", server.token_url,
                   "--client-id", "corral-test").returncode == 0
    if signin == "stdin":
        proc = env.cli("auth", "login", "cx", "--refresh-token-stdin", input=pair["refresh_token"] + "\n")
        assert proc.returncode == 0, proc.stderr
        return
    proc = env.cli("auth", "login", "cx", "--from-file", str(home / ".codex" / "auth.json"))
    assert proc.returncode == 0, proc.stderr
    assert "moved" in proc.stderr
    left = json.loads((home / ".codex" / "auth.json").read_text())["tokens"]
    assert left["refresh_token"] != pair["refresh_token"], "the file no longer holds a usable refresh token"
    assert left["access_token"] == pair["access_token"]


def test_codex_run_sees_its_auth_json_without_the_refresh_token(tmp_path: Path, server: OAuthServer) -> None:
    env = Env(tmp_path)
    home, pair = codex_user(env, server, lifetime=3600)
    import_codex(env, server, home, pair)
    proc = env.cli("run", "--auth", "cx", "lane", "--", "sh", "-c",
                   'cat "$CODEX_HOME/auth.json"; echo; echo @@; env | grep -c -E "^(OPENAI_API_KEY|CODEX_API_KEY)=" || true; '
                   'cat "$CODEX_HOME/config.toml" | grep -c model_providers',
                   extra_env={"OPENAI_API_KEY": "sk-should-not-reach-the-run"})
    assert proc.returncode == 0, proc.stderr
    first, _, rest = proc.stdout.partition("@@")
    seen = json.loads(first)
    assert seen["auth_mode"] == "chatgpt" and seen["last_refresh"]
    tokens = seen["tokens"]
    assert tokens["access_token"] == pair["access_token"]
    assert tokens["id_token"] == pair["id_token"], "the id_token kept from the import"
    assert tokens["account_id"] == "acct-42"
    assert tokens["refresh_token"] and tokens["refresh_token"] != pair["refresh_token"]
    # the provider does not take the sentinel
    status, answer = server.refresh_directly(tokens["refresh_token"])
    assert status in (400, 401) and "access_token" not in answer
    assert rest.split() == ["0", "1"], "no competing key in the environment; the user's codex config is there"
    assert "sk-should-not" not in proc.stdout


def test_what_codex_writes_outlives_the_run_in_the_agents_data_dir(tmp_path: Path, server: OAuthServer) -> None:
    """The run's CODEX_HOME is private and goes with the run; codex's sessions and state
    databases stay with the agent: the second run sees the first one's session, and after
    it both are kept. Another agent's runs start with nothing."""
    env = Env(tmp_path)
    home, pair = codex_user(env, server, lifetime=3600)
    import_codex(env, server, home, pair)
    data = env.dirs.state / "agent-data" / "lane" / "codex"
    count = 'find -L "$CODEX_HOME/sessions" -name "rollout-*" 2>/dev/null | wc -l'
    for i in range(2):
        proc = env.cli("run", "--auth", "cx", "--cwd", str(tmp_path), "lane", "--", "sh", "-c",
                       f'{count}; codex exec --skip-git-repo-check "task {i}" >/dev/null 2>&1 || exit 7; {count}',
                       timeout=90)
        assert proc.returncode == 0, (proc.stdout, proc.stderr)
        assert proc.stdout.split() == [str(i), str(i + 1)], proc.stdout
    assert len(list((data / "sessions").rglob("rollout-*"))) == 2
    assert not (data / "auth.json").exists(), "the credential stays per run"
    assert list(data.glob("state_*.sqlite")), "codex's state database is kept with the agent"
    assert not list((env.dirs.runtime / "run-auth").iterdir()), "the per-run dirs are gone"
    proc = env.cli("run", "--auth", "cx", "other", "--", "sh", "-c", count)
    assert proc.returncode == 0 and proc.stdout.split() == ["0"], (proc.stdout, proc.stderr)


@pytest.mark.parametrize("signin", ["file", "stdin"])
def test_codex_login_status_under_corral(tmp_path: Path, server: OAuthServer, signin: str) -> None:
    env = Env(tmp_path)
    home, pair = codex_user(env, server, lifetime=3600)
    import_codex(env, server, home, pair, signin)
    proc = env.cli("run", "--auth", "cx", "lane", "--", "codex", "login", "status", timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ChatGPT" in proc.stdout + proc.stderr


@pytest.mark.parametrize("signin", ["file", "stdin"])
def test_parallel_codex_runs_across_an_expiry_share_one_refresh(tmp_path: Path, server: OAuthServer,
                                                               signin: str) -> None:
    """4 detached runs each run `codex exec` before and after the signed-in access token
    expires at the provider. corral refreshes it once, single-flight, and rewrites every
    run's auth.json; codex never refreshes by itself (its refresh would reach corral's
    per-run endpoint, never the provider). Signed in from stdin, corral holds no access
    token yet: its one refresh comes at the first run's start."""
    lifetime = 10.0
    env = Env(tmp_path)
    home, pair = codex_user(env, server, lifetime=lifetime)
    expires = time.time() + lifetime
    import_codex(env, server, home, pair, signin)
    work = tmp_path / "work"
    work.mkdir()
    runs = []
    for i in range(4):
        out = work / f"r{i}"
        script = (f'codex exec --skip-git-repo-check "before {i}" > {out}.1 2>&1; echo $? >> {out}.1; '
                  f'while [ "$(date +%s)" -le {int(expires) + 1} ]; do sleep 0.2; done; '
                  f'codex exec --skip-git-repo-check "after {i}" > {out}.2 2>&1; echo $? >> {out}.2')
        proc = env.cli("run", "-d", "--auth", "cx", "--cwd", str(work), "lane", "--", "sh", "-c", script)
        assert proc.returncode == 0, proc.stderr
        runs.append(proc.stdout.strip())
    for run_id in runs:
        proc = env.cli("wait", run_id, "--timeout", "90", timeout=100)
        assert proc.returncode == 0, (run_id, proc.stdout, proc.stderr, env.cli("logs", run_id).stdout)
    for i in range(4):
        for part in (1, 2):
            text = (work / f"r{i}.{part}").read_text()
            assert text.rstrip().endswith("0") and "done" in text, text[-2000:]
    stats = server.stats()
    assert stats.get("refreshed", 0) == 1, stats
    assert stats.get("reused", 0) == 0 and stats.get("unknown", 0) == 0, stats  # no sentinel, no copy spent
    assert stats.get("token_requests", 0) == 1, "nothing but corral's one refresh reached the token endpoint"
    refreshed_at = stats["refresh_times"][0]
    model = stats["model"]
    assert len(model) >= 8 and all(m["ok"] for m in model), model
    assert all(m["account"] == ("acct-42" if signin == "file" else None) for m in model), model
    after = [m for m in model if m["t"] > refreshed_at + 0.5]
    assert len(after) >= 4 and all(m["token"] != pair["access_token"] for m in after), model
    assert len({m["token"] for m in after}) == 1
    late = [m for m in model if m["t"] > expires]
    assert len(late) >= 4, "the second codex exec of each run came after the first token expired"


class ConnectLog:
    """An HTTPS proxy on 127.0.0.1 that only writes down where a client tried to go (each
    CONNECT's host) and refuses it: a run whose HTTPS_PROXY points here shows every
    outside host the CLI would have contacted, with nothing leaving the machine."""

    def __init__(self) -> None:
        import socket
        import threading

        self.hosts: list[str] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    line = conn.recv(4096).split(b"\r\n", 1)[0].decode(errors="replace")
                    self.hosts.append(line.split()[1] if len(line.split()) > 1 else line)
                    conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def claude_user(env: Env, server: OAuthServer, *, lifetime: float) -> tuple[Path, dict]:
    """A user signed in to Claude Code: ~/.claude/.credentials.json as its sign-in leaves it."""
    home = env.root / "home"
    (home / ".claude").mkdir(parents=True)
    server.call("/config", {"lifetime": lifetime})
    pair = server.mint()
    server.call("/config", {"lifetime": 3600})
    server.call("/reset")
    creds = {"claudeAiOauth": {"accessToken": pair["access_token"], "refreshToken": pair["refresh_token"],
                               "expiresAt": int((time.time() + lifetime) * 1000),
                               "scopes": ["user:inference", "user:profile"], "subscriptionType": "pro"}}
    (home / ".claude" / ".credentials.json").write_text(json.dumps(creds))
    env.env.update(HOME=str(home), PATH=f"{BIN}:{os.environ['PATH']}")
    return home, pair


def test_claude_run_outlives_its_token_on_brokered_credentials(tmp_path: Path, server: OAuthServer) -> None:
    """One `claude -p` process asks the model, runs a tool for longer than the signed-in
    access token lives, and asks again. Without corral the second request gets 401 (Claude
    Code holds no refresh token it could use); under corral the run's .credentials.json
    was rewritten with the broker's new token, which Claude Code re-reads. Its own token
    endpoint (platform.claude.com, through the logging proxy) is never contacted."""
    lifetime = 8.0
    env = Env(tmp_path)
    home, pair = claude_user(env, server, lifetime=lifetime)
    expires = time.time() + lifetime
    assert env.cli("auth", "add", "cl", "--kind", "claude", "--token-url", server.token_url,
                   "--client-id", "corral-test").returncode == 0
    proc = env.cli("auth", "login", "cl", "--from-file", str(home / ".claude" / ".credentials.json"))
    assert proc.returncode == 0 and "moved" in proc.stderr, proc.stderr
    proxy = ConnectLog()
    try:
        sleep = int(lifetime) + 3
        proc = env.cli("run", "--auth", "cl", "lane",
                       "--env", f"ANTHROPIC_BASE_URL={server.base}", "--env", f"HTTPS_PROXY={proxy.url}",
                       "--env", "NO_PROXY=127.0.0.1,localhost", "--env", "DISABLE_TELEMETRY=1",
                       "--env", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1", "--", "sh", "-c",
                       f'test ! -e "$CLAUDE_CONFIG_DIR/.credentials.json" || '
                       f'! grep -q refreshToken "$CLAUDE_CONFIG_DIR/.credentials.json" || exit 9; '
                       f'claude -p "RUN: sleep {sleep}" --allowedTools "Bash(sleep:*)"',
                       extra_env={"ANTHROPIC_API_KEY": "sk-ant-should-not-reach-the-run"}, timeout=90)
    finally:
        proxy.close()
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert "done" in proc.stdout
    model = [m for m in server.stats()["model"] if m["path"] == "/v1/messages"]
    assert len(model) >= 2 and all(m["ok"] for m in model), model
    assert all(m["api_key"] is None for m in model), "the API key variable did not reach Claude Code"
    first, last = model[0], model[-1]
    assert first["token"] == pair["access_token"] and first["t"] < expires
    assert last["t"] > expires and last["token"] != pair["access_token"], "past the expiry, a new token"
    stats = server.stats()
    assert stats.get("refreshed", 0) == 1 and stats.get("token_requests", 0) == 1, stats
    assert stats.get("reused", 0) == 0, stats
    # Claude Code's token endpoint is hard-coded (TOKEN_URL platform.claude.com in its
    # bundle). With non-essential traffic off it tries no outside host at all; with it on,
    # api.anthropic.com (account metadata) shows up here, so the proxy does see its traffic.
    assert proxy.hosts == [], proxy.hosts


def _profile_state(status_output: str, profile_id: str) -> dict:
    """The profile's entry in `openclaw models status --json` (banner lines skipped)."""
    data = json.loads(status_output[status_output.index("{"):])
    found: list[dict] = []

    def walk(x: object) -> None:
        if isinstance(x, dict):
            if x.get("profileId") == profile_id:
                found.append(x)
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(data)
    assert found, data
    return found[0]


def test_openclaw_lists_the_runs_token_profile_as_valid_and_it_is_kept_fresh(tmp_path: Path,
                                                                           server: OAuthServer) -> None:
    """openclaw 2026.9 under corral: the run's own state dir holds one `token` profile
    (corral:oc), added and rewritten through openclaw's own paste-token; `openclaw models
    status` calls it valid, and later in the run its expiry has moved on (corral
    refreshed and rewrote it before it ran out). The user's own ~/.openclaw is not touched."""
    # Long enough that a loaded CI machine's node starts (each `openclaw` call, and each
    # rewrite through paste-token, took up to ~5 s there) fit between two rewrites.
    lifetime = 30.0
    env = Env(tmp_path)
    home = env.root / "home"
    home.mkdir()
    env.env.update(HOME=str(home), PATH=f"{NODE_BIN}:{BIN}:{os.environ['PATH']}")
    server.call("/config", {"lifetime": lifetime})
    pair = server.mint()
    server.call("/reset")
    assert env.cli("auth", "add", "oc", "--kind", "openclaw", "--provider", "openai", "--token-url",
                   server.token_url, "--client-id", "corral-test").returncode == 0
    proc = env.cli("auth", "login", "oc", "--refresh-token-stdin", input=pair["refresh_token"] + "\n")
    assert proc.returncode == 0, proc.stderr
    wait = int(lifetime * 0.75)
    logs = tmp_path / "oc-logs"
    logs.mkdir()
    os.chmod(logs, 0o777)
    proc = env.cli("run", "--auth", "oc", "lane", "--", "sh", "-c",
                   f'openclaw models status --json 2> {logs}/1.err || exit 11; echo @@; '
                   'env | grep -c -E "^(OPENAI_API_KEY|OPENCLAW_CONFIG_PATH)=" || true; echo @@; '
                   f'sleep {wait}; openclaw models status --json 2> {logs}/2.err; rc=$?; '
                   f'[ $rc = 0 ] || {{ echo "second status: exit $rc" >&2; exit $rc; }}',
                   extra_env={"OPENAI_API_KEY": "sk-should-not-reach-the-run", "OPENCLAW_CONFIG_PATH": "/x"},
                   timeout=180)
    if proc.returncode != 0:  # say as much as can be known about how it ended
        errs = {p.name: p.read_text()[-1500:] for p in logs.iterdir()}
        record = env.cli("ps", "--all", "--json").stdout
        raise AssertionError(f"run exited {proc.returncode}\nstdout: {proc.stdout[-1500:]}\nstderr: "
                             f"{proc.stderr}\nopenclaw stderr: {errs}\nrecords: {record[-3000:]}")
    first, count, second = proc.stdout.split("@@")
    before, after = _profile_state(first, "corral:oc"), _profile_state(second, "corral:oc")
    for state in (before, after):
        assert state["type"] == "token" and state["provider"] == "openai", state
        assert state["status"] in ("ok", "expiring") and state["remainingMs"] > 0, state  # expiring: < 24 h
    assert after["expiresAt"] > before["expiresAt"], "rewritten with a newer token while the run lived"
    assert count.split() == ["0"], "no competing key or config path in the run's environment"
    stats = server.stats()
    assert stats.get("refreshed", 0) >= 2 and stats.get("reused", 0) == 0, stats
    assert stats.get("token_requests", 0) == stats["refreshed"], "only corral's refreshes reached the provider"
    assert not (home / ".openclaw").exists()


def test_claude_api_key_profile_goes_through_apikeyhelper(tmp_path: Path, server: OAuthServer) -> None:
    """kind claude-api-key: Claude Code's apiKeyHelper runs `corral auth token` inside the
    run (its broker socket), and sends what it prints as the API key; no credential file."""
    env = Env(tmp_path)
    home = env.root / "home"
    (home / ".claude").mkdir(parents=True)
    (home / ".claude" / "settings.json").write_text(json.dumps({"env": {"FROM_USER_SETTINGS": "1"}}))
    env.env.update(HOME=str(home), PATH=f"{BIN}:{os.environ['PATH']}")
    pair = server.mint()
    server.call("/reset")
    assert env.cli("auth", "add", "ck", "--kind", "claude-api-key", "--token-url", server.token_url,
                   "--client-id", "corral-test").returncode == 0
    assert env.cli("auth", "login", "ck", "--refresh-token-stdin", input=pair["refresh_token"] + "\n").returncode == 0
    proc = env.cli("run", "--auth", "ck", "lane", "--env", f"ANTHROPIC_BASE_URL={server.base}",
                   "--env", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1", "--", "sh", "-c",
                   'ls -A "$CLAUDE_CONFIG_DIR"; echo @@; claude -p hello',
                   extra_env={"ANTHROPIC_API_KEY": "sk-ant-should-not-reach-the-run"}, timeout=90)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    listing, _, answer = proc.stdout.partition("@@")
    assert ".credentials.json" not in listing.split() and "settings.json" in listing.split()
    assert "done" in answer
    model = [m for m in server.stats()["model"] if m["path"] == "/v1/messages"]
    store = json.loads(env.store_path("ck").read_text())
    assert model and all(m["ok"] and m["api_key"] == store["access_token"] for m in model), (model, store)
