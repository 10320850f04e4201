"""Run records: one JSON file per run in the state dir, written atomically.

A record is written when a run is planned (``starting``), when its processes are in the
unit (``running``) and when it ends. Writes go to a unique temp file in the same
directory and are renamed over the record, so a reader sees the old or the new record,
never a torn one. Only the end is made durable (file and directory fsynced): while a run
lives its cgroup is the truth (a run whose record is missing or unreadable is still
listed, as ``unknown``, and can be killed), and a power loss that takes a start record
also takes the run; the end is the part that has no other witness. One durable write per
run instead of three: 2 fsyncs, not 6, on the launch path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import CorralError, RunNotFound, UsageError, translate_oserror
from .names import is_run_id

LIVE_STATES = ("starting", "running", "paused", "draining")
END_STATES = ("exited", "failed", "killed", "timeout", "lost")


def iso_utc(when: datetime) -> str:
    """The stamp format of every record and log line: ISO 8601 UTC, to the ms, with Z."""
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def now_iso() -> str:
    return iso_utc(datetime.now(UTC))


def parse_stamp(stamp: str | None) -> datetime | None:
    """A record's stamp as an aware datetime (a naive one is UTC), or None if it is not one."""
    if not stamp:
        return None
    try:
        when = datetime.fromisoformat(stamp)
    except (TypeError, ValueError):
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def seconds_between(start: str | None, end: str | None = None, now: float | None = None) -> float | None:
    """Seconds from stamp *start* to *end* (None: to *now*, default the wall clock), never
    negative; None if *start* (or a given *end*) is not a stamp. Ages and durations."""
    began = parse_stamp(start)
    if began is None:
        return None
    if end is None:
        return max((time.time() if now is None else now) - began.timestamp(), 0.0)
    ended = parse_stamp(end)
    return None if ended is None else max((ended - began).total_seconds(), 0.0)


