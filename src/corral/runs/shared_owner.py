"""The shared owner of detached runs, the caller's side: one process per state dir,
backend and corral install (:mod:`.ownerd`) owns every detached run its callers hand it.

Why: a detached run needs an owner (wait for the command, pump its output into the log,
keep its deadline, record its end, release its leases). One Python process per run costs
12-14 MiB of PSS forked from the CLI, 5-6 MiB forked from a warm server (CPython changes
reference counts on every page it runs, so copy-on-write shares little). One process for
all runs costs its ~13 MiB once and a thread pair per run (bench/ANALYSIS.md).

What stays per run: its watchdog (:mod:`.watchdog`) in the run's own scope, whose pipe's
only writer is the owner. If the shared owner dies, even by SIGKILL, every watchdog sees
EOF and kills its run: nothing outlives its owner, as before. The owner lives in a
cgroup of its own (``corral.slice/corral-ownerd-<key>.scope``), so the end of whoever
started it (a logout, a stopped service) is not the end of the runs.

Whom it serves: the owner forks each run's command and watchdog itself, so they inherit
its context, not the caller's. The caller's context (ids, groups, capabilities,
no_new_privs, seccomp, namespaces, root, LSM label, audit session, rlimits, priorities,
affinity) is read from /proc through a pidfd and must equal the owner's; anyone else is
turned away and forks an owner of its own, as before. So a caller never gets more through
the owner than it could do alone: a sandboxed caller cannot start unsandboxed runs here,
and a niced one's command keeps its nice. The caller plans the run's environment and
sandbox from its own environment; the owner gives the command the caller's umask. Runs
with ``--auth`` fork their own owner: their auth broker serves from the caller's memory.

The caller hands over the run's log, its report and gate pipes and its leases' fds
(SCM_RIGHTS), and the spec, record and plan (pickled). The owner forks the pair held at
the gate and reports their pids; the caller places them (systemd: the scope around them)
and opens the gate, exactly as for an owner it forked itself.
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
    from ..isolation.sandbox import Sandbox
    from ..linux.cgroup import CgroupDir
    from ..linux.flock import HeldLock
    from ..records import RunRecord
    from ..spec import RunSpec
    from .context import RunContext

IDLE_ENV = "CORRAL_OWNERD_IDLE"  # seconds an owner with no run waits for the next (tests: short)
DISABLE_ENV = "CORRAL_SHARED_OWNER"  # "0": every detached run gets an owner forked by its caller
DEFAULT_IDLE = 10.0
LOCK_NAME = "ownerd.lock"  # one per runtime dir: taken to start an owner, and by one leaving
# What decides which backend the owner opens and how it reaches it: the owner gets these
# (and no other variable of its first caller's), and a caller with other values another owner.
BACKEND_ENV = ("CORRAL_BACKEND", "CORRAL_CGROUP_ROOT", "XDG_RUNTIME_DIR", "DBUS_SESSION_BUS_ADDRESS",
               "DBUS_SYSTEM_BUS_ADDRESS")
# Where a cgroup is decides nothing once the owner lives in its own: compared only if it could not move.
PLACEMENT_KEYS = ("cgroup",)
UMASK_KEY = "umask"
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
        if key in _STATUS_FIELDS or key == "Umask":
            status[key] = value.strip()
    ctx = {f"status {k}": status.get(k, "<missing>") for k in _STATUS_FIELDS}
    ctx[UMASK_KEY] = status.get("Umask", "0022")  # not compared: what the command gets from its caller
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


def pidfd_pid(pidfd: int) -> int | None:
    """The pid a pidfd refers to while that process lives; None once it has exited."""
    for line in _read(f"/proc/self/fdinfo/{pidfd}").splitlines():
        if line.startswith("Pid:"):
            pid = int(line.split()[1])
            return pid if pid > 0 else None
    return None


# --- where a server is ------------------------------------------------------------------


def socket_path(runtime: Path, state: Path, backend: str) -> Path:
    """One owner per state dir, backend (and what picks it), interpreter and version of
    corral's code: an upgrade (or an edit of an editable install) never runs old code."""
    package = Path(__file__).resolve().parents[1]
    newest = max((p.stat().st_mtime_ns for p in package.rglob("*.py")), default=0)
    chosen = "\0".join(f"{k}={os.environ.get(k, '')}" for k in BACKEND_ENV)
    key = hashlib.sha256(f"{sys.executable}\0{package}\0{newest}\0{state}\0{backend}\0{chosen}".encode())
    return runtime / f"ownerd-{key.hexdigest()[:16]}.sock"


