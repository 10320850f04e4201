"""The systemd backend: transient scopes over D-Bus, through pystemd.

A run is ``corral-<agent>-<id>.scope`` in ``corral-<agent>.slice`` (a child of
``corral.slice``). The processes are forked first, held before exec, moved into the
scope by ``StartTransientUnit(PIDs=...)``, and released only once the start job has
finished (``JobRemoved``), so nothing the command starts can be born outside it.

System manager as root, the user's manager (``systemd --user``) otherwise. One bus
connection per backend object; calls go straight to ``call_method`` with known
signatures, skipping pystemd's per-object introspection on the hot path.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import select
import time
from pathlib import Path
from typing import Any

from .._log import log
from ..errors import BackendError, CorralError, NoBackend, PermissionDenied
from ..linux.cgroup import CgroupDir, find_cgroup2_mount
from ..names import ROOT_SLICE, agent_slice, scope_name
from ..spec import Limits
from .base import Backend, Probe

DEST = b"org.freedesktop.systemd1"
PATH = b"/org/freedesktop/systemd1"
MANAGER = b"org.freedesktop.systemd1.Manager"
START_JOB_TIMEOUT = 15.0
UINT64_MAX = 2**64 - 1


def _translate(err: Exception, what: str) -> Exception:
    """pystemd's D-Bus errors become corral's, once, here."""
    text = str(err)
    name = type(err).__name__
    if "AccessDenied" in name or "Access denied" in text or "EPERM" in text or "InteractiveAuthorization" in name:
        return PermissionDenied(f"{what}: systemd refused: {text}", hint="run as root, or as yourself against your user manager")
    return BackendError(f"{what}: {name}: {text}")


PYSTEMD_HINT = ("pip install 'corral[systemd]' (builds pystemd: needs gcc, pkg-config and libsystemd-dev; "
                "`make deps` installs them), or use the cgroupfs backend")


def pystemd_missing() -> str | None:
    """Why pystemd cannot be imported, or None. It is an extra (corral[systemd]): a plain
    pip install needs no compiler and gets the cgroupfs backend only."""
    try:
        import pystemd.dbuslib  # noqa: F401
    except ImportError as err:
        return f"pystemd is not installed ({err})"
    return None


UNREACHABLE_HINT = ("is systemd PID 1 here? For a user manager, is XDG_RUNTIME_DIR set? "
                    "Use --backend cgroupfs where systemd is not the init (see: corral doctor)")


def _bus_socket_paths(user_mode: bool) -> tuple[Path, Path]:
    """Where a manager is reached: the bus, else systemd's private socket."""
    if not user_mode:
        return Path("/run/dbus/system_bus_socket"), Path("/run/systemd/private")
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.geteuid()}"
    return Path(runtime, "bus"), Path(runtime, "systemd/private")


def _bus_sockets(user_mode: bool) -> bool:
    if user_mode and os.environ.get("DBUS_SESSION_BUS_ADDRESS"):
        return True
    return any(p.exists() for p in _bus_socket_paths(user_mode))


def _open_bus(user_mode: bool) -> Any:
    """Connect to the manager: the bus first, then systemd's private socket."""
    missing = pystemd_missing()
    if missing is not None:
        raise NoBackend(f"the systemd backend needs pystemd: {missing}", hint=PYSTEMD_HINT)
    from pystemd.dbuslib import DBus, DBusAddress

    errors: list[str] = []
    try:
        bus = DBus(user_mode=user_mode)
        bus.open()
        return bus
    except Exception as err:  # noqa: BLE001 - any failure means: try the next way in
        errors.append(f"{'user' if user_mode else 'system'} bus: {err}")
    private = _bus_socket_paths(user_mode)[1]
    if private.exists():
        try:
            bus = DBusAddress(f"unix:path={private}".encode(), peer_to_peer=True)
            bus.open()
            return bus
        except Exception as err:  # noqa: BLE001
            errors.append(f"{private}: {err}")
    else:
        errors.append(f"{private}: no such socket")
    raise NoBackend("systemd is not reachable: " + "; ".join(errors), hint=UNREACHABLE_HINT)


def _prop_args(props: list[tuple[str, str, Any]]) -> list[Any]:
    from pystemd.dbuslib import apply_signature

    args: list[Any] = [(ord(b"a"), b"(sv)")]
    for name, sig, value in props:
        args += [(ord(b"r"), b"sv"), (ord(b"s"), name.encode()), (ord(b"v"), sig.encode())]
        args += apply_signature(sig.encode(), [value])
        args += [(-1, None), (-1, None)]
    args += [(-1, None)]
    return args


