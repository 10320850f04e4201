"""The fork server itself (:mod:`.forkserver` says why it exists and whom it serves):
one single-threaded process that accepts a caller, compares the caller's context with
its own, and forks that run's owner. Run as ``python -I -m corral.runs.forkserverd``.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import os
import pickle
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from ..linux.procs import peer_credentials
from .forkserver import HEADER, LOCK_NAME, MAX_FDS, SO_PEERPIDFD, pidfd_pid, process_context, umask_of


def serve(listener: socket.socket, idle: float, path: Path | None = None) -> None:
    """Fork an owner for each caller whose context is ours, until *idle* seconds pass
    without one; then remove *path* if it is still this server's socket. Single-threaded:
    a fork never copies another thread's half-held lock."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # owners are reaped by the kernel
    me = process_context(os.getpid())
    inode = 0
    if path is not None:
        with contextlib.suppress(OSError):
            inode = os.stat(path).st_ino  # bound by the caller that started us, a moment ago
    listener.settimeout(idle)
    while True:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            if path is not None:
                _leave(listener, path, inode)
            return
        except InterruptedError:
            continue
        with conn:
            try:
                _serve_one(listener, conn, me)
            except Exception:  # noqa: BLE001, S110 - one bad caller must not end the server
                pass


def _leave(listener: socket.socket, path: Path, inode: int) -> None:
    """Unlink our socket, under the start lock, unless a new server already replaced it."""
    from ..linux import flock as _flock

    try:
        lock = _flock.open_private(path.parent / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        listener.close()  # from here a caller gets ECONNREFUSED and starts its own
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == inode:
                path.unlink()
    finally:
        _flock.close_private(lock)


def _serve_one(listener: socket.socket, conn: socket.socket, me: dict[str, str]) -> None:
    conn.settimeout(2.0)  # a caller that connects and says nothing holds up the others this long
    pid, uid, _gid = peer_credentials(conn)
    pidfd = conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    try:
        theirs = process_context(pid) if uid == os.geteuid() else {"uid": str(uid)}
        alive = pidfd_pid(pidfd) == pid  # so what was read was that very process
        umask = umask_of(pid)
    finally:
        os.close(pidfd)
    differs = sorted(k for k in me.keys() | theirs.keys() if me.get(k) != theirs.get(k))
    if not alive or differs:
        conn.sendall(f"no {'caller gone' if not alive else 'context differs: ' + ', '.join(differs)}\n".encode())
        return
    conn.sendall(b"ready\n")
    header, fds, _flags, _addr = socket.recv_fds(conn, HEADER.size, MAX_FDS)
    if len(header) != HEADER.size:
        for fd in fds:
            os.close(fd)
        conn.sendall(b"no short request\n")
        return
    (size,) = HEADER.unpack(header)
    chunks, got = [], 0
    while got < size:
        chunk = conn.recv(min(1 << 16, size - got))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    if got != size:
        for fd in fds:
            os.close(fd)
        conn.sendall(b"no short request\n")
        return
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked owner
        try:
            listener.close()
            _become_owner(b"".join(chunks), fds, umask, conn.fileno())
        except BaseException:  # noqa: BLE001 - say why, on the run's log if it got that far
            import traceback

            traceback.print_exc()
        finally:
            os._exit(1)
    for fd in fds:
        os.close(fd)
    conn.sendall(f"ok {child}\n".encode())


def _become_owner(payload: bytes, fds: list[int], umask: int, conn_fd: int) -> None:  # pragma: no cover
    """In the forked child: take the caller's fds at their numbers, its environment, cwd and
    umask, then run the owner as a fork of the caller would have."""
    request: dict[str, Any] = pickle.loads(payload)
    wanted = request["fds"]
    if len(wanted) != len(fds):
        os._exit(1)
    # Out of the way first (above every fd here and every number wanted: still below
    # RLIMIT_NOFILE, which is the caller's too), then everything else of the server's
    # closed, then each fd at its number in the caller, with its close-on-exec.
    base = 1 + max([conn_fd, *fds, *(number for number, _ in wanted)])
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, base) for fd in fds]
    os.closerange(3, base)  # the received copies, the connection, whatever the server had
    for (number, inheritable), fd in zip(wanted, high, strict=True):
        os.dup2(fd, number, inheritable=inheritable)
        os.close(fd)
    os.dup2(request["log_fd"], 2)  # from here a failure is told in the run's log
    os.umask(umask)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    os.setsid()
    from .corral import Corral
    from .detach import detached_owner

    corral = Corral(request["backend"], dirs=request["dirs"])
    detached_owner(corral, request["spec"], request["record"], request["cgroup"], request["log_fd"],
                   request["report_w"], request["gate_r"], request["leases"], None)


def main(argv: list[str]) -> None:  # pragma: no cover - the server process
    listen_fd, idle = int(argv[0]), float(argv[1])
    listener = socket.socket(fileno=listen_fd)
    os.set_inheritable(listen_fd, False)
    from ..linux.procs import set_process_title
    from . import detach  # noqa: F401 - what every owner runs: imported once, here
    from .corral import Corral  # noqa: F401

    with contextlib.suppress(Exception):  # an owner on systemd connects at its end
        from ..backends import systemd  # noqa: F401

    path = Path(argv[2])
    set_process_title(f"corral-forkserver {path}")
    gc.freeze()  # what is here now stays shared with every owner: the collector leaves it be
    serve(listener, idle, path)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
