#!/usr/bin/python3
"""Boot a throwaway real systemd in systemd-nspawn and run a command inside it.

The container reuses the host's own /usr (``-D / --volatile=yes``: the root is
a fresh tmpfs, /usr is the host's, read-only), so no image has to be built.
Only the repository is bound in; everything else the container writes is gone
when it powers off.

Command line (used by the Makefile)::

    /usr/bin/python3 tests/nspawn.py [--user] [--repo DIR] -- CMD ARG...

exits with CMD's exit code. ``--user`` runs CMD as an unprivileged user
(uid 1001) that has a running ``user@1001.service`` manager.

Library use::

    with SystemdContainer(repo, user=True) as box:
        box.exec(["systemctl", "is-system-running"])
        box.run(["pytest"], as_user=True)

Standard library only; needs root, systemd-nspawn and nsenter on the host.

Housekeeping that is easy to miss: each container gets its own cgroup (so
parallel containers do not share nspawn's fixed ``payload`` cgroup), and the
script is a child subreaper (so a command orphaned by a dying nsenter can
still be killed before poweroff). The container is always powered off, also
on exceptions and SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType

# Fixed PATH inside: the host's PATH may point at venvs or tool dirs that do
# not exist (or mean something else) in the container.
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Host environment variables forwarded to the command (besides CI).
PASSTHROUGH_PREFIXES = ("CORRAL_", "PYTEST_")
PASSTHROUGH_NAMES = ("CI",)

USER_NAME = "u1"
USER_UID = 1001
USER_HOME = f"/home/{USER_NAME}"
USER_RUNTIME_DIR = f"/run/user/{USER_UID}"

BOOT_TIMEOUT = 60.0  # from nspawn start to "running"/"degraded"
PID1_TIMEOUT = 10.0  # from nspawn start to the container's PID 1 showing up
USER_TIMEOUT = 30.0  # for user@.service to expose its sockets
STOP_TIMEOUT = 15.0  # graceful poweroff before SIGKILL
ABORT_TIMEOUT = 5.0  # for an interrupted command inside to exit on SIGTERM

PR_SET_CHILD_SUBREAPER = 36  # from <linux/prctl.h>

# Runs as "sh -c WRAPPER sh N FILE... CMD...": writes its pid into N
# cgroup.procs files, then execs CMD (so the pid stays nspawn's).
_CGROUP_WRAPPER = (
    'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ >"$1" || exit 125; '
    'shift; n=$((n - 1)); done; exec "$@"'
)

DEFAULT_REPO = Path(__file__).resolve().parent.parent


class ContainerError(RuntimeError):
    """The container failed to boot or to set up the test user."""


class SignalExit(SystemExit):
    """Raised from the SIGINT/SIGTERM handler so ``finally`` blocks still run."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


def _raise_signal_exit(signum: int, _frame: FrameType | None) -> None:
    """Signal handler: turn the signal into an exception (cleanup via finally)."""
    raise SignalExit(signum)


def passthrough_env(environ: Mapping[str, str], *, home: str) -> dict[str, str]:
    """Pick the host variables the command inside should see, plus PATH/HOME."""
    env = {
        name: value
        for name, value in environ.items()
        if name.startswith(PASSTHROUGH_PREFIXES) or name in PASSTHROUGH_NAMES
    }
    env["PATH"] = CONTAINER_PATH
    env["HOME"] = home
    return env