def _limit_props(limits: Limits) -> list[tuple[str, str, Any]]:
    """Unit properties for corral's limits (CPUQuota is in usec of CPU per second)."""
    props: list[tuple[str, str, Any]] = []
    if limits.memory_max is not None:
        props.append(("MemoryMax", "t", limits.memory_max))
    if limits.memory_high is not None:
        props.append(("MemoryHigh", "t", limits.memory_high))
    if limits.tasks_max is not None:
        props.append(("TasksMax", "t", limits.tasks_max))
    if limits.cpu_quota is not None:
        props.append(("CPUQuotaPerSecUSec", "t", int(limits.cpu_quota * 10_000)))
    return props


class SystemdBackend(Backend):
    """The bus is opened on first use: listing runs (``ps``, ``kill --all``'s scan, ``top``)
    reads the cgroup tree only, so it neither imports pystemd (~15 ms) nor talks D-Bus.
    Opening the backend checks only that a manager socket is there to connect to."""

    name = "systemd"

    def __init__(self, *, user_mode: bool | None = None, mount: Path | None = None) -> None:
        found = mount or find_cgroup2_mount()
        if found is None:
            raise NoBackend("no cgroup2 mount found in /proc/self/mountinfo")
        super().__init__(found)
        self.user_mode = os.geteuid() != 0 if user_mode is None else user_mode
        if importlib.util.find_spec("pystemd") is None:  # found, not imported: that waits for the bus
            raise NoBackend("the systemd backend needs pystemd: it is not installed", hint=PYSTEMD_HINT)
        if not _bus_sockets(self.user_mode):
            raise NoBackend(
                f"systemd is not reachable: no {'user' if self.user_mode else 'system'} bus socket "
                f"({', '.join(map(str, _bus_socket_paths(self.user_mode)))})",
                hint=UNREACHABLE_HINT)
        self._subscribed = False
        self._done_jobs: dict[bytes, bytes] = {}
        self._removed_units: set[bytes] = set()
        self._handled = 0  # signals our callbacks took: see _processed

    @functools.cached_property
    def bus(self) -> Any:
        bus = _open_bus(self.user_mode)
        try:  # the manager's version: proof that it is one
            self._version: str = bus.get_property(DEST, PATH, MANAGER, b"Version", b"s").decode()
        except Exception as err:
            raise NoBackend(f"systemd answered but not as a manager: {err}") from err
        return bus

    @property
    def version(self) -> str:
        self.connect()
        return self._version

    @functools.cached_property
    def manager_cgroup(self) -> str:
        """The manager's own cgroup: "/" for the system manager; the user manager lives in
        user@UID.service, where systemd always puts it (asked over the bus only if not)."""
        if not self.user_mode:
            return "/"
        uid = os.geteuid()
        usual = f"/user.slice/user-{uid}.slice/user@{uid}.service"
        if (self.mount / usual.lstrip("/")).is_dir():
            return usual
        return str(self._manager_prop(b"ControlGroup", b"s").decode())

    def connect(self) -> None:
        self.bus  # noqa: B018 -- opens it, or raises NoBackend

    # --- D-Bus helpers ----------------------------------------------------------------

    def _manager_prop(self, name: bytes, sig: bytes) -> Any:
        return self.bus.get_property(DEST, PATH, MANAGER, name, sig)

    def _call(self, method: bytes, args: list[Any], what: str) -> Any:
        try:
            return self.bus.call_method(DEST, PATH, MANAGER, method, args).body
        except Exception as err:
            raise _translate(err, what) from err

    def _unit_path(self, unit: str) -> bytes:
        from pystemd.dbuslib import path_encode

        path: bytes = path_encode(b"/org/freedesktop/systemd1/unit", unit.encode())
        return path

    def _subscribe(self) -> None:
        if self._subscribed:
            return

        def on_job_removed(msg: Any, error: Any = None, userdata: Any = None) -> None:
            self._handled += 1
            msg.process_reply(False)
            _id, job, _unit, result = msg.body
            self._done_jobs[job] = result

        def on_unit_removed(msg: Any, error: Any = None, userdata: Any = None) -> None:
            self._handled += 1
            msg.process_reply(False)
            self._removed_units.add(msg.body[0])

        # pystemd keeps only a borrowed pointer to each callback: we must hold the references.
        self._callbacks = (on_job_removed, on_unit_removed)
        self.bus.match_signal(DEST, PATH, MANAGER, b"JobRemoved", on_job_removed)
        self.bus.match_signal(DEST, PATH, MANAGER, b"UnitRemoved", on_unit_removed)
        self._call(b"Subscribe", [], "subscribe to systemd")
        self._subscribed = True

    def _wait_job(self, job: bytes, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while job not in self._done_jobs:
            if self._processed():
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise BackendError(f"systemd job {job.decode()} did not finish within {timeout:.0f}s")
            self._wait_bus(min(left, 1.0))
        return self._done_jobs.pop(job)

    def _processed(self) -> bool:
        """One message handled? pystemd's process() returns an empty message for one a
        callback took as for none: our count tells (else we would wait on what sd-bus holds)."""
        before = self._handled
        return not self.bus.process().is_empty() or self._handled != before

    def _wait_bus(self, seconds: float) -> None:
        """Until the bus has something to read, or *seconds*. Not pystemd's ``wait()``:
        that holds the GIL for as long, and corral's shared owner has a thread per run."""
        poller = select.poll()
        poller.register(self.bus.get_fd(), select.POLLIN)
        poller.poll(seconds * 1000)

    # --- primitives ---------------------------------------------------------------------

    def slice_dir(self) -> Path:
        return self.mount / self.manager_cgroup.lstrip("/") / ROOT_SLICE

    def prepare(self, agent: str, run_id: str, limits: Limits) -> CgroupDir:
        return self.run_cgroup(agent, run_id)  # systemd makes it in adopt()

    def adopt(self, agent, run_id, pids, *, description, limits, timeout, grace):  # type: ignore[no-untyped-def]
        unit = scope_name(agent, run_id)
        props: list[tuple[str, str, Any]] = [
            ("Description", "s", description),
            ("Slice", "s", agent_slice(agent)),
            ("PIDs", "au", [int(p) for p in pids]),
            ("CollectMode", "s", "inactive-or-failed"),
            # corral splits the scope into payload/ and supervisor/ leaves
            ("Delegate", "b", True),
            ("TimeoutStopUSec", "t", int(grace * 1_000_000)),
        ]
        props += _limit_props(limits)
        if timeout is not None:
            props.append(("RuntimeMaxUSec", "t", int(timeout * 1_000_000)))
        from pystemd.dbuslib import apply_signature

        self._subscribe()
        args = apply_signature(b"ss", [unit.encode(), b"fail"]) + _prop_args(props)
        args += [(ord(b"a"), b"(sa(sv))"), (-1, None)]
        t0 = time.monotonic()
        job = self._call(b"StartTransientUnit", args, f"start {unit}")
        result = self._wait_job(job, START_JOB_TIMEOUT)
        log.debug("StartTransientUnit %s: %s in %.1f ms", unit, result.decode(), (time.monotonic() - t0) * 1000)
        if result != b"done":
            raise BackendError(f"systemd could not start {unit}: job result {result.decode()!r}")
        self.make_leaves(self.run_cgroup(agent, run_id))
        return self.effective_limits(self.run_cgroup(agent, run_id), limits, self._unit_limits(unit, limits))

    def _unit_limits(self, unit: str, limits: Limits) -> dict[str, Any]:
        """The limits as the manager holds them (it may hold what the kernel does not)."""
        wanted = {
            "memory_max": (b"MemoryMax", b"t"),
            "memory_high": (b"MemoryHigh", b"t"),
            "tasks_max": (b"TasksMax", b"t"),
            "cpu_quota": (b"CPUQuotaPerSecUSec", b"t"),
        }
        out: dict[str, Any] = {}
        path = self._unit_path(unit)
        for key in limits.requested():
            prop, sig = wanted[key]
            try:
                value = self.bus.get_property(DEST, path, b"org.freedesktop.systemd1.Scope", prop, sig)
            except Exception as err:  # noqa: BLE001
                log.debug("read back %s of %s: %s", prop, unit, err)
                continue
            if value == UINT64_MAX:
                out[key] = None
            elif key == "cpu_quota":
                out[key] = value / 10_000
            else:
                out[key] = value
        return out

    def place_self(self, name: str) -> CgroupDir:
        """A transient scope ``<name>`` in corral.slice around this process (see Backend)."""
        from pystemd.dbuslib import apply_signature

        props: list[tuple[str, str, Any]] = [
            ("Description", "s", "corral: the shared owner of detached runs"), ("Slice", "s", ROOT_SLICE),
            ("PIDs", "au", [os.getpid()]), ("CollectMode", "s", "inactive-or-failed")]
        self._subscribe()
        args = apply_signature(b"ss", [name.encode(), b"fail"]) + _prop_args(props)
        args += [(ord(b"a"), b"(sa(sv))"), (-1, None)]
        result = self._wait_job(self._call(b"StartTransientUnit", args, f"start {name}"), START_JOB_TIMEOUT)
        if result != b"done":
            raise BackendError(f"systemd could not start {name}: job result {result.decode()!r}")
        return CgroupDir(self.slice_dir() / name)

    def release(self, agent: str, run_id: str, cgroup: CgroupDir) -> None:
        """Remove our leaves; systemd then sees the scope empty, stops and collects it. Wait
        for that briefly, so that a finished run is gone from ``systemctl`` on return.

        A scope whose processes all died before systemd attached them (corral killed
        between StartTransientUnit and exec) never gets an "empty" event: systemd keeps it
        active with nothing in it. Those are stopped explicitly."""
        super().release(agent, run_id, cgroup)
        unit = scope_name(agent, run_id)
        try:
            self.connect()
        except NoBackend as err:  # kill/stop/gc reached the cgroup without the bus: systemd collects the empty scope
            log.debug("release of %s without the bus: %s", unit, err.message)
            return
        if self._wait_removed(unit, cgroup, 0.25):
            return
        from pystemd.dbuslib import apply_signature

        try:
            self._call(b"StopUnit", apply_signature(b"ss", [unit.encode(), b"replace"]), f"stop {unit}")
        except CorralError as err:
            log.debug("stop of empty %s: %s", unit, err)
        self._wait_removed(unit, cgroup, 2.0)

    def _wait_removed(self, unit: str, cgroup: CgroupDir, timeout: float) -> bool:
        """Wait for systemd's UnitRemoved signal (or the cgroup to vanish): no polling."""
        self._subscribe()
        name = unit.encode()
        deadline = time.monotonic() + timeout
        while name not in self._removed_units and cgroup.exists():
            if self._processed():
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._wait_bus(min(left, 0.05))
        self._removed_units.discard(name)
        return True

    def apply_budget(self, limits: Limits) -> None:
        """SetUnitProperties(corral.slice, runtime): systemd owns the slice's files."""
        from pystemd.dbuslib import apply_signature

        props = _limit_props(limits)
        if not props:
            return
        args = apply_signature(b"sb", [ROOT_SLICE.encode(), True]) + _prop_args(props)
        self._call(b"SetUnitProperties", args, f"set the budget on {ROOT_SLICE}")

    def close(self) -> None:
        if "bus" not in self.__dict__:
            return  # never opened
        try:
            self.bus.close()
        except Exception:  # noqa: BLE001, S110 -- closing a bus that already broke: nothing left to do
            pass

    def probe(self) -> Probe:
        p = Probe("systemd", True)
        p.facts.update(
            version=self.version,
            manager="user" if self.user_mode else "system",
            manager_cgroup=self.manager_cgroup,
            mount=str(self.mount),
            slice_dir=str(self.slice_dir()),
        )
        p.reasons.append(f"systemd {self.version} {'user' if self.user_mode else 'system'} manager reachable over D-Bus")
        controllers = CgroupDir(self.mount / self.manager_cgroup.lstrip("/")).controllers()
        p.facts["controllers"] = sorted(controllers)
        missing = sorted({"memory", "pids", "cpu"} - controllers)
        if missing:
            p.facts["limits_not_enforced"] = missing
            p.reasons.append(
                f"controllers {', '.join(missing)} are not delegated on cgroup v2 here: "
                "limits set on units are read back and shown as not enforced"
            )
        return p


def probe(user_mode: bool | None = None) -> Probe:
    """Can a systemd manager be reached? Never raises."""
    if not Path("/run/systemd/system").exists():
        return Probe("systemd", False, ["systemd is not PID 1 here (/run/systemd/system is missing)"],
                     ["a systemd init (or use the cgroupfs backend)"])
    missing = pystemd_missing()
    if missing is not None:
        return Probe("systemd", False, [missing], [PYSTEMD_HINT])
    try:
        backend = SystemdBackend(user_mode=user_mode)
    except Exception as err:  # noqa: BLE001
        return Probe("systemd", False, [str(err).splitlines()[0]], ["a reachable systemd manager bus"])
    try:
        return backend.probe()
    except Exception as err:  # noqa: BLE001 -- the bus is opened here, on first use
        return Probe("systemd", False, [str(err).splitlines()[0]], ["a reachable systemd manager bus"])
    finally:
        backend.close()
