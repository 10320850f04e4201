"""Session leases: an flock per (agent, KEY) that dies with its holder and is never
granted while the previous holder's run still has live processes.

The seed failure (OpenClaw #43367, #32799): a PID-file lock, reclaimed by heuristics,
outlived killed holders and timed out parallel runs. Here nothing is reclaimed by
guesswork: liveness is the kernel's flock, and "the previous run is over" is the
kernel's ``populated 0`` in that run's cgroup.

One directory per session, nothing shared between sessions (no global lock)::

    <runtime>/sessions/<agent>/<escaped key>/
        session.json  {agent, key}, written once (the directory name is lossy)
        lease         the lease: LOCK_EX for the holder's whole life; its content is the
                      current or last holder (JSON), ``ended_at`` once released
        drain.json    present while the lease is granted but waits for the previous run
        queue         ticket counter, flock'd for microseconds to take a ticket
        t.<n>         one per waiter, LOCK_EX while it waits: arrival order

Fairness: plain flock is not FIFO; waiters queue on tickets first (:mod:`.queue`). The
holder keeps its ticket while it holds the lease, so the head of the line waits on that
ticket, and takes ``lease`` once it is free.

Who holds the lease: the process that calls :meth:`Lease.acquire`; after a fork both
sides share it (flock belongs to the open file description). The side that keeps it
calls :meth:`Lease.release` at the end; the other side calls :meth:`Lease.close`, which
drops its reference without unlocking.
"""

from __future__ import annotations

import dataclasses
import fcntl
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Self

from ..errors import CorralError, SessionBusy, UsageError, translate_oserror
from ..linux import flock as _flock
from ..paths import Dirs
from ..records import now_iso
from .queue import Ticket
from .session_files import HolderInfo, Waiting, session_dir, situation, wait_drained, write_holder, write_json