def _proc_start_time(pid: int) -> str | None:
    """Start time of *pid* from /proc (to tell a live pid from a reused one)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may contain spaces; fields after the last ')' are safe.
    return stat.rsplit(")", 1)[1].split()[19]


def _innermost_pid(pid: int) -> int | None:
    """The pid of *pid* in its own innermost pid namespace (NSpid's last value)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    return None


def _children(pid: int) -> list[int]:
    """Direct children of *pid* (host pids)."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """Hold off SIGINT/SIGTERM so cleanup is not cut short; they fire afterwards."""
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def become_subreaper() -> None:
    """Make orphaned descendants reparent to this process instead of host init.

    When an nsenter dies before the command it forked into the container
    (e.g. a terminal ^C hits the whole process group), that command would be
    orphaned to the *host's* init, out of our reach: it keeps the bind mount
    busy and stalls the container's shutdown by ~10 s. As a subreaper we can
    find, kill and reap it. Process-wide, so only main() turns it on.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


def _reaped(pid: int) -> bool:
    """Reap child *pid* if it has exited; True if it is gone."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done == pid


def _cgroup_bases() -> list[Path]:
    """Our current cgroup dirs in the hierarchies nspawn uses (name=systemd, v2)."""
    mounts: dict[str, Path] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields, _, fs_part = line.partition(" - ")
            fstype, _source, options = fs_part.split()[:3]
            mountpoint = Path(fields.split()[4])
            if fstype == "cgroup2":
                mounts.setdefault("", mountpoint)
            elif fstype == "cgroup" and "name=systemd" in options.split(","):
                mounts.setdefault("name=systemd", mountpoint)
    bases = []
    with open("/proc/self/cgroup") as f:
        for line in f:
            hier_id, controllers, path = line.rstrip("\n").split(":", 2)
            key = "" if hier_id == "0" else controllers
            if key in mounts:
                bases.append(mounts[key] / path.lstrip("/"))
    return bases


def _make_cgroups(name: str) -> list[Path]:
    """Create a private cgroup *name* below ours in each relevant hierarchy.

    With --keep-unit and no systemd on the host, nspawn puts the container
    in ``<its cgroup>/payload``; two containers started from the same cgroup
    would share (and clobber) one tree, e.g. one's shutdown killing the
    other's user@1001.service. Best effort: without them we still work alone.
    """
    made: list[Path] = []
    try:
        for base in _cgroup_bases():
            cg = base / name
            cg.mkdir()
            made.append(cg)
    except OSError as err:
        print(f"nspawn.py: no private cgroup ({err}); parallel containers may clash",
              file=sys.stderr)
        _remove_cgroups(made)
        return []
    return made


def _remove_cgroups(cgroups: Sequence[Path]) -> None:
    """rmdir our cgroups bottom-up (nspawn/systemd leave sub-cgroups behind)."""
    for cg in cgroups:
        for dirpath, _dirs, _files in os.walk(cg, topdown=False):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)


def _own_children() -> list[int]:
    """Direct children of this process (any thread may be the parent)."""
    pids: list[int] = []
    for task in Path("/proc/self/task").iterdir():
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return pids


def _pidns(pid: int) -> str | None:
    """Identity of *pid*'s pid namespace (e.g. ``pid:[4026532301]``)."""
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


@functools.cache
def _nsenter_has_wdns() -> bool:
    """Whether this nsenter knows ``--wdns`` (util-linux >= 2.39, some backports)."""
    try:
        res = subprocess.run(["nsenter", "--help"], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return False
    return "--wdns" in res.stdout


class SystemdContainer:
    """A booted, throwaway systemd container; use as a context manager.

    ``pid1`` is the host pid of the container's init once booted. Commands run
    with the repository as working directory and a minimal environment
    (see :func:`passthrough_env`).
    """

    def __init__(self, repo: Path, *, user: bool = False) -> None:
        self.repo = Path(repo).resolve()
        self.user = user
        self.pid1: int | None = None
        self._pid1_start: str | None = None
        self._pidns: str | None = None  # the container's pid namespace
        self._cgroups: list[Path] = []  # our private cgroups for nspawn
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_path: Path | None = None
        self._user_ready = False
        #: what `systemctl is-system-running --wait` reported ("running"/"degraded")
        self.system_state: str | None = None

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> SystemdContainer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Boot the container and wait until systemd reports it is up."""
        if self._proc is not None:
            raise RuntimeError("container already started")
        if not self.repo.is_dir():
            raise ContainerError(f"repository directory {self.repo} does not exist")
        # Binding e.g. / or /var would expose the host's /tmp (or /usr, /etc)
        # to the container's boot-time cleanup and writes.
        for vital in ("/tmp", "/var/tmp", "/usr", "/etc", "/run"):
            if Path(vital).is_relative_to(self.repo):
                raise ContainerError(f"refusing to bind {self.repo}: it contains {vital}")
        # The log lives in the host's /tmp; the container never sees it (we
        # must not bind /tmp: the container's boot would clean the host's).
        name = f"corral-{os.getpid()}-{secrets.token_hex(3)}"
        fd, log_name = tempfile.mkstemp(prefix=f"{name}-", suffix=".log")
        self._log_path = Path(log_name)
        self._cgroups = _make_cgroups(name)
        cmd = [
            # Move nspawn (same pid: exec) into its own cgroups first.
            "sh", "-c", _CGROUP_WRAPPER, "sh", str(len(self._cgroups)),
            *(str(cg / "cgroup.procs") for cg in self._cgroups),
            "systemd-nspawn",
            "-D", "/",
            "--volatile=yes",
            "--register=no",
            "--keep-unit",
            "-q",
            "--console=passive",
            # A unique machine name keeps parallel containers from sharing
            # /run/systemd/nspawn/propagate/<name> (default is the host name).
            f"--machine={name}",
            f"--bind={self.repo}",
            # PAM config for runuser/user@.service; volatile /etc is empty.
            "--bind-ro=/etc/pam.d",
            "--bind-ro=/etc/security",
            "-b",
            "--",
            "systemd.firstboot=off",
        ]
        try:
            # Own session: terminal ^C must not reach nspawn (we stop it).
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except BaseException:
            os.close(fd)
            self._remove_log()
            _remove_cgroups(self._cgroups)
            raise
        os.close(fd)
        try:
            deadline = time.monotonic() + BOOT_TIMEOUT
            self._find_pid1()
            self._wait_booted(deadline)
            if self.user:
                self.ensure_user()
        except BaseException:
            # __exit__ does not run when __enter__ raises: clean up here.
            self.stop()
            raise

    def stop(self) -> None:
        """Power the container off (SIGTERM, then SIGKILL), reap it, drop the log.

        Safe to call more than once, and after a failed start().
        """
        # A further ^C/SIGTERM is held until teardown is done, then raises.
        with _signals_blocked():
            # Strays keep /work busy and make the halt wait; end them first.
            self._reap_strays()
            proc, self._proc = self._proc, None
            if proc is not None:
                self._terminate(proc)
            self._sweep_cgroups()
            self.pid1 = None
            self._pid1_start = None
            self._pidns = None
            _remove_cgroups(self._cgroups)
            self._cgroups = []
            self._user_ready = False
            self._remove_log()

    def _terminate(self, proc: subprocess.Popen[bytes]) -> None:
        """Stop nspawn: first SIGTERM makes it halt the container gracefully."""
        if proc.poll() is None:
            try:
                proc.terminate()
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                # start_new_session made nspawn a group leader: pgid == pid.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        # nspawn normally takes PID 1 (and so the whole pid namespace) with
        # it; if it was SIGKILLed, make sure the init it spawned is gone too.
        # The start time check avoids hitting a recycled pid.
        pid1, start = self.pid1, self._pid1_start
        if pid1 is not None and start is not None and _proc_start_time(pid1) == start:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid1, signal.SIGKILL)
            # As a subreaper we may have inherited it; reap the zombie.
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid1, 0)

    def _sweep_cgroups(self) -> None:
        """SIGKILL anything still in our private cgroups once nspawn is gone.

        A SIGTERM that reaches nspawn before it has set up its handlers kills
        it outright, orphaning the container's init (before we even knew its
        pid). Everything in these cgroups was started by our nspawn.
        """
        for _ in range(100):
            pids: set[int] = set()
            for cg in self._cgroups:
                for dirpath, _dirs, _files in os.walk(cg):
                    with contextlib.suppress(OSError, ValueError):
                        procs = Path(dirpath, "cgroup.procs").read_text().split()
                        pids.update(int(p) for p in procs)
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
            # Orphans may have been reparented to us (subreaper): reap them.
            for pid in pids:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)

    def _reap_strays(self) -> None:
        """Kill and reap container processes that were orphaned to us.

        Only processes in the container's pid namespace whose parent is this
        process qualify: commands whose nsenter died under them (see
        :func:`become_subreaper`). Nothing else is touched.
        """
        if self._pidns is None:
            return
        strays = [pid for pid in _own_children() if _pidns(pid) == self._pidns]
        if not strays:
            return
        for pid in strays:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + ABORT_TIMEOUT
        while strays and time.monotonic() < deadline:
            # Our own children, so waitpid() is safe and reaps the zombies.
            strays = [pid for pid in strays if not _reaped(pid)]
            time.sleep(0.05)
        for pid in strays:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)

    def _run_nsenter(
        self, cmd: Sequence[str], *, capture: bool, timeout: float | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run an nsenter command line to completion, cleaning up on any exception.

        nsenter itself gets only PATH, so the host's environment does not
        leak into the container; the command's own variables come via ``env``.
        """
        pipe = subprocess.PIPE if capture else None
        proc = subprocess.Popen(
            list(cmd),
            # Captured runs are non-interactive; streamed runs share our stdio.
            stdin=subprocess.DEVNULL if capture else None,
            stdout=pipe,
            stderr=pipe,
            text=True,
            env={"PATH": CONTAINER_PATH},
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            self._abort(proc)
            raise
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def _abort(self, proc: subprocess.Popen[str]) -> None:
        """Stop an nsenter *and* the process it forked into the container.

        Killing only nsenter would orphan its child out of the container's
        reach (see :func:`become_subreaper`), so SIGTERM the child first.
        """
        with _signals_blocked():
            if proc.poll() is None:
                for pid in _children(proc.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=ABORT_TIMEOUT)
                except subprocess.TimeoutExpired:
                    # nsenter is still alive, so these pids are still its
                    # children (not recycled): safe to SIGKILL by pid.
                    for pid in _children(proc.pid):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    proc.kill()
                    proc.wait()
            # nsenter may have died first (^C to the process group).
            self._reap_strays()

    def _remove_log(self) -> None:
        if self._log_path is not None:
            self._log_path.unlink(missing_ok=True)
            self._log_path = None

    # -- boot helpers ----------------------------------------------------

    def log_text(self) -> str:
        """What nspawn and the container's console printed so far."""
        if self._log_path is None:
            return ""
        try:
            return self._log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _dump_log(self, reason: str) -> None:
        print(f"nspawn.py: {reason}; container log follows:", file=sys.stderr)
        print(self.log_text(), file=sys.stderr, flush=True)

    def _find_pid1(self) -> None:
        """Find the container's init: the nspawn process's child in a new pid ns."""
        assert self._proc is not None
        nspawn = self._proc.pid
        children = Path(f"/proc/{nspawn}/task/{nspawn}/children")
        deadline = time.monotonic() + PID1_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._dump_log(f"systemd-nspawn exited early with {self._proc.returncode}")
                raise ContainerError("systemd-nspawn exited before booting")
            try:
                pids = [int(p) for p in children.read_text().split()]
            except OSError:
                pids = []
            for pid in pids:
                # nspawn briefly has an intermediate child; the real init is
                # the one that is pid 1 in its own namespace.
                if _innermost_pid(pid) == 1:
                    self.pid1 = pid
                    self._pid1_start = _proc_start_time(pid)
                    self._pidns = _pidns(pid)
                    return
            time.sleep(0.05)
        self._dump_log("container PID 1 did not appear")
        raise ContainerError(f"no container PID 1 after {PID1_TIMEOUT:g} s")

    def _nsenter(self) -> list[str]:
        """Prefix entering all the container's namespaces, cwd = the repo.

        Plain ``nsenter --wd=DIR`` opens DIR on the host before setns(), so the
        command's cwd lies outside the container's tree (getcwd() fails).
        ``--wdns`` resolves it inside; older nsenter lacks it, so fall back
        to a ``cd`` in a shell.
        """
        if self.pid1 is None:
            raise RuntimeError("container is not running")
        prefix = ["nsenter", "-t", str(self.pid1), "-a"]
        if _nsenter_has_wdns():
            return [*prefix, f"--wdns={self.repo}"]
        return [*prefix, "sh", "-c", 'cd "$0" && exec "$@"', str(self.repo)]

    def _raw(
        self, argv: Sequence[str], timeout: float | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run *argv* as root inside, captured, with only PATH set."""
        return self._run_nsenter([*self._nsenter(), *argv], capture=True, timeout=timeout)

    def _wait_booted(self, deadline: float) -> None:
        """Wait for ``systemctl is-system-running --wait`` to say running/degraded."""
        assert self._proc is not None
        state = ""
        while True:
            if self._proc.poll() is not None:
                self._dump_log(f"systemd-nspawn exited during boot with {self._proc.returncode}")
                raise ContainerError("container died during boot")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                # Fails fast (e.g. "offline") until PID 1 has exec'd systemd
                # and its bus is up; then blocks until boot has finished.
                res = self._raw(["systemctl", "is-system-running", "--wait"], timeout=remaining)
                state = res.stdout.strip()
            except subprocess.TimeoutExpired:
                break
            if state in ("running", "degraded"):
                self.system_state = state
                return
            if state in ("maintenance", "stopping"):
                break
            time.sleep(0.05)
        self._dump_log(f"container did not finish booting (state {state or 'unknown'!r})")
        try:
            failed = self._raw(["systemctl", "--failed", "--no-pager"], timeout=10)
            print(failed.stdout + failed.stderr, file=sys.stderr, flush=True)
        except subprocess.TimeoutExpired:
            pass
        raise ContainerError(f"boot did not complete within {BOOT_TIMEOUT:g} s")

    def ensure_user(self) -> None:
        """Create u1 (uid 1001) and start its user manager; idempotent."""
        if self._user_ready:
            return
        for argv in (
            ["useradd", "-m", "-u", str(USER_UID), USER_NAME],
            ["systemctl", "start", f"user@{USER_UID}.service"],
        ):
            res = self._raw(argv, timeout=USER_TIMEOUT)
            if res.returncode != 0:
                raise ContainerError(f"{' '.join(argv)} failed: {res.stdout}{res.stderr}")
        # user@.service is Type=notify, but dbus.socket may come up a bit
        # later; either socket is enough for `systemctl --user`.
        probe = (
            f"test -S {USER_RUNTIME_DIR}/bus || "
            f"test -S {USER_RUNTIME_DIR}/systemd/private"
        )
        deadline = time.monotonic() + USER_TIMEOUT
        while time.monotonic() < deadline:
            if self._raw(["sh", "-c", probe], timeout=USER_TIMEOUT).returncode == 0:
                self._user_ready = True
                return
            time.sleep(0.1)
        status = self._raw(
            ["systemctl", "status", "--no-pager", f"user@{USER_UID}.service"], timeout=10
        )
        print(status.stdout + status.stderr, file=sys.stderr, flush=True)
        raise ContainerError(f"user manager sockets did not appear in {USER_RUNTIME_DIR}")

    # -- running commands ----------------------------------------------------

    def command(
        self,
        argv: Sequence[str],
        *,
        as_user: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> list[str]:
        """The host argv that runs *argv* inside (as root, or as u1)."""
        if not argv:
            raise ValueError("empty command")
        if as_user:
            self.ensure_user()
            variables = {
                "XDG_RUNTIME_DIR": USER_RUNTIME_DIR,
                "DBUS_SESSION_BUS_ADDRESS": f"unix:path={USER_RUNTIME_DIR}/bus",
                **passthrough_env(os.environ, home=USER_HOME),
            }
            prefix = ["runuser", "-u", USER_NAME, "--", "env"]
        else:
            variables = passthrough_env(os.environ, home="/root")
            prefix = ["env"]
        variables.update(env or {})
        return [
            *self._nsenter(),
            *prefix,
            *(f"{k}={v}" for k, v in variables.items()),
            *argv,
        ]

    def exec(
        self,
        argv: Sequence[str],
        *,
        as_user: bool = False,
        env: Mapping[str, str] | None = None,
        check: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run *argv* inside and capture its output as text."""
        res = self._run_nsenter(self.command(argv, as_user=as_user, env=env), capture=True)
        if check:
            res.check_returncode()
        return res

    def run(
        self,
        argv: Sequence[str],
        *,
        as_user: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> int:
        """Run *argv* inside with inherited stdio (live output); return its exit code."""
        sys.stdout.flush()
        sys.stderr.flush()
        res = self._run_nsenter(self.command(argv, as_user=as_user, env=env), capture=False)
        return res.returncode


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``[--user] [--repo DIR] -- CMD ARG...``."""
    parser = argparse.ArgumentParser(
        description="Boot a throwaway systemd container over the host's /usr and run CMD in it.",
    )
    parser.add_argument(
        "--user",
        action="store_true",
        help=f"run CMD as {USER_NAME} (uid {USER_UID}) with a running user manager",
    )
    parser.add_argument(
        "--repo",
        type=Path,
        default=DEFAULT_REPO,
        help="directory to bind in and run from (default: %(default)s)",
    )
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARG...")
    args = parser.parse_args(argv)
    if args.cmd and args.cmd[0] == "--":
        args.cmd = args.cmd[1:]
    if not args.cmd:
        parser.error("missing command (usage: nspawn.py [--user] [--repo DIR] -- CMD ARG...)")
    args.repo = args.repo.resolve()
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Boot, run the command, power off; return the command's exit code."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if os.geteuid() != 0:
        print("nspawn.py: must run as root", file=sys.stderr)
        return 1
    # Raise on SIGINT/SIGTERM so the container is always powered off.
    signal.signal(signal.SIGINT, _raise_signal_exit)
    signal.signal(signal.SIGTERM, _raise_signal_exit)
    become_subreaper()
    try:
        with SystemdContainer(args.repo, user=args.user) as box:
            return box.run(args.cmd, as_user=args.user)
    except ContainerError as err:
        print(f"nspawn.py: {err}", file=sys.stderr)
        return 1
    except FileNotFoundError as err:
        # e.g. systemd-nspawn or nsenter not installed
        print(f"nspawn.py: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
