"""Starting runs: fork the command and its watchdog held at a gate, place them, let go.

Attached, the calling process is the owner. Detached, a double-forked owner waits in the
scope's ``supervisor`` leaf, is placed by the parent (systemd: ``StartTransientUnit``
with its pid), then starts the pair itself and reports back through a pipe.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BackendError, CorralError, UsageError
from ..linux.cgroup import CgroupDir, join
from ..linux.procs import process_start
from ..paths import current_dir
from ..records import RunRecord, now_iso
from ..spec import RunSpec
from .spawn import fork_held, reset_signals_in_child
from .supervise import (
    Owner,
    block_forwarded_signals,
    set_child_subreaper,
    unblock_forwarded_signals,
    watchdog_argv,
)

if TYPE_CHECKING:
    from ..auth.runauth import RunAuth
    from ..isolation.sandbox import Sandbox
    from ..linux.flock import HeldLock
    from ..linux.terminal import PtyRelay
    from .corral import Corral
    from .runlog import OutputPump
    from .spawn import HeldChild

DESCRIPTION_MAX = 200


def _describe(agent: str, argv: tuple[str, ...]) -> str:
    text = f"corral {agent}: {shlex.join(argv)}"
    return text if len(text) <= DESCRIPTION_MAX else text[: DESCRIPTION_MAX - 3] + "..."


def _new_record(corral: Corral, spec: RunSpec, *, detach: bool) -> RunRecord:
    from ..names import new_run_id

    given = spec.cwd or ""
    cwd = os.path.normpath(given if os.path.isabs(given) else os.path.join(current_dir(), given))
    if not os.path.isdir(cwd):
        raise UsageError(f"working directory {cwd!r} does not exist")
    backend = corral.backend
    backend.connect()  # an unreachable manager fails here: no record, no process yet
    corral.store.ensure()
    for _ in range(16):
        run_id = new_run_id()
        if not corral.store.path(run_id).exists() and not backend.run_cgroup(spec.agent, run_id).exists():
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
        # The launching process guards the run until an owner takes over: gc leaves the
        # (still empty) cgroup of a starting run alone while this process lives.
        owner_pid=os.getpid(),
        owner_start=process_start(os.getpid()),
        detached=detach,
        session=spec.session,
        timeout=spec.timeout,
        log=str(corral.store.log_path(run_id)) if detach else None,
        limits={"requested": spec.limits.requested()},
        grants=list(spec.auth),
    )


def _prepare_auth(corral: Corral, spec: RunSpec, record: RunRecord) -> tuple[RunSpec, RunAuth | None]:
    """The run's granted profiles, made ready before the fork (auth/runauth.py): its own
    broker socket, the adapters' files, the variables. The token store is hidden from it."""
    if not spec.auth:
        return spec, None
    import dataclasses

    from ..auth.runauth import prepare_run_auth
    from ..isolation.sandbox import resolve_identity

    ident = resolve_identity(spec.isolation, record.cwd)
    owner = (ident.uid, ident.gid if ident.gid is not None else ident.uid) if ident.uid is not None else None
    run_auth = prepare_run_auth(corral.dirs, agent=spec.agent, run_id=record.id, grants=spec.auth, owner=owner)
    store = str(corral.dirs.state / "auth")
    spec = dataclasses.replace(spec, env={**run_auth.env, **spec.env}, hidden_paths=(*spec.hidden_paths, store),
                               env_unset=(*spec.env_unset, *run_auth.unset),
                               bind_back=(*spec.bind_back, *run_auth.shared))
    return spec, run_auth

