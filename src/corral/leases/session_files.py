"""The files of a session directory and what they say: names, the holder note, the
state of a session (held, draining, free) and the listing.

:mod:`.sessions` holds the lease itself; the layout of the directory is described there.
Reading a session never takes its lock: the listing learns who holds what from
/proc/locks, so that it cannot make a concurrent ``timeout=0`` acquire fail.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..errors import UsageError, translate_oserror
from ..linux import flock as _flock
from ..linux.cgroup import CgroupDir
from ..names import validate_agent
from ..paths import Dirs
from ..records import atomic_write, now_iso
from .queue import tickets

KEY_MAX = 4096
_READABLE_MAX = 40
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_FOREVER = 86400.0  # one poll round when there is no deadline


# --- names and small files ---------------------------------------------------------------


def escape_key(key: str) -> str:
    """A file name for any KEY: a readable prefix plus a hash (no '/', no '..', bounded)."""
    readable = _UNSAFE.sub("_", key)[:_READABLE_MAX].lstrip(".") or "_"
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{readable}.{digest}"


def sessions_root(dirs: Dirs) -> Path:
    return dirs.runtime / "sessions"


def session_dir(dirs: Dirs, agent: str, key: str) -> Path:
    return sessions_root(dirs) / validate_agent(agent) / escape_key(check_key(key))


def check_key(key: str) -> str:
    if not isinstance(key, str) or not key:
        raise UsageError("session key is empty", hint="use any non-empty string, e.g. --session feature-login")
    if len(key) > KEY_MAX:
        raise UsageError(f"session key is {len(key)} characters long; the limit is {KEY_MAX}")
    return key


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomic, not durable: the runtime dir does not outlive a reboot, and neither does any
    lease, so the fsyncs would buy nothing."""
    atomic_write(path, json.dumps(data, sort_keys=True).encode(), mode=0o600, durable=False)


_PAGE = 4096


