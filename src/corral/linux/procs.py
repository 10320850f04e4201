"""Process identity: a pid plus its start time names one process, whatever pid reuse."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import socket


def process_start(pid: int) -> float | None:
    """Start time of *pid* in clock ticks since boot (/proc/PID/stat field 22); None if it
    is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return float(fields[19])


def children(pid: int) -> list[int] | None:
    """*pid*'s children (its main thread's, as /proc lists them), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except (OSError, ValueError):
        return None


def owner_alive(pid: int | None, start: float | None) -> bool:
    """Is the process that was *pid* when it started at *start* still running?"""
    if not pid:
        return False
    got = process_start(pid)
    if got is None:
        return False
    return start is None or got == start


def escaped(run_id: str, cgroup: str, *, proc: Path = Path("/proc")) -> list[dict[str, object]]:
    """Processes of run *run_id* that are no longer in its cgroup (moved into another unit
    or cgroup): found by the ``CORRAL_RUN_ID`` every process of the run inherits. A process
    that cleared its environment cannot be found this way."""
    from .cgroup import own_cgroup

    needle = f"CORRAL_RUN_ID={run_id}".encode()
    scope = os.path.basename(cgroup.rstrip("/"))
    out: list[dict[str, object]] = []
    try:
        entries = [e for e in os.listdir(proc) if e.isdigit()]
    except OSError:
        return out
    for entry in entries:
        try:
            environ = (proc / entry / "environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if needle not in environ.split(b"\0"):
            continue
        pid = int(entry)
        if process_start(pid) is None:
            continue  # a zombie: dead
        where = own_cgroup(pid)
        if scope not in where.split("/"):
            try:
                argv = (proc / entry / "cmdline").read_bytes().split(b"\0")[:-1]
            except OSError:
                argv = []
            out.append({"pid": pid, "argv": [a.decode(errors="replace") for a in argv], "cgroup": where})
    return out



def set_process_title(title: str) -> bool:
    """Replace this process's command line (/proc/PID/cmdline, what ps shows) with *title*.

    A detached run's owner is a fork of the ``corral run`` that started it: its argv, which
    may hold ``--env KEY=secret``, would stay readable by every local user for the run's
    life. The argv area is this process's own memory (its bounds are fields 48 and 49 of
    /proc/self/stat): overwritten in place, as setproctitle does. False if it could not be."""
    import ctypes

    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])  # field N is fields[N - 3]
    except (OSError, ValueError, IndexError):
        return False
    size = end - start
    if size <= 1:
        return False
    data = title.encode(errors="replace")[: size - 1]
    ctypes.memset(start, 0, size)
    ctypes.memmove(start, data, len(data))
    return True


def rss_sum(pids: list[int]) -> int:
    """Sum of resident memory over *pids* from /proc/PID/statm (what psutil reads, without
    building a Process object per pid: `ps` does this for every run)."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                total += int(f.read().split()[1]) * page
        except (OSError, ValueError, IndexError):
            pass  # gone meanwhile
    return total


_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, from the kernel (SO_PEERCRED)."""
    import socket  # here: `ps` and the other listings import this module and need no socket

    return _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
