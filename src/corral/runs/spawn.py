"""fork + exec with a gate: the child waits until its parent has placed it in the run's cgroup.

``subprocess.Popen`` blocks until the child has exec'd, so a child that must wait for
the parent (systemd moves it into the scope first) cannot be started with it. Here the
child is forked, joins its cgroup or waits on the gate pipe, and reports a failed exec
through a close-on-exec error pipe, the way ``_posixsubprocess`` does.
"""

from __future__ import annotations

import os
import resource  # here, not in the child: a fork of a threaded process must not import
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import spawn_error

if TYPE_CHECKING:
    from ..isolation.sandbox import Sandbox

# Ignored by the outer bwrap of a sandboxed run: they are meant for the command, to which
# the owner forwards them (bwrap would die of them and SIGKILL the namespace).
SHIELDED_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")
_RESET_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD, signal.SIGPIPE,
                  signal.SIGXFSZ)


def reset_signals_in_child() -> None:
    """Undo what Python (SIGPIPE ignored, SIGINT handler) and corral changed."""
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass
    for sig in _RESET_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


@dataclass(frozen=True)
class Inherited:
    """What a child forked by corral's shared owner takes from the caller that handed the
    run over, instead of from the owner: its umask, and its soft limit on open files (the
    owner raises its own: it holds a dozen fds per run)."""

    umask: int
    nofile: tuple[int, int]

    def limit_files(self) -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, self.nofile)


@dataclass
class HeldChild:
    """A forked child waiting at the gate. ``release()`` lets it exec."""

    pid: int
    argv: Sequence[str]
    _gate_w: int
    _err_r: int

    def release(self) -> None:
        """Open the gate; return once the child has exec'd, raise :class:`SpawnError` if it could not."""
        try:
            os.write(self._gate_w, b"g")
        except BrokenPipeError:
            pass
        os.close(self._gate_w)
        self._gate_w = -1
        data = b""
        while True:
            chunk = os.read(self._err_r, 64)
            if not chunk:
                break
            data += chunk
        os.close(self._err_r)
        if data:
            os.waitpid(self.pid, 0)
            code = int(data.split(b":")[0] or 0)
            if data.endswith(b":hide"):
                raise spawn_error(
                    f"cannot hide the auth token store from the run: {os.strerror(code)}",
                    errno=code,
                    hint="this needs a private mount namespace (root, or unprivileged user namespaces: "
                    "sysctl kernel.unprivileged_userns_clone=1)",
                )
            if data.endswith(b":join"):
                raise spawn_error(
                    f"cannot run {self.argv[0]!r}: its run's cgroup could not be joined ({os.strerror(code)})",
                    errno=code,
                    hint="it was removed while the run started (by hand, or by a corral of another version); "
                    "run it again" if code == 2 else None,
                )
            raise spawn_error(
                f"cannot run {self.argv[0]!r}: {os.strerror(code)}",
                errno=code,
                hint="check the command name and PATH" if code == 2 else None,
            )

    def abort(self) -> None:
        """Close the gate without opening it: the child exits without running anything."""
        if self._gate_w >= 0:
            os.close(self._gate_w)
            self._gate_w = -1
        try:
            os.close(self._err_r)
        except OSError:
            pass
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)


def _child(
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: str | None,
    stdio: tuple[int, int, int],
    join: Callable[[], None] | None,
    gate_r: int,
    err_w: int,
    new_session: bool,
    hide: Sequence[str] = (),
    sandbox: Sandbox | None = None,
    ctty: bool = False,
    inherit: Inherited | None = None,
) -> None:
    """Runs in the forked child; never returns."""
    try:
        reset_signals_in_child()
        if inherit is not None:
            os.umask(inherit.umask)
        if new_session:
            os.setsid()
        if os.read(gate_r, 1) != b"g":
            os._exit(125)
        if join is not None:
            try:
                join()  # into its leaf cgroup, after the parent placed it in the unit
            except OSError as err:
                os.write(err_w, f"{err.errno}:join".encode())
                os._exit(126)
        if hide:
            from ..isolation.mountns import hide_paths

            try:
                hide_paths(hide)
            except OSError as err:
                os.write(err_w, f"{err.errno}:hide".encode())
                os._exit(126)
        if sandbox is not None:
            # Out of the cgroup's reach first (joining needed the caller's rights), then
            # the caller's identity; bwrap then builds the namespaces as that identity.
            sandbox.identity.become()
            if sandbox.active:
                argv = sandbox.argv()
                for name in SHIELDED_SIGNALS:
                    signal.signal(getattr(signal, name), signal.SIG_IGN)
        for target, fd in enumerate(stdio):
            if fd != target:
                os.dup2(fd, target)
            else:
                os.set_inheritable(fd, True)
        if ctty:  # the run's own pty (linux/terminal.py): its controlling terminal, not the caller's
            import fcntl
            import termios

            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        if cwd:
            os.chdir(cwd)
        # Close everything else; err_w is close-on-exec so it reports only a failed exec.
        # A sandbox may hand bwrap one more fd (its seccomp filter).
        keep = sorted({err_w, sandbox.keep_fd if sandbox is not None else -1} - {-1})
        start = 3
        for fd in keep:
            os.closerange(start, fd)
            start = fd + 1
        os.closerange(start, max(65536, os.sysconf("SC_OPEN_MAX")))
        if inherit is not None:
            inherit.limit_files()  # now: the open-file limit bounds opens, and most fds are closed
        os.execvpe(argv[0], list(argv), dict(env))
    except OSError as err:
        try:
            os.write(err_w, f"{err.errno}:".encode())
        finally:
            os._exit(127)
    except BaseException:  # noqa: BLE001 - nothing may return into the parent's code
        os._exit(127)
    os._exit(127)


def fork_held(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: str | None = None,
    stdio: tuple[int, int, int] = (0, 1, 2),
    join: Callable[[], None] | None = None,
    new_session: bool = False,
    hide: Sequence[str] = (),
    sandbox: Sandbox | None = None,
    ctty: bool = False,
    inherit: Inherited | None = None,
) -> HeldChild:
    """Fork a child that waits for ``release()``, runs *join* (if any), then execs *argv*,
    or, with an active *sandbox*, bwrap around it (as the sandbox's identity). *ctty*: make
    stdin (a pty slave) the controlling terminal of the child's new session. *inherit*: what
    the child takes from a caller of the shared owner rather than from this process."""
    gate_r, gate_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(gate_w)
        os.close(err_r)
        _child(argv, env, cwd, stdio, join, gate_r, err_w, new_session, hide, sandbox, ctty, inherit)
    os.close(gate_r)
    os.close(err_w)
    return HeldChild(pid=pid, argv=argv, _gate_w=gate_w, _err_r=err_r)


def exit_code_of(status: int) -> tuple[int | None, int | None]:
    """waitpid status -> (exit_code, signal)."""
    if os.WIFSIGNALED(status):
        return None, os.WTERMSIG(status)
    return os.WEXITSTATUS(status), None