def _sandbox(corral: Corral, spec: RunSpec, record: RunRecord) -> Sandbox:
    """The run's isolation, planned before the fork (errors surface here, not in the child)."""
    from ..isolation.sandbox import plan

    dirs = corral.dirs
    corral_env = {"CORRAL_RUN_ID": record.id, "CORRAL_AGENT": record.agent, "CORRAL_UNIT": record.unit}
    hidden = (str(dirs.config), str(dirs.state), str(dirs.runtime), *spec.hidden_paths)
    if record.grants:
        from ..auth.runauth import run_dir

        bind_back: tuple[str, ...] = (str(run_dir(dirs, record.id)),)  # its broker socket and adapters' files
    else:
        socket = spec.env.get("CORRAL_AUTH_SOCKET")
        bind_back = (socket,) if socket else ()
    return plan(spec.isolation, agent=spec.agent, argv=spec.argv, cwd=record.cwd, env=spec.env,
                corral_env=corral_env, hidden=hidden, bind_back=(*bind_back, *spec.bind_back), unset=spec.env_unset,
                state_dir=str(dirs.state))

def _take_leases(corral: Corral, spec: RunSpec, on_wait: Callable[[object], None] | None) -> list[HeldLock]:
    """The session lease, then a slot under the agent's cap, taken before the run exists:
    waiting must not hold a unit. The session comes first so that a run queued on a busy
    session does not sit on a slot another session's run could use."""
    if spec.budget is not None and spec.budget.requested():
        corral.backend.apply_budget(spec.budget)
    leases: list[HeldLock] = []
    try:
        if spec.session:
            from ..leases.sessions import Lease

            leases.append(Lease.acquire(corral.dirs, spec.agent, spec.session, timeout=spec.lock_timeout,
                                        on_wait=on_wait))
        if spec.max_runs:
            from ..leases.slots import Slot

            leases.append(Slot.acquire(corral.dirs, spec.agent, spec.max_runs, wait=spec.wait_for_slot,
                                       on_wait=on_wait))
    except BaseException:
        _release_all(leases)
        raise
    return leases


def _release_all(leases: list[HeldLock]) -> None:
    for lease in leases:
        lease.release()


def unenforced_limits(limits: dict[str, Any]) -> list[str]:
    """One line per requested limit the kernel will not enforce here (from the read-back)."""
    from ..units import format_limit

    return [f"--{key.replace('_', '-')} {format_limit(key, entry.get('requested'))}: "
            f"{entry.get('note') or 'not enforced here'}"
            for key, entry in (limits or {}).items() if not entry.get("enforced")]


def _check_strict_limits(spec: RunSpec, limits: dict[str, Any]) -> None:
    if spec.strict_limits and unenforced_limits(limits):
        raise BackendError("refusing to start (--strict-limits, or the agent's strict_limits): "
                           + "; ".join(unenforced_limits(limits)),
                           hint="drop the limit, delegate the controller (corral doctor says how), "
                                "or run with --no-strict-limits")


def _save_start_record(corral: Corral, record: RunRecord) -> None:
    try:
        corral.store.save(record, durable=False)  # the run lives: its cgroup is the truth (records.py)
    except CorralError as err:
        err.message = f"{err.message}; the command was not started"
        raise


def start_attached(corral: Corral, spec: RunSpec, *, reap_orphans: bool = False, hold_signals: bool = False,
                   terminal: bool = False, on_wait: Callable[[object], None] | None = None) -> tuple[RunRecord, Owner]:
    """Start *spec* owned by this process: the caller waits on the returned Owner.

    *hold_signals*: block Ctrl-C & co. from just before the fork until ``Owner.wait``
    listens (the CLI), so a signal in that window reaches the command, not corral.
    *terminal*: a sandboxed run started from a terminal gets its own pty, relayed by the
    owner (terminal.py), instead of the caller's terminal.
    """
    leases = _take_leases(corral, spec, on_wait)
    run_auth = None
    try:
        record = _new_record(corral, spec, detach=False)
        spec, run_auth = _prepare_auth(corral, spec, record)
        for lease in leases:
            lease.update_holder(run_id=record.id, cgroup=record.cgroup)  # before any process is in it
        _save_start_record(corral, record)
        if hold_signals:
            block_forwarded_signals()
        record, owner = _start_attached(corral, spec, record, reap_orphans=reap_orphans, terminal=terminal)
    except BaseException:
        if hold_signals:
            unblock_forwarded_signals()
        _release_all(leases)
        if run_auth is not None:
            run_auth.close()
        raise
    for lease in leases:
        lease.update_holder(main_pid=owner.main_pid)
    owner.leases = leases
    if run_auth is not None:
        owner.services = run_auth
        run_auth.start()
    return record, owner


