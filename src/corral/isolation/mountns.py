"""Hide directories from a run: a private mount namespace with an empty tmpfs on top.

Used for runs with ``--auth``: the token store (refresh tokens) lives in a directory the
agent's own uid could otherwise read. The child, between fork and exec, unshares its
mount namespace (and, when not root, a user namespace mapping only its own uid, so it
needs no privilege) and mounts an empty, read-only, mode-000 tmpfs over each directory.
As its uid is not 0 inside that namespace, the agent keeps no capability after exec and
cannot unmount it; a nested namespace would see the mount locked.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REC, MS_PRIVATE = 0x4000, 1 << 18


def _check(ret: int) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def hide_paths(paths: Sequence[str]) -> None:
    """Runs in the forked child (async-signal-safe enough: no threads there)."""
    targets = [p for p in paths if os.path.isdir(p)]
    if not targets:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if os.geteuid() != 0:
        uid, gid = os.getuid(), os.getgid()
        _check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS))
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    else:
        _check(libc.unshare(CLONE_NEWNS))
    # private: our tmpfs must not propagate back to the host's mount table
    _check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None))
    for path in targets:
        _check(libc.mount(b"tmpfs", path.encode(), b"tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                          b"size=4k,mode=000"))