@dataclass(frozen=True)
class RunRecord:
    id: str
    agent: str
    argv: list[str]
    cwd: str
    backend: str
    unit: str
    cgroup: str  # absolute path of the run's cgroup v2 directory
    state: str = "starting"
    detached: bool = False
    session: str | None = None
    main_pid: int | None = None
    owner_pid: int | None = None
    owner_start: float | None = None  # psutil create_time: tells a reused pid apart
    helper_pids: list[int] = field(default_factory=list)  # corral's own pids in the cgroup
    started_at: str | None = None
    ended_at: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    ended_by: str | None = None  # exited | killed | timeout | lost-owner | ...
    leftovers_killed: int | None = None
    timeout: float | None = None
    log: str | None = None
    limits: dict[str, Any] = field(default_factory=dict)
    isolation: dict[str, Any] = field(default_factory=dict)  # what was in effect (Sandbox.describe)
    adopted: bool = False  # found live by name, with no (usable) record of ours
    problem: str | None = None  # why an adopted run has no usable record
    grants: list[str] = field(default_factory=list)  # auth profiles the broker serves this run
    journal: bool = False  # its output also went to the journal (runs/output.py)
    # What it used, recorded at its end (runs/meter.py): an ended run keeps its numbers.
    peak_memory_bytes: int | None = None
    peak_memory_source: str | None = None  # memory.peak | sampled
    cpu_usec: int | None = None

    @property
    def ended(self) -> bool:
        return self.state in END_STATES

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunRecord:
        """Raises ValueError for anything that is not a record this version can use: a run
        writes its own record file, so a listing must survive whatever it finds there."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")  # noqa: TRY004 -- "bad data" is ValueError to every caller
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            record = cls(**{k: v for k, v in data.items() if k in names})
        except TypeError as err:
            raise ValueError(str(err)) from None
        for name, kinds in _FIELD_TYPES.items():
            value = getattr(record, name)
            if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
                raise ValueError(f"field {name!r} has the wrong type ({type(value).__name__})")
        if not is_run_id(record.id) or not all(isinstance(a, str) for a in (*record.argv, *record.grants)):
            raise ValueError("bad id or argv")
        # Whatever corral does to a run it does to this path (cgroup.kill, freeze): it must
        # name the run's own scope, never some other cgroup.
        scope = Path(record.cgroup)
        if not scope.is_absolute() or ".." in scope.parts or scope.name != f"corral-{record.agent}-{record.id}.scope" \
                or scope.parent.name != f"corral-{record.agent}.slice":
            raise ValueError(f"cgroup {record.cgroup!r} is not the run's scope")
        return record

    def replace(self, **changes: Any) -> RunRecord:
        return dataclasses.replace(self, **changes)


_OPT_INT = (int, type(None))
_OPT_STR = (str, type(None))
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "id": (str,), "agent": (str,), "argv": (list,), "cwd": (str,), "backend": (str,), "unit": (str,),
    "cgroup": (str,), "state": (str,), "detached": (bool,), "session": _OPT_STR, "main_pid": _OPT_INT,
    "owner_pid": _OPT_INT, "owner_start": (int, float, type(None)), "helper_pids": (list,), "started_at": _OPT_STR,
    "ended_at": _OPT_STR, "exit_code": _OPT_INT, "signal": _OPT_INT, "ended_by": _OPT_STR,
    "leftovers_killed": _OPT_INT, "timeout": (int, float, type(None)), "log": _OPT_STR, "limits": (dict,),
    "isolation": (dict,), "adopted": (bool,), "problem": _OPT_STR, "grants": (list,), "journal": (bool,),
    "peak_memory_bytes": _OPT_INT, "peak_memory_source": _OPT_STR, "cpu_usec": _OPT_INT,
}


def _remove_empty_cgroup(scope: Path) -> None:
    """rmdir a cgroupfs run's leaves, scope and agent slice, where empty (EBUSY otherwise)."""
    for path in (scope / "payload", scope / "supervisor", scope, scope.parent):
        try:
            os.rmdir(path)
        except OSError:
            pass


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600, durable: bool = True) -> None:
    """temp file in the same dir + fsync + rename + dir fsync. Readers see the old or the
    new content, never a torn one. *durable=False* skips both fsyncs: still atomic against
    a crash of the writer, not against a power loss (for files that need only the former)."""
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        if durable:
            os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if not durable:
        return
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class RecordStore:
    """The ``runs/`` directory of the state dir."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)

    def ensure(self) -> None:
        try:
            # The state dir may be traversed (a dropped-uid run's bwrap reaches its strict
            # home below it) but not listed; records and logs are the owner's alone: argv
            # and env may hold secrets.
            self.dir.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
            self.dir.mkdir(exist_ok=True, mode=0o700)
            st = self.dir.stat()
            if st.st_uid == os.geteuid() and st.st_mode & 0o077:
                os.chmod(self.dir, 0o700)  # made 0755 by an older corral
        except OSError as err:
            raise translate_oserror(err, what="create state dir", path=str(self.dir)) from err

    def path(self, run_id: str) -> Path:
        return self.dir / f"{run_id}.json"

    def log_path(self, run_id: str) -> Path:
        return self.dir / f"{run_id}.log"

    def lost_path(self, run_id: str) -> Path:
        """The watchdog's note that the run's owner died and it killed the run (its time)."""
        return self.dir / f"{run_id}.lost"

    def _with_lost_note(self, record: RunRecord, noted: bool | None) -> RunRecord:
        """*noted*: whether a listing of runs/ showed a note (None: not known, look)."""
        if record.ended or noted is False:
            return record
        try:
            when = self.lost_path(record.id).read_text().strip()
        except OSError:
            return record
        return record.replace(state="lost", ended_by="lost-owner", ended_at=when or now_iso())

    def settle_lost(self) -> int:
        """Write the ends the watchdogs noted into the records and remove what is left of
        those runs' cgroup directories (cgroupfs: systemd collects its own scopes). Cheap
        enough for every command: one listing of runs/. Best effort, never raises."""
        try:
            notes = [n for n in os.listdir(self.dir) if n.endswith(".lost")]
        except OSError:
            return 0
        settled = 0
        for name in notes:
            run_id = name[:-5]
            record = self.load(run_id, noted=True)
            if record is None:
                continue
            gone = True
            if record.backend == "cgroupfs":
                _remove_empty_cgroup(Path(record.cgroup))
                gone = not os.path.exists(record.cgroup)  # else: the watchdog is still leaving
            if self.save_or_warn(record, f"run {run_id} lost its owner; its record could not be updated") and gone:
                with contextlib.suppress(OSError):
                    os.unlink(self.lost_path(run_id))
                settled += 1
        return settled

    def save(self, record: RunRecord, *, durable: bool = True) -> RunRecord:
        """Write *record* atomically; *durable* (the default, and for every end) also
        fsyncs it; a record of a live run need not be (see the module's docstring)."""
        self.ensure()
        data = json.dumps(record.to_json(), indent=1, sort_keys=True).encode()
        try:
            atomic_write(self.path(record.id), data, durable=durable)
        except OSError as err:
            raise translate_oserror(err, what="write run record", path=str(self.path(record.id))) from err
        return record

    def save_or_warn(self, record: RunRecord, why: str, *, durable: bool = True) -> bool:
        """Save, but never fail the caller: for writes whose loss costs only history (the
        end of a run that already ended; a listing noting a lost owner). A full or
        read-only state dir must not take the command's exit status, the teardown or the
        listing with it. Returns whether the record was written."""
        try:
            self.save(record, durable=durable)
            return True
        except (CorralError, OSError) as err:
            import sys

            print(f"corral: warning: {why}: {getattr(err, 'message', err)}", file=sys.stderr)
            return False

    def load(self, run_id: str, *, noted: bool | None = None) -> RunRecord | None:
        try:
            data = json.loads(self.path(run_id).read_bytes())
            return self._with_lost_note(RunRecord.from_json(data), noted)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, RecursionError):
            return None  # unreadable or foreign: treated as absent, never fatal

    def all(self) -> Iterator[RunRecord]:
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return
        lost = {n[:-5] for n in names if n.endswith(".lost")}  # no open per record to look for one
        for name in sorted(names):
            if name.endswith(".json") and is_run_id(name[:-5]):
                record = self.load(name[:-5], noted=name[:-5] in lost)
                if record is not None:
                    yield record

    def resolve(self, ref: str) -> str:
        """A full run id from an id or a unique prefix of one."""
        if not ref or not all(c in "0123456789abcdef" for c in ref):
            raise RunNotFound(ref)
        if is_run_id(ref):
            return ref
        try:
            matches = sorted(n[:-5] for n in os.listdir(self.dir) if n.startswith(ref) and n.endswith(".json"))
        except FileNotFoundError:
            matches = []
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise UsageError(f"run id prefix {ref!r} is ambiguous: {', '.join(matches[:5])}")
        raise RunNotFound(ref)

    def sweep_temps(self, older_than: float = 3600.0) -> list[str]:
        """Remove the temp files of writers killed mid-write (``.ID.json.*.tmp``); a live
        writer renames its temp file within milliseconds, so an hour-old one is debris."""
        import time

        removed: list[str] = []
        try:
            entries = list(os.scandir(self.dir))
        except FileNotFoundError:
            return removed
        cutoff = time.time() - older_than
        for entry in entries:
            if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                try:
                    if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                        os.unlink(entry.path)
                        removed.append(entry.name)
                except OSError:
                    pass
        return removed

    def delete(self, run_id: str) -> None:
        log = self.log_path(run_id)
        for path in (self.path(run_id), log, log.with_name(log.name + ".1"), self.lost_path(run_id)):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
