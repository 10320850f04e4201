"""Starting runs: fork the command and its watchdog held at a gate, place them, let go.

Attached, the calling process is the owner. Detached runs start in :mod:`.detach`, from
the same steps.

Why the gate: the command must not run a single instruction outside its cgroup, and
systemd makes a scope only around pids that already exist. So the command and its
watchdog are forked held at a gate (:mod:`.spawn`), the backend places them (systemd:
``StartTransientUnit`` with their pids), each joins its leaf (``payload/``,
``supervisor/``), and only then does the gate open and the command exec. A start that
fails closes the gate instead: the command never ran.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import BackendError, CorralError, UsageError
from ..linux.cgroup import CgroupDir, join
from ..linux.procs import process_start
from ..paths import current_dir
from ..records import RunRecord, now_iso
from ..spec import RunSpec
from .signals import block_forwarded_signals, set_child_subreaper, unblock_forwarded_signals
from .spawn import fork_held
from .supervise import Owner
from .watchdog import watchdog_argv

if TYPE_CHECKING:
    from ..auth.runauth import RunAuth
    from ..isolation.sandbox import Sandbox
    from ..linux.flock import HeldLock
    from ..linux.terminal import PtyRelay
    from .context import RunContext
    from .spawn import HeldChild, Inherited

DESCRIPTION_MAX = 200


def describe(agent: str, argv: tuple[str, ...]) -> str:
    text = f"corral {agent}: {shlex.join(argv)}"
    return text if len(text) <= DESCRIPTION_MAX else text[: DESCRIPTION_MAX - 3] + "..."


def new_record(corral: RunContext, spec: RunSpec, *, detach: bool) -> RunRecord:
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


def prepare_auth(corral: RunContext, spec: RunSpec, record: RunRecord) -> tuple[RunSpec, RunAuth | None]:
    """The run's granted profiles, made ready before the fork (auth/runauth.py): its own
    broker socket, the adapters' files, the variables. The token store is hidden from it."""
    if not spec.auth:
        return spec, None
    import dataclasses

    from ..auth.runauth import prepare_run_auth
    from ..isolation.policy import resolve_identity

    ident = resolve_identity(spec.isolation, record.cwd)
    owner = (ident.uid, ident.gid if ident.gid is not None else ident.uid) if ident.uid is not None else None
    run_auth = prepare_run_auth(corral.dirs, agent=spec.agent, run_id=record.id, grants=spec.auth, owner=owner)
    store = str(corral.dirs.state / "auth")
    spec = dataclasses.replace(spec, env={**run_auth.env, **spec.env}, hidden_paths=(*spec.hidden_paths, store),
                               env_unset=(*spec.env_unset, *run_auth.unset),
                               bind_back=(*spec.bind_back, *run_auth.shared))
    return spec, run_auth

def plan_sandbox(corral: RunContext, spec: RunSpec, record: RunRecord) -> Sandbox:
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

def take_leases(corral: RunContext, spec: RunSpec, on_wait: Callable[[object], None] | None) -> list[HeldLock]:
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
        release_all(leases)
        raise
    return leases


def release_all(leases: list[HeldLock]) -> None:
    for lease in leases:
        lease.release()


def unenforced_limits(limits: dict[str, Any]) -> list[str]:
    """One line per requested limit the kernel will not enforce here (from the read-back)."""
    from ..units import format_limit

    return [f"--{key.replace('_', '-')} {format_limit(key, entry.get('requested'))}: "
            f"{entry.get('note') or 'not enforced here'}"
            for key, entry in (limits or {}).items() if not entry.get("enforced")]


def check_strict_limits(spec: RunSpec, limits: dict[str, Any]) -> None:
    if spec.strict_limits and unenforced_limits(limits):
        raise BackendError("refusing to start (--strict-limits, or the agent's strict_limits): "
                           + "; ".join(unenforced_limits(limits)),
                           hint="drop the limit, delegate the controller (corral doctor says how), "
                                "or run with --no-strict-limits")


def save_start_record(corral: RunContext, record: RunRecord) -> None:
    try:
        corral.store.save(record, durable=False)  # the run lives: its cgroup is the truth (records.py)
    except CorralError as err:
        err.message = f"{err.message}; the command was not started"
        raise


