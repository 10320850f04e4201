"""How signals reach a run: what its owner forwards, and to which process.

An attached run's owner is the process the terminal signals. It forwards Ctrl-C & co.
(:data:`FORWARDED`) to the command; a sandboxed command has its own session (bwrap's
``--new-session``), so the owner also relays job control (:data:`JOB_CONTROL`): Ctrl-Z
stops the run's process group and then the owner, as a shell expects of a foreground job.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import TYPE_CHECKING

from ..linux.procs import children

if TYPE_CHECKING:
    from ..linux.terminal import PtyRelay

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
JOB_CONTROL = (signal.SIGTSTP, signal.SIGCONT, signal.SIGWINCH)


class SignalRelay:
    """The signal side of :class:`~corral.runs.supervise.Owner`."""

    main_pid: int
    sandboxed: bool
    terminal: PtyRelay | None
    _command_pid: int | None

    def _forward(self, sig: int) -> None:
        if self.sandboxed:
            # The command has its own session: the terminal's Ctrl-C reached only us.
            target = self._sandboxed_command()
        elif sig == signal.SIGINT and tty_delivered():
            return  # the terminal already sent it to the whole foreground group, main included
        else:
            target = self.main_pid
        try:
            os.kill(target, sig)
        except ProcessLookupError:
            pass

    def _job_control(self, sig: int) -> None:
        """A sandboxed run is in its own session, so the terminal's Ctrl-Z and resizes reach
        only us. Ctrl-Z: stop the run's process group, then ourselves, as a shell expects of
        a foreground job; on ``fg`` (SIGCONT) continue it. A resize: tell the command."""
        pty = self.terminal
        if sig == signal.SIGWINCH:
            if pty is not None:
                pty.resize()  # the kernel tells the run's foreground job
            else:
                self._signal_command(signal.SIGWINCH)
            return
        if sig == signal.SIGTSTP:
            if pty is not None:
                pty.signal_foreground(signal.SIGTSTP)  # what Ctrl-Z does to it on its terminal
                pty.leave()  # the shell gets its terminal back as it gave it to us
            else:
                self._signal_group(signal.SIGTSTP)
            os.kill(os.getpid(), signal.SIGSTOP)  # returns once the shell continues us
        if pty is not None:
            pty.enter()
            pty.resize()
            pty.signal_foreground(signal.SIGCONT)
        self._signal_group(signal.SIGCONT)

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.main_pid, sig)  # the gate child's setsid made main the group leader
        except (ProcessLookupError, PermissionError):
            pass
        self._signal_command(sig)  # in case it made itself a group of its own

    def _signal_command(self, sig: int) -> None:
        try:
            os.kill(self._sandboxed_command(), sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _sandboxed_command(self) -> int:
        """The command's pid (as we see it): the child of bwrap's pid-1 init, which is the
        child of main. While bwrap is still setting up, wait a moment for it."""
        if self._command_pid is not None:
            return self._command_pid
        deadline = time.monotonic() + 1.0
        while True:
            pid = self.main_pid
            for _depth in range(2):
                kids = children(pid) or []
                if not kids:
                    break
                pid = kids[0]
            else:
                self._command_pid = pid
                return pid
            if time.monotonic() > deadline:
                return self.main_pid  # bwrap ignores it; the grace deadline ends the run
            time.sleep(0.002)


def block_forwarded_signals() -> None:
    """Hold Ctrl-C & co. pending from before the launch until the owner listens, so a
    signal in that window is forwarded to the command instead of killing corral."""
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)


def unblock_forwarded_signals() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)


def raise_interrupt(_sig: int, _frame: object) -> None:
    raise KeyboardInterrupt


def set_child_subreaper() -> bool:
    """prctl(PR_SET_CHILD_SUBREAPER): orphans of the run come to us, not to PID 1, so
    they are reaped at once (some PID 1s reap late, leaving zombies behind a kill)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(36, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def tty_delivered() -> bool:
    """True if we are in the terminal's foreground process group (so Ctrl-C hit everyone)."""
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except (OSError, ValueError, AttributeError):
        return False
