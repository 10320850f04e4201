"""A run's watchdog is a tiny ``sh`` in the run's cgroup that blocks reading a pipe whose only
writer is the owner. If the owner dies, even by SIGKILL, the kernel closes the pipe, the
read returns, and the watchdog writes ``cgroup.kill``: nothing outlives its owner. When
the owner ends normally it writes ``done`` first.

Why a shell and not a thread of the owner: it must outlive the owner's death, and it
must be in the run's own cgroup so that ``cgroup.kill`` takes it too. ``/bin/sh`` costs
about 0.4 MiB of PSS and nothing else.
"""

from __future__ import annotations

import os

# sh: ignore terminal and stop signals (the owner decides), wait for "done" or EOF. On
# EOF (the owner died): kill the run whole, then note when, so that the end is on record
# without anyone having to look (records.RecordStore reads the note; it holds no secret).
WATCHDOG_SCRIPT = (  # $1 is the scope's cgroup.kill, $2 the run's .lost note
    "trap '' INT HUP QUIT TERM; "
    'while read -r line; do [ "$line" = done ] && exit 0; done; '
    # The note first: cgroup.kill takes the watchdog too (it lives in the scope).
    '[ -z "$2" ] || date -u +%Y-%m-%dT%H:%M:%S.000Z > "$2"; echo 1 > "$1"'
)


def watchdog_argv(kill_file: str, lost_note: str = "") -> list[str]:
    return ["/bin/sh", "-c", WATCHDOG_SCRIPT, "corral-watchdog", kill_file, lost_note]


def tell_watchdog_done(fd: int) -> None:
    try:
        os.write(fd, b"done\n")
    except OSError:
        pass
    try:
        os.close(fd)
    except OSError:
        pass
