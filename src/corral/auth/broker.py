"""``corral broker``: hands out access tokens over a unix socket; refresh tokens stay here.

The socket is ``<runtime>/broker.sock``, mode 0600 in a 0700 dir, or the one systemd
passes by socket activation (``LISTEN_FDS``, see units/corral-broker.socket). The mode
keeps other users out of the file; SO_PEERCRED keeps out whoever gets in anyway (root's
processes pass any mode check, and a passed socket may have been made by someone else).

Protocol: one JSON object per line each way, any number of requests per connection::

    {"op": "token", "profile": "openai"}  ->  {"ok": true, "access_token": "...",
                                               "token_type": "Bearer", "expires_at": 1.7e9}
    {"op": "ping"}                         ->  {"ok": true, "pid": 1234, "version": 1}
    anything failing                       ->  {"ok": false, "kind": "sign_in_again",
                                               "error": "...", "exit_code": 77, ...}

The refresh itself is the same single-flight code path ``corral auth token`` uses in a
process of its own, so a broker and CLI callers never refresh the same token twice.

Grants: a peer inside a corral run (its cgroup says which, see ``cgroup.run_of``) gets
only the profiles granted to that run (``--auth``, the agent's ``auth``), as recorded in
the run's record; a peer outside runs gets any profile of this uid. A run's owner serves
the same protocol on a socket of the run's own (:mod:`.runauth`), for that run only.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import selectors
import signal
import socket
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._log import log
from ..errors import (
    AuthBusy,
    Busy,
    ConfigError,
    CorralError,
    NotFound,
    PermissionDenied,
    ProfileNotFound,
    SignInAgain,
    UsageError,
    translate_oserror,
)
from ..linux.cgroup import run_of
from ..linux.procs import peer_credentials
from ..paths import Dirs
from .client import socket_path, token_from_broker
from .refresh import DEFAULT_TIMEOUT, AccessToken, get_token

PROTOCOL_VERSION = 1
MAX_LINE = 4096
IDLE_TIMEOUT = 30.0  # a connection that sends nothing for this long is dropped
MAX_CONNECTIONS = 512  # one thread each; beyond this, new connections are closed at once
SD_LISTEN_FDS_START = 3


def activation_socket(env: dict[str, str] | os._Environ[str] | None = None) -> socket.socket | None:
    """The listening socket systemd passed (sd_listen_fds(3) protocol), or None.

    Done with the environment directly, as sd_listen_fds does: LISTEN_PID must be us
    (the variables are inherited, a child must not take its parent's sockets), and the
    variables are removed so that nothing this process starts believes it was activated."""
    env = os.environ if env is None else env
    count, pid = env.get("LISTEN_FDS"), env.get("LISTEN_PID")
    if not count:
        return None
    for var in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        env.pop(var, None)
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    if not count.isdigit() or int(count) < 1:
        return None
    if int(count) > 1:
        log.warning("broker: %s sockets passed; using the first (fd %d)", count, SD_LISTEN_FDS_START)
    fd = SD_LISTEN_FDS_START
    os.set_inheritable(fd, False)
    sock = socket.socket(fileno=fd)  # family and type are read from the fd
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise UsageError(f"the socket passed on fd {fd} is not a unix stream socket",
                         hint="use ListenStream=PATH in the .socket unit")
    return sock


def bind_socket(path: Path) -> socket.socket:
    """A fresh listening socket at *path*, 0600 from its first moment."""
    try:
        # 0700 when we make it. An existing runtime dir keeps its mode: sessions and slots
        # live there too, and the socket's own 0600 plus SO_PEERCRED are what guard it.
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as err:
        raise translate_oserror(err, what="create runtime dir", path=str(path.parent)) from err
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # The umask makes bind create it 0600: a chmod after bind would leave a moment in
    # which others could connect. (Process-wide, but the broker starts no threads yet.)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as err:
        sock.close()
        raise translate_oserror(err, what="bind broker socket", path=str(path)) from err
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(128)
    return sock


def _remove_stale(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise UsageError(f"{path} exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError as err:
        if err.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise translate_oserror(err, what="probe broker socket", path=str(path)) from err
        os.unlink(path)  # nobody listens: left by a broker that was killed
        return
    finally:
        probe.close()
    raise Busy(f"a broker is already listening on {path}", hint="stop it first, or use it")


def _error_answer(err: CorralError) -> dict[str, Any]:
    kind = ("sign_in_again" if isinstance(err, SignInAgain) else "busy" if isinstance(err, Busy)
            else "not_found" if isinstance(err, NotFound) else "permission" if isinstance(err, PermissionDenied)
            else "config" if isinstance(err, ConfigError) else "usage" if isinstance(err, UsageError) else "error")
    answer: dict[str, Any] = {"ok": False, "kind": kind, "error": err.message, "hint": err.hint,
                              "exit_code": err.exit_code}
    if isinstance(err, SignInAgain):
        answer["reason"] = err.reason
    if isinstance(err, AuthBusy):
        answer.update(waited=err.waited, holder=err.holder)
    if isinstance(err, ProfileNotFound):
        answer["profile"] = err.profile
    return answer


@dataclass(frozen=True)
class RunGrant:
    """A broker serving one run only: its peers must be in the run's cgroup."""

    agent: str
    run_id: str
    grants: tuple[str, ...]


def check_grant(dirs: Dirs, pid: int, profile: str, *, only: RunGrant | None = None) -> None:
    """PermissionDenied unless process *pid* may have *profile*'s access token."""
    found = run_of(pid)
    if only is not None:
        if found != (only.agent, only.run_id):
            where = f"run {found[1]} ({found[0]})" if found else "outside any corral run"
            raise PermissionDenied(f"this socket serves run {only.run_id} ({only.agent}) only; "
                                   f"process {pid} is {where}")
        grants: tuple[str, ...] | list[str] = only.grants
    elif found is None:
        return  # outside runs: the uid check in _serve_one was the whole test
    else:
        from ..records import RecordStore

        record = RecordStore(dirs.runs).load(found[1])
        if record is None or record.agent != found[0]:
            raise PermissionDenied(f"process {pid} is in run {found[1]} ({found[0]}), which this broker has no "
                                   "record of (another state dir?); it gets no tokens",
                                   hint="start the run with this XDG_STATE_HOME and --auth PROFILE")
        grants = record.grants
    if profile not in grants:
        agent, run_id = found
        raise PermissionDenied(f"run {run_id} ({agent}) was not granted auth profile {profile!r}"
                               + (f" (granted: {', '.join(grants)})" if grants else " (it has no auth grants)"),
                               hint=f"start the run with --auth {profile}, or give agent {agent} that auth profile")


class Broker:
    """Serves one listening socket until :meth:`shutdown`. A thread per connection: each
    one mostly waits (for the peer, the refresh lock or the token endpoint).

    *only*: a run's own broker (:mod:`.runauth`): serves that run's processes, whatever
    their uid (``--user``), and only its grants; tokens come from the broker service if one
    listens, else from the store in this process, through the same single flight."""

    def __init__(self, dirs: Dirs, sock: socket.socket, *, owned_path: Path | None = None,
                 timeout: float = DEFAULT_TIMEOUT, only: RunGrant | None = None) -> None:
        self.dirs = dirs
        self.sock = sock
        self.owned_path = owned_path  # unlinked on exit; None for a socket systemd owns
        self.timeout = timeout
        self.only = only
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stopping = threading.Event()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    @classmethod
    def open(cls, dirs: Dirs, *, path: Path | None = None, timeout: float = DEFAULT_TIMEOUT) -> Broker:
        activated = activation_socket() if path is None else None
        if activated is not None:
            log.info("broker: listening on the socket passed by systemd")
            return cls(dirs, activated, timeout=timeout)
        path = path or socket_path(dirs)
        sock = bind_socket(path)
        log.info("broker: listening on %s", path)
        return cls(dirs, sock, owned_path=path, timeout=timeout)

    def shutdown(self) -> None:
        """Safe from a signal handler and from other threads."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def serve_forever(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stopping.is_set():
                for key, _ in sel.select():
                    if key.fileobj is self.sock:
                        self._accept()
        finally:
            sel.close()
            self.close()

    def close(self) -> None:
        self.sock.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.owned_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.owned_path)

    def _accept(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        if not self._slots.acquire(blocking=False):
            log.warning("broker: %d connections open; closing a new one", MAX_CONNECTIONS)
            conn.close()
            return
        threading.Thread(target=self._serve, args=(conn,), name="corral-broker-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self._serve_one(conn)
        finally:
            self._slots.release()

    def _serve_one(self, conn: socket.socket) -> None:
        with conn:
            try:
                pid, uid, _ = peer_credentials(conn)
            except OSError:
                return
            if self.only is None and uid != os.geteuid():
                log.warning("broker: refused pid %d of uid %d (this broker serves uid %d only)", pid, uid, os.geteuid())
                self._send(conn, _error_answer(PermissionDenied(
                    f"uid {uid} may not use this broker (it serves uid {os.geteuid()} only)")))
                return
            conn.settimeout(IDLE_TIMEOUT)
            reader = conn.makefile("rb")
            while True:
                try:
                    line = reader.readline(MAX_LINE + 1)
                except OSError:
                    return
                if not line:
                    return
                if len(line) > MAX_LINE:
                    self._send(conn, _error_answer(UsageError("request too long")))
                    return
                if not self._send(conn, self._answer(line, pid)):
                    return

    def _answer(self, line: bytes, pid: int) -> dict[str, Any]:
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError("not an object")  # noqa: TRY004 -- "bad data" is ValueError to every caller
        except ValueError:
            return _error_answer(UsageError("bad request: one JSON object per line"))
        op = req.get("op")
        if op == "ping":
            return {"ok": True, "pid": os.getpid(), "version": PROTOCOL_VERSION}
        if op != "token":
            return _error_answer(UsageError(f"unknown op {op!r}", hint="ops: token, ping"))
        profile = req.get("profile")
        timeout = req.get("timeout", self.timeout)
        if not isinstance(profile, str) or not isinstance(timeout, (int, float)) or isinstance(timeout, bool):
            return _error_answer(UsageError("a token request needs a profile name"))
        try:
            check_grant(self.dirs, pid, profile, only=self.only)
            token = self.token(profile, timeout=min(max(float(timeout), 0.0), 300.0))
        except CorralError as err:
            log.info("broker: pid %d, profile %s: %s", pid, profile, err.message)
            return _error_answer(err)
        except Exception as err:
            log.exception("broker: pid %d, profile %s: unexpected error", pid, profile)
            return {"ok": False, "kind": "error", "error": f"internal error: {type(err).__name__}", "exit_code": 1}
        return {"ok": True, **token.to_json()}

    def token(self, profile: str, *, timeout: float, min_valid: float = 0.0) -> AccessToken:
        if self.only is not None and not min_valid:
            got = token_from_broker(socket_path(self.dirs), profile, timeout=timeout)
            if got is not None:
                return got
        return get_token(self.dirs, profile, timeout=timeout, min_valid=min_valid)

    @staticmethod
    def _send(conn: socket.socket, answer: dict[str, Any]) -> bool:
        try:
            conn.sendall(json.dumps(answer).encode() + b"\n")
            return True
        except OSError:
            return False


def sd_notify(state: str) -> bool:
    """sd_notify(3) for a Type=notify unit: one datagram to ``$NOTIFY_SOCKET`` (a path, or
    ``@name`` in the abstract namespace). Written out so the broker does not need pystemd,
    which is an extra. False when not under systemd or if the send fails: readiness is a
    courtesy, never a reason to fail."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or address[0] not in "/@":
        return False
    target = "\0" + address[1:] if address[0] == "@" else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), target)
    except OSError:
        return False
    return True


def run_broker(dirs: Dirs, *, path: Path | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
    """``corral broker``: serve until SIGTERM or SIGINT."""
    broker = Broker.open(dirs, path=path, timeout=timeout)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: broker.shutdown())
    sd_notify("READY=1")
    broker.serve_forever()
    log.info("broker: stopped")


__all__ = ["Broker", "RunGrant", "activation_socket", "bind_socket", "check_grant", "peer_credentials", "run_broker", "socket_path"]
