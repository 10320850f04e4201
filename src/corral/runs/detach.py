"""Starting a detached run, owned by corral's shared owner (:mod:`.shared_owner`) where
the caller may use it, else by an owner forked here.

Shared: the owner forks the pair held at the gate and reports their pids; we place them
(systemd: ``StartTransientUnit`` with their pids) and open the gate. Forked: a
double-forked owner waits in the scope's ``supervisor`` leaf, is placed by us, then
starts the pair itself (:func:`.launch.fork_pair`). Either reports back through a pipe.

The caller returns once the owner has written the ``running`` record; from then on the
owner alone owns the run (the leases' fds went to it, its auth is served from it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import BackendError, CorralError
from ..linux.cgroup import CgroupDir, join
from ..linux.procs import process_start
from ..records import RunRecord, now_iso
from ..spec import RunSpec
from .signals import set_child_subreaper
from .spawn import reset_signals_in_child
from .supervise import Owner

if TYPE_CHECKING:
    from ..auth.runauth import RunAuth
    from ..linux.flock import HeldLock
    from .context import RunContext
    from .output import OutputPump
from . import shared_owner
from .launch import (
    backstop,
    check_strict_limits,
    describe,
    fork_pair,
    new_record,
    plan_sandbox,
    prepare_auth,
    release_all,
    save_start_record,
    take_leases,
)


def start_detached(corral: RunContext, spec: RunSpec, *, on_wait: Callable[[object], None] | None = None) -> RunRecord:
    """Start *spec* owned by corral's shared owner (or an owner forked here, in the run's
    own scope); return once it runs. The leases' fds go to that owner; we drop our copies."""
    leases = take_leases(corral, spec, on_wait)
    run_auth = None
    try:
        record = new_record(corral, spec, detach=True)
        spec, run_auth = prepare_auth(corral, spec, record)
        for lease in leases:
            lease.update_holder(run_id=record.id, cgroup=record.cgroup)
        save_start_record(corral, record)
        started = _run_detached(corral, spec, record, leases, run_auth)
        if run_auth is not None:
            run_auth.detach_copy()  # the owner serves it now
        return started
    except BaseException:
        release_all(leases)  # no owner took it over (it would have reported "ok")
        if run_auth is not None:
            run_auth.close()
        raise
    finally:
        for lease in leases:
            lease.close()  # the owner's copy keeps the lock; release() above is a no-op after it


def _run_detached(corral: RunContext, spec: RunSpec, record: RunRecord, leases: list[HeldLock],
                  run_auth: RunAuth | None) -> RunRecord:
    backend = corral.backend
    cgroup = backend.prepare(spec.agent, record.id, spec.limits)
    gate_w = -1
    placed = False
    try:
        log_fd = os.open(record.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)  # type: ignore[arg-type]
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        gate_r, gate_w = os.pipe2(os.O_CLOEXEC)
        try:
            shared = False
            if run_auth is None and shared_owner.enabled():  # the run's auth serves from our memory: only a fork takes it
                sandbox = plan_sandbox(corral, spec, record)  # from our environment; errors before any process
                shared = shared_owner.hand_over(corral, spec, record, cgroup, sandbox, report_w, gate_r, leases)
            if not shared:
                _fork_owner(corral, spec, record, cgroup, log_fd, (report_r, report_w), (gate_r, gate_w), leases,
                            run_auth)
        finally:
            os.close(report_w)
            os.close(gate_r)
            os.close(log_fd)
        with os.fdopen(report_r, "rb") as reader:
            first = reader.readline().decode().strip()
            if shared and first.startswith("adopt "):
                pids = [int(pid) for pid in first.split()[1:]]  # the watchdog and main, at their gate
            elif not shared and first.isdigit():
                pids = [int(first)]  # the owner, at its gate
            else:
                raise _failure(spec, first or "the run's owner process did not start")
            limits = backend.adopt(
                spec.agent, record.id, pids, description=describe(spec.agent, spec.argv),
                limits=spec.limits, timeout=backstop(spec.timeout), grace=spec.grace,
            )
            check_strict_limits(spec, limits)
            # The gate carries the read-back limits: the owner writes the one "running" record.
            os.write(gate_w, b"g" + json.dumps(limits).encode() + b"\n")
            os.close(gate_w)
            gate_w = -1
            placed = True
            reply = reader.readline().decode().strip()
    except BaseException:
        if gate_w >= 0:
            os.close(gate_w)  # the owner sees EOF at the gate: its processes exit unstarted
        if not placed:
            backend.release(spec.agent, record.id, cgroup)
            corral.store.save_or_warn(record.replace(state="failed", ended_by="spawn-failed", ended_at=now_iso()),
                                      f"run {record.id} did not start; its record could not say so")
        raise
    if not reply.startswith("ok"):  # the owner recorded why and removed what it had started
        raise _failure(spec, reply or "owner died")
    return corral.store.load(record.id) or record


