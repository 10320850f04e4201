"""The config lock: flock(2) on ``<target>.lock``, exclusive, with a deadline.

Why corral has two lock stacks, side by side:

- the config lock is the one filelock's ``UnixFileLock`` takes on the same path, so any
  tool that edits corral's config with filelock excludes corral and corral it. corral
  takes it through :mod:`corral.linux.flock` rather than importing filelock, whose
  import costs ~40 ms (half an ``agents add``), and whose waiters poll every 10 ms where
  a blocking flock hands the lock on at once;
- a session lease (:mod:`corral.leases`) is held for a whole run, by the run's owner, and
  must be given up by the kernel when that owner dies and not before; it queues waiters
  in arrival order and is not granted while the previous holder's processes live. None
  of that is filelock's business, so the leases use the flock helpers directly.

Both stacks rest on the same primitive: a flock belongs to an open file description, so
it dies with the last process holding that description, and nothing is reclaimed by
guesswork.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from pathlib import Path

from ..errors import Busy, CorralError, PermissionDenied
from ..linux import flock as _flock


class ConfigBusy(Busy):
    """The config lock was not granted in time (exit 75). Carries the lock and its holders."""

    def __init__(self, lock_path: Path, timeout: float, holders: list[int]) -> None:
        who = f" (held by pid {', '.join(map(str, holders))})" if holders else ""
        super().__init__(
            f"config lock {lock_path} not granted within {timeout:g}s{who}",
            hint="another corral is editing the config; retry, or check the holder with: cat /proc/locks",
        )
        self.lock_path = lock_path
        self.holders = holders


def config_os_error(err: OSError, what: str, path: Path | str) -> CorralError:
    """An OSError on the config, its directory or its lock, in corral's tree (once, here)."""
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PermissionDenied(f"{what}: permission denied ({path})",
                                hint="check the owner and mode of the file and its directory, or run as its owner")
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return CorralError(f"{what}: no space left on the filesystem ({path}); the file was not changed",
                           hint=f"free space there (df -h {path}), then try again")
    return CorralError(f"{what}: {err.strerror or err} ({path})")


def take_lock(lock_path: Path, mode: int, timeout: float) -> int:
    """An fd holding flock(LOCK_EX) on *lock_path* (created with *mode* if missing), or
    ConfigBusy after *timeout* seconds. The lock file is never followed through a symlink."""
    try:
        try:
            fd = _flock.open_private(lock_path, os.O_RDWR)
        except FileNotFoundError:
            fd = _flock.open_private(lock_path, os.O_RDWR | os.O_CREAT, mode)
            with contextlib.suppress(OSError):
                os.fchmod(fd, mode)  # the umask must not narrow who may take it
    except OSError as err:
        raise config_os_error(err, "lock config", lock_path) from err
    try:
        taken = _flock.flock_until(fd, fcntl.LOCK_EX, time.monotonic() + timeout)
    except OSError as err:
        _flock.close_private(fd)
        raise config_os_error(err, "lock config", lock_path) from err
    except BaseException:  # Ctrl-C while waiting: the fd must not outlive the wait
        _flock.close_private(fd)
        raise
    if not taken:
        _flock.close_private(fd)
        raise ConfigBusy(lock_path, timeout, lock_holders(lock_path))
    return fd


def lock_holders(lock_path: Path) -> list[int]:
    """Pids holding a flock on *lock_path*, from /proc/locks (best effort, for messages)."""
    try:
        st = os.stat(lock_path)
        text = Path("/proc/locks").read_text()
    except OSError:
        return []
    want = f":{st.st_ino}"
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}{want}"
    pids = []
    for line in text.splitlines():
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 4242 fd:01:1234 0 EOF"; waiters are marked "->".
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == dev and parts[4].isdigit():
            pids.append(int(parts[4]))
    return sorted(set(pids))
