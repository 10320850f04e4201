"""What ``ps`` and ``show`` report: one scan of the cgroup tree against the records.

A record that says a run is live is believed only while its cgroup is populated
(:func:`reconcile`); a live ``corral-*`` scope without a usable record is listed as
``unknown`` (ours, record unreadable) or, when asked, ``foreign`` (:func:`adopted`).
Records are read once per listing, and the cgroup files of live runs only.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..linux.cgroup import CgroupDir
from ..linux.procs import children, owner_alive
from ..records import END_STATES, RecordStore, RunRecord, now_iso, seconds_between

if TYPE_CHECKING:
    from ..backends import Backend


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
            "owner_pid": r.owner_pid,  # who waits for it (corral's shared owner, or the attached CLI)
            "pids": self.pids,
            "memory_bytes": self.memory_bytes,
            "memory_source": self.memory_source,
            "cpu_usec": self.cpu_usec,
            "peak_memory_bytes": r.peak_memory_bytes,
            "peak_memory_source": r.peak_memory_source,
            "duration_s": _duration(r),
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
            "journal": r.journal,
            "adopted": r.adopted,
            "problem": r.problem,
            "isolation": r.isolation or None,
        }


def adopted(backend: Backend, store: RecordStore, *, all_users: bool = False,
            known: frozenset[str] = frozenset()) -> dict[str, RunRecord]:
    """Live ``corral-*`` scopes this state dir has no usable record of: ours with an
    unreadable record (state ``unknown``), and with *all_users* the runs of other state
    dirs (another user, checkout or test; state ``foreign``), named by their uid. A run
    without a record here is never ours to list or touch by default."""
    out: dict[str, RunRecord] = {}
    for scope in backend.live_scopes():
        if scope.run_id in known:
            continue  # the caller has read its record already (ps)
        path = store.path(scope.run_id)
        state = "unknown"
        if path.exists():
            if store.load(scope.run_id) is not None:
                continue
            problem = f"record {path} is unreadable"
        elif all_users:
            state = "foreign"
            problem = f"a run of another corral state dir, {_whose(scope.cgroup)}"
        else:
            continue
        pids = sorted(scope.cgroup.pids())
        argv: list[str] = []
        if pids:
            try:
                raw = Path(f"/proc/{pids[0]}/cmdline").read_bytes().split(b"\0")[:-1]
                argv = [a.decode(errors="replace") for a in raw]
            except OSError:
                argv = []
        out[scope.run_id] = RunRecord(
            id=scope.run_id, agent=scope.agent, argv=argv, cwd="", backend=backend.name,
            unit=backend.unit_name(scope.agent, scope.run_id), cgroup=str(scope.cgroup.path),
            state=state, main_pid=pids[0] if pids else None, adopted=True, problem=problem,
        )
    return out


def reconcile(store: RecordStore, record: RunRecord) -> RunRecord:
    """A record that says live is believed only while its cgroup is populated."""
    if record.ended:
        return record
    cg = CgroupDir(Path(record.cgroup))
    if cg.events().populated:
        return record
    if owner_alive(record.owner_pid, record.owner_start) and record.owner_pid != os.getpid():
        # The owner is finishing (teardown, record write): give it a moment.
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            fresh = store.load(record.id)
            if fresh is not None and fresh.ended:
                return fresh
            if not owner_alive(record.owner_pid, record.owner_start):
                break
            time.sleep(0.02)
        fresh = store.load(record.id)
        if fresh is not None and (fresh.ended or record.state == "starting"):
            return fresh
    fresh = store.load(record.id)
    if fresh is not None and fresh.ended:
        return fresh
    lost = record.replace(state="lost", ended_by="lost-owner", ended_at=record.ended_at or now_iso())
    if not record.adopted:  # best effort: a listing must work on a full disk
        store.save_or_warn(lost, f"run {record.id} lost its owner; its record could not be updated")
    return lost


def view(backend: Backend, store: RecordStore, record: RunRecord) -> RunView:
    record = reconcile(store, record)
    if record.ended:
        return RunView(record, record.state, 0, None, record.cpu_usec)
    cg = CgroupDir(Path(record.cgroup))
    ev = cg.commands.events()
    usage = backend.usage(cg)
    state = "paused" if ev.frozen else (record.state if record.state in ("starting", "draining", "unknown",
                                                                      "foreign") else "running")
    pids = usage.pids
    if pids and (record.isolation or {}).get("level") not in (None, "none"):
        pids -= _sandbox_helpers(record)  # count the command's, not bwrap's
    return RunView(record, state, pids, usage.memory_bytes, usage.cpu_usec, usage.memory_source)


def list_views(backend: Backend, store: RecordStore, *, all: bool = False, all_users: bool = False) -> list[RunView]:
    """Live runs (and, with *all*, ended ones), oldest first. Includes our scopes whose
    record is unreadable; with *all_users*, the live runs of other state dirs too."""
    views = [view(backend, store, r) for r in store.all()]
    known = frozenset(v.record.id for v in views)
    views += [view(backend, store, r) for r in adopted(backend, store, all_users=all_users, known=known).values()]
    if not all:
        views = [v for v in views if v.state not in END_STATES]
    views.sort(key=lambda v: (v.record.started_at or "", v.record.id))
    return views


def processes(record: RunRecord) -> list[dict[str, Any]]:
    """Every process in the run's scope, each with its ``ppid``, ``argv``, resident memory
    (``rss_bytes``), CPU time (``cpu_s``, user + system) and ``role``: ``main`` (the
    command), ``command`` (what it started), ``leftover`` (in the payload, no longer
    below main: orphaned, or left behind), ``sandbox`` (bwrap and its init) and
    ``corral`` (the watchdog, and a detached run's owner, in ``supervisor/``)."""
    import psutil

    out = []
    scope = CgroupDir(Path(record.cgroup))
    roles = {pid: "corral" for pid in scope.supervisor.pids()}
    for pid in scope.commands.pids():
        roles[pid] = "leftover"
    for pid in sorted(roles):
        try:
            proc = psutil.Process(pid)
            with proc.oneshot():
                argv = proc.cmdline()
                while argv and not argv[-1]:
                    argv.pop()  # a retitled owner (procs.set_process_title) pads with NULs
                times = proc.cpu_times()
                entry: dict[str, Any] = {"pid": pid, "ppid": proc.ppid(), "argv": argv,
                                         "rss_bytes": proc.memory_info().rss,
                                         "cpu_s": round(times.user + times.system, 2)}
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        except psutil.AccessDenied:
            entry = {"pid": pid, "ppid": None, "argv": [], "rss_bytes": None, "cpu_s": None}
        entry["role"] = roles[pid]
        out.append(entry)
    main = record.main_pid
    if (record.isolation or {}).get("level") not in (None, "none"):
        # main is bwrap; its child is the namespace's init; the init's child is the command
        inits = {e["pid"] for e in out if e["ppid"] == main}
        for e in out:
            if e["pid"] == main or e["pid"] in inits:
                e["role"] = "sandbox"
        commands = [e["pid"] for e in out if e["ppid"] in inits]
        main = commands[0] if commands else None
    parent = {e["pid"]: e["ppid"] for e in out}
    for e in out:
        if e["role"] != "leftover":
            continue
        if e["pid"] == main:
            e["role"] = "main"
            continue
        up, seen = e["ppid"], 0
        while up in parent and up != main and seen < len(parent):
            up, seen = parent[up], seen + 1
        if main is not None and up == main:
            e["role"] = "command"
    return out


def _duration(record: RunRecord) -> float | None:
    """Seconds from start to end (to now for a live run), to the millisecond."""
    seconds = seconds_between(record.started_at, record.ended_at)
    return None if seconds is None else round(seconds, 3)


def _whose(cgroup: CgroupDir) -> str:
    """"uid N (name)" of who started a run we have no record of: its corral processes'
    (the watchdog, a detached owner), else its command's, else the cgroup dir's owner."""
    uid = None
    for pid in (*cgroup.supervisor.pids(), *cgroup.pids()):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("Uid:"):
                    uid = int(line.split()[1])
                    break
        except (OSError, ValueError, IndexError):
            continue
        if uid is not None:
            break
    if uid is None:
        try:
            uid = cgroup.path.stat().st_uid
        except OSError:
            return "started by an unknown user"
    import pwd

    try:
        return f"started by uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"started by uid {uid}"


def _sandbox_helpers(record: RunRecord) -> int:
    """How many of a sandboxed run's processes are bwrap's (bwrap, main, and the namespace's
    init, its child): two reads where the record names main, instead of one per process."""
    if record.main_pid is None or record.adopted:
        from ..isolation.sandbox import sandbox_pids

        return len(sandbox_pids(payload_of(record).pids()))
    inits = children(record.main_pid)
    if inits is None:
        return 0  # bwrap has exited: what is left is the command's (or nothing)
    return 1 + min(len(inits), 1)


def payload_of(record: RunRecord) -> CgroupDir:
    return CgroupDir(Path(record.cgroup)).commands
