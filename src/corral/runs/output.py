"""Writing a run's output: the owner's thread that reads the command's two pipes and
appends records to its log (:class:`LogFile`, rotating at ``log_max``) and, on systemd, to
the journal (:class:`Journal`). The record format, and how it is read back, is in
:mod:`.runlog`.
"""


from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..records import now_iso
from ..units import DEFAULT_LOG_MAX, MIN_LOG_MAX

IDLE_FLUSH = 0.2  # seconds an unfinished line waits before it is written as a fragment
JOURNAL_SOCKET = "/run/systemd/journal/socket"
JOURNAL_LINE_MAX = 48 * 1024  # journald's own LineMax: longer lines go in pieces

_TAGS = {("stdout", True): b"O", ("stdout", False): b"o", ("stderr", True): b"E", ("stderr", False): b"e"}


def _stamp() -> bytes:
    return now_iso().encode()


class LogFile:
    """The run's log file, appended to record by record and rotated at *cap* bytes.
    *on_reopen* gets the new file's fd after a rotation (the owner points its own
    stdout/stderr at it)."""

    def __init__(self, path: Path, cap: int = DEFAULT_LOG_MAX, on_reopen: Callable[[int], None] | None = None) -> None:
        self.path = Path(path)
        self.cap = max(int(cap), MIN_LOG_MAX)
        self.chunk = min(65536, self.cap // 4)  # the longest fragment: records always fit the cap
        self.on_reopen = on_reopen
        self.fd = self._open()
        self.size = os.fstat(self.fd).st_size
        self.rotations = 0

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)

    def append(self, stream: str, data: bytes, *, newline: bool, stamp: bytes | None = None) -> None:
        record = b"%s %s %s\n" % (stamp or _stamp(), _TAGS[stream, newline], data)
        if self.size + len(record) > self.cap and self.size > 0:
            self._rotate()
        try:
            os.write(self.fd, record)
        except OSError:
            return  # a full disk loses output, never the run (the pipe keeps draining)
        self.size += len(record)

    def _rotate(self) -> None:
        try:
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            fd = self._open()
        except OSError:
            return  # keep writing where we are; the cap is best effort on a broken disk
        os.close(self.fd)
        self.fd, self.size = fd, 0
        self.rotations += 1
        if self.on_reopen is not None:
            self.on_reopen(fd)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


class Journal:
    """Sends lines to journald over its native socket, with the run's fields. Never
    blocks: a line journald cannot take right now is dropped (and counted)."""

    def __init__(self, fields: dict[str, str], socket_path: str = JOURNAL_SOCKET) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.connect(socket_path)
        except OSError:
            self.sock.close()
            raise
        self.head = b"".join(_field(k, v.encode()) for k, v in fields.items())
        self.dropped = 0

    def send(self, stream: str, line: bytes) -> None:
        for start in range(0, max(len(line), 1), JOURNAL_LINE_MAX):
            message = self.head + _field("CORRAL_STREAM", stream.encode()) + \
                _field("MESSAGE", line[start:start + JOURNAL_LINE_MAX])
            try:
                self.sock.send(message, socket.MSG_DONTWAIT)
            except OSError:
                self.dropped += 1

    def close(self) -> None:
        self.sock.close()


def _field(name: str, value: bytes) -> bytes:
    if b"\n" in value or not value.isascii():
        return name.encode() + b"\n" + struct.pack("<Q", len(value)) + value + b"\n"
    return name.encode() + b"=" + value + b"\n"


def open_journal(*, run_id: str, agent: str, unit: str, argv0: str, user_mode: bool) -> Journal | None:
    """The run's journal sink, or None where there is no journald to take it."""
    fields = {"PRIORITY": "6", "SYSLOG_IDENTIFIER": os.path.basename(argv0) or agent, "CORRAL_RUN_ID": run_id,
              "CORRAL_AGENT": agent,
              # journald names the unit from the sender's cgroup (the owner is in the scope);
              # this says it too, for a line that journald reads after the owner has gone.
              "OBJECT_SYSTEMD_USER_UNIT" if user_mode else "OBJECT_SYSTEMD_UNIT": unit}
    try:
        return Journal(fields)
    except OSError:
        return None


