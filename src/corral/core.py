"""The library front: ``Corral`` starts, lists, inspects and ends runs.

The CLI is a thin layer over this class; orchestrators can use it directly::

    from corral import Corral, RunSpec
    with Corral() as c:
        run = c.run(RunSpec(agent="lane1", argv=("make", "test")))
        outcome = run.wait()
"""

from __future__ import annotations

import json
import os
import shlex
import signal as _signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from .backends import Backend, detect
from .cgroup import CgroupDir, join
from .errors import CorralError, NotFound, RunNotFound, UsageError
from .names import validate_agent
from .paths import Dirs
from .records import END_STATES, RecordStore, RunRecord, now_iso
from .spawn import fork_held, reset_signals_in_child
from .spec import RunSpec
from .supervise import Outcome, Owner, set_child_subreaper, watchdog_argv

if TYPE_CHECKING:
    from .gc import GcReport

DESCRIPTION_MAX = 200
OWNER_READY_TIMEOUT = 30.0


def _describe(agent: str, argv: tuple[str, ...]) -> str:
    text = f"corral {agent}: {shlex.join(argv)}"
    return text if len(text) <= DESCRIPTION_MAX else text[: DESCRIPTION_MAX - 3] + "..."


def _process_start(pid: int) -> float | None:
    """Start time of *pid* in clock ticks since boot (/proc/PID/stat field 22); None if it
    is gone or a zombie. Together with the pid it names one process, whatever reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return float(fields[19])


def _alive(pid: int | None, start: float | None) -> bool:
    if not pid:
        return False
    got = _process_start(pid)
    if got is None:
        return False
    return start is None or got == start


@dataclass(frozen=True)
class RunView:
    """A run as ``ps`` and ``show`` report it: the record reconciled with the cgroup."""

    record: RunRecord
    state: str
    pids: int | None
    memory_bytes: int | None
    cpu_usec: int | None
    memory_source: str | None = None

    def to_json(self) -> dict[str, Any]:
        r = self.record
        return {
            "id": r.id,
            "agent": r.agent,
            "state": self.state,
            "unit": r.unit,
            "backend": r.backend,
            "main_pid": r.main_pid,
            "pids": self.pids,
            "memory_bytes": self.memory_bytes,
            "memory_source": self.memory_source,
            "cpu_usec": self.cpu_usec,
            "started_at": r.started_at,
            "ended_at": r.ended_at,
            "exit_code": r.exit_code,
            "signal": r.signal,
            "ended_by": r.ended_by,
            "leftovers_killed": r.leftovers_killed,
            "session": r.session,
            "argv": list(r.argv),
            "cwd": r.cwd,
            "detached": r.detached,
            "adopted": r.adopted,
        }


class Run:
    """A handle on one run. Attached runs started by this process can be waited on as owner."""

    def __init__(self, corral: "Corral", record: RunRecord, owner: Owner | None = None) -> None:
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

    def wait(self, timeout: float | None = None, *, handle_signals: bool = False) -> RunRecord:
        """Wait for the run to end; as its owner, also kill leftovers and record the end."""
        if self._owner is not None:
            self._owner.wait(handle_signals=handle_signals)
            self.record = self._owner.record
            return self.record
        self.record = self.corral.wait(self.id, timeout=timeout)
        return self.record

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

    def __enter__(self) -> "Corral":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- starting runs ----------------------------------------------------------------

    def _new_record(self, spec: RunSpec, *, detach: bool) -> RunRecord:
        from .names import new_run_id

        cwd = os.path.abspath(spec.cwd or os.getcwd())
        if not os.path.isdir(cwd):
            raise UsageError(f"working directory {cwd!r} does not exist")
        backend = self.backend
        self.store.ensure()
        for _ in range(16):
            run_id = new_run_id()
            if not self.store.path(run_id).exists() and not backend.run_cgroup(spec.agent, run_id).exists():
                break
        else:  # pragma: no cover - 16 collisions of 32 random bits
            raise CorralError("could not allocate a run id")
        return RunRecord(
            id=run_id,
            agent=spec.agent,
            argv=list(spec.argv),
            cwd=cwd,
            backend=backend.name,
            unit=backend.unit_name(spec.agent, run_id),
            cgroup=str(backend.run_cgroup(spec.agent, run_id).path),
            state="starting",
            detached=detach,
            session=spec.session,
            timeout=spec.timeout,
            log=str(self.store.log_path(run_id)) if detach else None,
            limits={"requested": spec.limits.requested()},
        )

    def _env(self, spec: RunSpec, record: RunRecord) -> dict[str, str]:
        env = dict(os.environ)
        env.update(spec.env)
        env["CORRAL_RUN_ID"] = record.id
        env["CORRAL_AGENT"] = record.agent
        env["CORRAL_UNIT"] = record.unit
        return env

    def run(self, spec: RunSpec, *, detach: bool = False, reap_orphans: bool = False) -> Run:
        """Start *spec* in its own cgroup.

        Attached (default): this process owns the run; call ``Run.wait()``. With
        *reap_orphans* this process becomes a child subreaper and reaps what the run
        orphans (the CLI does; a library caller with children of its own may not want it).
        Detached: a small owner process in the run's own scope owns it.
        """
        record = self._new_record(spec, detach=detach)
        self.store.save(record)
        if detach:
            return self._run_detached(spec, record)
        backend = self.backend
        cgroup = backend.prepare(spec.agent, record.id, spec.limits)
        if reap_orphans:
            set_child_subreaper()
        started = False
        try:
            main, watchdog, wd_fd = self._fork_pair(spec, record, cgroup, stdio=(0, 1, 2), join_supervisor=True)
            try:
                limits = backend.adopt(
                    spec.agent, record.id, [main.pid, watchdog.pid],
                    description=_describe(spec.agent, spec.argv), limits=spec.limits,
                    timeout=_backstop(spec.timeout), grace=spec.grace,
                )
                watchdog.release()
            except BaseException:
                main.abort()
                watchdog.abort()
                os.close(wd_fd)
                raise
            try:
                main.release()
            except BaseException:
                os.close(wd_fd)  # the watchdog sees EOF and kills the scope
                backend.teardown(cgroup)
                Owner._reap(watchdog.pid)
                raise
            started = True
        finally:
            if not started:
                backend.release(spec.agent, record.id, cgroup)
                self.store.save(record.replace(state="failed", ended_by="spawn-failed", ended_at=now_iso()))
        record = record.replace(
            state="running",
            main_pid=main.pid,
            owner_pid=os.getpid(),
            owner_start=_process_start(os.getpid()),
            helper_pids=[watchdog.pid],
            started_at=now_iso(),
            limits={"requested": spec.limits.requested(), "effective": limits},
        )
        self.store.save(record)
        owner = Owner(
            backend=backend, store=self.store, record=record, cgroup=cgroup, main_pid=main.pid,
            watchdog_pid=watchdog.pid, watchdog_fd=wd_fd, timeout=spec.timeout, grace=spec.grace, in_cgroup=False,
            reap_orphans=reap_orphans, keep_leftovers=spec.keep_leftovers,
        )
        return Run(self, record, owner)

    def _fork_pair(self, spec: RunSpec, record: RunRecord, cgroup: CgroupDir, *, stdio: tuple[int, int, int],
                   join_supervisor: bool):  # type: ignore[no-untyped-def]
        """Fork the watchdog (into ``supervisor/``) and the main command (into ``payload/``),
        both held at the gate until the caller has placed them in the unit."""
        wd_r, wd_w = os.pipe2(os.O_CLOEXEC)
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        supervisor, payload = str(cgroup.supervisor.path), str(cgroup.payload.path)
        try:
            watchdog = fork_held(
                watchdog_argv(str(cgroup.path / "cgroup.kill")),
                env={"PATH": "/usr/bin:/bin"}, cwd="/", stdio=(wd_r, devnull, devnull),
                join=(lambda: join(supervisor)) if join_supervisor else None, new_session=True,
            )
            try:
                main = fork_held(spec.argv, env=self._env(spec, record), cwd=record.cwd, stdio=stdio,
                                 join=lambda: join(payload))
            except BaseException:
                watchdog.abort()
                raise
        finally:
            os.close(wd_r)
            os.close(devnull)
        return main, watchdog, wd_w

    def _run_detached(self, spec: RunSpec, record: RunRecord) -> Run:
        backend = self.backend
        cgroup = backend.prepare(spec.agent, record.id, spec.limits)
        log_fd = os.open(record.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)  # type: ignore[arg-type]
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        gate_r, gate_w = os.pipe2(os.O_CLOEXEC)
        first = os.fork()
        if first == 0:  # pragma: no cover - runs in the forked child
            try:
                os.close(report_r)
                os.close(gate_w)
                os.setsid()
                owner_pid = os.fork()  # double fork: the owner is nobody's child to reap
                if owner_pid:
                    os.write(report_w, f"{owner_pid}\n".encode())
                    os._exit(0)
                self._detached_owner(spec, record, cgroup, log_fd, report_w, gate_r)
            finally:
                os._exit(1)
        os.close(report_w)
        os.close(gate_r)
        os.close(log_fd)
        os.waitpid(first, 0)
        reader = os.fdopen(report_r, "rb")
        try:
            owner_line = reader.readline()
            if not owner_line:
                raise CorralError("the run's owner process did not start")
            owner_pid = int(owner_line)
            try:
                limits = backend.adopt(
                    spec.agent, record.id, [owner_pid], description=_describe(spec.agent, spec.argv),
                    limits=spec.limits, timeout=_backstop(spec.timeout), grace=spec.grace,
                )
            except BaseException:
                os.close(gate_w)  # the owner sees EOF at the gate and exits
                backend.release(spec.agent, record.id, cgroup)
                self.store.save(record.replace(state="failed", ended_by="spawn-failed", ended_at=now_iso()))
                raise
            # The gate carries the read-back limits: the owner writes the one "running" record.
            os.write(gate_w, b"g" + json.dumps(limits).encode() + b"\n")
            os.close(gate_w)
            reply = reader.readline().decode().strip()
        finally:
            reader.close()
        if not reply.startswith("ok"):
            from .errors import SpawnError

            errno_text = reply.partition(" ")[2]
            code = int(errno_text) if errno_text.isdigit() else 0
            raise SpawnError(f"cannot run {spec.argv[0]!r}: {os.strerror(code) if code else reply or 'owner died'}",
                             errno=code)
        return Run(self, self.store.load(record.id) or record)

    def _detached_owner(self, spec: RunSpec, record: RunRecord, cgroup: CgroupDir, log_fd: int, report_w: int,
                        gate_r: int) -> None:  # pragma: no cover - runs in the forked owner
        """Body of a detached run's owner: wait to be placed, start the pair, own the run.
        The parent's D-Bus connection must not be used after fork, and the owner needs none."""
        reset_signals_in_child()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(devnull)
        with os.fdopen(gate_r, "rb") as gate:
            line = gate.readline()
        if not line.startswith(b"g"):
            os._exit(125)
        limits = json.loads(line[1:] or b"{}")
        join(str(cgroup.supervisor.path))
        set_child_subreaper()
        try:
            # The watchdog inherits supervisor/ from us; main joins payload/.
            main, watchdog, wd_fd = self._fork_pair(spec, record, cgroup, stdio=(0, 1, 2), join_supervisor=False)
            watchdog.release()
            main.release()
        except CorralError as err:
            os.write(report_w, f"err {getattr(err, 'errno', 0)}\n".encode())
            self.store.save(record.replace(state="failed", ended_by="spawn-failed", ended_at=now_iso(),
                                           exit_code=getattr(err, "exit_code", 1)))
            cgroup.kill()
            os._exit(1)
        running = record.replace(
            state="running", main_pid=main.pid, owner_pid=os.getpid(), owner_start=_process_start(os.getpid()),
            helper_pids=[os.getpid(), watchdog.pid], started_at=now_iso(),
            limits={"requested": spec.limits.requested(), "effective": limits},
        )
        self.store.save(running)
        os.write(report_w, b"ok\n")
        os.close(report_w)
        owner = Owner(
            backend=self.backend, store=self.store, record=running, cgroup=cgroup, main_pid=main.pid,
            watchdog_pid=watchdog.pid, watchdog_fd=wd_fd, timeout=spec.timeout, grace=spec.grace, in_cgroup=True,
            reap_orphans=True, keep_leftovers=spec.keep_leftovers,
        )
        owner.wait(handle_signals=True)
        os._exit(0)

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

    def _adopted(self) -> dict[str, RunRecord]:
        """Live ``corral-*`` scopes with no record: found again by name (re-adoption)."""
        out: dict[str, RunRecord] = {}
        for scope in self.backend.live_scopes():
            if self.store.path(scope.run_id).exists():
                continue
            pids = sorted(scope.cgroup.pids())
            argv: list[str] = []
            if pids:
                try:
                    argv = Path(f"/proc/{pids[0]}/cmdline").read_bytes().split(b"\0")[:-1]  # type: ignore[assignment]
                    argv = [a.decode(errors="replace") for a in argv]  # type: ignore[union-attr]
                except OSError:
                    argv = []
            out[scope.run_id] = RunRecord(
                id=scope.run_id, agent=scope.agent, argv=argv, cwd="", backend=self.backend.name,
                unit=self.backend.unit_name(scope.agent, scope.run_id), cgroup=str(scope.cgroup.path),
                state="running", main_pid=pids[0] if pids else None, adopted=True,
            )
        return out

    def _reconcile(self, record: RunRecord) -> RunRecord:
        """A record that says live is believed only while its cgroup is populated."""
        if record.ended:
            return record
        cg = CgroupDir(Path(record.cgroup))
        if cg.events().populated:
            return record
        if _alive(record.owner_pid, record.owner_start) and record.owner_pid != os.getpid():
            # The owner is finishing (teardown, record write): give it a moment.
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                fresh = self.store.load(record.id)
                if fresh is not None and fresh.ended:
                    return fresh
                if not _alive(record.owner_pid, record.owner_start):
                    break
                time.sleep(0.02)
            fresh = self.store.load(record.id)
            if fresh is not None and (fresh.ended or record.state == "starting"):
                return fresh
        fresh = self.store.load(record.id)
        if fresh is not None and fresh.ended:
            return fresh
        lost = record.replace(state="lost", ended_by="lost-owner", ended_at=record.ended_at or now_iso())
        if not record.adopted:
            self.store.save(lost)
        return lost

    def _view(self, record: RunRecord) -> RunView:
        record = self._reconcile(record)
        if record.ended:
            return RunView(record, record.state, 0, None, None)
        cg = CgroupDir(Path(record.cgroup))
        ev = _payload_of(record).events()
        usage = self.backend.usage(cg)
        state = "paused" if ev.frozen else (record.state if record.state in ("starting", "draining") else "running")
        return RunView(record, state, usage.pids, usage.memory_bytes, usage.cpu_usec, usage.memory_source)

    def ps(self, *, all: bool = False) -> list[RunView]:
        """Live runs (and, with *all*, ended ones), oldest first. Includes re-adopted scopes."""
        views = [self._view(r) for r in self.store.all()]
        views += [self._view(r) for r in self._adopted().values()]
        if not all:
            views = [v for v in views if v.state not in END_STATES]
        views.sort(key=lambda v: (v.record.started_at or "", v.record.id))
        return views

    def view(self, ref: str) -> RunView:
        return self._view(self.get(ref).record)

    def processes(self, ref: str) -> list[dict[str, Any]]:
        """Every process in the run's scope: ``main``, its ``child`` processes, and ``corral``
        (the watchdog, and a detached run's owner, in the ``supervisor`` leaf)."""
        import psutil

        run = self.get(ref)
        out = []
        scope = run.cgroup
        roles = {pid: "corral" for pid in scope.supervisor.pids()}
        payload = scope.payload if scope.payload.exists() else scope
        for pid in payload.pids():
            roles[pid] = "main" if pid == run.record.main_pid else "child"
        for pid in sorted(roles):
            try:
                proc = psutil.Process(pid)
                with proc.oneshot():
                    entry: dict[str, Any] = {"pid": pid, "ppid": proc.ppid(), "argv": proc.cmdline()}
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
            except psutil.AccessDenied:
                entry = {"pid": pid, "ppid": None, "argv": []}
            entry["role"] = roles[pid]
            out.append(entry)
        return out

    def targets(self, target: str | None, *, all_runs: bool = False) -> list[RunRecord]:
        """A run id (or unique prefix), an agent name (its live runs), or every live run."""
        if all_runs:
            return [v.record for v in self.ps()]
        if not target:
            raise UsageError("name a run id, an agent, or use --all")
        try:
            return [self.get(target).record]
        except (RunNotFound, UsageError) as err:
            try:
                validate_agent(target)
            except UsageError:
                raise err from None
            runs = [v.record for v in self.ps() if v.record.agent == target]
            if runs:
                return runs
            known_agent = any(r.agent == target for r in self.store.all())
            if known_agent:
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
            payload = _payload_of(record)
            if sig == _signal.SIGKILL:
                payload.kill()
            else:
                payload.signal_all(sig)
        out: dict[str, list[int]] = {}
        for record in records:
            payload = _payload_of(record)
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

    def stop_run(self, ref: str, grace: float = 10.0) -> list[int]:
        """SIGTERM every process of the run, SIGKILL what is left after *grace* seconds."""
        record = self.get(ref).record
        clean = self.backend.stop(_payload_of(record), grace=grace)
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
            if not _alive(fresh.owner_pid, fresh.owner_start) or time.monotonic() > deadline:
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
        self.backend.freeze(_payload_of(self._live(ref)), True)

    def resume(self, ref: str) -> None:
        self.backend.freeze(_payload_of(self._live(ref)), False)

    def _live(self, ref: str) -> RunRecord:
        view = self.view(ref)
        if view.state in END_STATES:
            raise UsageError(f"run {view.record.id} has ended ({view.state})")
        return view.record

    def gc(self, *, retention: float | None = None) -> "GcReport":
        """Tear down runs whose owner is gone, remove empty cgroups, prune old records."""
        from .gc import DEFAULT_RETENTION, collect

        return collect(self, retention=DEFAULT_RETENTION if retention is None else retention)

    def wait(self, ref: str, *, timeout: float | None = None) -> RunRecord:
        """Block until the run has ended and its cgroup is empty; return its final record."""
        record = self.get(ref).record
        cg = CgroupDir(Path(record.cgroup))
        deadline = None if timeout is None else time.monotonic() + timeout
        while not record.ended:
            left = 3600.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                from .errors import Busy

                raise Busy(f"run {record.id} still running after {timeout}s")
            if cg.wait_empty(min(left, 3600.0)):
                record = self._reconcile(self.store.load(record.id) or record)
        return record

    def logs(self, ref: str, *, follow: bool = False) -> Iterator[bytes]:
        record = self.get(ref).record
        if not record.log:
            raise NotFound(f"run {record.id} has no log: it ran attached, its output went to the terminal")
        try:
            f = open(record.log, "rb")
        except FileNotFoundError:
            raise NotFound(f"log of run {record.id} is gone ({record.log})") from None
        with f:
            while True:
                chunk = f.read(65536)
                if chunk:
                    yield chunk
                    continue
                if not follow:
                    return
                if self._reconcile(self.store.load(record.id) or record).ended:
                    rest = f.read()
                    if rest:
                        yield rest
                    return
                time.sleep(0.1)


def _payload_of(record: RunRecord) -> CgroupDir:
    scope = CgroupDir(Path(record.cgroup))
    return scope.payload if scope.payload.exists() or not scope.exists() else scope


def _backstop(timeout: float | None) -> float | None:
    """systemd's RuntimeMaxSec sits a second behind the owner's own deadline: the owner
    records ``timeout`` precisely, systemd ends the run even if the owner could not."""
    return None if timeout is None else timeout + 1.0
