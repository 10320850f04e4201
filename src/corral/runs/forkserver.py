"""A fork server for detached owners: one process per state dir and corral install that
has imported the owner's code once, and forks each detached run's owner from it.

Why: an owner forked from the ``corral run`` that started it keeps that process's whole
heap (click, the command tree, the config) as its own, 13-14 MiB of PSS per run. Owners
forked from this server share the pages of the modules they run, copy-on-write
(``gc.freeze()`` keeps the collector off them): 3-4 MiB per run at ten runs, less with
more (bench/owner_memory.py, the bench's "fork server" row).

What the owner does is unchanged (:func:`.detach.detached_owner`); only who forks it. A
fork hands the child everything its parent has, so the caller sends what the fork from it
would have given: its open fds at their numbers (SCM_RIGHTS), its environment and working
directory, and the run's spec, record and leases (pickled; unpickled only in the forked
child). The rest of a process's context cannot be sent: namespaces, capabilities,
no_new_privs, seccomp, LSM label, ids and groups, rlimits, affinity, priorities, audit
session. The server reads the caller's from /proc through a pidfd and forks only for a
caller whose context is its own; anyone else gets "no" and forks its owner itself, as
before. So a caller never gets more through the server than it could do alone: a
sandboxed caller cannot start unsandboxed runs here, and what it sends runs with exactly
its own privileges. Runs with ``--auth`` always fork their own owner: their auth broker
is already serving from the caller's memory.

The server lives outside every run (it is nobody's owner), exits after a few idle
seconds (its children keep sharing what they shared) and never unlinks its socket: a
caller that finds the socket dead removes it under the start lock and starts a new one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import pickle
import platform
import socket
import struct
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..linux.cgroup import CgroupDir
    from ..linux.flock import HeldLock
    from ..records import RunRecord
    from ..spec import RunSpec
    from .context import RunContext

IDLE_ENV = "CORRAL_FORKSERVER_IDLE"  # seconds a server waits for the next run (tests: short)
DISABLE_ENV = "CORRAL_FORKSERVER"  # "0": every owner is forked by its caller
DEFAULT_IDLE = 10.0
LOCK_NAME = "forkserver.lock"  # one per runtime dir: taken to start a server, and by one leaving
SO_PEERPIDFD = 77  # Linux 6.5: a pidfd of the peer, fixed at connect()
HEADER = struct.Struct("!I")
MAX_FDS = 250  # SCM_MAX_FD is 253
_STATUS_FIELDS = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs",
                  "Seccomp", "Seccomp_filters", "Cpus_allowed_list", "Mems_allowed_list")
_NAMESPACES = ("cgroup", "ipc", "mnt", "net", "pid", "pid_for_children", "time", "time_for_children", "user", "uts")
_IOPRIO_GET = {"x86_64": 252, "aarch64": 31}


# --- the context a fork would pass on ------------------------------------------------


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError as err:
        return f"<{errno.errorcode.get(err.errno or 0, err.errno)}>"


def _ioprio(pid: int) -> str:
    number = _IOPRIO_GET.get(platform.machine())
    if number is None:
        return "<unknown>"
    libc = ctypes.CDLL(None, use_errno=True)
    return str(libc.syscall(number, 1, pid))  # IOPRIO_WHO_PROCESS


def process_context(pid: int) -> dict[str, str]:
    """What a child forked from *pid* would inherit beyond memory and fds, as text."""
    base = f"/proc/{pid}"
    status = {}
    for line in _read(f"{base}/status").splitlines():
        key, _, value = line.partition(":")
        if key in _STATUS_FIELDS:
            status[key] = value.strip()
    ctx = {f"status {k}": status.get(k, "<missing>") for k in _STATUS_FIELDS}
    for ns in _NAMESPACES:
        try:
            ctx[f"ns {ns}"] = os.readlink(f"{base}/ns/{ns}")
        except OSError as err:
            ctx[f"ns {ns}"] = "<missing>" if err.errno == errno.ENOENT else f"<{err.errno}>"
    try:
        st = os.stat(f"{base}/root/")
        ctx["root"] = f"{st.st_dev}:{st.st_ino}"
    except OSError as err:
        ctx["root"] = f"<{err.errno}>"
    # cgroup: moving the owner into its scope needs write access to the common ancestor of
    # where it is and where it goes, which the caller has for its own cgroup.
    for name in ("cgroup", "attr/current", "loginuid", "sessionid", "oom_score_adj", "limits"):
        ctx[name] = _read(f"{base}/{name}")
    stat = _read(f"{base}/stat").rsplit(")", 1)[-1].split()
    # field N of stat(5) is stat[N - 3] here: nice 19, rt_priority 40, policy 41
    ctx["sched"] = " ".join(stat[i] for i in (16, 37, 38)) if len(stat) > 38 else "<unreadable>"
    ctx["ioprio"] = _ioprio(pid)
    return ctx


def umask_of(pid: int) -> int:
    for line in _read(f"/proc/{pid}/status").splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    return 0o022


def pidfd_pid(pidfd: int) -> int | None:
    """The pid a pidfd refers to while that process lives; None once it has exited."""
    for line in _read(f"/proc/self/fdinfo/{pidfd}").splitlines():
        if line.startswith("Pid:"):
            pid = int(line.split()[1])
            return pid if pid > 0 else None
    return None


# --- where a server is ------------------------------------------------------------------


def socket_path(runtime: Path, state: Path) -> Path:
    """One server per state dir, interpreter and version of corral's code: an upgrade (or
    an edit of an editable install) never forks an owner from old code."""
    package = Path(__file__).resolve().parents[1]
    newest = max((p.stat().st_mtime_ns for p in package.rglob("*.py")), default=0)
    key = hashlib.sha256(f"{sys.executable}\0{package}\0{newest}\0{state}".encode()).hexdigest()[:16]
    return runtime / f"forkserver-{key}.sock"


def enabled() -> bool:
    return os.environ.get(DISABLE_ENV, "1") != "0"


# --- the caller's side ------------------------------------------------------------------


def spawn_owner(ctx: RunContext, spec: RunSpec, record: RunRecord, cgroup: CgroupDir, log_fd: int, report_w: int,
                gate_r: int, leases: list[HeldLock], *, withhold: tuple[int, ...]) -> int | None:
    """The pid of this run's owner, forked by the server; None if the server cannot or
    will not (then the caller forks the owner itself). The owner then waits at the gate
    exactly as one forked by the caller does. *withhold*: fds a fork's child would close
    first (the caller's ends of the gate and report pipes)."""
    try:
        cwd = os.getcwd()
    except OSError:
        return None  # a removed cwd: only a real fork can hand that on
    path = socket_path(ctx.dirs.runtime, ctx.dirs.state)
    conn = _connect(path) or _start_server(path)
    if conn is None:
        return None
    with conn:
        fds = _own_fds(exclude=(conn.fileno(), *withhold))
        if fds is None:
            return None
        try:
            payload = pickle.dumps({
                "env": dict(os.environ), "cwd": cwd, "fds": [(fd, os.get_inheritable(fd)) for fd in fds],
                "backend": ctx.backend.name, "dirs": ctx.dirs, "spec": spec, "record": record, "cgroup": cgroup,
                "log_fd": log_fd, "report_w": report_w, "gate_r": gate_r, "leases": leases,
            }, protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, TypeError, AttributeError):
            return None  # something of this run only a real fork can hand on
        conn.settimeout(10.0)
        try:
            if _read_line(conn) != "ready":
                return None  # turned away ("no ..."), or gone: nothing was taken
            socket.send_fds(conn, [HEADER.pack(len(payload))], fds)
            conn.sendall(payload)
        except OSError:
            return None
        try:
            reply = _read_line(conn)
        except OSError:
            reply = ""
    if reply.startswith("ok "):
        return int(reply[3:])
    if reply.startswith("no "):
        return None
    # Sent, and no answer: an owner may be waiting at our gate. It leaves when the gate
    # closes, which the failed start does; forking a second one here would not be safe.
    from ..errors import BackendError

    raise BackendError(f"the fork server at {path} took the run and did not answer",
                       hint=f"try again; {DISABLE_ENV}=0 makes each run fork its own owner")


def _connect(path: Path) -> socket.socket | None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        conn.connect(str(path))
    except OSError:
        conn.close()
        return None
    return conn


def _start_server(path: Path) -> socket.socket | None:
    """Bind the socket here, hand it to a new server, and connect: the connection waits in
    the backlog while the server imports. Under a lock, so that two callers start one."""
    from ..linux import flock as _flock

    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = _flock.open_private(path.parent / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        conn = _connect(path)
        if conn is not None:
            return conn  # another caller started it meanwhile
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a server that has exited
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            old_umask = os.umask(0o177)
            try:
                listener.bind(str(path))
            finally:
                os.umask(old_umask)
            listener.listen(64)
            _exec_server(listener.fileno(), path)
        except OSError:
            return None
        finally:
            listener.close()
        return _connect(path)
    finally:
        _flock.close_private(lock)


def _exec_server(listen_fd: int, path: Path) -> None:
    first = os.fork()
    if first == 0:  # pragma: no cover - runs in the forked child
        try:
            os.setsid()
            if os.fork():
                os._exit(0)
            devnull = os.open(os.devnull, os.O_RDWR)
            for std in (0, 1, 2):
                os.dup2(devnull, std)
            os.closerange(3, listen_fd)  # nothing of the caller's but the socket outlives it here
            os.closerange(listen_fd + 1, os.sysconf("SC_OPEN_MAX"))
            os.set_inheritable(listen_fd, True)
            idle = os.environ.get(IDLE_ENV) or str(DEFAULT_IDLE)
            # -I: neither the caller's cwd nor PYTHON* variables decide what code runs.
            # An empty environment: each owner gets its caller's, and this long-lived
            # process keeps none of the first caller's (its /proc/PID/environ).
            os.execve(sys.executable, [sys.executable, "-I", "-m", "corral.runs.forkserverd", str(listen_fd), idle,
                                       str(path)], {})
        finally:
            os._exit(127)
    os.waitpid(first, 0)


def _own_fds(*, exclude: tuple[int, ...]) -> list[int] | None:
    """This process's open fds but stdio and *exclude*; None if more than one message holds."""
    fds = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 2 or fd in exclude:
            continue
        try:
            os.fstat(fd)
        except OSError:
            continue  # the listing's own fd, closed by now
        fds.append(fd)
    return fds if len(fds) <= MAX_FDS else None


def _read_line(conn: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(256)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()
