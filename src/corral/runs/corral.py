"""The library front: ``Corral`` starts, lists, inspects and ends runs.

The CLI is a thin layer over this class; orchestrators can use it directly::

    from corral import Corral, RunSpec
    with Corral() as c:
        run = c.run(RunSpec(agent="lane1", argv=("make", "test")))
        outcome = run.wait()
"""

from __future__ import annotations

import signal as _signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from ..backends import Backend, detect
from ..errors import CorralError, NotFound, RunNotFound, UsageError
from ..linux.cgroup import CgroupDir
from ..linux.procs import owner_alive
from ..names import validate_agent
from ..paths import Dirs
from ..records import END_STATES, RecordStore, RunRecord, now_iso
from ..spec import RunSpec
from ..units import parse_duration
from . import listing
from .listing import RunView, payload_of
from .supervise import Outcome, Owner

if TYPE_CHECKING:
    from .gc import GcReport
    from .runlog import Line


class Run:
    """A handle on one run. Attached runs started by this process can be waited on as owner."""

    def __init__(self, corral: Corral, record: RunRecord, owner: Owner | None = None) -> None:
        self.corral = corral
        self.record = record
        self._owner = owner

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def cgroup(self) -> CgroupDir:
        return CgroupDir(Path(self.record.cgroup))

    def __repr__(self) -> str:
        return f"<Run {self.id} agent={self.record.agent} unit={self.record.unit}>"

    def wait(self, timeout: float | str | None = None, *, handle_signals: bool = False,
             notify: Callable[[str], None] | None = None) -> RunRecord:
        """Wait for the run to end; as its owner, also kill leftovers and record the end.
        *timeout* (seconds or a duration such as ``"5m"``): raise :class:`corral.Busy` (a
        TimeoutError) if the run is still going then; the run is not touched."""
        if timeout is not None:
            timeout = parse_duration(timeout, allow_zero=True)
        if self._owner is not None and notify is not None:
            self._owner.notify = notify  # e.g. "grace ran out, killing"
        if self._owner is not None:
            until = None if timeout is None else time.monotonic() + timeout
            if self._owner.wait(handle_signals=handle_signals, until=until) is None:
                from ..errors import Busy

                raise Busy(f"run {self.id} still running after {timeout:g}s")
            self.record = self._owner.record
            return self.record
        self.record = self.corral.wait(self.id, timeout=timeout)
        return self.record

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        """Leaving a ``with`` block ends an attached run that is still going (SIGTERM, then
        SIGKILL after its grace) and waits for it; a detached run is left running."""
        if self.record.detached:
            return
        if self._owner is not None and self._owner.outcome is not None:
            return
        if not self.record.ended:
            self.stop()
        if self._owner is not None:
            self.wait()

    @property
    def outcome(self) -> Outcome | None:
        return self._owner.outcome if self._owner else None

    def kill(self, sig: int = _signal.SIGKILL) -> list[int]:
        return self.corral.kill_run(self.id, sig)

    def stop(self, grace: float = 10.0) -> list[int]:
        return self.corral.stop_run(self.id, grace)

    def pause(self) -> None:
        self.corral.pause(self.id)

    def resume(self) -> None:
        self.corral.resume(self.id)

    def usage(self) -> RunView:
        return self.corral.view(self.id)


