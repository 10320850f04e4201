"""The owner side of a run: wait for the main command, the watchdog, signals and deadlines.

The owner is the process that forked the run's main command (the attached ``corral run``,
or the small process a ``--detach`` run leaves in its scope). It waits on pidfds and a
signal wakeup fd with poll(2); no busy loops. When the main command ends, whatever it
left in the cgroup is killed and the end is recorded.

The watchdog (:mod:`.watchdog`) kills the run if the owner dies.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..linux.cgroup import CgroupDir
from ..records import RunRecord, now_iso
from .meter import RunMeter
from .signals import FORWARDED, JOB_CONTROL, SignalRelay, raise_interrupt
from .spawn import exit_code_of
from .watchdog import tell_watchdog_done

if TYPE_CHECKING:
    from ..backends import Backend
    from ..linux.flock import HeldLock
    from ..linux.terminal import PtyRelay
    from ..records import RecordStore
    from .output import OutputPump


@dataclass
class Outcome:
    state: str
    ended_by: str
    exit_code: int | None
    signal: int | None
    leftovers: int

    @property
    def shell_status(self) -> int:
        """What an attached ``corral run`` exits with (the contract's table)."""
        if self.state == "timeout":
            return 124
        if self.signal is not None:
            return 128 + self.signal
        return self.exit_code if self.exit_code is not None else 1


def outcome_state(exit_code: int | None, sig: int | None, ended_by: str) -> str:
    if ended_by == "timeout":
        return "timeout"
    if ended_by in ("killed", "stopped", "lost-supervisor") or sig is not None:
        return "killed"
    return "exited" if exit_code == 0 else "failed"


class Owner(SignalRelay):
    """Owns one run until it ends. Used by the attached CLI, the library and detached owners.

    The owner is never in the payload: it kills the payload, reaps, records, and only then
    lets the scope go. A detached owner sits in the scope's ``supervisor`` leaf.
    """

    def __init__(
        self,
        *,
        backend: Backend,
        store: RecordStore,
        record: RunRecord,
        cgroup: CgroupDir,
        main_pid: int,
        watchdog_pid: int,
        watchdog_fd: int,
        timeout: float | None,
        grace: float,
        in_cgroup: bool,
        reap_orphans: bool = False,
        keep_leftovers: bool = False,
        sandboxed: bool = False,
        terminal: PtyRelay | None = None,
    ) -> None:
        self.backend = backend
        self.store = store
        self.record = record
        self.cgroup = cgroup
        self.payload = cgroup.payload
        self.main_pid = main_pid
        self.watchdog_pid = watchdog_pid
        self.watchdog_fd = watchdog_fd
        self.timeout = timeout
        self.grace = grace
        self.in_cgroup = in_cgroup  # a detached owner lives in its own run's scope
        self.reap_orphans = reap_orphans  # we are a child subreaper: orphans come to us
        self.keep_leftovers = keep_leftovers  # let what main left behind end on its own
        # main is bwrap: signals go to the command inside (bwrap ignores them), and a
        # command killed by signal N comes back as exit status 128+N.
        self.sandboxed = sandboxed
        self.terminal = terminal  # the run's own pty, relayed while we wait (linux/terminal.py)
        self._command_pid: int | None = None
        self.started = time.monotonic()
        self.outcome: Outcome | None = None
        self.leases: list[HeldLock] = []  # session leases held for the run, released once it is torn down
        self.services: Any = None  # the run's auth (auth/runauth.py): served while it lives, closed at its end
        self.output: OutputPump | None = None  # a detached run's log writer (output.py): finished before the end record
        self.meter = RunMeter(self.payload)  # peak memory, CPU time: the ended run's numbers
        # What the one waiting should hear while it waits (the CLI prints it): a grace
        # that ran out, a deadline that struck. The library stays silent by default.
        self.notify: Any = lambda message: None
        self._killed_others = 0  # processes besides main that corral killed (timeout, grace)

    # ------------------------------------------------------------------------------------

    def wait(self, *, handle_signals: bool = False, until: float | None = None) -> Outcome | None:
        """Block until the run has ended and its cgroup is empty; record and return how.
        *until* (time.monotonic): return None then if it has not ended; the run goes on
        and a later wait picks it up."""
        if self.outcome is not None:
            return self.outcome
        main_fd = os.pidfd_open(self.main_pid)
        wd_fd = os.pidfd_open(self.watchdog_pid)
        wake_r = wake_w = -1
        old_handlers: dict[int, object] = {}
        received: list[int] = []
        listen = list(FORWARDED) if handle_signals else []
        if handle_signals and self.sandboxed:
            listen += JOB_CONTROL  # the command has no terminal of ours: we relay these
        if self.reap_orphans:
            listen.append(signal.SIGCHLD)
        if listen:
            wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            old_wakeup = signal.set_wakeup_fd(wake_w)
            for sig in listen:
                old_handlers[sig] = signal.signal(sig, lambda s, _f: received.append(s))
            # The CLI blocks these before it starts the run (see block_forwarded_signals):
            # a Ctrl-C that came during the launch is delivered now, to the handlers above.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, listen)
        poller = select.poll()
        poller.register(main_fd, select.POLLIN)
        poller.register(wd_fd, select.POLLIN)
        if wake_r >= 0:
            poller.register(wake_r, select.POLLIN)
        pty = self.terminal
        if pty is not None:
            pty.enter()
            poller.register(pty.master, select.POLLIN)
            poller.register(0, select.POLLIN)

        status: int | None = None
        ended_by = "exited"
        timeout_at = self.started + self.timeout if self.timeout else None
        grace_at: float | None = None
        try:
            while status is None:
                now = time.monotonic()
                if until is not None and now >= until:
                    return None
                if now >= self.meter.next_at:
                    self.meter.sample()
                deadlines = [d for d in (timeout_at, grace_at, until, self.meter.next_at) if d is not None]
                # poll(2) takes at most 2^31-1 ms: wake at least hourly on a long deadline
                wait_ms = min(max(0.0, min(deadlines) - now), 3600.0) * 1000 if deadlines else None
                events = dict(poller.poll(wait_ms))
                now = time.monotonic()
                if pty is not None:
                    self._pump(pty, poller, events)
                if main_fd in events:
                    status = self._reap(self.main_pid)
                    break
                if wake_r in events:
                    _drain(wake_r)
                    for signum in received:
                        if signum == signal.SIGCHLD:
                            self._reap_orphans()
                            continue
                        if signum in JOB_CONTROL:
                            self._job_control(signum)
                            continue
                        if pty is not None and signum in (signal.SIGINT, signal.SIGQUIT):
                            pty.key(signum)  # a key, as on a terminal: no grace deadline
                            continue
                        if grace_at is not None and signum in (signal.SIGINT, signal.SIGTERM):
                            # A second Ctrl-C (or TERM) while the first one's grace runs: now.
                            self.notify(f"corral: run {self.record.id}: second {signal.Signals(signum).name}, "
                                        "killing it now")
                            ended_by = "killed" if ended_by != "timeout" else ended_by
                            grace_at = None
                            self._kill_payload()
                            continue
                        self._forward(signum)
                        if grace_at is None:
                            grace_at = now + self.grace
                    received.clear()
                if wd_fd in events:
                    # The watchdog is gone (killed by hand?): nothing guards the run any more.
                    poller.unregister(wd_fd)
                    self._reap(self.watchdog_pid, nohang=True)
                    ended_by = "lost-supervisor"
                    self.backend.teardown(self.payload)
                    continue
                if timeout_at is not None and now >= timeout_at:
                    # As systemd's RuntimeMaxSec: SIGTERM to every process, SIGKILL after the grace.
                    ended_by = "timeout"
                    timeout_at = None
                    self.notify(f"corral: run {self.record.id} reached its --timeout of {self.timeout:g}s: "
                                f"SIGTERM to all its processes, SIGKILL in {self.grace:g}s")
                    self._signal_payload(signal.SIGTERM)
                    grace_at = now + self.grace
                    continue
                if grace_at is not None and now >= grace_at:
                    ended_by = "killed" if ended_by != "timeout" else ended_by
                    grace_at = None
                    self.notify(f"corral: run {self.record.id} did not end within {self.grace:g}s of SIGTERM: "
                                "killing it (SIGKILL)")
                    self._kill_payload()
                    continue
        finally:
            os.close(main_fd)
            os.close(wd_fd)
            if pty is not None:
                pty.close()
                self.terminal = None
            if listen:
                for signum, handler in old_handlers.items():
                    signal.signal(signum, handler)  # type: ignore[arg-type]
                signal.set_wakeup_fd(old_wakeup)
                os.close(wake_r)
                os.close(wake_w)
        return self._finish(status, ended_by)

    @staticmethod
    def _pump(pty: PtyRelay, poller: select.poll, events: dict[int, int]) -> None:
        """Bytes between the caller's terminal and the run's pty."""
        if events.get(pty.master):
            pty.on_master()
            if not pty.master_open:
                poller.unregister(pty.master)
        if events.get(0):
            pty.on_stdin()
            if not pty.stdin_open:
                poller.unregister(0)

    def _finish(self, status: int, ended_by: str) -> Outcome:
        exit_code, sig = exit_code_of(status)
        if self.sandboxed and exit_code is not None and 128 < exit_code <= 128 + signal.SIGRTMAX:
            # bwrap passes "killed by N" on as 128+N, as a shell does; record it as the signal.
            sig, exit_code = exit_code - 128, None
        if self.keep_leftovers and ended_by == "exited" and self.payload.events().populated:
            self._drain(exit_code, sig)
        leftovers = max(len(self._leftovers()), self._killed_others)
        if leftovers:
            self.meter.sample()  # what main left may be most of it
        self.backend.teardown(self.payload)
        if self.output is not None:
            self.output.finish()  # all of the output is in the log before the record says "ended"
            self.output = None
        if self.services is not None:
            self.services.close()  # nothing of the run is left to ask for a token
            self.services = None
        if self.reap_orphans:
            self._reap_orphans()
        if ended_by == "exited" and sig is not None:
            # Killed from outside (corral kill/stop, systemctl stop, OOM): say so.
            ended_by = "killed"
        state = outcome_state(exit_code, sig, ended_by)
        self.outcome = Outcome(state, ended_by, exit_code, sig, leftovers)
        self.record = self.record.replace(
            state=state,
            ended_by=ended_by,
            exit_code=exit_code,
            signal=sig,
            ended_at=now_iso(),
            leftovers_killed=leftovers,
            **self.meter.final(),
        )
        tell_watchdog_done(self.watchdog_fd)
        self._reap(self.watchdog_pid)
        # The run has ended whatever the disk says: teardown, release and the exit status
        # must not depend on this write (a full state filesystem).
        self.store.save_or_warn(self.record, f"run {self.record.id} ended ({self.record.state}) but its record "
                                f"could not be written")
        if self.in_cgroup:
            self._leave_scope()
            self._release_leases()
            return self.outcome
        if not self.cgroup.wait_empty(2.0):
            self.backend.teardown(self.cgroup)
        self.backend.release(self.record.agent, self.record.id, self.cgroup)
        self._release_leases()
        return self.outcome

    def _leftovers(self) -> list[int]:
        """What main left in the payload, not counting the sandbox's own init."""
        pids = self.payload.pids()
        if self.sandboxed and pids:
            from ..isolation.sandbox import sandbox_pids

            helpers = set(sandbox_pids(pids))
            pids = [p for p in pids if p not in helpers]
        return pids

    def _release_leases(self) -> None:
        """Only now: the run's processes are gone, so the next holder may start."""
        for lease in self.leases:
            lease.release()
        self.leases = []

    def _drain(self, exit_code: int | None, sig: int | None) -> None:
        """--keep-leftovers: main has ended, what it left may finish on its own. The run is
        listed as ``draining`` until then; the deadline, Ctrl-C or SIGTERM still end it."""
        self.store.save_or_warn(self.record.replace(state="draining", exit_code=exit_code, signal=sig),
                                f"run {self.record.id} is draining but its record could not be written", durable=False)
        left = None
        if self.timeout:
            left = max(0.0, self.started + self.timeout - time.monotonic())
        try:
            previous = signal.signal(signal.SIGTERM, raise_interrupt)
        except ValueError:  # not the main thread: no signal handling, just wait
            previous = None
        try:
            self.payload.wait_empty(left if left is not None else 10**9)
        except KeyboardInterrupt:
            pass  # Ctrl-C / SIGTERM while draining: the teardown below ends the rest
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def _leave_scope(self) -> None:
        """A detached owner steps out of its scope so the scope can empty and be removed.
        Where it may not (a delegated subtree without the root), it stays: the scope empties
        when it exits, and ``corral ps`` / ``gc`` remove what is left."""
        root = getattr(self.backend, "root", None)
        if root is None:
            return  # systemd collects the scope once this process exits
        try:
            from ..linux.cgroup import join

            join(root)
        except OSError:
            return
        self.backend.release(self.record.agent, self.record.id, self.cgroup)

    def _kill_payload(self) -> None:
        """SIGKILL the whole payload at once, counting what besides main it took."""
        self._killed_others = max(self._killed_others, len(self._leftovers()) - 1)
        self.backend.teardown(self.payload)

    def _signal_payload(self, sig: int) -> None:
        """*sig* to every process of the payload (the command's whole tree, daemons too),
        the sandbox's own helpers excepted: bwrap ignores it, its init would pass it on."""
        from ..isolation.sandbox import sandbox_pids

        self.payload.signal_all(sig, skip=sandbox_pids if self.sandboxed else None)

    def _reap_orphans(self) -> None:
        """Reap children that are not main or the watchdog (orphans handed to us as subreaper)."""
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None or info.si_pid in (self.main_pid, self.watchdog_pid):
                return  # main and the watchdog are reaped through their pidfds
            try:
                os.waitpid(info.si_pid, 0)
            except ChildProcessError:
                return

    @staticmethod
    def _reap(pid: int, nohang: bool = False) -> int:
        while True:
            try:
                got, status = os.waitpid(pid, os.WNOHANG if nohang else 0)
                return status if got else 0
            except ChildProcessError:
                return 0
            except InterruptedError:
                continue


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass
    except OSError as err:
        if err.errno != errno.EAGAIN:
            raise
