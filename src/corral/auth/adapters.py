"""Adapters: a profile's credential in the form one agent CLI reads (``[auth.X] kind``).

Each run that has the profile gets its own copy in a private per-run directory
(:mod:`.runauth`), holding the broker's current access token and never the real refresh
token, rewritten by the run's owner before the CLI's own refresh margin:

- ``env``: the access token in ``env_var`` (fixed for the run; ``corral auth token
  PROFILE`` inside the run gets a fresh one from the run's broker socket);
- ``codex``: ``$CODEX_HOME/auth.json`` in ChatGPT mode (id_token and account id kept from
  sign-in, a sentinel refresh token) plus a copy of the user's codex ``config.toml``;
  ``CODEX_REFRESH_TOKEN_URL_OVERRIDE`` points codex's own refresh at an endpoint the
  owner serves for this run, which answers from the single flight (:mod:`.runauth`).
  Everything else codex writes there (sessions, history, its state databases) lives in
  the agent's data dir, linked in at the start and merged back at the end.
  Written under ``flock($CODEX_HOME/auth.lock)``, codex's own lock, so a codex writing the
  file at the same moment is never torn. codex re-reads the file before refreshing and
  after a 401, so a rewrite is picked up without a restart;
- ``claude``: ``$CLAUDE_CONFIG_DIR/.credentials.json`` with no refresh token: Claude Code
  then never refreshes (nothing to send to its hard-coded endpoint) and re-reads the file
  when it changes;
- ``claude-api-key``: Claude Code's ``apiKeyHelper`` runs ``corral auth token PROFILE``;
- ``openclaw``: a ``token`` profile in a per-run ``OPENCLAW_STATE_DIR``, added and
  rewritten through openclaw's own ``models auth paste-token``.

Each adapter also names the variables that would make the CLI use another credential;
they are removed from the run's environment.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import time
from datetime import UTC
from pathlib import Path
from typing import Any

from ..errors import AuthError, UsageError
from .profiles import Profile
from .refresh import AccessToken

SENTINEL_PREFIX = "corral-run-"  # the refresh token a CLI sees: worthless anywhere but its run's endpoint


class Adapter:
    """``env``: the token in a variable. Subclasses write a file and keep it fresh."""

    kind = "env"
    # Rewrite this long before expiry. codex and Claude Code act at expiry - 5 min; the
    # rewrite must land before that, so the CLI never decides to refresh by itself.
    lead = 0.0
    unset: tuple[str, ...] = ()

    def __init__(self, profile: Profile, root: Path, *, run_id: str, extra: dict[str, str] | None,
                 owner: tuple[int, int] | None) -> None:
        self.profile = profile
        self.root = root  # the run's private dir (runauth.run_dir)
        self.run_id = run_id
        self.extra = dict(extra or {})
        self.owner = owner  # (uid, gid) the files must belong to: the run's identity
        self.sentinel = f"{SENTINEL_PREFIX}{run_id}-{os.urandom(6).hex()}"

    def setup(self, token: AccessToken, endpoint_url: str | None) -> dict[str, str]:
        """Write the first copy; return the variables the run gets."""
        return {self.profile.env_var: token.access_token}

    def write(self, token: AccessToken) -> None:
        """Put *token* where the CLI reads it (atomically)."""

    @property
    def wants_endpoint(self) -> bool:
        return False

    # The CLI writes data of its own next to its credential (sessions, history): if so,
    # that part lives in a per-agent ``data_dir`` (runauth.agent_data_dir), set before setup.
    keeps_data = False
    data_dir: Path | None = None

    def finish(self) -> None:
        """The run has ended: keep what must outlive it."""

    # -- helpers ---------------------------------------------------------------------

    def _dir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(mode=0o700, exist_ok=True)
        self._chown(path)
        return path

    def _chown(self, path: Path | int) -> None:
        if self.owner is not None and os.geteuid() == 0:
            if isinstance(path, int):
                os.fchown(path, *self.owner)
            else:
                os.chown(path, *self.owner)

    def _write_json(self, path: Path, data: Any, *, mode: int = 0o600) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, mode)
            self._chown(fd)
            os.write(fd, json.dumps(data, indent=2).encode())
            os.close(fd)
            fd = -1
            os.replace(tmp, path)  # no fsync: a per-run copy, rebuilt if lost
        except BaseException:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def _copy_config(self, source_dir: Path, names: tuple[str, ...], dest: Path, *, mode: int = 0o444) -> None:
        """The user's own settings for the CLI, copied (read-only unless the CLI must write
        the copy), never their credentials."""
        for name in names:
            src = source_dir / name
            if src.is_file():
                target = dest / name
                shutil.copyfile(src, target)
                os.chmod(target, mode)
                self._chown(target)


def _iso(ts: float) -> str:
    from datetime import datetime

    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data, separators=(",", ":")).encode()).rstrip(b"=").decode()


def unsigned_id_token(account_id: str | None, expires_at: float | None) -> str:
    """A 3-part JWT for codex's ``id_token`` when sign-in gave none (a plain refresh
    token). codex parses it for display (plan, email) and checks no signature; the model
    backend never sees it.

    It names a user (``sub``, ``chatgpt_user_id``): codex compares the signed-in owner
    before and after each refresh, and an id_token naming none reads as an account switch
    that disables every request it makes."""
    user = f"corral-{account_id or 'user'}"
    claims: dict[str, Any] = {"iss": "corral", "sub": user, "exp": int(expires_at or time.time() + 3600),
                              "https://api.openai.com/auth": {"chatgpt_account_id": account_id or "",
                                                              "chatgpt_user_id": user, "user_id": user,
                                                              "chatgpt_plan_type": "unknown"}}
    return f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}.corral"


class CodexAdapter(Adapter):
    kind = "codex"
    lead = 360.0  # codex refreshes at exp - 5 min
    unset = ("OPENAI_API_KEY", "CODEX_API_KEY", "CODEX_ACCESS_TOKEN", "CODEX_REFRESH_TOKEN_URL_OVERRIDE",
             "CODEX_REVOKE_TOKEN_URL_OVERRIDE")
    CONFIG_FILES = ("config.toml", "AGENTS.md")

    @property
    def wants_endpoint(self) -> bool:
        return True

    @property
    def home(self) -> Path:
        return self.root / "codex"

    keeps_data = True
    OWN = ("auth.json", "auth.lock", *CONFIG_FILES)  # per run; all else codex writes is the agent's
    _SQLITE_SIDE = ("-wal", "-shm", "-journal")

    def setup(self, token: AccessToken, endpoint_url: str | None) -> dict[str, str]:
        home = self._dir("codex")
        source = Path(os.environ.get("CODEX_HOME") or os.path.expanduser("~/.codex"))
        self._copy_config(source, self.CONFIG_FILES, home)
        self._link_data(home)
        self.write(token)
        env = {"CODEX_HOME": str(home)}
        if endpoint_url:
            env["CODEX_REFRESH_TOKEN_URL_OVERRIDE"] = f"{endpoint_url}/token"
            env["CODEX_REVOKE_TOKEN_URL_OVERRIDE"] = f"{endpoint_url}/revoke"
        return env

    def auth_json(self, token: AccessToken) -> dict[str, Any]:
        account = self.extra.get("account_id")
        return {
            "auth_mode": "chatgpt",
            "OPENAI_API_KEY": None,
            "tokens": {"id_token": self.extra.get("id_token") or unsigned_id_token(account, token.expires_at),
                       "access_token": token.access_token, "refresh_token": self.sentinel, "account_id": account},
            # Without last_refresh codex sends no Authorization header at all.
            "last_refresh": _iso(time.time()),
        }

    def write(self, token: AccessToken) -> None:
        home = self.home
        fd = os.open(home / "auth.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            self._chown(fd)
            fcntl.flock(fd, fcntl.LOCK_EX)  # codex's own lock around its auth.json writes
            self._write_json(home / "auth.json", self.auth_json(token))
        finally:
            os.close(fd)

    def _own(self, name: str) -> bool:
        return name in self.OWN or (name.startswith(".auth.json.") and name.endswith(".tmp"))

    def _link_data(self, home: Path) -> None:
        """Link what earlier runs of the agent left (sessions, history, codex's state
        databases) into this run's CODEX_HOME: codex writes through the links into the
        per-agent dir, as codex processes share one ~/.codex."""
        if self.data_dir is None:
            return
        self.data_dir.parent.mkdir(mode=0o711, parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            self.data_dir.mkdir(mode=0o700)
            self._chown(self.data_dir)
        for entry in os.scandir(self.data_dir):
            if not self._own(entry.name):
                os.symlink(entry.path, home / entry.name)

    def finish(self) -> None:
        """Move what this run's codex made anew into the agent's data dir. A name another
        run of the agent made meanwhile is kept as theirs (a directory is merged)."""
        home = self.home
        if self.data_dir is None or not home.is_dir() or not self.data_dir.is_dir():
            return
        self._merge(home, self.data_dir, top=True)

    def _merge(self, src: Path, dst: Path, *, top: bool = False) -> None:
        entries = sorted(os.scandir(src), key=lambda e: e.name.endswith(self._SQLITE_SIDE))  # databases first
        moved: set[str] = set()
        for entry in entries:
            if (top and self._own(entry.name)) or entry.is_symlink():
                continue
            target = dst / entry.name
            side = next((entry.name[:-len(x)] for x in self._SQLITE_SIDE if entry.name.endswith(x)), None)
            if side is not None and side not in moved and (src / side).exists():
                continue  # a database's journal goes only with its database
            if entry.is_dir() and target.is_dir() and not target.is_symlink():
                self._merge(Path(entry.path), target)
            elif not os.path.lexists(target):
                shutil.move(entry.path, target)
                moved.add(entry.name)

    def refresh_answer(self, token: AccessToken) -> dict[str, Any]:
        """What codex's refresh request to the run's endpoint gets back."""
        tokens = self.auth_json(token)["tokens"]
        return {"access_token": token.access_token, "id_token": tokens["id_token"],
                "refresh_token": self.sentinel, "token_type": token.token_type,
                **({"expires_in": max(int(token.expires_at - time.time()), 1)} if token.expires_at else {})}


class ClaudeAdapter(Adapter):
    kind = "claude"
    lead = 120.0  # with no refresh token it never refreshes; just never let the file expire
    unset = ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "CLAUDE_CODE_OAUTH_TOKEN",
             "CLAUDE_CODE_OAUTH_REFRESH_TOKEN", "CLAUDE_CONFIG_DIR")
    CONFIG_FILES = ("settings.json", "CLAUDE.md")

    @property
    def config_dir(self) -> Path:
        return self.root / "claude"

    def setup(self, token: AccessToken, endpoint_url: str | None) -> dict[str, str]:
        home = self._dir("claude")
        source = Path(os.environ.get("CLAUDE_CONFIG_DIR") or os.path.expanduser("~/.claude"))
        self._copy_config(source, self.CONFIG_FILES, home)
        self.write(token)
        return {"CLAUDE_CONFIG_DIR": str(home)}

    def write(self, token: AccessToken) -> None:
        scopes = (self.profile.scope or "user:inference").split()
        oauth: dict[str, Any] = {"accessToken": token.access_token, "scopes": scopes,
                                 # No refreshToken: Claude Code then never refreshes by itself.
                                 "expiresAt": int((token.expires_at or time.time() + 3600) * 1000)}
        for key in ("subscriptionType", "rateLimitTier"):
            if self.extra.get(key):
                oauth[key] = self.extra[key]
        self._write_json(self.config_dir / ".credentials.json", {"claudeAiOauth": oauth})


class ClaudeApiKeyAdapter(ClaudeAdapter):
    """``claude-api-key``: the profile's token as Claude Code's API key, through its
    ``apiKeyHelper`` setting, which runs ``corral auth token PROFILE`` (the run's broker
    socket) at start, after ``CLAUDE_CODE_API_KEY_HELPER_TTL_MS`` and on a 401. Nothing is
    written that could go stale, so there is nothing to rewrite."""

    kind = "claude-api-key"
    lead = 0.0
    HELPER_TTL_MS = 300_000  # ask again every 5 min even without a 401

    def setup(self, token: AccessToken, endpoint_url: str | None) -> dict[str, str]:
        import shlex
        import sys

        home = self._dir("claude")
        source = Path(os.environ.get("CLAUDE_CONFIG_DIR") or os.path.expanduser("~/.claude"))
        self._copy_config(source, ("CLAUDE.md",), home)
        settings: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            loaded = json.loads((source / "settings.json").read_text())
            settings = loaded if isinstance(loaded, dict) else {}
        # The interpreter corral runs on, by absolute path: the run's PATH may lack corral.
        settings["apiKeyHelper"] = shlex.join([sys.executable, "-m", "corral.cli.main", "auth", "token",
                                               self.profile.name])
        self._write_json(home / "settings.json", settings, mode=0o400)
        return {"CLAUDE_CONFIG_DIR": str(home), "CLAUDE_CODE_API_KEY_HELPER_TTL_MS": str(self.HELPER_TTL_MS)}

    def write(self, token: AccessToken) -> None:
        """Nothing to rewrite: Claude Code asks the helper."""


class OpenclawAdapter(Adapter):
    """A per-run ``OPENCLAW_STATE_DIR`` and ``OPENCLAW_HOME`` whose only credential is a
    ``token`` profile (``corral:PROFILE``) holding the broker's access token. openclaw
    never refreshes ``token`` profiles, so corral rewrites it before expiry, the way
    openclaw itself adds one: ``openclaw models auth paste-token`` (token on stdin), run as
    the run's user. openclaw keeps profiles in SQLite, whose own locking makes a rewrite
    safe beside a running openclaw. ``OPENCLAW_HOME`` rather than ``HOME``: openclaw
    imports codex and Claude Code logins it finds in its home, and everything else in
    the run (git, ssh) keeps the run's own HOME."""

    kind = "openclaw"
    lead = 300.0
    unset = ("OPENCLAW_STATE_DIR", "OPENCLAW_HOME", "OPENCLAW_CONFIG_PATH", "OPENCLAW_PROFILE", "OPENAI_API_KEY",
             "ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "CLAUDE_CODE_OAUTH_TOKEN")
    CONFIG_FILES = ("openclaw.json",)
    PASTE_TIMEOUT = 60.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.provider = self.profile.openclaw_provider()
        # Found once, on the launching user's PATH: the refresher must not pick up
        # another binary that a run put on some PATH later.
        self.binary = shutil.which("openclaw")
        if self.binary is None:
            raise UsageError(f"auth profile {self.profile.name!r} is of kind openclaw, but openclaw is not on PATH",
                             hint="install it (npm install -g openclaw), or use --kind env")
        self.path = os.environ.get("PATH", "/usr/bin:/bin")

    @property
    def state_dir(self) -> Path:
        return self.root / "openclaw" / "state"

    @property
    def home(self) -> Path:
        return self.root / "openclaw" / "home"

    @property
    def profile_id(self) -> str:
        return f"corral:{self.profile.name}"

    def setup(self, token: AccessToken, endpoint_url: str | None) -> dict[str, str]:
        self._dir("openclaw")
        state, home = self._dir("openclaw/state"), self._dir("openclaw/home")
        source = Path(os.environ.get("OPENCLAW_STATE_DIR") or os.path.expanduser("~/.openclaw"))
        self._copy_config(source, self.CONFIG_FILES, state, mode=0o600)  # paste-token adds the profile to it
        self.write(token)
        return {"OPENCLAW_STATE_DIR": str(state), "OPENCLAW_HOME": str(home)}

    def write(self, token: AccessToken) -> None:
        import subprocess

        assert self.binary is not None  # __init__ refused a profile without one
        argv = [self.binary, "models", "auth", "paste-token", "--provider", self.provider,
                "--profile-id", self.profile_id]
        if token.expires_at is not None:
            argv += ["--expires-in", f"{max(int(token.expires_at - time.time()), 1)}s"]
        env = {"PATH": self.path, "HOME": str(self.home), "OPENCLAW_HOME": str(self.home),
               "OPENCLAW_STATE_DIR": str(self.state_dir), "NO_COLOR": "1", "OPENCLAW_NO_AUTO_UPDATE": "1",
               "LANG": os.environ.get("LANG", "C.UTF-8")}
        ids: dict[str, Any] = {}
        if self.owner is not None and os.geteuid() == 0 and self.owner[0] != 0:
            ids = {"user": self.owner[0], "group": self.owner[1], "extra_groups": []}
        try:
            proc = subprocess.run(argv, input=token.access_token, env=env, cwd=str(self.home), text=True,
                                  capture_output=True, timeout=self.PASTE_TIMEOUT, check=False, **ids)
        except subprocess.TimeoutExpired:
            raise AuthError(f"openclaw models auth paste-token did not finish in {self.PASTE_TIMEOUT:.0f} s") \
                from None
        except OSError as err:
            raise AuthError(f"cannot run {argv[0]}: {err.strerror or err}") from None
        if proc.returncode != 0:
            last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
            raise AuthError(f"openclaw models auth paste-token failed: {last[0]}")


ADAPTERS: dict[str, type[Adapter]] = {"env": Adapter, "codex": CodexAdapter, "claude": ClaudeAdapter,
                                      "claude-api-key": ClaudeApiKeyAdapter, "openclaw": OpenclawAdapter}


def adapter_for(profile: Profile, root: Path, *, run_id: str, extra: dict[str, str] | None,
                owner: tuple[int, int] | None) -> Adapter:
    return ADAPTERS[profile.kind](profile, root, run_id=run_id, extra=extra, owner=owner)


__all__ = [
    "ADAPTERS",
    "SENTINEL_PREFIX",
    "Adapter",
    "ClaudeAdapter",
    "ClaudeApiKeyAdapter",
    "CodexAdapter",
    "OpenclawAdapter",
    "adapter_for",
    "unsigned_id_token",
]