class Corral:
    """Entry point of the library. Backend and directories are parameters."""

    def __init__(self, backend: str | Backend | None = None, *, dirs: Dirs | None = None) -> None:
        self._backend_arg = backend
        self._backend: Backend | None = backend if isinstance(backend, Backend) else None
        self.dirs = dirs or Dirs.from_env()
        self.store = RecordStore(self.dirs.runs)

    # --- plumbing ---------------------------------------------------------------------

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self._backend = detect(self._backend_arg if isinstance(self._backend_arg, str) else None)
        return self._backend

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- starting runs ----------------------------------------------------------------

    def run(self, spec: RunSpec, *, detach: bool = False, reap_orphans: bool = False, hold_signals: bool = False,
            terminal: bool = False, on_wait: Callable[[object], None] | None = None) -> Run:
        """Start *spec* in its own cgroup.

        Attached (default): this process owns the run; call ``Run.wait()``. With
        *reap_orphans* this process becomes a child subreaper and reaps what the run
        orphans (the CLI does; a library caller with children of its own may not want it).
        Detached: a small owner process in the run's own scope owns it. *terminal*: an
        isolated attached run started from a terminal gets its own pty, relayed by
        ``Run.wait(handle_signals=True)`` (the CLI).
        """
        from .detach import start_detached
        from .launch import start_attached

        if detach:
            return Run(self, start_detached(self, spec, on_wait=on_wait))
        record, owner = start_attached(self, spec, reap_orphans=reap_orphans, hold_signals=hold_signals,
                                       terminal=terminal, on_wait=on_wait)
        return Run(self, record, owner)

    # --- finding runs -----------------------------------------------------------------

    def get(self, ref: str) -> Run:
        run_id = self.store.resolve(ref)
        record = self.store.load(run_id)
        if record is None:
            adopted = self._adopted().get(run_id)
            if adopted is None:
                raise RunNotFound(ref)
            record = adopted
        return Run(self, record)

    def _adopted(self, *, all_users: bool = False, known: frozenset[str] = frozenset()) -> dict[str, RunRecord]:
        return listing.adopted(self.backend, self.store, all_users=all_users, known=known)

    def _reconcile(self, record: RunRecord) -> RunRecord:
        return listing.reconcile(self.store, record)

    def _view(self, record: RunRecord) -> RunView:
        return listing.view(self.backend, self.store, record)

    def ps(self, *, all: bool = False, all_users: bool = False) -> list[RunView]:
        """Live runs (and, with *all*, ended ones), oldest first. Includes our scopes whose
        record is unreadable; with *all_users*, the live runs of other state dirs too."""
        return listing.list_views(self.backend, self.store, all=all, all_users=all_users)

    def view(self, ref: str) -> RunView:
        return self._view(self.get(ref).record)

    def processes(self, ref: str) -> list[dict[str, Any]]:
        """Every process in the run's scope, each with its ``ppid``, ``argv``, resident memory
        (``rss_bytes``), CPU time (``cpu_s``, user + system) and ``role``: ``main`` (the
        command), ``command`` (what it started), ``leftover`` (in the payload, no longer
        below main: orphaned, or left behind), ``sandbox`` (bwrap and its init) and
        ``corral`` (the watchdog, and a detached run's owner, in ``supervisor/``)."""
        return listing.processes(self.get(ref).record)


    def targets(self, target: str | None, *, all_runs: bool = False, all_users: bool = False,
                kind: str | None = None) -> list[RunRecord]:
        """A run id (or unique prefix), an agent name (its live runs), or every live run
        (*all_runs*; with *all_users* other state dirs' too). *kind* ``"id"`` or
        ``"agent"`` says which TARGET is; unsaid, a name that is both is a UsageError."""
        if all_runs or all_users:
            return [v.record for v in self.ps(all_users=all_users)]
        if not target:
            raise UsageError("name a run id, an agent, or use --all")
        if kind == "agent":
            validate_agent(target)
            return [v.record for v in self.ps() if v.record.agent == target]
        try:
            record = self.get(target).record
        except (RunNotFound, UsageError) as err:
            if kind == "id":
                raise
            return self._agent_targets(target, err)
        if kind is None and record.id != target and self._is_agent(target):
            raise UsageError(f"{target!r} is an agent and also the start of run {record.id} (agent "
                             f"{record.agent})", hint=f"say which: --agent {target}, or --id {record.id}")
        return [record]

    def _is_agent(self, name: str) -> bool:
        try:
            validate_agent(name)
        except UsageError:
            return False
        if any(r.agent == name for r in self.store.all()):
            return True
        from ..config.settings import load_agent

        try:
            return load_agent(self.dirs, name) is not None
        except (CorralError, OSError):
            return False

    def _agent_targets(self, target: str, err: Exception) -> list[RunRecord]:
        try:
            validate_agent(target)
        except UsageError:
            raise err from None
        runs = [v.record for v in self.ps() if v.record.agent == target]
        if runs:
            return runs
        if self._is_agent(target):
            return []
        raise NotFound(f"no run or agent {target!r}", hint="list runs with: corral ps --all") from None

    # --- ending runs ------------------------------------------------------------------

    def kill_run(self, ref: str, sig: int = _signal.SIGKILL) -> list[int]:
        """Signal every process of the run. SIGKILL (the default) is atomic (cgroup.kill) and
        returns once the cgroup is empty; another signal is sent to every process with the
        cgroup frozen, then we wait up to 10 s for it to empty. Returns the pids still alive
        (an empty list: all gone)."""
        record = self.get(ref).record
        return self.kill_runs([record], sig)[record.id]

    def kill_runs(self, records: list[RunRecord], sig: int = _signal.SIGKILL) -> dict[str, list[int]]:
        """Kill many runs at once: signal all first, then verify each, so the owners record
        their ends in parallel. Returns, per run id, the pids still alive."""
        for record in records:
            payload = payload_of(record)
            if sig == _signal.SIGKILL:
                payload.kill()
            else:
                payload.signal_all(sig)
        out: dict[str, list[int]] = {}
        for record in records:
            payload = payload_of(record)
            if sig == _signal.SIGKILL:
                self.backend.teardown(payload)
            elif not payload.wait_empty(10.0):
                out[record.id] = payload.pids()
                continue
            out[record.id] = []
        for record in records:
            if not out[record.id]:
                self._after_end(record, ended_by="killed", sig=sig)
        return out

    def escaped(self, record: RunRecord) -> list[dict[str, Any]]:
        """Processes of the run alive outside its cgroup (they moved into another unit):
        a kill of the cgroup cannot reach them, so they are reported, never ignored."""
        from ..linux.procs import escaped

        return escaped(record.id, record.cgroup)

    def stop_run(self, ref: str, grace: float = 10.0, *, notify: Callable[[str], None] | None = None) -> list[int]:
        """SIGTERM every process of the run, SIGKILL what is left after *grace* seconds.
        *notify* hears, in a line each, what was sent and whether it came to SIGKILL."""
        grace = parse_duration(grace, allow_zero=True)
        record = self.get(ref).record
        on_term = on_escalate = None
        if notify is not None:
            rid = record.id

            def on_term(n: int) -> None:
                notify(f"{rid}: SIGTERM to {n} process(es); SIGKILL after {grace:g}s if any are left")

            def on_escalate(n: int) -> None:
                notify(f"{rid}: {n} process(es) still running after {grace:g}s: SIGKILL")

        clean = self.backend.stop(payload_of(record), grace=grace, on_term=on_term, on_escalate=on_escalate)
        self._after_end(record, ended_by="stopped", sig=_signal.SIGTERM if clean else _signal.SIGKILL)
        return []

    def _after_end(self, record: RunRecord, *, ended_by: str, sig: int) -> None:
        """The payload is empty. Its owner records the end and lets the scope go; if the
        owner is gone (or never was: a re-adopted run), we do both."""
        scope = CgroupDir(Path(record.cgroup))
        deadline = time.monotonic() + 2.0
        while not record.adopted:
            fresh = self.store.load(record.id)
            if fresh is None or fresh.ended:
                break
            if not owner_alive(fresh.owner_pid, fresh.owner_start) or time.monotonic() > deadline:
                self.store.save(fresh.replace(state="killed", ended_by=ended_by, signal=sig, exit_code=None,
                                              ended_at=now_iso()))
                break
            time.sleep(0.005)
        if not scope.wait_empty(2.0):
            self.backend.teardown(scope)  # the owner did not finish: take the rest with us
        if record.backend == self.backend.name:
            self.backend.release(record.agent, record.id, scope)

    def pause(self, ref: str) -> None:
        """Freeze the run's payload (its owner stays awake to keep deadlines)."""
        self.backend.freeze(payload_of(self._live(ref)), True)

    def resume(self, ref: str) -> None:
        self.backend.freeze(payload_of(self._live(ref)), False)

    def _live(self, ref: str) -> RunRecord:
        view = self.view(ref)
        if view.state in END_STATES:
            raise UsageError(f"run {view.record.id} has ended ({view.state})")
        return view.record

    def gc(self, *, retention: float | None = None) -> GcReport:
        """Tear down runs whose owner is gone, remove empty cgroups, prune old records."""
        from .gc import DEFAULT_RETENTION, collect

        return collect(self, retention=DEFAULT_RETENTION if retention is None else retention)

    def wait(self, ref: str, *, timeout: float | None = None) -> RunRecord:
        """Block until the run has ended and its cgroup is empty; return its final record."""
        record = self.get(ref).record
        cg = CgroupDir(Path(record.cgroup))
        if timeout is not None:
            timeout = parse_duration(timeout, allow_zero=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not record.ended:
            left = 3600.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                from ..errors import Busy

                raise Busy(f"run {record.id} still running after {timeout}s")
            if cg.wait_empty(min(left, 3600.0)):
                record = self._reconcile(self.store.load(record.id) or record)
        return record

    def log_lines(self, ref: str, *, follow: bool = False, tail: int | None = None, since: str | None = None,
                  stream: str | None = None) -> Iterator[Line]:
        """A detached run's output, line by line (runlog.py): the last *tail* lines, those
        from *since* (ISO 8601 UTC) on, of one *stream* (``stdout``/``stderr``); with
        *follow*, then what it prints until it ends (an unfinished line as it comes, as a
        ``Line`` with ``newline=False``)."""
        from .runlog import CAUGHT_UP, Line, LineAssembler, parse_record, records, since_filter

        record = self.get(ref).record
        if not record.log:
            raise NotFound(f"run {record.id} has no log: it ran attached, its output went to the terminal")
        path = Path(record.log)
        if not path.exists() and not path.with_name(path.name + ".1").exists() and \
                (record.ended or not follow):
            raise NotFound(f"log of run {record.id} is gone ({record.log})")

        def ended() -> bool:
            return self._reconcile(self.store.load(record.id) or record).ended

        def wanted(line: Line) -> bool:
            return stream is None or line.stream == stream

        assembler = LineAssembler()
        backlog: list[Line] = []
        live = False
        for raw in records(path, follow=follow, ended=ended):
            if raw is CAUGHT_UP:
                backlog.extend(assembler.rest())
                picked = [line for line in backlog if wanted(line)]
                if since is not None:
                    picked = list(since_filter(picked, since))
                if tail is not None:
                    picked = picked[len(picked) - tail:] if tail else []
                yield from picked
                backlog, live = [], True
            elif live:
                stamp, name, data, newline = parse_record(raw)
                line = Line(stamp, name, data, newline)
                if wanted(line):
                    yield line
            else:
                done = assembler.feed(raw)
                if done is not None:
                    backlog.append(done)

    def logs(self, ref: str, *, follow: bool = False) -> Iterator[bytes]:
        """A detached run's output as it printed it (both streams, in order)."""
        for line in self.log_lines(ref, follow=follow):
            yield line.data + b"\n" if line.newline else line.data