class OutputPump(threading.Thread):
    """Reads the run's stdout and stderr pipes until both are closed (every writer has
    exited) or :meth:`finish` says stop, and writes what it reads to the log file and the
    journal, line by line."""

    def __init__(self, pipes: dict[int, str], log: LogFile, journal: Journal | None = None) -> None:
        super().__init__(name="corral-output", daemon=True)
        self.pipes = dict(pipes)  # fd -> "stdout" | "stderr"
        self.log = log
        self.journal = journal
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._pending: dict[str, bytearray] = {s: bytearray() for s in pipes.values()}
        self._since: dict[str, float] = {}  # when each stream's unfinished line began
        self._journal_line: dict[str, bytearray] = {s: bytearray() for s in pipes.values()}

    def finish(self, timeout: float = 2.0) -> None:
        """Return once everything the run wrote is in the log: wait for the pipes to close,
        then (a writer escaped the cgroup and holds one open) take what is there and stop."""
        self.join(timeout)
        if self.is_alive():
            os.write(self._stop_w, b"x")
            self.join(timeout)
        self.log.close()
        if self.journal is not None:
            self.journal.close()

    def run(self) -> None:
        poller = select.poll()
        for fd in self.pipes:
            poller.register(fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        open_fds = set(self.pipes)
        try:
            while open_fds:
                wait = None
                if self._since:
                    wait = max(0.0, min(self._since.values()) + IDLE_FLUSH - time.monotonic()) * 1000
                events = poller.poll(wait)
                for fd, _ev in events:
                    if fd == self._stop_r:
                        for other in list(open_fds):
                            self._drain(other)
                        open_fds.clear()
                        break
                    if not self._read(fd):
                        poller.unregister(fd)
                        open_fds.discard(fd)
                self._flush_idle()
        finally:
            for stream in self._pending:
                self._flush(stream)
                self._journal_flush(stream)
            for fd in self.pipes:
                with contextlib.suppress(OSError):
                    os.close(fd)
            os.close(self._stop_r)
            os.close(self._stop_w)

    def _read(self, fd: int) -> bool:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        stream = self.pipes[fd]
        if not data:
            self._flush(stream)
            return False
        self._take(stream, data)
        return True

    def _drain(self, fd: int) -> None:
        os.set_blocking(fd, False)
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                return
            if not data:
                return
            self._take(self.pipes[fd], data)

    def _take(self, stream: str, data: bytes) -> None:
        buf = self._pending[stream]
        buf += data
        stamp = _stamp()
        *lines, rest = bytes(buf).split(b"\n")
        for line in lines:
            self.log.append(stream, line, newline=True, stamp=stamp)
            self._journal(stream, line, end=True)
        buf[:] = rest
        while len(buf) >= self.log.chunk:  # a very long line goes in fragments
            piece = bytes(buf[:self.log.chunk])
            del buf[:self.log.chunk]
            self.log.append(stream, piece, newline=False, stamp=stamp)
            self._journal(stream, piece, end=False)
        if buf:
            self._since.setdefault(stream, time.monotonic())
        else:
            self._since.pop(stream, None)

    def _flush_idle(self) -> None:
        now = time.monotonic()
        for stream, since in list(self._since.items()):
            if now - since >= IDLE_FLUSH:
                self._flush(stream)

    def _flush(self, stream: str) -> None:
        buf = self._pending[stream]
        if buf:
            self.log.append(stream, bytes(buf), newline=False)
            self._journal(stream, bytes(buf), end=False)
            buf.clear()
        self._since.pop(stream, None)

    def _journal(self, stream: str, data: bytes, *, end: bool) -> None:
        """The journal gets whole lines (a fragment waits for the rest of its line)."""
        if self.journal is None:
            return
        line = self._journal_line[stream]
        line += data
        if end or len(line) >= JOURNAL_LINE_MAX:
            self.journal.send(stream, bytes(line))
            line.clear()

    def _journal_flush(self, stream: str) -> None:
        if self.journal is not None and self._journal_line[stream]:
            self.journal.send(stream, bytes(self._journal_line[stream]))
            self._journal_line[stream].clear()