def _failure(spec: RunSpec, reply: str) -> CorralError:
    """The owner's ``err <errno> <message>`` or ``fail <message>`` as the error to raise."""
    if reply.startswith("fail "):  # the owner could not record the run: it is gone again
        return BackendError(f"the run was not started: {reply[5:]}",
                            hint="free space on the state filesystem (corral doctor names it), then try again")
    from ..errors import spawn_error

    _, _, rest = reply.partition(" ")
    errno_text, _, message = rest.partition(" ")
    code = int(errno_text) if errno_text.isdigit() else 0
    if message:
        return spawn_error(message, errno=code)
    return spawn_error(f"cannot run {spec.argv[0]!r}: {os.strerror(code) if code else reply}", errno=code)

def _fork_owner(corral: RunContext, spec: RunSpec, record: RunRecord, cgroup: CgroupDir, log_fd: int,
                report: tuple[int, int], gate: tuple[int, int], leases: list[HeldLock],
                run_auth: RunAuth | None) -> None:
    """Fork the owner from this process (double fork: it is nobody's child to reap); its
    pid comes back as the report pipe's first line."""
    (report_r, report_w), (gate_r, gate_w) = report, gate
    first = os.fork()
    if first == 0:  # pragma: no cover - runs in the forked child
        try:
            os.close(report_r)
            os.close(gate_w)
            os.setsid()
            owner_pid = os.fork()
            if owner_pid:
                os.write(report_w, f"{owner_pid}\n".encode())
                os._exit(0)
            detached_owner(corral, spec, record, cgroup, log_fd, report_w, gate_r, leases, run_auth)
        except BaseException:  # noqa: BLE001 - say why (on the caller's stderr or the run's log)
            import traceback

            traceback.print_exc()
        finally:
            os._exit(1)
    os.waitpid(first, 0)


def detached_owner(corral: RunContext, spec: RunSpec, record: RunRecord, cgroup: CgroupDir, log_fd: int, report_w: int,
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
    # The command's stdout and stderr are pipes to us: kept apart in the log (output.py).
    # Our own messages (a warning, a traceback) go to the log file as they are.
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    try:
        # The watchdog inherits supervisor/ from us; main joins payload/.
        main, watchdog, wd_fd, sandbox, _relay = fork_pair(corral, spec, record, cgroup, stdio=(0, out_w, err_w),
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
    output = start_output(corral, spec, record, {out_r: "stdout", err_r: "stderr"})
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
    owner = detached_run_owner(corral, spec, running, cgroup, (main.pid, watchdog.pid, wd_fd), sandbox.active, leases,
                               output, in_scope=True)
    if run_auth is not None:
        owner.services = run_auth
        run_auth.start()
    owner.wait(handle_signals=True)
    os._exit(0)


def detached_run_owner(corral: RunContext, spec: RunSpec, running: RunRecord, cgroup: CgroupDir,
                       pair: tuple[int, int, int], sandboxed: bool, leases: list[HeldLock], output: OutputPump, *,
                       in_scope: bool) -> Owner:
    """The :class:`.supervise.Owner` of a detached run: *pair* is main's pid, the
    watchdog's and its pipe. *in_scope*: a forked owner in the run's ``supervisor/`` leaf
    (it leaves the scope at the end and reaps orphans as subreaper); the shared owner is not."""
    main_pid, watchdog_pid, wd_fd = pair
    owner = Owner(
        backend=corral.backend, store=corral.store, record=running, cgroup=cgroup, main_pid=main_pid,
        watchdog_pid=watchdog_pid, watchdog_fd=wd_fd, timeout=spec.timeout, grace=spec.grace, in_cgroup=in_scope,
        reap_orphans=in_scope, keep_leftovers=spec.keep_leftovers, sandboxed=sandboxed,
    )
    owner.leases = leases
    owner.output = output
    return owner


def start_output(corral: RunContext, spec: RunSpec, record: RunRecord, pipes: dict[int, str], *,
                 follow_stdio: bool = True) -> OutputPump:  # pragma: no cover - runs in an owner
    """The thread that writes the command's output to its log (and, on systemd, the journal).
    *follow_stdio*: a forked owner's own stdout/stderr follow the log through a rotation."""
    from ..units import DEFAULT_LOG_MAX
    from .output import LogFile, OutputPump, open_journal

    def point_stdio(fd: int) -> None:  # after a rotation our own messages follow the new file
        os.dup2(fd, 1)
        os.dup2(fd, 2)

    log = LogFile(Path(record.log or corral.store.log_path(record.id)), int(spec.log_max or DEFAULT_LOG_MAX),
                  on_reopen=point_stdio if follow_stdio else None)
    journal = None
    if corral.backend.name == "systemd":
        journal = open_journal(run_id=record.id, agent=record.agent, unit=record.unit, argv0=spec.argv[0],
                               user_mode="/user@" in record.cgroup)
    pump = OutputPump(pipes, log, journal)
    pump.start()
    return pump
