"""One detached run on its thread of corral's shared owner (:mod:`.ownerd`).

It does what a forked owner does (:func:`.detach.detached_owner`), with the same
:class:`.supervise.Owner`, except that the pair is forked before the gate (the caller
places them, not us) and the owner stays where it is. The threads fork only children that
exec at once: nothing in them imports or takes a lock another thread might hold.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import TYPE_CHECKING, Any

from ..errors import CorralError
from ..records import now_iso

if TYPE_CHECKING:
    from ..isolation.sandbox import Sandbox
    from ..linux.cgroup import CgroupDir
    from ..linux.flock import HeldLock
    from ..records import RunRecord
    from ..spec import RunSpec
    from .context import RunContext
    from .spawn import HeldChild, Inherited
    from .supervise import Owner


def own_run(corral: RunContext, spec: RunSpec, record: RunRecord, cgroup: CgroupDir, sandbox: Sandbox, inherit: Inherited,
            report_w: int, gate_r: int, leases: list[HeldLock], *, owner_start: float | None) -> None:
    """One run, on its thread of the shared owner: as :func:`.detach.detached_owner`, but
    the pair is forked before the gate (the caller places them, not us) and this process
    stays where it is. *report_w* and *gate_r* are ours to close, as soon as the run has
    started: the owner holds a few fds per run, for as long as it runs."""
    try:
        owner = _start_run(corral, spec, record, cgroup, sandbox, inherit, report_w, gate_r, leases, owner_start)
    finally:
        os.close(gate_r)
        os.close(report_w)
    if owner is not None:
        owner.wait()


def _start_run(corral: RunContext, spec: RunSpec, record: RunRecord, cgroup: CgroupDir, sandbox: Sandbox,
               inherit: Inherited, report_w: int, gate_r: int, leases: list[HeldLock],
               owner_start: float | None) -> Owner | None:
    from .launch import fork_pair

    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        # The command's own session: a `kill 0` in it must not reach us or other runs.
        main, watchdog, wd_fd, sandbox, _relay = fork_pair(corral, spec, record, cgroup, stdio=(devnull, out_w, err_w),
                                                            join_supervisor=True, sandbox=sandbox, inherit=inherit,
                                                            own_session=True)
    except CorralError as err:
        os.close(out_r)
        os.close(err_r)
        _tell(report_w, f"err {getattr(err, 'errno', 0) or 0} {err.message}")  # the caller records it
        return None
    finally:
        os.close(devnull)
        os.close(out_w)
        os.close(err_w)
    try:
        os.write(report_w, f"adopt {watchdog.pid} {main.pid}\n".encode())
        line = _read_line(gate_r)
    except OSError:
        line = b""  # the caller is gone
    if not line.startswith(b"g"):  # the caller could not place them (or died): it, or gc, records that
        main.abort()
        watchdog.abort()
        for fd in (wd_fd, out_r, err_r):
            os.close(fd)
        return None
    limits = json.loads(line[1:] or b"{}")
    # From here the caller is not needed (a report it cannot read any more is no failure):
    # the pair runs or is torn down, and what happened is recorded.
    return _start_pair(corral, spec, record, cgroup, sandbox, limits, main, watchdog, wd_fd, (out_r, err_r), report_w,
                       leases, owner_start)


def _start_pair(corral: RunContext, spec: RunSpec, record: RunRecord, cgroup: CgroupDir, sandbox: Sandbox,
                limits: dict[str, Any], main: HeldChild, watchdog: HeldChild, wd_fd: int, pipes: tuple[int, int],
                report_w: int, leases: list[HeldLock], owner_start: float | None) -> Owner | None:
    from .detach import detached_run_owner, start_output

    out_r, err_r = pipes
    started: list[int] = []
    output = None
    try:
        watchdog.release()
        started.append(watchdog.pid)
        main.release()
        started.append(main.pid)
        output = start_output(corral, spec, record, {out_r: "stdout", err_r: "stderr"}, follow_stdio=False)
        running = record.replace(
            state="running", main_pid=main.pid, owner_pid=os.getpid(), owner_start=owner_start,
            helper_pids=[watchdog.pid], started_at=now_iso(),
            limits={"requested": spec.limits.requested(), "effective": limits}, isolation=sandbox.describe(),
            journal=output.journal is not None,
        )
        for lease in leases:
            lease.update_holder(owner_pid=os.getpid(), main_pid=main.pid)
        # This record is what names the owner: a detached run that cannot be recorded does not run.
        corral.store.save(running, durable=False)
    except BaseException as err:
        # A child whose release() failed has been reaped by it; one still held is aborted.
        if not started:
            main.abort()
        _end_unstarted(corral, record, cgroup, started, wd_fd, () if output else (out_r, err_r))
        if output is not None:
            output.finish()
        corral.store.save_or_warn(record.replace(state="failed", ended_by="spawn-failed", ended_at=now_iso(),
                                                 exit_code=getattr(err, "exit_code", 1)),
                                  f"run {record.id} did not start; its record could not say so")
        if isinstance(err, CorralError) and len(started) < 2:
            _tell(report_w, f"err {getattr(err, 'errno', 0) or 0} {err.message}")
            return None
        _tell(report_w, f"fail {getattr(err, 'message', None) or err!r}")
        if not isinstance(err, CorralError):
            raise  # told in the run's log, with its traceback
        return None
    _tell(report_w, "ok")
    return detached_run_owner(corral, spec, running, cgroup, (main.pid, watchdog.pid, wd_fd), sandbox.active, leases,
                              output, in_scope=False)


def _end_unstarted(corral: RunContext, record: RunRecord, cgroup: CgroupDir, started: list[int], wd_fd: int,
                   fds: tuple[int, ...]) -> None:
    """Kill what of the pair runs, reap it, and let the cgroup go. A watchdog that runs is
    told "done" first: it is us who end the run, not a lost owner (no ``.lost`` note)."""
    from .supervise import Owner
    from .watchdog import tell_watchdog_done

    if started:
        tell_watchdog_done(wd_fd)  # closes it
        corral.backend.teardown(cgroup)
    else:
        os.close(wd_fd)
    for pid in started:
        Owner._reap(pid)
    for fd in fds:
        os.close(fd)
    corral.backend.release(record.agent, record.id, cgroup)


def _tell(report_w: int, line: str) -> None:
    with contextlib.suppress(OSError):  # the caller is gone: nobody to tell
        os.write(report_w, line.encode() + b"\n")


def _read_line(fd: int) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        line += chunk
    return line
