"""Live usage of every run, sampled over time: the library half of ``corral top``.

A :class:`Sampler` turns ``Corral.ps()`` into :class:`Frame`\\ s. A frame has one
:class:`RunRow` per live run (CPU % as the ``cpu.stat`` ``usage_usec`` delta over the wall
time between two samples, 100 % being one CPU; memory as the cgroup's ``memory.current``
where memory is a v2 controller, else the PSS of the run's processes, labelled so; the
run cgroup's CPU/memory/IO pressure, PSI "some avg10", which cgroup v2 keeps per cgroup
even where a controller sits on v1) and the host's load, pressure and available memory.
Each row carries its last minute of samples, for the screen's sparklines.

Nothing here draws: the curses screen is ``top_screen``, the command ``cli_top``. Every
read tolerates a run that ends between (or during) samples: its files vanish (ENOENT, or
ENODEV for a cgroup being removed) and its numbers read as unknown.

    from corral import Corral
    from corral.runs.top import Sampler
    with Corral() as c:
        s = Sampler(c)
        s.sample(); time.sleep(1)
        for row in s.sample().runs:
            print(row.id, row.cpu_percent, row.memory_bytes, row.memory_source)
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from ..linux.cgroup import CgroupDir, parse_pressure
from ..records import seconds_between

if TYPE_CHECKING:
    from .corral import Corral
    from .listing import RunView

HISTORY_SECONDS = 60.0
PRESSURES = ("cpu", "memory", "io")
SORT_KEYS = ("cpu", "mem", "pids", "age", "agent")


@dataclass(frozen=True)
class Point:
    """One sample of a run: when (monotonic seconds), CPU % and memory bytes."""

    t: float
    cpu_percent: float | None
    memory_bytes: int | None


@dataclass(frozen=True)
class RunRow:
    id: str
    agent: str
    state: str
    unit: str
    pids: int | None
    cpu_percent: float | None  # None on the first sample of a run, or when cpu.stat is gone
    cpu_usec: int | None
    memory_bytes: int | None
    memory_source: str | None  # "cgroup" (memory.current) | "pss" (smaps_rollup) | "rss" (PSS unreadable)
    pressure: dict[str, float | None]  # cpu/memory/io: the run cgroup's PSI "some avg10", percent
    started_at: str | None
    age: float | None  # seconds since started_at
    argv: tuple[str, ...]
    history: tuple[Point, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "agent": self.agent, "state": self.state, "unit": self.unit, "pids": self.pids,
            "cpu_percent": None if self.cpu_percent is None else round(self.cpu_percent, 2),
            "cpu_usec": self.cpu_usec, "memory_bytes": self.memory_bytes, "memory_source": self.memory_source,
            "pressure": self.pressure, "started_at": self.started_at,
            "age_seconds": None if self.age is None else round(self.age, 1), "argv": list(self.argv),
        }


@dataclass(frozen=True)
class Host:
    cpus: int
    load: tuple[float, float, float] | None
    pressure: dict[str, float | None]  # /proc/pressure/{cpu,memory,io}: "some avg10", percent
    memory_total: int | None
    memory_available: int | None

    def to_json(self) -> dict[str, Any]:
        return {"cpus": self.cpus, "load": None if self.load is None else list(self.load),
                "pressure": self.pressure, "memory_total": self.memory_total,
                "memory_available": self.memory_available}


@dataclass(frozen=True)
class Frame:
    time: float  # wall clock (epoch seconds) of the sample
    mono: float  # the same instant on the monotonic clock (the history's time base)
    interval: float | None  # seconds since the previous sample (None: the first)
    host: Host
    runs: list[RunRow] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        stamp = datetime.fromtimestamp(self.time, UTC).isoformat(timespec="milliseconds")
        return {"time": stamp, "interval": None if self.interval is None else round(self.interval, 3),
                "host": self.host.to_json(), "runs": [r.to_json() for r in self.runs]}


@dataclass
class _Track:
    """What the sampler remembers of one run between samples."""

    cpu_usec: int | None = None
    t: float | None = None
    history: deque[Point] = field(default_factory=deque)


class Sampler:
    """Samples the live runs of a :class:`corral.Corral` (of its state dir; with
    *all_users*, everyone's), optionally of some *agents* only. Call :meth:`sample` at
    the pace you want: CPU % is measured over the time between two calls."""

    def __init__(self, corral: Corral, *, agents: Iterable[str] = (), all_users: bool = False,
                 history: float = HISTORY_SECONDS, proc: Path = Path("/proc")) -> None:
        self.corral = corral
        self.agents = frozenset(agents)
        self.all_users = all_users
        self.history = history
        self.proc = proc
        self._tracks: dict[str, _Track] = {}
        self._last: float | None = None

    def sample(self) -> Frame:
        views = self.corral.ps(all_users=self.all_users)
        if self.agents:
            views = [v for v in views if v.record.agent in self.agents]
        wall = time.time()
        rows = [self._row(v, wall) for v in views]
        mono = time.monotonic()
        live = {r.id for r in rows}
        for gone in set(self._tracks) - live:  # ended since the last sample
            del self._tracks[gone]
        interval = None if self._last is None else mono - self._last
        self._last = mono
        return Frame(time=wall, mono=mono, interval=interval, host=host_info(self.proc), runs=rows)

    def _row(self, view: RunView, wall: float) -> RunRow:
        r = view.record
        scope = CgroupDir(Path(r.cgroup))
        # Our own read of cpu.stat, timed: ps() reads every run in turn, so its moment for
        # this one is not known; this read is, to the microsecond. The payload's: what the
        # command uses (a paused run reads 0), not corral's owner and watchdog beside it.
        payload = scope.commands
        usec = payload.cpu_usec()
        now = time.monotonic()
        track = self._tracks.setdefault(r.id, _Track())
        cpu = None
        if usec is not None and track.cpu_usec is not None and track.t is not None and now > track.t:
            cpu = max(0.0, (usec - track.cpu_usec) / 1e6 / (now - track.t) * 100)
        track.cpu_usec, track.t = usec, now
        memory, source = view.memory_bytes, view.memory_source
        if source != "cgroup":
            memory, source = pss(payload.pids(), self.proc)
        track.history.append(Point(now, cpu, memory))
        while track.history and track.history[0].t < now - self.history:
            track.history.popleft()
        pressure = {}
        for resource in PRESSURES:
            psi = scope.pressure(resource)
            pressure[resource] = (psi or {}).get("some", {}).get("avg10")
        return RunRow(id=r.id, agent=r.agent, state=view.state, unit=r.unit, pids=view.pids, cpu_percent=cpu,
                      cpu_usec=usec, memory_bytes=memory, memory_source=source, pressure=pressure,
                      started_at=r.started_at, age=seconds_between(r.started_at, now=wall), argv=tuple(r.argv),
                      history=tuple(track.history))


def pss(pids: Iterable[int], proc: Path = Path("/proc")) -> tuple[int | None, str]:
    """Summed PSS of *pids* (``/proc/PID/smaps_rollup``): shared pages split between their
    users, so runs sharing a library or a page cache do not each count it whole. A pid we
    may not read (another user's) counts its RSS instead, and the source says ``rss``."""
    total, source, seen = 0, "pss", False
    page = os.sysconf("SC_PAGE_SIZE")
    for pid in pids:
        try:
            with open(proc / str(pid) / "smaps_rollup", "rb") as f:
                for line in f:
                    if line.startswith(b"Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
            seen = True
        except PermissionError:
            try:
                with open(proc / str(pid) / "statm", "rb") as f:
                    total += int(f.read().split()[1]) * page
                seen, source = True, "rss"
            except (OSError, ValueError, IndexError):
                pass
        except (OSError, ValueError, IndexError):
            pass  # gone meanwhile (ESRCH reads as an empty file, ENOENT): it uses nothing now
    return (total if seen else 0), source


def host_info(proc: Path = Path("/proc")) -> Host:
    load = None
    try:
        a, b, c = (float(x) for x in (proc / "loadavg").read_text().split()[:3])
        load = (a, b, c)
    except (OSError, ValueError):
        pass
    pressure: dict[str, float | None] = {}
    for resource in PRESSURES:
        try:
            pressure[resource] = parse_pressure((proc / "pressure" / resource).read_text())["some"]["avg10"]
        except (OSError, ValueError, KeyError):
            pressure[resource] = None  # no PSI in this kernel (or psi=0)
    total = avail = None
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key == "MemTotal":
                total = int(rest.split()[0]) * 1024
            elif key == "MemAvailable":
                avail = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        cpus = len(os.sched_getaffinity(0))
    except OSError:
        cpus = os.cpu_count() or 1
    return Host(cpus=cpus, load=load, pressure=pressure, memory_total=total, memory_available=avail)


def sort_rows(rows: Sequence[RunRow], key: str) -> list[RunRow]:
    """Rows by *key* (one of SORT_KEYS): cpu, mem and pids the largest first, age the
    oldest first, agent by name; unknown numbers last, ties by run id."""
    def num(value: float | None) -> tuple[int, float]:
        return (1, 0.0) if value is None else (0, -value)

    if key == "cpu":
        return sorted(rows, key=lambda r: (num(r.cpu_percent), r.id))
    if key == "mem":
        return sorted(rows, key=lambda r: (num(r.memory_bytes), r.id))
    if key == "pids":
        return sorted(rows, key=lambda r: (num(r.pids), r.id))
    if key == "age":
        return sorted(rows, key=lambda r: (num(r.age), r.id))
    if key == "agent":
        return sorted(rows, key=lambda r: (r.agent, r.started_at or "", r.id))
    raise UsageError(f"unknown sort key {key!r}", hint=f"use one of: {', '.join(SORT_KEYS)}")


SPARK_UTF8 = "\u2581\u2582\u2583\u2584\u2585\u2586\u2587\u2588"  # ▁▂▃▄▅▆▇█
SPARK_ASCII = "_.-:=+*#"


def sparkline(points: Sequence[Point], what: str, *, now: float, width: int, window: float = HISTORY_SECONDS,
              top: float | None = None, blocks: str = SPARK_UTF8) -> str:
    """The last *window* seconds of *what* (``cpu`` or ``mem``) in *width* cells, oldest
    left; each cell the highest sample of its slice of time, blank where there was none
    (the run was not yet started, or had no reading). Scaled to *top* (default: the
    highest value shown; for CPU at least 100 %)."""
    if width <= 0:
        return ""
    slot = window / width
    cells: list[float | None] = [None] * width
    for p in points:
        value = p.cpu_percent if what == "cpu" else p.memory_bytes
        if value is None:
            continue
        i = width - 1 - int((now - p.t) / slot)
        if 0 <= i < width:
            cells[i] = value if cells[i] is None else max(value, cells[i] or 0)
    known = [c for c in cells if c is not None]
    if top is None:
        top = max(known, default=0.0)
        if what == "cpu":
            top = max(top, 100.0)
    out = []
    for c in cells:
        if c is None:
            out.append(" ")
        else:
            level = 0 if top <= 0 else min(len(blocks) - 1, int(c / top * len(blocks)))
            out.append(blocks[level])
    return "".join(out)
