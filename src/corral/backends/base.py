"""The abstract backend: one place for deadlines, verification and logging.

A concrete backend implements only the primitives that differ between a systemd
manager and a bare cgroup v2 tree: where ``corral.slice`` lives, how a run's cgroup is
made and how processes get into it, and how limits are applied and read back. Killing,
freezing, waiting and usage are the same kernel files either way and live here.
"""

from __future__ import annotations

import os
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .._log import log
from ..errors import TeardownIncomplete
from ..linux.cgroup import CgroupDir, find_v1_mount
from ..linux.procs import rss_sum
from ..names import agent_slice, parse_agent_slice, parse_scope_name, scope_name
from ..spec import Limits

# kernel file for each limit in cgroup v2 and in a v1 hierarchy (hybrid layouts)
_V2_FILES = {"memory_max": "memory.max", "memory_high": "memory.high", "cpu_quota": "cpu.max", "tasks_max": "pids.max"}
_V1_FILES = {
    "memory_max": ("memory", "memory.limit_in_bytes"),
    "memory_high": ("memory", "memory.soft_limit_in_bytes"),
    "cpu_quota": ("cpu", "cpu.cfs_quota_us"),
    "tasks_max": ("pids", "pids.max"),
}
_CONTROLLER = {"memory_max": "memory", "memory_high": "memory", "cpu_quota": "cpu", "tasks_max": "pids"}


@dataclass(frozen=True)
class LiveScope:
    agent: str
    run_id: str
    cgroup: CgroupDir


@dataclass(frozen=True)
class Usage:
    pids: int
    memory_bytes: int | None
    cpu_usec: int | None
    memory_source: str  # "cgroup" (memory.current) | "procfs-rss" (sum of the pids' RSS)


@dataclass
class Probe:
    """What a backend found when asked whether it can run here (``corral doctor``)."""

    name: str
    usable: bool
    reasons: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)


