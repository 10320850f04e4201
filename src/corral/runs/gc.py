"""``corral gc``: tear down runs whose owner is gone, remove empty cgroups, prune old records.

A run is owned while its owner process lives (the attached ``corral run``, or a detached
run's owner in ``supervisor/``). A populated scope with no live owner is work nobody can
wait on or stop any more: it is killed whole and its record says ``lost``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ..linux.cgroup import CgroupDir
from ..linux.procs import owner_alive
from ..records import now_iso
from .listing import reconcile

if TYPE_CHECKING:
    from .context import RunContext

DEFAULT_RETENTION = 7 * 86400.0


@dataclass
class GcReport:
    reaped: list[dict[str, Any]] = field(default_factory=list)
    removed_cgroups: list[str] = field(default_factory=list)
    pruned_records: list[str] = field(default_factory=list)
    swept_temps: list[str] = field(default_factory=list)  # temp files of writers killed mid-write

    def to_json(self) -> dict[str, Any]:
        return {"reaped": self.reaped, "removed_cgroups": self.removed_cgroups, "pruned_records": self.pruned_records,
                "swept_temps": self.swept_temps}


def _owner_alive(corral: RunContext, run_id: str, scope: CgroupDir) -> bool:
    """Is someone still guarding this run? Its recorded owner, if we have a record with
    one. Otherwise (a run of another state dir, or one still starting) corral's processes
    in ``supervisor/``: a running watchdog means an owner holds its pipe (it kills the run
    itself the moment that owner dies), a detached owner lives there too. Only a stopped
    (SIGSTOP/traced) one cannot act."""
    record = corral.store.load(run_id)
    if record is not None and record.owner_pid:
        return owner_alive(record.owner_pid, record.owner_start)
    if record is None and corral.store.path(run_id).exists():
        return False  # a record we cannot read names no owner we could verify (pid + start time)
    for pid in scope.supervisor.pids():
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        if stat[stat.rindex(b")") + 2:].split()[0] not in (b"T", b"t", b"Z", b"X"):
            return True
    return False


def collect(corral: RunContext, *, retention: float = DEFAULT_RETENTION) -> GcReport:
    report = GcReport()
    backend = corral.backend
    for scope in backend.live_scopes():
        cg = scope.cgroup
        if not corral.store.path(scope.run_id).exists():
            continue  # another state dir's run (another user, checkout or test): not ours to judge
        if cg.events().populated:
            if _owner_alive(corral, scope.run_id, cg):
                continue
            from ..isolation.sandbox import sandbox_pids

            members = cg.commands.pids()
            pids = len(members) - len(sandbox_pids(members))  # the command's, not bwrap's
            backend.teardown(cg)
            record = corral.store.load(scope.run_id)
            if record is not None and not record.ended:
                corral.store.save_or_warn(record.replace(state="lost", ended_by="lost-owner", ended_at=now_iso(),
                                                         leftovers_killed=pids),
                                          f"reaped run {record.id}, but its record could not be updated")
            report.reaped.append({"id": scope.run_id, "agent": scope.agent, "unit": backend.unit_name(
                scope.agent, scope.run_id), "processes_killed": pids})
        else:
            record = corral.store.load(scope.run_id)
            if record is not None and not record.ended and owner_alive(record.owner_pid, record.owner_start):
                continue  # starting (nothing placed in it yet) or its owner is finishing
        backend.release(scope.agent, scope.run_id, cg)
        if not cg.exists():
            report.removed_cgroups.append(str(cg.path))
    # agent slices left empty (cgroupfs; systemd keeps slice units, which cost nothing)
    root = backend.slice_dir()
    try:
        entries = list(os.scandir(root)) if backend.name == "cgroupfs" else []
    except FileNotFoundError:  # the last run's release removed it meanwhile
        entries = []
    for entry in entries:
        # agent slices, and the cgroup of a shared owner that could not remove its own
        if entry.is_dir() and entry.name.startswith("corral-") and entry.name.endswith((".slice", ".scope")):
            try:
                os.rmdir(entry.path)
                report.removed_cgroups.append(entry.path)
            except OSError:
                pass
    report.swept_temps = corral.store.sweep_temps()
    # records: reconcile live-looking ones, prune ended ones past retention
    cutoff = time.time() - retention
    for record in list(corral.store.all()):
        record = reconcile(corral.store, record)
        if not record.ended or not record.ended_at:
            continue
        try:
            ended = datetime.fromisoformat(record.ended_at).timestamp()
        except ValueError:
            continue
        if ended < cutoff:
            corral.store.delete(record.id)
            report.pruned_records.append(record.id)
    return report

