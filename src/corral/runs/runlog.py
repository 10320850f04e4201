"""A detached run's output: the two streams kept apart, time-stamped, capped, and on a
systemd host also in the journal.

The run's stdout and stderr are two pipes. A thread of the run's owner (:mod:`.output`)
reads them and appends one record per line to ``runs/ID.log``::

    2026-12-07T12:00:00.123Z O a line of stdout, without its newline
    2026-12-07T12:00:00.125Z e a fragment of stderr: no newline (yet)

``O``/``E`` end a line of stdout/stderr; ``o``/``e`` are fragments that the next record
of the same stream continues: written when a line outgrows a chunk, or once a stream has
held back an unfinished line for 0.2 s (a prompt), so that ``logs -f`` shows it. One
file for both streams keeps their order: exact within a stream, and across the two the
order in which the owner read the pipes (what a program wrote to both within a moment
may come out either way, as with any two pipes). One record per write(2) with O_APPEND
keeps records whole. A line that is not a record (the owner's own messages, a log written by
an older corral) reads as stream ``corral``.

When a record would take the file past ``log_max``, the file is renamed to ``ID.log.1``
(replacing the one before) and a new one begun: a run's log never takes more than its cap
plus one rotation, however much the agent prints.

On systemd, each line is also sent to journald (native protocol, from the owner, which
sits in the run's scope: journald attributes it to the unit, so ``journalctl -u
corral-lane1-ID.scope`` shows it) with ``CORRAL_RUN_ID``, ``CORRAL_AGENT`` and
``CORRAL_STREAM`` fields. The journal is a copy: a full or slow journald drops lines
there, never stalls the run.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ..records import iso_utc

_STREAM_OF = {ord("O"): ("stdout", True), ord("o"): ("stdout", False), ord("E"): ("stderr", True),
              ord("e"): ("stderr", False)}
_RECORD = re.compile(rb"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) ([OoEe]) ?")


@dataclass(frozen=True)
class Line:
    """One line of a run's output (or, at the end, the unfinished rest of one)."""

    time: str | None  # ISO 8601 UTC, milliseconds; None for a line that is not a record
    stream: str  # stdout | stderr | corral
    data: bytes
    newline: bool = True

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"time": self.time, "stream": self.stream,
                                  "line": self.data.decode(errors="replace")}
        if not self.newline:
            out["partial"] = True
        return out


def parse_record(raw: bytes) -> tuple[str | None, str, bytes, bool]:
    """(time, stream, data, ends a line) of one record line (without its newline)."""
    m = _RECORD.match(raw)
    if m is None:
        return None, "corral", raw, True
    stream, newline = _STREAM_OF[m.group(2)[0]]
    return m.group(1).decode(), stream, raw[m.end():], newline


class LineAssembler:
    """Records in, lines out: fragments of a stream are held until their line ends."""

    def __init__(self) -> None:
        self._parts: dict[str, list[bytes]] = {}
        self._first: dict[str, str | None] = {}

    def feed(self, raw: bytes) -> Line | None:
        stamp, stream, data, newline = parse_record(raw)
        if not newline:
            self._first.setdefault(stream, stamp)
            self._parts.setdefault(stream, []).append(data)
            return None
        parts = self._parts.pop(stream, None)
        if parts is not None:
            stamp = self._first.pop(stream)
            data = b"".join(parts) + data
        return Line(stamp, stream, data)

    def rest(self) -> list[Line]:
        out = [Line(self._first[s], s, b"".join(p), newline=False) for s, p in self._parts.items()]
        self._parts.clear()
        self._first.clear()
        return out


CAUGHT_UP = None  # what :func:`records` yields once, when it has read what was there


def records(path: Path, *, follow: bool = False, ended: Callable[[], bool] = lambda: True,
            poll: float = 0.1) -> Iterator[bytes | None]:
    """The run's log records, oldest first: the rotated file, then the current one; then
    ``CAUGHT_UP``; with *follow*, the records written after that (``tail -F``: across
    rotations), until *ended()* says the run is over and all of it has been read."""
    rotated = path.with_name(path.name + ".1")
    f = _open_wait(path, ended if follow else lambda: True)
    try:
        data = rotated.read_bytes()
    except FileNotFoundError:
        data = b""
    yield from _split(data)
    if f is None:
        yield CAUGHT_UP
        return
    buf = b""
    caught_up = False
    try:
        while True:
            chunk = f.read(65536)
            if chunk:
                buf += chunk
                *done, buf = buf.split(b"\n")
                yield from done
                continue
            if not caught_up:
                caught_up = True
                if not follow:
                    if buf:
                        yield buf
                    yield CAUGHT_UP
                    return
                yield CAUGHT_UP
            if _rotated(f, path):
                buf += f.read()  # what was written before the rename
                *done, buf = buf.split(b"\n")
                yield from done
                f.close()
                f = _open_wait(path, ended)
                if f is None:
                    return
                continue
            if ended():
                buf += f.read()
                *done, buf = buf.split(b"\n")
                yield from done
                if buf:
                    yield buf
                return
            time.sleep(poll)
    finally:
        if f is not None:
            f.close()


def _split(data: bytes) -> list[bytes]:
    parts = data.split(b"\n")
    if parts and parts[-1] == b"":
        parts.pop()
    return parts


def _open_wait(path: Path, ended: Callable[[], bool]):  # type: ignore[no-untyped-def]
    while True:
        try:
            return open(path, "rb")
        except FileNotFoundError:
            if ended():
                return None
            time.sleep(0.05)


def _rotated(f, path: Path) -> bool:  # type: ignore[no-untyped-def]
    try:
        return os.stat(path).st_ino != os.fstat(f.fileno()).st_ino
    except FileNotFoundError:
        return False


def since_stamp(text: str, now: float | None = None) -> str:
    """``--since``: a duration ago (``10m``, ``1h30m``) or a time (``2026-12-07 12:00``,
    ISO 8601; local time unless it names its zone) -> an ISO 8601 UTC stamp."""
    from ..errors import UsageError
    from ..units import parse_duration

    raw = text.strip()
    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        try:
            ago = parse_duration(raw, allow_zero=True)
        except UsageError:
            raise UsageError(f"invalid --since {text!r}",
                             hint="a duration ago (10m, 2h) or a time (2026-12-07 12:00, 12:00:00+00:00)") from None
        return iso_utc(datetime.fromtimestamp((time.time() if now is None else now) - ago, UTC))
    if when.tzinfo is None:
        when = when.astimezone()  # naive: local time, as journalctl --since takes it
    return iso_utc(when)


def since_filter(lines: Iterable[Line], since: str) -> Iterator[Line]:
    """Lines from *since* (ISO 8601 UTC) on; a line without a time goes with the one before."""
    keep = False
    for line in lines:
        if line.time is not None:
            keep = line.time >= since
        if keep:
            yield line