def _start_attached(corral: Corral, spec: RunSpec, record: RunRecord, *, reap_orphans: bool,
                    terminal: bool) -> tuple[RunRecord, Owner]:
    backend = corral.backend
    cgroup = backend.prepare(spec.agent, record.id, spec.limits)
    if reap_orphans:
        set_child_subreaper()
    started = False
    try:
        main, watchdog, wd_fd, sandbox, relay = _fork_pair(corral, spec, record, cgroup, stdio=(0, 1, 2),
                                                           join_supervisor=True, terminal=terminal)
        try:
            limits = backend.adopt(
                spec.agent, record.id, [main.pid, watchdog.pid],
                description=_describe(spec.agent, spec.argv), limits=spec.limits,
                timeout=_backstop(spec.timeout), grace=spec.grace,
            )
            _check_strict_limits(spec, limits)  # the command has not run yet: it waits at its gate
            watchdog.release()
        except BaseException:
            main.abort()
            watchdog.abort()
            os.close(wd_fd)
            if relay is not None:
                relay.close()
            raise
        try:
            main.release()
        except BaseException:
            os.close(wd_fd)  # the watchdog sees EOF and kills the scope
            backend.teardown(cgroup)
            Owner._reap(watchdog.pid)
            if relay is not None:
                relay.close()
            raise
        if relay is not None:
            relay.close_slave()
        started = True
    finally:
        if not started:
            backend.release(spec.agent, record.id, cgroup)
            corral.store.save_or_warn(record.replace(state="failed", ended_by="spawn-failed", ended_at=now_iso()),
                                      f"run {record.id} did not start; its record could not say so")
    record = record.replace(
        state="running",
        main_pid=main.pid,
        owner_pid=os.getpid(),
        owner_start=process_start(os.getpid()),
        helper_pids=[watchdog.pid],
        started_at=now_iso(),
        limits={"requested": spec.limits.requested(), "effective": limits},
        isolation=sandbox.describe(terminal=relay is not None),
    )
    # The command runs: from here a failed write costs only detail in `ps` (the record on
    # disk still names this process as the owner, and the cgroup is the truth), never the run.
    corral.store.save_or_warn(record, f"run {record.id} is running; its record could not be updated", durable=False)
    owner = Owner(
        backend=backend, store=corral.store, record=record, cgroup=cgroup, main_pid=main.pid,
        watchdog_pid=watchdog.pid, watchdog_fd=wd_fd, timeout=spec.timeout, grace=spec.grace, in_cgroup=False,
        reap_orphans=reap_orphans, keep_leftovers=spec.keep_leftovers, sandboxed=sandbox.active, terminal=relay,
    )
    return record, owner

def _fork_pair(corral: Corral, spec: RunSpec, record: RunRecord, cgroup: CgroupDir, *, stdio: tuple[int, int, int],
               join_supervisor: bool, terminal: bool = False,
               ) -> tuple[HeldChild, HeldChild, int, Sandbox, PtyRelay | None]:
    """Fork the watchdog (into ``supervisor/``) and the main command (into ``payload/``),
    both held at the gate until the caller has placed them in the unit. With *terminal*,
    a sandboxed command on a terminal gets a pty of its own (returned as the relay)."""
    wd_r, wd_w = os.pipe2(os.O_CLOEXEC)
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    supervisor, payload = str(cgroup.supervisor.path), str(cgroup.payload.path)
    try:
        watchdog = fork_held(
            watchdog_argv(str(cgroup.path / "cgroup.kill"), str(corral.store.lost_path(record.id))),
            env={"PATH": "/usr/bin:/bin"}, cwd="/", stdio=(wd_r, devnull, devnull),
            join=(lambda: join(supervisor)) if join_supervisor else None, new_session=True,
        )
        relay = None
        try:
            sandbox = _sandbox(corral, spec, record)
            if terminal and sandbox.active:
                from ..linux.terminal import PtyRelay, wants_pty

                if wants_pty():
                    relay = PtyRelay()
                    stdio = relay.stdio()
            main = fork_held(spec.argv, env=sandbox.env, cwd=record.cwd, stdio=stdio, join=lambda: join(payload),
                             hide=() if sandbox.active else spec.hidden_paths, sandbox=sandbox,
                             new_session=sandbox.active, ctty=relay is not None)
        except BaseException:
            watchdog.abort()
            if relay is not None:
                relay.close()
            raise
    finally:
        os.close(wd_r)
        os.close(devnull)
    return main, watchdog, wd_w, sandbox, relay