def start_attached(corral: RunContext, spec: RunSpec, *, reap_orphans: bool = False, hold_signals: bool = False,
                   terminal: bool = False, on_wait: Callable[[object], None] | None = None) -> tuple[RunRecord, Owner]:
    """Start *spec* owned by this process: the caller waits on the returned Owner.

    *hold_signals*: block Ctrl-C & co. from just before the fork until ``Owner.wait``
    listens (the CLI), so a signal in that window reaches the command, not corral.
    *terminal*: a sandboxed run started from a terminal gets its own pty, relayed by the
    owner (linux/terminal.py), instead of the caller's terminal.
    """
    leases = take_leases(corral, spec, on_wait)
    run_auth = None
    try:
        record = new_record(corral, spec, detach=False)
        spec, run_auth = prepare_auth(corral, spec, record)
        for lease in leases:
            lease.update_holder(run_id=record.id, cgroup=record.cgroup)  # before any process is in it
        save_start_record(corral, record)
        if hold_signals:
            block_forwarded_signals()
        record, owner = _start_attached(corral, spec, record, reap_orphans=reap_orphans, terminal=terminal)
    except BaseException:
        if hold_signals:
            unblock_forwarded_signals()
        release_all(leases)
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


def _start_attached(corral: RunContext, spec: RunSpec, record: RunRecord, *, reap_orphans: bool,
                    terminal: bool) -> tuple[RunRecord, Owner]:
    backend = corral.backend
    cgroup = backend.prepare(spec.agent, record.id, spec.limits)
    if reap_orphans:
        set_child_subreaper()
    started = False
    try:
        main, watchdog, wd_fd, sandbox, relay = fork_pair(corral, spec, record, cgroup, stdio=(0, 1, 2),
                                                           join_supervisor=True, terminal=terminal)
        try:
            limits = backend.adopt(
                spec.agent, record.id, [main.pid, watchdog.pid],
                description=describe(spec.agent, spec.argv), limits=spec.limits,
                timeout=backstop(spec.timeout), grace=spec.grace,
            )
            check_strict_limits(spec, limits)  # the command has not run yet: it waits at its gate
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

def fork_pair(corral: RunContext, spec: RunSpec, record: RunRecord, cgroup: CgroupDir, *, stdio: tuple[int, int, int],
               join_supervisor: bool, terminal: bool = False, sandbox: Sandbox | None = None,
               inherit: Inherited | None = None, own_session: bool = False,
               ) -> tuple[HeldChild, HeldChild, int, Sandbox, PtyRelay | None]:
    """Fork the watchdog (into ``supervisor/``) and the main command (into ``payload/``),
    both held at the gate until the caller has placed them in the unit. With *terminal*,
    a sandboxed command on a terminal gets a pty of its own (returned as the relay).
    *sandbox*: planned already (by the caller of a shared owner, from its environment);
    *inherit*, *own_session*: what the shared owner gives each run of its callers."""
    wd_r, wd_w = os.pipe2(os.O_CLOEXEC)
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    supervisor, payload = str(cgroup.supervisor.path), str(cgroup.payload.path)
    try:
        watchdog = fork_held(
            watchdog_argv(str(cgroup.path / "cgroup.kill"), str(corral.store.lost_path(record.id))),
            env={"PATH": "/usr/bin:/bin"}, cwd="/", stdio=(wd_r, devnull, devnull),
            join=(lambda: join(supervisor)) if join_supervisor else None, new_session=True, inherit=inherit,
        )
        relay = None
        try:
            if sandbox is None:
                sandbox = plan_sandbox(corral, spec, record)
            if terminal and sandbox.active:
                from ..linux.terminal import PtyRelay, wants_pty

                if wants_pty():
                    relay = PtyRelay()
                    stdio = relay.stdio()
            main = fork_held(spec.argv, env=sandbox.env, cwd=record.cwd, stdio=stdio, join=lambda: join(payload),
                             hide=() if sandbox.active else spec.hidden_paths, sandbox=sandbox,
                             new_session=sandbox.active or own_session, ctty=relay is not None, inherit=inherit)
        except BaseException:
            watchdog.abort()
            if relay is not None:
                relay.close()
            raise
    finally:
        os.close(wd_r)
        os.close(devnull)
    return main, watchdog, wd_w, sandbox, relay

def backstop(timeout: float | None) -> float | None:
    """systemd's RuntimeMaxSec sits a second behind the owner's own deadline: the owner
    records ``timeout`` precisely, systemd ends the run even if the owner could not."""
    return None if timeout is None else timeout + 1.0
