"""corral's shared owner itself (:mod:`.shared_owner` says why it exists and whom it
serves): one process that owns every detached run its callers hand it, each run on a
thread of its own (:mod:`.owner_thread`), until it has none left and no caller came for
a few idle seconds. Run as ``python -I -m corral.runs.ownerd``.

The main thread only accepts callers, checks them and starts their runs' threads. It
lives in a cgroup of its own (``Backend.place_self``); on SIGTERM it takes no new run,
owns the ones it has to their end, then exits.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import os
import pickle
import resource
import select
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CorralError
from ..linux.procs import peer_credentials, process_start
from .owner_thread import own_run
from .shared_owner import (
    HEADER,
    LOCK_NAME,
    MAX_FDS,
    PLACEMENT_KEYS,
    SO_PEERPIDFD,
    UMASK_KEY,
    pidfd_pid,
    process_context,
    unit_of,
)
from .spawn import Inherited

if TYPE_CHECKING:
    from ..linux.cgroup import CgroupDir
    from ..linux.flock import HeldLock


FDS_MARGIN = 64  # what one more run (and its children's start) may need, with room to spare


class SharedOwner:
    def __init__(self, listener: socket.socket, idle: float, path: Path, backend: str) -> None:
        self.listener = listener
        self.idle = idle
        self.path = path
        self.backend = backend
        self.inode = 0
        with contextlib.suppress(OSError):
            self.inode = os.stat(path).st_ino  # bound by the caller that started us, a moment ago
        self.placed: CgroupDir | None = None
        self.origin = ""  # where we were started (cgroupfs: where we step back to, to remove ours)
        self.runs = 0
        self.lock = threading.Lock()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.stopping = False
        self.start = process_start(os.getpid())
        self.nofile = resource.getrlimit(resource.RLIMIT_NOFILE)  # our callers': theirs is ours

    def raise_nofile(self) -> None:
        """A dozen fds per run: up to the hard limit, once the context to compare is read."""
        _soft, hard = self.nofile
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    # --- where we live ------------------------------------------------------------------

    def place(self) -> None:
        """Into our own cgroup in corral.slice; if that is refused we stay where we were
        started, and serve only callers from that same cgroup."""
        from . import corral as _corral

        with contextlib.suppress(OSError):
            self.origin = Path("/proc/self/cgroup").read_text().strip().rpartition("::")[2]
        ctx = _corral.Corral(self.backend)
        try:
            self.placed = ctx.backend.place_self(unit_of(self.path))
        except (OSError, CorralError):
            self.placed = None
        finally:
            ctx.close()

    def _step_out(self) -> None:
        """cgroupfs: back to where we came from, then remove our own directory (systemd
        collects our scope when we exit). gc removes one we could not."""
        if self.placed is None or self.backend != "cgroupfs" or not self.origin:
            return
        from ..linux.cgroup import find_cgroup2_mount, join

        found = find_cgroup2_mount()
        if found is None:
            return
        with contextlib.suppress(OSError):
            join(str(Path(found) / self.origin.lstrip("/")))
            self.placed.path.rmdir()

    # --- serving --------------------------------------------------------------------------

    def serve(self) -> None:
        me = self._compared(process_context(os.getpid()))
        self.raise_nofile()  # after reading our context: a caller's limits must equal our callers'
        poller = select.poll()
        poller.register(self.wake_r, select.POLLIN)
        poller.register(self.listener.fileno(), select.POLLIN)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGTERM, self._on_term)
        last = time.monotonic()
        try:
            while True:
                with self.lock:
                    runs = self.runs
                if runs:
                    last = time.monotonic()
                if self.stopping:
                    if self.listener.fileno() >= 0:
                        poller.unregister(self.listener.fileno())
                    self._leave()
                    if not runs:
                        return
                wait = None if runs or self.stopping else max(0.0, last + self.idle - time.monotonic())
                if wait == 0.0:
                    return
                listen = self.listener.fileno()
                ready = {fd for fd, _ in poller.poll(None if wait is None else wait * 1000)}
                if self.wake_r in ready:
                    with contextlib.suppress(BlockingIOError):
                        while os.read(self.wake_r, 64):
                            pass
                if listen in ready and not self.stopping:
                    try:
                        conn, _ = self.listener.accept()
                    except OSError:
                        continue
                    with conn:
                        try:
                            self._serve_one(conn, me)
                        except Exception:  # noqa: BLE001, S110 - one bad caller must not end the others' owner
                            pass
                    last = time.monotonic()
        finally:
            self._leave()
            self._step_out()

    def _compared(self, context: dict[str, str]) -> dict[str, str]:
        """What of a process context must equal ours: not the umask (each command gets its
        caller's), nor, once we live in our own cgroup, where a caller's cgroup is."""
        skip = {UMASK_KEY, *(PLACEMENT_KEYS if self.placed is not None else ())}
        return {k: v for k, v in context.items() if k not in skip}

    def _on_term(self, _signum: int, _frame: object) -> None:
        """corral.slice is being stopped (or someone asked us to go): take no new run,
        own the ones we have to their end (they are being stopped too), then exit. The
        loop does it: the wakeup fd tells it."""
        self.stopping = True

    def _leave(self) -> None:
        """Unlink our socket, under the start lock, unless a new owner already replaced it."""
        from ..linux import flock as _flock

        if self.listener.fileno() < 0:
            return
        try:
            lock = _flock.open_private(self.path.parent / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            self.listener.close()
            return
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.listener.close()  # from here a caller gets ECONNREFUSED and starts another
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == self.inode:
                    self.path.unlink()
        finally:
            _flock.close_private(lock)

    def _serve_one(self, conn: socket.socket, me: dict[str, str]) -> None:
        conn.settimeout(2.0)  # a caller that connects and says nothing holds up the others this long
        pid, uid, _gid = peer_credentials(conn)
        pidfd = conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
        try:
            theirs = process_context(pid) if uid == os.geteuid() else {"uid": str(uid)}
            alive = pidfd_pid(pidfd) == pid  # so what was read was that very process
        finally:
            os.close(pidfd)
        umask = int(theirs.get(UMASK_KEY, "0022"), 8)
        theirs = self._compared(theirs)
        differs = sorted(k for k in me.keys() | theirs.keys() if me.get(k) != theirs.get(k))
        if len(os.listdir("/proc/self/fd")) + FDS_MARGIN > resource.getrlimit(resource.RLIMIT_NOFILE)[0]:
            conn.sendall(b"no full: at its open-file limit\n")  # the caller forks an owner of its own
            return
        if not alive or differs:
            conn.sendall(f"no {'caller gone' if not alive else 'context differs: ' + ', '.join(differs)}\n".encode())
            return
        conn.sendall(b"ready\n")
        header, fds, _flags, _addr = socket.recv_fds(conn, HEADER.size, MAX_FDS, socket.MSG_CMSG_CLOEXEC)
        try:
            if len(header) != HEADER.size:
                raise ValueError("short request")
            (size,) = HEADER.unpack(header)
            chunks, got = [], 0
            while got < size:
                chunk = conn.recv(min(1 << 16, size - got))
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
            if got != size:
                raise ValueError("short request")
            request: dict[str, Any] = pickle.loads(b"".join(chunks))
            if len(request["fds"]) != len(fds):
                raise ValueError("fds missing")
        except Exception:  # noqa: BLE001 - whatever is wrong with it, the request is refused
            for fd in fds:
                os.close(fd)
            conn.sendall(b"no bad request\n")
            return
        request["umask"] = umask
        with self.lock:
            self.runs += 1
        try:
            threading.Thread(target=self._own, args=(request, fds), name=f"run {request['record'].id}",
                             daemon=True).start()
        except BaseException:
            with self.lock:
                self.runs -= 1
            for fd in fds:
                os.close(fd)
            raise
        conn.sendall(b"ok\n")

    def _own(self, request: dict[str, Any], fds: list[int]) -> None:
        moved = dict(zip(request["fds"], fds, strict=True))
        report_w, gate_r = moved[request["report_w"]], moved[request["gate_r"]]
        leases: list[HeldLock] = request["leases"]
        for lease in leases:
            lease.rebind(moved)
        try:
            from .corral import Corral

            corral = Corral(self.backend, dirs=request["dirs"])
            try:
                inherit = Inherited(umask=request["umask"], nofile=self.nofile)
                own_run(corral, request["spec"], request["record"], request["cgroup"], request["sandbox"], inherit,
                        report_w, gate_r, leases, owner_start=self.start)
            finally:
                corral.close()
        except BaseException:  # noqa: BLE001 - say why, in the run's log
            import traceback

            with contextlib.suppress(OSError), open(request["record"].log, "a") as log:
                log.write(traceback.format_exc())
        finally:
            for lease in leases:
                lease.close()  # released by the run's end; or the caller releases its copy
            with self.lock:
                self.runs -= 1
            _give_back_memory()
            with contextlib.suppress(OSError):
                os.write(self.wake_w, b"r")


def _give_back_memory() -> None:
    """A run's end frees its objects, but glibc keeps the pages: many runs at once would
    leave the owner at their high-water mark. Hand the free ones back (a few ms)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def main(argv: list[str]) -> None:  # pragma: no cover - the owner process
    listen_fd, idle, path, backend = int(argv[0]), float(argv[1]), Path(argv[2]), argv[3]
    listener = socket.socket(fileno=listen_fd)
    os.set_inheritable(listen_fd, False)
    from ..linux.procs import set_process_title
    from . import detach, launch, output, supervise  # noqa: F401 - what every run needs: imported once, here
    from .corral import Corral  # noqa: F401

    if backend == "systemd":
        with contextlib.suppress(Exception):
            from ..backends import systemd  # noqa: F401
    set_process_title(f"corral-ownerd {path}")

    owner = SharedOwner(listener, idle, path, backend)
    owner.place()
    gc.freeze()  # what is here now stays put: the collector leaves it be
    owner.serve()


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