def write_holder(fd: int, info: HolderInfo) -> None:
    """Holder metadata goes *into* the lease file, by its holder, through the lease fd:
    one pwrite of whole pages, padded with blanks. The inode must never change (the
    lock lives on it), and rename-over on ext4 stalled up to 130 ms here (auto_da_alloc
    starts writeback); an in-place pwrite stays under a millisecond."""
    data = (json.dumps(info.to_json(), sort_keys=True) + "\n").encode()
    data = data.ljust(-(-len(data) // _PAGE) * _PAGE, b" ")
    os.pwrite(fd, data, 0)
    if os.fstat(fd).st_size > len(data):
        os.ftruncate(fd, len(data))


def _parse_holder(raw: bytes) -> HolderInfo | None:
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return HolderInfo.from_json(data) if isinstance(data, dict) else None


def _read_holder(sdir: Path) -> HolderInfo | None:
    """The holder recorded in ``lease``; None if there is none (new, or a foreign/stale
    file such as a PID written by an older tool). A read racing the holder's pwrite can
    see a torn page, which does not parse: read again."""
    for _attempt in range(3):
        try:
            raw = (sdir / "lease").read_bytes()
        except OSError:
            return None
        if not raw.strip():
            return None
        info = _parse_holder(raw)
        if info is not None:
            return info
        time.sleep(0.001)
    return None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None  # absent, foreign or half-made by an older version: no information
    return data if isinstance(data, dict) else None


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# --- records -----------------------------------------------------------------------------


@dataclass(frozen=True)
class HolderInfo:
    """Who holds (or last held) a session (the content of the ``lease`` file).

    Pass the fields you know to :meth:`Lease.acquire`; fill in the rest with
    :meth:`Lease.update_holder` as the run starts. ``cgroup`` must be set before any
    process is placed in it: it is what the next holder waits on.
    """

    run_id: str | None = None
    main_pid: int | None = None
    owner_pid: int | None = None  # corral's side, the process that keeps the lease fd
    cgroup: str | None = None  # absolute path of the run's cgroup v2 directory
    agent: str = ""
    key: str = ""
    since: str | None = None  # ISO 8601 UTC, when the lease was granted
    ended_at: str | None = None  # set by release(); None while held or if the holder died

    _SETTABLE: ClassVar[tuple[str, ...]] = ("run_id", "main_pid", "owner_pid", "cgroup")  # update_holder()

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> HolderInfo | None:
        if not data:
            return None
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError:
            return None

    def describe(self) -> str:
        """``run 0a1b2c3d (agent lane1, main pid 4242) since ...`` for messages."""
        who = f"run {self.run_id}" if self.run_id else f"pid {self.owner_pid} (no run started yet)"
        bits = [f"agent {self.agent}"] if self.run_id else []
        if self.run_id:
            bits.append(f"main pid {self.main_pid if self.main_pid else '-'}")
        detail = f" ({', '.join(bits)})" if bits else ""
        return f"{who}{detail} since {self.since or '?'}"

    def stop_command(self) -> str:
        return f"corral stop {self.run_id}" if self.run_id else f"kill {self.owner_pid}"


@dataclass(frozen=True)
class Waiting:
    """What :meth:`Lease.acquire` reports (once) through ``on_wait`` when it must wait."""

    agent: str
    key: str
    state: str  # "held" | "draining"
    holder: HolderInfo | None
    ahead: int  # earlier waiters in line
    pids: tuple[int, ...]  # live processes of the previous run (when draining)
    detail: str

    def __str__(self) -> str:
        return f"waiting for session {self.key!r} of agent {self.agent}: {self.detail}"


@dataclass(frozen=True)
class SessionInfo:
    """One session as ``corral sessions list`` shows it."""

    agent: str
    key: str
    state: str  # "held" | "draining" | "free"
    holder: HolderInfo | None  # the holder, or the last one
    waiters: int
    pids: tuple[int, ...]  # live processes still in the (last) holder's run cgroup
    reason: str | None

    def to_json(self) -> dict[str, Any]:
        h = self.holder
        return {
            "agent": self.agent, "key": self.key, "state": self.state,
            "run_id": h.run_id if h else None, "main_pid": h.main_pid if h else None,
            "owner_pid": h.owner_pid if h else None, "since": h.since if h else None,
            "ended_at": h.ended_at if h else None, "cgroup": h.cgroup if h else None,
            "waiters": self.waiters, "pids": list(self.pids), "reason": self.reason,
        }


# --- what is going on in a session (shared by on_wait, SessionBusy and list) ------------


def _live_pids(holder: HolderInfo | None) -> tuple[int, ...]:
    """Live processes in the holder's run cgroup (empty when it has none or it is gone)."""
    if holder is None or not holder.cgroup or not os.path.isabs(holder.cgroup):
        return ()
    cg = CgroupDir(Path(holder.cgroup))
    if not cg.events().populated:
        return ()
    return tuple(sorted(cg.pids())) or (0,)  # populated, pids not readable: still busy


def _fmt_pids(pids: tuple[int, ...]) -> str:
    shown = ", ".join(str(p) for p in pids[:8] if p) or "unreadable"
    more = f" and {len(pids) - 8} more" if len(pids) > 8 else ""
    return f"{len(pids)} live process(es) (pids {shown}{more})"


def situation(sdir: Path, *, lease_held: bool) -> tuple[str, HolderInfo | None, tuple[int, ...], str]:
    """(state, holder, pids, detail) of a session, from its files and the cgroup."""
    holder = _read_holder(sdir)
    pids = _live_pids(holder)
    drain = _read_json(sdir / "drain.json") if lease_held else None
    if holder is None:
        return ("held" if lease_held else "free"), None, (), "held by a process that has not said who it is yet"
    if pids and (drain is not None or not lease_held):
        ended = f"ended at {holder.ended_at}" if holder.ended_at else "lost its holder (killed?)"
        detail = f"{holder.describe()}, {ended}, but its cgroup still has {_fmt_pids(pids)}"
        if drain is not None and drain.get("pid") != os.getpid():
            detail += f"; granted to pid {drain.get('pid')} once they exit"
        return "draining", holder, pids, detail
    if lease_held:
        return "held", holder, pids, f"held by {holder.describe()}"
    ended = f"ended at {holder.ended_at}" if holder.ended_at else "its holder died without releasing"
    return "free", holder, (), f"last held by {holder.describe()}, {ended}"


def wait_drained(sdir: Path, fd: int, deadline: float | None, tell: Callable[[int], None]) -> bool:
    """With the flock held: wait until the previous holder's run cgroup is empty (poll(2)
    on cgroup.events, no busy loop). ``drain.json`` says so meanwhile. False at the deadline."""
    previous = _parse_holder(os.pread(fd, 1 << 16, 0))  # nobody writes it while we hold the lock
    if not _live_pids(previous):
        return True
    assert previous is not None and previous.cgroup
    write_json(sdir / "drain.json", {"pid": os.getpid(), "since": now_iso(), "run_id": previous.run_id})
    try:
        if deadline is None or deadline > time.monotonic():
            tell(0)  # not with timeout 0: that fails at once, without a "waiting" line
        cg = CgroupDir(Path(previous.cgroup))
        while True:
            left = _FOREVER if deadline is None else deadline - time.monotonic()
            if cg.wait_empty(max(0.0, left)):
                return True
            if deadline is not None:
                return False
    finally:
        _unlink(sdir / "drain.json")


# --- listing -------------------------------------------------------------------------------


def _flocked_inodes() -> set[int] | None:
    """Inodes with a granted flock, from /proc/locks (None if unreadable). Read-only: unlike
    a LOCK_NB probe it can never make a concurrent ``timeout=0`` acquire fail. Matched by
    inode number alone (btrfs reports another st_dev than /proc/locks)."""
    try:
        text = Path("/proc/locks").read_text()
    except OSError:
        return None
    out = set()
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[1] == "FLOCK":  # "->" lines are blocked waiters
            try:
                out.add(int(parts[5].rsplit(":", 1)[1]))
            except (IndexError, ValueError):
                continue
    return out


def _is_flocked(path: Path, inodes: set[int] | None) -> bool:
    try:
        ino = os.stat(path).st_ino
    except FileNotFoundError:
        return False
    if inodes is not None:
        return ino in inodes
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # fallback: probe
    try:
        return not _flock.try_flock(fd, fcntl.LOCK_SH)
    finally:
        os.close(fd)


def list_sessions(dirs: Dirs, *, agent: str | None = None) -> list[SessionInfo]:
    """Every session with a lease file: held, draining (with why) or free (with history)."""
    root = sessions_root(dirs)
    agents = [validate_agent(agent)] if agent else sorted(os.listdir(root)) if root.is_dir() else []
    inodes = _flocked_inodes()
    out = []
    for name in agents:
        try:
            entries = sorted(os.listdir(root / name))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            sdir = root / name / entry
            meta = _read_json(sdir / "session.json")
            if meta is None or not isinstance(meta.get("key"), str):
                continue
            try:
                held = _is_flocked(sdir / "lease", inodes)
                in_line = sum(_is_flocked(sdir / f"t.{n}", inodes) for n in tickets(sdir))
            except OSError as err:
                if err.errno in (errno.ENOENT, errno.ENOTDIR):
                    continue
                raise translate_oserror(err, what="read session", path=str(sdir)) from err
            waiters = max(0, in_line - 1) if held else in_line  # the holder keeps a ticket too
            state, holder, pids, detail = situation(sdir, lease_held=held)
            reason = detail if state == "draining" else None
            if state == "free" and holder is not None and holder.ended_at is None:
                reason = "its last holder died without releasing"
            out.append(SessionInfo(name, meta["key"], state, holder, waiters, pids, reason))
    return out