def start_detached(corral: Corral, spec: RunSpec, *, on_wait: Callable[[object], None] | None = None) -> RunRecord:
    """Start *spec* owned by a small process in the run's own scope; return once it runs.
    The session lease travels to that owner with the fork; this process drops its copy."""
    leases = _take_leases(corral, spec, on_wait)
    run_auth = None
    try:
        record = _new_record(corral, spec, detach=True)
        spec, run_auth = _prepare_auth(corral, spec, record)
        for lease in leases:
            lease.update_holder(run_id=record.id, cgroup=record.cgroup)
        _save_start_record(corral, record)
        started = _run_detached(corral, spec, record, leases, run_auth)
        if run_auth is not None:
            run_auth.detach_copy()  # the owner serves it now
        return started
    except BaseException:
        _release_all(leases)  # no owner took it over (it would have reported "ok")
        if run_auth is not None:
            run_auth.close()
        raise
    finally:
        for lease in leases:
            lease.close()  # the owner's copy keeps the lock; release() above is a no-op after it


def _run_detached(corral: Corral, spec: RunSpec, record: RunRecord, leases: list[HeldLock],
                  run_auth: RunAuth | None) -> RunRecord:
    backend = corral.backend
    cgroup = backend.prepare(spec.agent, record.id, spec.limits)
    log_fd = os.open(record.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)  # type: ignore[arg-type]
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
            _detached_owner(corral, spec, record, cgroup, log_fd, report_w, gate_r, leases, run_auth)
        except BaseException:  # noqa: BLE001 - say why (on the caller's stderr or the run's log)
            import traceback

            traceback.print_exc()
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
            _check_strict_limits(spec, limits)
        except BaseException:
            os.close(gate_w)  # the owner sees EOF at the gate and exits
            backend.release(spec.agent, record.id, cgroup)
            corral.store.save_or_warn(record.replace(state="failed", ended_by="spawn-failed", ended_at=now_iso()),
                                      f"run {record.id} did not start; its record could not say so")
            raise
        # The gate carries the read-back limits: the owner writes the one "running" record.
        os.write(gate_w, b"g" + json.dumps(limits).encode() + b"\n")
        os.close(gate_w)
        reply = reader.readline().decode().strip()
    finally:
        reader.close()
    if reply.startswith("fail "):  # the owner could not record the run: it is gone again
        raise BackendError(f"run {record.id} was not started: {reply[5:]}",
                           hint="free space on the state filesystem (corral doctor names it), then try again")
    if not reply.startswith("ok"):
        from ..errors import spawn_error

        errno_text = reply.partition(" ")[2]
        code = int(errno_text) if errno_text.isdigit() else 0
        raise spawn_error(f"cannot run {spec.argv[0]!r}: {os.strerror(code) if code else reply or 'owner died'}",
                         errno=code)
    return corral.store.load(record.id) or record

