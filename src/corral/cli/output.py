"""How every corral command prints: tables that fit the terminal, JSON, command lines,
times and sizes. One place, so that `ps`, `agents list`, `auth status` and `sessions
list` look and behave alike (systemctl's conventions: ellipsize only on a terminal)."""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import threading
import time
from collections.abc import Sequence
from datetime import UTC
from typing import Any, Self

import click

from ..records import parse_stamp


def echo_json(data: Any) -> None:
    """Indented for a person at a terminal; one compact line for a pipe (scripts, `jq`):
    the same JSON, and for `ps --json` of hundreds of runs a third of the time."""
    click.echo(json.dumps(data, indent=2 if sys.stdout.isatty() else None, sort_keys=False))


def _terminal_width() -> int | None:
    """The terminal's width, or None when stdout is not a terminal (a pipe, a file): then
    nothing is cut, as systemctl does, so scripts and `| less -S` see whole lines."""
    if not sys.stdout.isatty():
        return None
    return shutil.get_terminal_size((100, 24)).columns


def table(rows: Sequence[Sequence[Any]], header: Sequence[str], *, shrink: int | None = None,
          no_trunc: bool = False) -> None:
    """Columns padded to their widest cell. On a terminal narrower than the table, column
    *shrink* (default: the last) is cut to fit, with an ellipsis, unless *no_trunc*."""
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    width = None if no_trunc else _terminal_width()
    col = len(header) - 1 if shrink is None else shrink
    if width is not None:
        over = sum(widths) + 2 * (len(widths) - 1) - width
        if over > 0:
            widths[col] = max(len(header[col]), widths[col] - over)
    for row in cells:
        row[col] = ellipsize(row[col], widths[col])
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def ellipsize(text: str, width: int) -> str:
    return text if len(text) <= width else text[:max(width - 1, 0)] + "\u2026"


def command_line(argv: Sequence[str]) -> str:
    """argv as a shell would take it back (systemctl shows ExecStart= so), on one line."""
    return shlex.join(argv).replace("\n", "\\n")


def local_time(stamp: str | None, *, utc: bool = False) -> str:
    """A record's UTC ISO stamp in local time with its zone (``2026-12-07 06:10:03 CET``),
    or in UTC with ``--utc``."""
    when = parse_stamp(stamp)
    if when is None:
        return stamp or "-"
    shown = when.astimezone(UTC) if utc else when.astimezone()
    return shown.strftime("%Y-%m-%d %H:%M:%S %Z")


def ago(stamp: str | None, now: float | None = None) -> str:
    """``3m ago``, ``2h ago``, ``5d ago``: how long since *stamp*, as a person reads it."""
    when = parse_stamp(stamp)
    if when is None:
        return "-"
    seconds = (time.time() if now is None else now) - when.timestamp()
    if seconds < 0:
        return "just now" if seconds > -60 else "in the future"  # a clock set back since
    return f"{duration(seconds)} ago"


def duration(seconds: float, *, precise: bool = False) -> str:
    """``45s``, ``3m``, ``2h5m``, ``3d4h``: the two largest units that matter. *precise*:
    under a minute to a tenth of a second, and minutes with their seconds (how long a run took)."""
    s = int(seconds)
    if precise and s < 60:
        return f"{seconds:.1f}s"
    if precise and s < 3600:
        return f"{s // 60}m{s % 60}s"
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        h, m = divmod(s // 60, 60)
        return f"{h}h{m}m" if m else f"{h}h"
    d, h = divmod(s // 3600, 24)
    return f"{d}d{h}h" if h else f"{d}d"


def process_tree(processes: Sequence[dict[str, Any]]) -> None:
    """A run's processes as a tree (as ``ps f`` / systemd-cgls draw it): each below its
    parent, with role, resident memory and CPU time. Processes whose parent is not in
    the run (the watchdog, an orphan) start trees of their own."""
    from ..units import format_bytes

    pids = {p["pid"] for p in processes}
    children: dict[int | None, list[dict[str, Any]]] = {}
    for p in processes:
        children.setdefault(p["ppid"] if p["ppid"] in pids else None, []).append(p)
    rows: list[list[str]] = []

    def walk(parent: int | None, prefix: str, seen: set[int]) -> None:
        kids = sorted(children.get(parent, []), key=lambda p: p["pid"])
        for i, p in enumerate(kids):
            if p["pid"] in seen:
                continue  # a pid reused while we read: never loop
            last = i == len(kids) - 1
            branch = "" if parent is None else ("\u2514\u2500 " if last else "\u251c\u2500 ")
            cpu = "-" if p.get("cpu_s") is None else f"{p['cpu_s']:.1f}s"
            rows.append([str(p["pid"]), p["role"], format_bytes(p.get("rss_bytes")), cpu,
                         prefix + branch + command_line(p["argv"] or ["?"])])
            walk(p["pid"], prefix + ("" if parent is None else ("   " if last else "\u2502  ")), seen | {p["pid"]})

    walk(None, "", set())
    lines: list[str] = []
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(("PID", "ROLE", "RSS", "CPU"))]
    width = _terminal_width()
    for row in [["PID", "ROLE", "RSS", "CPU", "COMMAND"], *rows]:
        text = "  " + "  ".join(c.rjust(w) if i in (0, 2, 3) else c.ljust(w)
                                for i, (c, w) in enumerate(zip(row, widths))) + "  " + row[4]
        lines.append(ellipsize(text, width) if width else text)
    for text in lines:
        click.echo(text.rstrip())


class WaitProgress:
    """A wait for a session lease or a max_runs slot, shown as it goes. On a terminal: one
    line on stderr, redrawn each second with the time waited, replaced at the end by a line
    saying how long it took. Elsewhere (a pipe, a log): the line once, as it starts.

    The wait itself blocks in flock(2) in the calling thread; the redraw is a daemon thread,
    stopped on leaving the ``with`` block however it is left (the lease came, a timeout,
    Ctrl-C)."""

    def __init__(self) -> None:
        self._what: str | None = None
        self._started = 0.0
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._tty = sys.stderr.isatty()

    def __call__(self, what: object) -> None:
        """The ``on_wait`` callback: the wait begins (called at most once per wait)."""
        self._what = str(what)
        self._started = time.monotonic()
        if not self._tty:
            click.echo(f"corral: waiting: {self._what}", err=True)
            return
        self._draw()
        self._ticker = threading.Thread(target=self._tick, name="corral-wait-progress", daemon=True)
        self._ticker.start()

    def _elapsed(self) -> str:
        s = int(time.monotonic() - self._started)
        return f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s" if s < 3600 else duration(s)

    def _draw(self) -> None:
        width = shutil.get_terminal_size((100, 24)).columns
        line = ellipsize(f"corral: waiting {self._elapsed()}: {self._what}", max(20, width - 1))
        sys.stderr.write(f"\r\033[K{line}")
        sys.stderr.flush()

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            self._draw()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self._stop.set()
        if self._ticker is None:
            return
        self._ticker.join()
        outcome = "waited" if exc_type is None else "gave up after"
        sys.stderr.write(f"\r\033[Kcorral: {outcome} {self._elapsed()}: {self._what}\n")
        sys.stderr.flush()