def unit_of(path: Path) -> str:
    """The owner's own cgroup (cgroupfs) or scope (systemd), in corral.slice."""
    return f"corral-ownerd-{path.stem.removeprefix('ownerd-')}.scope"


def enabled() -> bool:
    return os.environ.get(DISABLE_ENV, "1") != "0"


# --- the caller's side ------------------------------------------------------------------


def hand_over(ctx: RunContext, spec: RunSpec, record: RunRecord, cgroup: CgroupDir, sandbox: Sandbox, report_w: int,
              gate_r: int, leases: list[HeldLock]) -> bool:
    """Hand the run to the shared owner; True once it took it (its report pipe then says
    ``adopt <watchdog> <main>``), False if it cannot or will not (then the caller forks
    the owner itself)."""
    path = socket_path(ctx.dirs.runtime, ctx.dirs.state, ctx.backend.name)
    conn = _connect(path) or _start_server(path, ctx.backend.name)
    if conn is None:
        return False
    with conn:
        fds = [report_w, gate_r, *(fd for lease in leases for fd in lease.fds())]  # its log it opens by path
        if len(fds) > MAX_FDS:
            return False
        try:
            payload = pickle.dumps({
                "dirs": ctx.dirs, "spec": spec, "record": record, "cgroup": cgroup, "sandbox": sandbox,
                "fds": fds, "report_w": report_w, "gate_r": gate_r, "leases": leases,
            }, protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, TypeError, AttributeError):
            return False  # something of this run only a real fork can hand on
        conn.settimeout(10.0)
        try:
            if _read_line(conn) != "ready":
                return False  # turned away ("no ..."), or gone: nothing was taken
            socket.send_fds(conn, [HEADER.pack(len(payload))], fds)
            conn.sendall(payload)
        except OSError:
            return False
        try:
            reply = _read_line(conn)
        except OSError:
            reply = ""
    if reply == "ok":
        return True
    if reply.startswith("no "):
        return False
    # Sent, and no answer: the owner may be forking the run. It gives up when the gate
    # closes, which the failed start does; a second owner here would not be safe.
    from ..errors import BackendError

    raise BackendError(f"corral's shared owner at {path} took the run and did not answer",
                       hint=f"try again; {DISABLE_ENV}=0 makes each detached run fork its own owner")


def _connect(path: Path) -> socket.socket | None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        conn.connect(str(path))
    except OSError:
        conn.close()
        return None
    return conn


def _start_server(path: Path, backend: str) -> socket.socket | None:
    """Bind the socket here, hand it to a new owner, and connect: the connection waits in
    the backlog while the owner imports. Under a lock, so that two callers start one."""
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
            _exec_server(listener.fileno(), path, backend)
        except OSError:
            return None
        finally:
            listener.close()
        return _connect(path)
    finally:
        _flock.close_private(lock)


def _exec_server(listen_fd: int, path: Path, backend: str) -> None:
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
            # Of the environment only what picks the backend: each run's comes planned by
            # its caller, and this long-lived process keeps no other (its /proc/PID/environ).
            env = {k: os.environ[k] for k in BACKEND_ENV if k in os.environ}
            os.execve(sys.executable, [sys.executable, "-I", "-m", "corral.runs.ownerd", str(listen_fd), idle,
                                       str(path), backend], env)
        finally:
            os._exit(127)
    os.waitpid(first, 0)


def _read_line(conn: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(256)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()
