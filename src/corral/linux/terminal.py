"""An attached, sandboxed run's own terminal: a pty relayed to the caller's.

Sharing the caller's terminal would let the payload push input into it (TIOCSTI) or
take it over once corral exits. So the command gets a new session whose controlling
terminal is the slave side of a fresh pty, and the owner copies bytes between the
caller's terminal and the master side, as ``script(1)`` and ``ssh -t`` do.

The caller's terminal is put in raw mode *except ISIG*: Ctrl-C, Ctrl-\\ and Ctrl-Z still
raise signals at corral, in the caller's foreground job. Ctrl-C and Ctrl-\\ are handed to
the run as the pty's own INTR/QUIT characters, so its line discipline signals the run's
foreground job (or a program in raw mode reads the key, as it would on a real terminal).
Ctrl-Z stops the run's foreground job and then corral, so the caller's shell gets its
prompt back; ``fg`` resumes both. Window size follows SIGWINCH.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import termios
from typing import Any

_STDIN, _STDOUT, _STDERR = 0, 1, 2
_CHUNK = 65536


def wants_pty() -> bool:
    """True where a pty relay is possible and needed: stdin and stdout are a terminal and
    we are its foreground job (a background corral must not touch the terminal's modes)."""
    try:
        return os.isatty(_STDIN) and os.isatty(_STDOUT) and os.tcgetpgrp(_STDIN) == os.getpgrp()
    except OSError:
        return False


class PtyRelay:
    """The master side, owned by the run's owner; the slave becomes the command's stdio."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        for fd in (self.master, self.slave):
            os.set_inheritable(fd, False)
        try:  # the run starts with the caller's modes and size
            termios.tcsetattr(self.slave, termios.TCSANOW, termios.tcgetattr(_STDIN))
        except termios.error:
            pass
        self.resize()
        os.set_blocking(self.master, False)
        self._saved: list[Any] | None = None  # termios.tcgetattr's [iflag, oflag, cflag, lflag, ispeed, ospeed, cc]
        self._to_run = b""  # typed input the run has not read yet
        self.stdin_open = True
        self.master_open = True

    def stdio(self) -> tuple[int, int, int]:
        """The command's fds 0-2: the slave, except a stderr the caller redirected."""
        return self.slave, self.slave, self.slave if os.isatty(_STDERR) else _STDERR

    def close_slave(self) -> None:
        """Once the command holds the slave, the owner must not (or EOF never comes)."""
        if self.slave >= 0:
            os.close(self.slave)
            self.slave = -1

    # --- the caller's terminal --------------------------------------------------------

    def enter(self) -> None:
        """Raw mode on the caller's terminal, keeping ISIG (see the module docstring)."""
        try:
            if self._saved is None:  # a second enter (SIGCONT) must not save the raw mode
                self._saved = termios.tcgetattr(_STDIN)
        except termios.error:
            return
        mode: list[Any] = [list(x) if isinstance(x, list) else x for x in self._saved]
        mode[0] &= ~(termios.BRKINT | termios.ICRNL | termios.INPCK | termios.ISTRIP | termios.IXON)
        mode[1] &= ~termios.OPOST  # the pty's own OPOST already turned \n into \r\n
        mode[2] = (mode[2] & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
        mode[3] &= ~(termios.ECHO | termios.ICANON | termios.IEXTEN)
        mode[6][termios.VMIN], mode[6][termios.VTIME] = 1, 0
        termios.tcsetattr(_STDIN, termios.TCSAFLUSH, mode)

    def leave(self) -> None:
        if self._saved is not None:
            try:
                termios.tcsetattr(_STDIN, termios.TCSAFLUSH, self._saved)
            except termios.error:
                pass
            self._saved = None

    def resize(self) -> None:
        try:
            size = fcntl.ioctl(_STDOUT, termios.TIOCGWINSZ, b"\0" * 8)
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, size)  # the kernel sends the run SIGWINCH
        except OSError:
            pass

    # --- keys and job control ---------------------------------------------------------

    def key(self, sig: int) -> None:
        """A Ctrl-C / Ctrl-\\ the caller's terminal turned into a signal at us: type the
        run's own INTR / QUIT character into its terminal."""
        index = termios.VINTR if sig == signal.SIGINT else termios.VQUIT
        try:
            char = termios.tcgetattr(self.master)[6][index]
        except termios.error:
            char = b"\x03" if sig == signal.SIGINT else b"\x1c"
        if isinstance(char, int):
            char = bytes([char])
        self._to_run += char
        self.flush_input()

    def foreground_group(self) -> int | None:
        """The run's foreground process group, in our pid namespace."""
        try:
            pgrp = os.tcgetpgrp(self.master)
        except OSError:
            return None
        return pgrp if pgrp > 0 else None

    def signal_foreground(self, sig: int) -> None:
        pgrp = self.foreground_group()
        if pgrp is not None:
            try:
                os.killpg(pgrp, sig)
            except (ProcessLookupError, PermissionError):
                pass

    # --- the byte pump ----------------------------------------------------------------

    def on_stdin(self) -> None:
        try:
            data = os.read(_STDIN, _CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.stdin_open = False
            return
        self._to_run += data
        self.flush_input()

    def flush_input(self) -> None:
        """Write what was typed to the run; what does not fit waits for the next byte in
        or out (a run that never reads its input must not block the owner)."""
        while self._to_run:
            try:
                written = os.write(self.master, self._to_run)
            except BlockingIOError:
                return
            except OSError:
                self._to_run = b""
                return
            self._to_run = self._to_run[written:]

    def on_master(self) -> None:
        """Copy the run's output to the caller's terminal."""
        while True:
            try:
                data = os.read(self.master, _CHUNK)
            except BlockingIOError:
                return
            except OSError as err:  # EIO: every slave fd is closed
                if err.errno == errno.EIO:
                    self.master_open = False
                    return
                raise
            if not data:
                self.master_open = False
                return
            _write_all(_STDOUT, data)
            self.flush_input()

    def close(self) -> None:
        """After the run: copy what it wrote last, give the caller's terminal back."""
        if self.master_open:
            self.on_master()
        self.leave()
        self.close_slave()
        os.close(self.master)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except InterruptedError:
            continue
        except BlockingIOError:  # a non-blocking stdout: wait until it drains
            import select

            select.select([], [fd], [])
        except OSError:
            return