def _detached_owner(corral: Corral, spec: RunSpec, record: RunRecord, cgroup: CgroupDir, log_fd: int, report_w: int,
                    gate_r: int, leases: list[HeldLock],
                    run_auth: RunAuth | None) -> None:  # pragma: no cover - runs in the forked owner
    """Body of a detached run's owner: wait to be placed, start the pair, own the run.
    The parent's D-Bus connection must not be used after fork, and the owner needs none."""
    from ..linux.procs import set_process_title

    set_process_title(f"corral-owner {record.id} {record.agent}")  # not the CLI's argv: --env secrets
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
    # The command's stdout and stderr are pipes to us: kept apart in the log (runlog.py).
    # Our own messages (a warning, a traceback) go to the log file as they are.
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    try:
        # The watchdog inherits supervisor/ from us; main joins payload/.
        main, watchdog, wd_fd, sandbox, _relay = _fork_pair(corral, spec, record, cgroup, stdio=(0, out_w, err_w),
                                                            join_supervisor=False)
        watchdog.release()
        main.release()
        os.close(out_w)
        os.close(err_w)  # the pipes end when the command's last process does
    except CorralError as err:
        os.write(report_w, f"err {getattr(err, 'errno', 0)}\n".encode())
        corral.store.save_or_warn(record.replace(state="failed", ended_by="spawn-failed", ended_at=now_iso(),
                                                 exit_code=getattr(err, "exit_code", 1)),
                                  f"run {record.id} did not start; its record could not say so")
        cgroup.kill()
        os._exit(1)
    output = _start_output(corral, spec, record, {out_r: "stdout", err_r: "stderr"})
    running = record.replace(
        state="running", main_pid=main.pid, owner_pid=os.getpid(), owner_start=process_start(os.getpid()),
        helper_pids=[os.getpid(), watchdog.pid], started_at=now_iso(),
        limits={"requested": spec.limits.requested(), "effective": limits}, isolation=sandbox.describe(),
        journal=output.journal is not None,
    )
    for lease in leases:
        lease.update_holder(owner_pid=os.getpid(), main_pid=main.pid)
    try:
        # Unlike an attached run's, this record is what names the owner: without it the
        # run would look ownerless, so a detached run that cannot be recorded does not run.
        corral.store.save(running, durable=False)
    except CorralError as err:
        os.write(report_w, f"fail {err.message}\n".encode())
        cgroup.kill()
        os._exit(1)
    os.write(report_w, b"ok\n")
    os.close(report_w)
    owner = Owner(
        backend=corral.backend, store=corral.store, record=running, cgroup=cgroup, main_pid=main.pid,
        watchdog_pid=watchdog.pid, watchdog_fd=wd_fd, timeout=spec.timeout, grace=spec.grace, in_cgroup=True,
        reap_orphans=True, keep_leftovers=spec.keep_leftovers, sandboxed=sandbox.active,
    )
    owner.leases = leases
    owner.output = output
    if run_auth is not None:
        owner.services = run_auth
        run_auth.start()
    owner.wait(handle_signals=True)
    os._exit(0)


def _start_output(corral: Corral, spec: RunSpec, record: RunRecord,
                  pipes: dict[int, str]) -> OutputPump:  # pragma: no cover - runs in the forked owner
    """The thread that writes the command's output to its log (and, on systemd, the journal)."""
    from ..units import DEFAULT_LOG_MAX
    from .runlog import LogFile, OutputPump, open_journal

    def point_stdio(fd: int) -> None:  # after a rotation our own messages follow the new file
        os.dup2(fd, 1)
        os.dup2(fd, 2)

    log = LogFile(Path(record.log or corral.store.log_path(record.id)), int(spec.log_max or DEFAULT_LOG_MAX),
                  on_reopen=point_stdio)
    journal = None
    if corral.backend.name == "systemd":
        journal = open_journal(run_id=record.id, agent=record.agent, unit=record.unit, argv0=spec.argv[0],
                               user_mode="/user@" in record.cgroup)
    pump = OutputPump(pipes, log, journal)
    pump.start()
    return pump


def _backstop(timeout: float | None) -> float | None:
    """systemd's RuntimeMaxSec sits a second behind the owner's own deadline: the owner
    records ``timeout`` precisely, systemd ends the run even if the owner could not."""
    return None if timeout is None else timeout + 1.0