class Lease:
    """An exclusive lease on (agent, KEY). Use as a context manager::

        with Lease.acquire(dirs, "lane1", "feature-x", timeout=30, on_wait=print) as lease:
            ...                             # start the run, then:
            lease.update_holder(run_id=rid, cgroup=path, main_pid=pid)

    ``release()`` writes ``ended_at`` and unlocks (for every process sharing the fd);
    ``close()`` only drops this process's reference (the other side of a fork keeps it).
    """

    def __init__(self, sdir: Path, agent: str, key: str, fd: int, holder: HolderInfo, ticket: Ticket) -> None:
        self.path = sdir
        self.agent = agent
        self.key = key
        self._fd = fd
        self._holder = holder
        self._ticket = ticket

    def __repr__(self) -> str:
        return f"<Lease {self.agent}/{self.key!r} fd={self._fd} holder={self._holder.run_id or self._holder.owner_pid}>"

    # --- acquiring ---------------------------------------------------------------------

    @classmethod
    def acquire(
        cls,
        dirs: Dirs,
        agent: str,
        key: str,
        *,
        timeout: float | None = None,
        holder: HolderInfo | None = None,
        on_wait: Callable[[Waiting], None] | None = None,
    ) -> Lease:
        """Wait for the lease, in arrival order, for at most *timeout* seconds (None: no
        limit, 0: fail at once), then until the previous holder's run cgroup is empty.
        Raises :class:`SessionBusy` (exit 75) naming the holder when time runs out.
        *on_wait* is called at most once, when this call first has to wait."""
        if timeout is not None and (math.isnan(timeout) or timeout < 0):
            raise UsageError(f"invalid lock timeout {timeout!r}: use a number of seconds >= 0")
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        sdir = session_dir(dirs, agent, key)
        try:
            return cls._acquire(sdir, agent, key, holder, deadline, started, on_wait)
        except CorralError:
            raise  # SessionBusy is a TimeoutError, hence an OSError: keep it as it is
        except OSError as err:
            raise translate_oserror(err, what="acquire session lease", path=str(sdir)) from err

    @classmethod
    def _acquire(cls, sdir: Path, agent: str, key: str, holder: HolderInfo | None, deadline: float | None,
                 started: float, on_wait: Callable[[Waiting], None] | None) -> Lease:
        sdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not (sdir / "session.json").exists():
            write_json(sdir / "session.json", {"agent": agent, "key": key})
        told: list[bool] = []

        def tell(ahead: int) -> None:
            if on_wait is None or told:
                return
            told.append(True)
            ahead = max(0, ahead - 1)  # the lowest live ticket is the holder's own
            state, who, pids, detail = situation(sdir, lease_held=True)
            if ahead:
                detail += f"; {ahead} earlier waiter(s) ahead"
            on_wait(Waiting(agent, key, "draining" if state == "draining" else "held", who, ahead, pids, detail))

        ticket = Ticket.take(sdir)
        fd = -1
        try:
            if not ticket.wait_turn(deadline, on_block=tell):
                raise _busy(sdir, agent, key, started, ahead=True)
            fd = _flock.open_private(sdir / "lease", os.O_RDWR | os.O_CREAT)
            # Free by now, unless its last holder is dying this very moment (the kernel
            # closed its ticket before its lease fd) or a ticket-less tool holds it.
            if not _flock.flock_polling(fd, fcntl.LOCK_EX, deadline, on_block=lambda: tell(0)):
                raise _busy(sdir, agent, key, started)
            if not wait_drained(sdir, fd, deadline, tell):
                raise _busy(sdir, agent, key, started, lease_held=False)  # we let go: only the run remains
            info = dataclasses.replace(holder or HolderInfo(), agent=agent, key=key, since=now_iso(), ended_at=None)
            if info.owner_pid is None:
                info = dataclasses.replace(info, owner_pid=os.getpid())
            write_holder(fd, info)
        except BaseException:
            ticket.drop()
            if fd >= 0:
                _flock.close_private(fd)  # closing the only reference unlocks
            raise
        _flock.make_inheritable_by_fork(fd)
        ticket.keep_across_fork()  # the next in line waits on it until we release
        return cls(sdir, agent, key, fd, info, ticket)

    # --- holding -----------------------------------------------------------------------

    @property
    def holder(self) -> HolderInfo:
        return self._holder

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        """The lease fd (close-on-exec). A fork child shares the lock; see :meth:`close`."""
        if self._fd < 0:
            raise ValueError("lease is closed")
        return self._fd

    def update_holder(self, **fields: Any) -> HolderInfo:
        """Record ``run_id``, ``main_pid``, ``owner_pid`` and/or ``cgroup`` in the lease file."""
        unknown = set(fields) - set(HolderInfo._SETTABLE)
        if unknown:
            raise UsageError(f"cannot set {sorted(unknown)} on a lease holder; settable: {list(HolderInfo._SETTABLE)}")
        if self._fd < 0:
            raise UsageError("the lease is closed in this process")
        self._holder = dataclasses.replace(self._holder, **fields)
        try:
            write_holder(self._fd, self._holder)
        except OSError as err:
            raise translate_oserror(err, what="record session holder", path=str(self.path / "lease")) from err
        return self._holder

    def release(self) -> None:
        """End the lease: write ``ended_at``, unlock, close. Unlocking frees it for every
        process that shares this fd (a fork's other side). Idempotent."""
        if self._fd < 0:
            return
        try:
            self._holder = dataclasses.replace(self._holder, ended_at=now_iso())
            write_holder(self._fd, self._holder)
        finally:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)  # first: the next one takes it as soon as...
            finally:
                self._ticket.drop()  # ...this ticket, which it waits on, goes
                self.close()

    def fds(self) -> list[int]:
        """The lease fd and its queue ticket's: what a shared owner must be handed."""
        return [fd for fd in (self._fd, self._ticket.fd) if fd >= 0]

    def rebind(self, moved: Mapping[int, int]) -> None:
        """In the shared owner: the same open files, received under other numbers."""
        self._fd = moved.get(self._fd, -1)
        self._ticket.fd = moved.get(self._ticket.fd, -1)

    def close(self) -> None:
        """Drop this process's fd without unlocking: after handing the lease to a forked
        owner, the parent calls this. The lock lasts while any process keeps the fd."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
        self._ticket.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _busy(sdir: Path, agent: str, key: str, started: float, *, ahead: bool = False,
          lease_held: bool = True) -> SessionBusy:
    _state, holder, pids, detail = situation(sdir, lease_held=lease_held)
    waited = time.monotonic() - started
    if ahead:
        detail += "; earlier waiters are in line"
    end = f"; end it with: {holder.stop_command()}" if holder is not None else ""
    return SessionBusy(
        f"session {key!r} of agent {agent} is busy (waited {waited:.1f}s): {detail}{end}",
        agent=agent, key=key, holder=holder, pids=list(pids), waited=waited,
    )


__all__ = ["Lease"]
