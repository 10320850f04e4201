"""How every corral command prints: tables that fit the terminal, JSON, command lines,
times and sizes. One place, so that `ps`, `agents list`, `auth status` and `sessions
list` look and behave alike (systemctl's conventions: ellipsize only on a terminal)."""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import click


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


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


def _parse_iso(stamp: str) -> datetime | None:
    try:
        when = datetime.fromisoformat(stamp)
    except (TypeError, ValueError):
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def local_time(stamp: str | None, *, utc: bool = False) -> str:
    """A record's UTC ISO stamp in local time with its zone (``2026-12-07 06:10:03 CET``),
    or in UTC with ``--utc``."""
    when = _parse_iso(stamp) if stamp else None
    if when is None:
        return stamp or "-"
    shown = when.astimezone(UTC) if utc else when.astimezone()
    return shown.strftime("%Y-%m-%d %H:%M:%S %Z")


def ago(stamp: str | None, now: float | None = None) -> str:
    """``3m ago``, ``2h ago``, ``5d ago``: how long since *stamp*, as a person reads it."""
    when = _parse_iso(stamp) if stamp else None
    if when is None:
        return "-"
    seconds = (time.time() if now is None else now) - when.timestamp()
    if seconds < 0:
        return "just now" if seconds > -60 else "in the future"  # a clock set back since
    return f"{duration(seconds)} ago"


def duration(seconds: float) -> str:
    """``45s``, ``3m``, ``2h5m``, ``3d4h``: the two largest units that matter."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        h, m = divmod(s // 60, 60)
        return f"{h}h{m}m" if m else f"{h}h"
    d, h = divmod(s // 3600, 24)
    return f"{d}d{h}h" if h else f"{d}d"
