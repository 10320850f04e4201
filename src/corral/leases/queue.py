"""Arrival order for one session: a line of tickets, each a file its waiter keeps LOCK_EX.

Plain flock is not FIFO: a holder that releases and asks again is on the CPU while the
waiter the kernel woke is not, and usually wins again (measured: with three rounds of 8
holders, plain flock broke arrival order in 5 runs out of 5; tickets in none). So each
waiter takes the next number under a short flock on the session's ``queue`` file, then
blocks on the ticket just ahead of it (a CLH queue made of kernel locks). When that
waiter is granted the lease, gives up, or dies, its ticket lock goes and the next one
moves up. A dead waiter's ticket is unlocked by the kernel, so it never blocks anyone;
its file is unlinked by whoever walks past it. Everything is per session directory.

The holder keeps its ticket for the whole lease, so the head of the line waits on the
holder's ticket like everyone else (with LOCK_SH, through a helper thread when there is
a deadline: see :mod:`corral.linux.flock`), and only then takes ``lease``, which is free by then.
"""

from __future__ import annotations

import fcntl
import functools
import os
import re
from collections.abc import Callable
from pathlib import Path

from ..linux import flock as _flock

_TICKET_RE = re.compile(r"t\.([0-9]+)")


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def tickets(sdir: Path) -> list[int]:
    """Numbers of the tickets on disk (live or left by dead waiters)."""
    out = []
    for name in os.listdir(sdir):
        m = _TICKET_RE.fullmatch(name)
        if m:
            out.append(int(m.group(1)))
    return out


class Ticket:
    """This waiter's place in line: ``t.<n>``, LOCK_EX until it leaves the line."""

    def __init__(self, sdir: Path, number: int, fd: int) -> None:
        self.sdir, self.number, self.fd = sdir, number, fd

    @classmethod
    def take(cls, sdir: Path) -> Ticket:
        qfd = _flock.open_private(sdir / "queue", os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(qfd, fcntl.LOCK_EX)  # held for the few syscalls below, by ticket takers only
            try:
                last = int(os.pread(qfd, 32, 0).strip() or 0)
            except ValueError:
                last = 0
            # Never below a ticket still on disk, even if someone removed or mangled `queue`.
            number = max([last, *tickets(sdir)]) + 1
            os.pwrite(qfd, f"{number:020d}\n".encode(), 0)
            tmp = sdir / f".t.{number}.{os.getpid()}"
            fd = _flock.open_private(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # a fresh inode: never contended
                # Appears already locked, so nobody can mistake it for a dead waiter's.
                os.rename(tmp, sdir / f"t.{number}")
            except BaseException:
                _flock.close_private(fd)
                _unlink(tmp)
                raise
        finally:
            _flock.close_private(qfd)
        return cls(sdir, number, fd)

    def wait_turn(self, deadline: float | None, on_block: Callable[[int], None]) -> bool:
        """Block until every earlier ticket has left the line; False at the deadline.
        *on_block(ahead)* is called before blocking (the caller reports only once)."""
        gone: set[int] = set()  # a ticket whose lock was let go is never locked again
        while True:
            ahead = sorted((n for n in tickets(self.sdir) if n < self.number and n not in gone), reverse=True)
            for n in ahead:
                path = self.sdir / f"t.{n}"
                try:
                    fd = _flock.open_private(path, os.O_RDONLY)
                except FileNotFoundError:
                    gone.add(n)
                    continue
                if _flock.try_flock(fd, fcntl.LOCK_SH):
                    gone.add(n)  # its waiter died: clear the way for everyone behind
                    _unlink(path)
                    _flock.close_private(fd)
                    continue
                # Live: wait for it alone (it in turn waits for the one ahead of it).
                left_ahead = len([m for m in ahead if m not in gone])
                try:
                    ok = _flock.flock_until(fd, fcntl.LOCK_SH, deadline, on_block=functools.partial(on_block, left_ahead))
                finally:
                    _flock.close_private(fd)
                if not ok:
                    return False
                gone.add(n)
                break
            else:
                return True

    def keep_across_fork(self) -> None:
        """Granted: the ticket is now part of the lease and goes with it to a forked owner."""
        _flock.make_inheritable_by_fork(self.fd)

    def close(self) -> None:
        """Drop this process's reference only (the other side of a fork keeps the ticket)."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def drop(self) -> None:
        """Leave the line (released, gave up). Idempotent."""
        if self.fd < 0:
            return
        _unlink(self.sdir / f"t.{self.number}")  # first, so nobody behind has to probe it
        # Unlock explicitly: a forked copy of this fd must not keep the next one waiting.
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        _flock.close_private(self.fd)
        self.fd = -1
