"""A run's credentials: its grants, its own broker socket, its adapters' files.

For a run started with auth profiles (``--auth``, the agent's ``auth``), corral makes
``<runtime>/run-auth/<id>/`` (0700, the run's uid), which the sandbox binds back into the
run although the runtime dir is hidden:

- ``auth.sock``: a broker serving this run's processes only (peer cgroup), only the
  granted profiles. ``corral auth token PROFILE`` inside the run uses it
  (``CORRAL_AUTH_SOCKET``), whether or not a broker service runs: tokens come from the
  service if one listens, else from the store in the owner, through the one single flight;
- one directory per adapter (``codex/``, ``claude/``, ``openclaw/``), see :mod:`.adapters`;
  what codex writes there besides its credential lives in ``<state>/agent-data/AGENT/codex``
  (bound into the run) and outlives it.

The run's owner (the ``corral run`` process, or a detached run's owner) serves all of it
while the run lives, from two daemon threads, and removes the directory at the end:

- the broker's accept loop;
- a refresher that rewrites each adapter's file before the CLI's own refresh margin.

codex gets one more: a loopback HTTP endpoint (``CODEX_REFRESH_TOKEN_URL_OVERRIDE``) with
an unguessable path, so that codex's own refresh requests reach the single flight and
carry back the broker's current token, never reaching the provider.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from .._log import log
from ..errors import CorralError, translate_oserror
from ..paths import Dirs
from .adapters import Adapter, CodexAdapter, adapter_for
from .broker import Broker, RunGrant
from .client import PROFILE_ENV, SOCKET_ENV
from .profiles import get_profile
from .refresh import DEFAULT_TIMEOUT, AccessToken
from .store import TokenStore

RETRY_AFTER_ERROR = 15.0  # seconds before the refresher tries again after a failed refresh


def run_dir(dirs: Dirs, run_id: str) -> Path:
    return dirs.runtime / "run-auth" / run_id


def agent_data_dir(dirs: Dirs, agent: str, kind: str) -> Path:
    """Where what a CLI writes next to its credential (codex's sessions, history, state
    databases) outlives the run: one per agent, shared by its runs as one user's ~/.codex
    is shared by the codex processes they start."""
    return dirs.state / "agent-data" / agent / kind


def _boot_now() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class RunAuth:
    """Made in the launching process before the fork (errors reach the caller: exit 3 for
    an unknown profile, 77 when not signed in); served by the run's owner."""

    def __init__(self, dirs: Dirs, *, agent: str, run_id: str, grants: tuple[str, ...],
                 owner: tuple[int, int] | None) -> None:
        self.dirs = dirs
        self.grant = RunGrant(agent, run_id, grants)
        self.root = run_dir(dirs, run_id)
        self.owner = owner
        self.env: dict[str, str] = {}
        self.unset: tuple[str, ...] = ()
        self.adapters: list[Adapter] = []
        self.shared: tuple[str, ...] = ()  # per-agent dirs of the CLIs' own data, bound into the run
        self.broker: Broker | None = None
        self._http: Any = None  # ThreadingHTTPServer for codex's refresh, if any adapter wants it
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- before the fork ---------------------------------------------------------------

    def prepare(self, timeout: float = DEFAULT_TIMEOUT) -> RunAuth:
        profiles = [get_profile(self.dirs, name) for name in self.grant.grants]  # exit 3 before anything
        try:
            self.root.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
            self.root.mkdir(mode=0o700)
            if self.owner is not None and os.geteuid() == 0:
                os.chown(self.root, *self.owner)
        except OSError as err:
            raise translate_oserror(err, what="create the run's auth dir", path=str(self.root)) from err
        try:
            self.broker = Broker(self.dirs, self._listen(self.root / "auth.sock"), owned_path=self.root / "auth.sock",
                                 only=self.grant)
            endpoint = None
            for profile in profiles:
                adapter = adapter_for(profile, self.root, run_id=self.grant.run_id, extra=self._extra(profile.name),
                                      owner=self.owner)
                if adapter.wants_endpoint and endpoint is None:
                    endpoint = self._serve_http()
                if adapter.keeps_data:
                    adapter.data_dir = agent_data_dir(self.dirs, self.grant.agent, adapter.kind)
                    self.shared += (str(adapter.data_dir),)
                token = self.broker.token(profile.name, timeout=timeout, min_valid=adapter.lead)
                self.env.update(adapter.setup(token, endpoint))
                self.adapters.append(adapter)
                self.unset += adapter.unset
        except BaseException:
            self.close()
            raise
        self.env[PROFILE_ENV] = self.grant.grants[0]
        self.env[SOCKET_ENV] = str(self.root / "auth.sock")
        return self

    def _extra(self, profile: str) -> dict[str, str] | None:
        with contextlib.suppress(CorralError, OSError, ValueError):
            token = TokenStore.of(self.dirs, profile).load()
            return token.extra if token else None
        return None

    def _listen(self, path: Path) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            # Anyone who can reach the path may connect (a run with --user has another
            # uid); the broker answers only processes in this run's cgroup.
            os.chmod(path, 0o666)
            sock.listen(64)
        except OSError as err:
            sock.close()
            raise translate_oserror(err, what="bind the run's broker socket", path=str(path)) from err
        return sock

    def _serve_http(self) -> str:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        secret = os.urandom(16).hex()
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = min(int(self.headers.get("Content-Length") or 0), 65536)
                self.rfile.read(length)
                status, body = service._http_answer(self.path, secret)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("run %s auth endpoint: " + fmt, service.grant.run_id, *args)

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self._http = server
        return f"http://127.0.0.1:{server.server_address[1]}/{secret}"

    def _http_answer(self, path: str, secret: str) -> tuple[int, dict[str, Any]]:
        """codex's refresh (``/token``) and revoke (``/revoke``) for this run."""
        prefix = f"/{secret}/"
        if not path.startswith(prefix):
            return 404, {"error": "not_found"}
        op = path[len(prefix):].split("?")[0]
        if op == "revoke":
            return 200, {}  # the sentinel is worth nothing: revoking it is a no-op
        if op != "token":
            return 404, {"error": "not_found"}
        codex = next(a for a in self.adapters if isinstance(a, CodexAdapter))
        try:
            token = self.broker.token(codex.profile.name, timeout=DEFAULT_TIMEOUT, min_valid=codex.lead)  # type: ignore[union-attr]
        except CorralError as err:
            log.warning("run %s: codex asked for a refresh: %s", self.grant.run_id, err.message)
            return 401, {"error": {"code": "refresh_failed", "message": err.message}}
        codex.write(token)
        return 200, codex.refresh_answer(token)

    # -- in the owner ---------------------------------------------------------------

    def start(self) -> None:
        """Serve the run: called in its owner once the command runs. The threads start
        with every signal blocked, so the owner's main thread alone receives them."""
        old = signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals))
        try:
            if self.broker is not None:
                self._spawn(self.broker.serve_forever, "corral-run-broker")
            if any(a.lead for a in self.adapters):
                self._spawn(self._refresher, "corral-run-refresher")
            if self._http is not None:
                self._spawn(self._http.serve_forever, "corral-run-endpoint")
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def _spawn(self, target: Any, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _refresher(self) -> None:
        """Rewrite each adapter's file before the CLI would refresh by itself. Scheduled on
        the boot clock: a wall clock set back an hour must not leave the file stale for an
        hour (nor one set forward make it refresh in a loop)."""
        due: dict[int, float] = {}
        while not self._stop.is_set():
            now = _boot_now()
            for i, adapter in enumerate(self.adapters):
                if not adapter.lead or due.get(i, 0.0) > now:
                    continue
                started = _boot_now()
                try:
                    token = self.broker.token(adapter.profile.name, timeout=DEFAULT_TIMEOUT,  # type: ignore[union-attr]
                                              min_valid=adapter.lead)
                    adapter.write(token)
                    # A rewrite can take seconds (openclaw's is a node start): the next one
                    # must begin that much earlier, twice over for a loaded machine.
                    due[i] = self._next_due(token, adapter.lead, took=_boot_now() - started)
                except (CorralError, OSError) as err:
                    log.warning("run %s: keeping %s's credential fresh: %s", self.grant.run_id,
                                adapter.profile.name, getattr(err, "message", err))
                    due[i] = now + RETRY_AFTER_ERROR
            wait = min(due.values(), default=now + 60) - _boot_now()
            self._stop.wait(max(wait, 1.0))

    @staticmethod
    def _next_due(token: AccessToken, lead: float, took: float = 0.0) -> float:
        """When to rewrite, on the boot clock: *lead* before expiry, but never more than half
        the token's remaining life early (the way the refresh window is capped), and at
        least twice the last rewrite's duration (*took*) early. The token's expiry is
        already bounded by the boot clock (Token.effective_expiry)."""
        if token.expires_at is None:
            return _boot_now() + 60
        left = token.expires_at - time.time()
        return _boot_now() + max(left - max(min(lead, left / 2), 2 * took), 1.0)

    def detach_copy(self) -> None:
        """In the launching process of a detached run, once the owner has its copies: close
        ours without removing what the owner serves."""
        if self.broker is not None:
            self.broker.owned_path = None
            self.broker.close()
        if self._http is not None:
            self._http.socket.close()

    def close(self) -> None:
        """The run has ended: stop serving, remove the directory."""
        self._stop.set()
        if self._http is not None:
            with contextlib.suppress(Exception):
                if any(t.name == "corral-run-endpoint" for t in self._threads):
                    self._http.shutdown()
                self._http.server_close()
        if self.broker is not None:
            if any(t.name == "corral-run-broker" for t in self._threads):
                self.broker.shutdown()
            else:
                self.broker.close()
        for thread in self._threads:
            thread.join(timeout=2.0)
        for adapter in self.adapters:
            try:
                adapter.finish()
            except OSError as err:
                log.warning("run %s: keeping what %s wrote: %s", self.grant.run_id, adapter.kind, err)
        shutil.rmtree(self.root, ignore_errors=True)


def prepare_run_auth(dirs: Dirs, *, agent: str, run_id: str, grants: tuple[str, ...],
                     owner: tuple[int, int] | None, timeout: float = DEFAULT_TIMEOUT) -> RunAuth:
    return RunAuth(dirs, agent=agent, run_id=run_id, grants=grants, owner=owner).prepare(timeout)


__all__ = ["RunAuth", "agent_data_dir", "prepare_run_auth", "run_dir"]