class Backend(ABC):
    name: ClassVar[str]

    def __init__(self, mount: Path) -> None:
        self.mount = Path(mount)  # the cgroup v2 mount point

    # --- primitives each backend implements -------------------------------------------

    @abstractmethod
    def slice_dir(self) -> Path:
        """Absolute cgroup v2 directory of ``corral.slice``."""

    @abstractmethod
    def prepare(self, agent: str, run_id: str, limits: Limits) -> CgroupDir:
        """Before any process exists: make what must exist for the run's cgroup."""

    @abstractmethod
    def adopt(
        self, agent: str, run_id: str, pids: list[int], *, description: str, limits: Limits, timeout: float | None,
        grace: float,
    ) -> dict[str, Any]:
        """After fork, before exec: make sure *pids* are in the run's cgroup.

        Returns the limits as requested and as in force (see :meth:`effective_limits`).
        """

    def release(self, agent: str, run_id: str, cgroup: CgroupDir) -> None:
        """After the run's cgroup is empty: remove the leaves corral made in it (the
        backend removes the rest)."""
        for leaf in (cgroup.payload, cgroup.supervisor):
            if not leaf.rmdir():
                leaf.wait_empty(2.0)
                leaf.rmdir()

    @staticmethod
    def make_leaves(cgroup: CgroupDir) -> None:
        """The run's scope holds two leaves: ``payload`` (the command and all it starts) and
        ``supervisor`` (corral's watchdog, and a detached run's owner). Killing the payload
        leaves the owner alive to reap, record and verify."""
        from ..errors import translate_oserror

        for leaf in (cgroup.payload, cgroup.supervisor):
            try:
                leaf.path.mkdir(exist_ok=True)
            except OSError as err:
                raise translate_oserror(err, what="create run cgroup", path=str(leaf.path)) from err

    def place_self(self, name: str) -> CgroupDir:
        """Move this process into a cgroup of its own, ``corral.slice/<name>``: corral's
        shared owner lives apart from whoever started it, so that their cgroup's end (a
        logout, a stopped service) is not the end of the runs it owns. Here: a directory
        (cgroupfs; systemd's backend asks for a scope). Raises OSError where it may not."""
        from ..linux.cgroup import join

        cg = CgroupDir(self.slice_dir() / name)
        cg.path.mkdir(parents=True, exist_ok=True)
        join(str(cg.path))
        return cg

    def connect(self) -> None:
        """Before a run is recorded or forked: reach whatever starting it needs (the
        systemd backend opens its bus here), so that failing to costs nothing."""

    def close(self) -> None:
        """Release connections."""

    def apply_budget(self, limits: Limits) -> None:
        """The ``[corral]`` budget: limits on corral.slice, i.e. on all agent work together.
        Here: the kernel files where the controllers are available (cgroupfs)."""
        root = CgroupDir(self.slice_dir())
        try:
            root.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            log.warning("cannot create %s for the budget: %s", root.path, err)
            return
        for name, value in v2_limit_files(limits).items():
            if (root.path / name).exists():
                try:
                    (root.path / name).write_text(value)
                except OSError as err:
                    log.warning("budget %s=%s on %s: %s", name, value, root.path, err)

    # --- shared -------------------------------------------------------------------------

    def unit_name(self, agent: str, run_id: str) -> str:
        return scope_name(agent, run_id)

    def run_cgroup(self, agent: str, run_id: str) -> CgroupDir:
        return CgroupDir(self.slice_dir() / agent_slice(agent) / scope_name(agent, run_id))

    def live_scopes(self) -> list[LiveScope]:
        """Every ``corral-<agent>-<id>.scope`` directory under ``corral.slice``."""
        out: list[LiveScope] = []
        root = self.slice_dir()
        try:
            slices = os.listdir(root)
        except (FileNotFoundError, NotADirectoryError):
            return out
        for slice_name in slices:
            agent = parse_agent_slice(slice_name)
            if agent is None:
                continue
            try:
                scopes = os.listdir(root / slice_name)
            except (FileNotFoundError, NotADirectoryError):
                continue
            for name in scopes:
                parsed = parse_scope_name(name)
                if parsed and parsed[0] == agent:
                    out.append(LiveScope(agent, parsed[1], CgroupDir(root / slice_name / name)))
        return out

    def usage(self, cgroup: CgroupDir) -> Usage:
        """Usage of a run: process count of its payload, memory and CPU of the whole scope."""
        pids = cgroup.commands.pids()
        memory = cgroup.read_int("memory.current")
        source = "cgroup"
        if memory is None:
            # memory is not a v2 controller here (hybrid layout): sum the processes' RSS.
            memory, source = rss_sum(pids), "procfs-rss"
        return Usage(pids=len(pids), memory_bytes=memory, cpu_usec=cgroup.cpu_usec(), memory_source=source)

    def effective_limits(self, cgroup: CgroupDir, limits: Limits, unit_values: dict[str, Any] | None = None) -> dict[str, Any]:
        """Requested vs. what the kernel enforces, read back from the cgroup files."""
        out: dict[str, Any] = {}
        for key, requested in limits.requested().items():
            entry: dict[str, Any] = {"requested": requested}
            if unit_values and key in unit_values:
                entry["unit"] = unit_values[key]
            kernel = _read_limit(cgroup, key)
            if kernel is None:
                entry["effective"] = None
                entry["enforced"] = False
                entry["note"] = (
                    f"not enforced here: the {_CONTROLLER[key]} controller is not available "
                    f"to this cgroup (see: corral doctor)"
                )
            else:
                entry["effective"] = kernel
                entry["enforced"] = kernel not in (-1,)
            out[key] = entry
        return out

    def teardown(self, cgroup: CgroupDir, *, timeout: float = 10.0) -> None:
        """SIGKILL the whole cgroup and return once ``populated 0``; raise with survivors.

        Why ``cgroup.kill`` and then ``populated 0``: one write to ``cgroup.kill`` SIGKILLs
        every process below, forks in flight included, so nothing escapes by forking faster
        than a pid-by-pid kill walks the list (a tree kill by parent pid also misses what
        double-forked away). But SIGKILL is delivered, not finished: the processes are gone
        only when ``cgroup.events`` says ``populated 0`` (waited on with poll(2)). Returning
        before that would let ``ps`` show a killed run as live, and a session's next run
        start beside its predecessor's last processes.
        """
        t0 = time.monotonic()
        cgroup.kill()
        if not cgroup.wait_empty(timeout):
            survivors = cgroup.pids()
            raise TeardownIncomplete(
                f"{cgroup.path} still has {len(survivors)} process(es) after SIGKILL: {survivors[:20]}",
                survivors=survivors,
                hint="processes in uninterruptible sleep (D state) die when their I/O completes; "
                "check: ps -o pid,stat,wchan -p " + ",".join(map(str, survivors[:20])),
            )
        log.debug("teardown of %s took %.1f ms", cgroup.path, (time.monotonic() - t0) * 1000)

    def stop(self, cgroup: CgroupDir, *, grace: float, on_term: Callable[[int], None] | None = None,
             on_escalate: Callable[[int], None] | None = None) -> bool:
        """SIGTERM everything, wait *grace*, then kill whole. True if SIGTERM sufficed.
        *on_term* hears how many processes got SIGTERM; *on_escalate* how many were still
        there at the deadline, just before they get SIGKILL."""
        signalled = cgroup.signal_all(signal.SIGTERM)
        if on_term is not None:
            on_term(len(signalled))
        if cgroup.wait_empty(grace):
            return True
        if on_escalate is not None:
            on_escalate(len(cgroup.pids()))
        self.teardown(cgroup)
        return False

    def freeze(self, cgroup: CgroupDir, frozen: bool) -> None:
        """``cgroup.freeze`` on the payload, for both backends: the kernel file works on
        hybrid hosts too, and freezes only the payload (systemd's FreezeUnit would freeze
        the whole unit, watchdog and detached owner included)."""
        if not cgroup.set_frozen(frozen):
            raise TeardownIncomplete(f"{cgroup.path} did not {'freeze' if frozen else 'thaw'} in time", survivors=[])

    def probe(self) -> Probe:
        return Probe(self.name, True)


