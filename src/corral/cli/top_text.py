"""``corral top`` as text: the columns, one row's cells, the title line. Shared by the
batch output (:mod:`.top`) and the full screen (:mod:`.top_screen`)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ..units import format_bytes
from .output import command_line, duration

if TYPE_CHECKING:
    from ..runs.top import Frame, RunRow

COLUMNS = ("ID", "AGENT", "STATE", "PIDS", "CPU%", "MEM", "CPUPSI", "MEMPSI", "AGE", "COMMAND")


def fmt_percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def fmt_memory(row: RunRow) -> str:
    """Bytes, with the source when it is not the cgroup's own count."""
    text = format_bytes(row.memory_bytes)
    return text if row.memory_source in (None, "cgroup") or row.memory_bytes is None else f"{text} {row.memory_source}"


def cells(row: RunRow) -> dict[str, str]:
    return {
        "ID": row.id, "AGENT": row.agent, "STATE": row.state, "PIDS": "-" if row.pids is None else str(row.pids),
        "CPU%": fmt_percent(row.cpu_percent), "MEM": fmt_memory(row),
        "CPUPSI": fmt_percent(row.pressure.get("cpu")), "MEMPSI": fmt_percent(row.pressure.get("memory")),
        "AGE": "-" if row.age is None else duration(row.age), "COMMAND": command_line(row.argv),
    }


def title(frame: Frame, *, pressure: bool = True) -> str:
    """``corral top 12:00:01  3 runs  load 0.52 0.40 0.33 (2 cpus)  avail 1.2G of 3.8G  psi
    cpu 0.1 mem 0.0 io 0.0``: the host, as the frame found it."""
    h = frame.host
    parts = [f"corral top {time.strftime('%H:%M:%S', time.localtime(frame.time))}",
             f"{len(frame.runs)} run{'' if len(frame.runs) == 1 else 's'}"]
    if h.load is not None:
        parts.append(f"load {h.load[0]:.2f} {h.load[1]:.2f} {h.load[2]:.2f} ({h.cpus} cpus)")
    if h.memory_available is not None:
        parts.append(f"avail {format_bytes(h.memory_available)} of {format_bytes(h.memory_total)}")
    if pressure and (psi := host_pressure(frame)):
        parts.append(psi)
    return "  ".join(parts)


def host_pressure(frame: Frame) -> str:
    """``psi cpu 0.1 mem 0.0 io 0.0`` (/proc/pressure, "some avg10"), '' without PSI."""
    p = frame.host.pressure
    if all(v is None for v in p.values()):
        return ""
    return "psi " + " ".join(f"{k.replace('memory', 'mem')} {fmt_percent(v)}" for k, v in p.items())
