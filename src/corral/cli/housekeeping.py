"""What every command does first, whichever parser took it (click, or :mod:`.fast_add`)."""

from __future__ import annotations

import os


def settle_lost_runs() -> None:
    """Record the ends the watchdogs noted (an owner that died) and remove those runs'
    empty cgroup dirs: nobody has to run ps or gc for that. Usually there is no note:
    one listing of runs/, and the record code is not even imported."""
    try:
        from ..paths import Dirs

        runs = Dirs.from_env().runs
        if not any(name.endswith(".lost") for name in os.listdir(runs)):
            return
        from ..records import RecordStore

        RecordStore(runs).settle_lost()
    except Exception:  # noqa: BLE001, S110 -- housekeeping must never break the command asked for
        pass