def v2_limit_files(limits: Limits) -> dict[str, str]:
    """The cgroup v2 file and value for each limit that is set (cpu.max: quota per 100 ms)."""
    values = {"memory.max": limits.memory_max, "memory.high": limits.memory_high, "pids.max": limits.tasks_max,
              "cpu.max": f"{int(limits.cpu_quota * 1000)} 100000" if limits.cpu_quota else None}
    return {name: str(value) for name, value in values.items() if value is not None}


def _read_limit(cgroup: CgroupDir, key: str) -> int | float | None:
    if (cgroup.path / _V2_FILES[key]).exists():
        try:
            text = cgroup.read_words(_V2_FILES[key])
        except OSError:  # the run ended and its cgroup went meanwhile
            return None
        if key == "cpu_quota":
            return -1 if text[0] == "max" else round(int(text[0]) * 100 / int(text[1]), 2)
        return -1 if text[0] == "max" else int(text[0])
    controller, name = _V1_FILES[key]
    mount = find_v1_mount(controller)
    if mount is None:
        return None
    # The v2 path relative to its mount is the same path in each v1 hierarchy on hybrid hosts.
    rel = _relative_cgroup(cgroup.path)
    if rel is None:
        return None
    path = mount / rel / name
    try:
        value = int(path.read_text().split()[0]) if path.exists() else None
    except (OSError, ValueError):
        return None
    if value is None:
        return None
    if key == "cpu_quota":
        if value < 0:
            return -1
        period = int((path.parent / "cpu.cfs_period_us").read_text())
        return round(value * 100 / period, 2)
    if key in ("memory_max", "memory_high") and value >= 2**62:
        return -1
    return value


def _relative_cgroup(path: Path) -> str | None:
    from ..linux.cgroup import find_cgroup2_mount

    mount = find_cgroup2_mount()
    if mount is None:
        return None
    try:
        return str(path.relative_to(mount))
    except ValueError:
        return None
