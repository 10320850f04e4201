"""Process identity: a pid plus its start time names one process, whatever pid reuse."""

from __future__ import annotations

from pathlib import Path


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


def owner_alive(pid: int | None, start: float | None) -> bool:
    """Is the process that was *pid* when it started at *start* still running?"""
    if not pid:
        return False
    got = process_start(pid)
    if got is None:
        return False
    return start is None or got == start
