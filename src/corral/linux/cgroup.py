"""Low-level cgroup v2 operations on one directory.

Both backends end up here: the cgroupfs backend owns the directories, and the systemd
backend reads (and, for a verified kill, writes ``cgroup.kill`` in) the directory systemd
made for the scope. Paths are parameters so tests and containers can point elsewhere.
"""

from __future__ import annotations

import errno
import os
import select
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import translate_oserror

MOUNTINFO = Path("/proc/self/mountinfo")


def _cgroup_mounts(mountinfo: Path) -> list[tuple[str, list[str], Path]]:
    """(fstype, super options, mount point) of every cgroup/cgroup2 mount in mountinfo."""
    try:
        text = mountinfo.read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        parts = right.split()
        if parts and parts[0] in ("cgroup", "cgroup2"):
            out.append((parts[0], parts[-1].split(","), Path(left.split()[4])))
    return out


def find_cgroup2_mount(mountinfo: Path = MOUNTINFO) -> Path | None:
    """The cgroup2 mount point from mountinfo (``/sys/fs/cgroup`` or ``.../unified``)."""
    return next((point for fstype, _opts, point in _cgroup_mounts(mountinfo) if fstype == "cgroup2"), None)


def find_v1_mount(controller: str, mountinfo: Path = MOUNTINFO) -> Path | None:
    """Mount point of a cgroup v1 hierarchy holding *controller* (hybrid layouts)."""
    return next((point for fstype, opts, point in _cgroup_mounts(mountinfo)
                 if fstype == "cgroup" and controller in opts), None)


def _open(path: str | os.PathLike[str], flags: int) -> int:
    """os.open for cgroup files. A cgroup being removed gives ENODEV (a kernfs node that is
    deactivated) on open or read; that is the same fact as a missing file, so it is one."""
    try:
        return os.open(path, flags | os.O_CLOEXEC)
    except OSError as err:
        if err.errno == errno.ENODEV:
            raise FileNotFoundError(errno.ENOENT, "cgroup removed", os.fspath(path)) from err
        raise


def _read_text(path: Path) -> str:
    fd = _open(path, os.O_RDONLY)
    try:
        with os.fdopen(fd, closefd=False) as f:
            return f.read()
    except OSError as err:
        if err.errno == errno.ENODEV:
            raise FileNotFoundError(errno.ENOENT, "cgroup removed", str(path)) from err
        raise
    finally:
        os.close(fd)


def own_cgroup(pid: int | str = "self") -> str:
    """The v2 cgroup path of a process (``0::/x/y``), '' if it has none."""
    try:
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return line[3:]
    except OSError:
        pass
    return ""


def run_of(pid: int | str) -> tuple[str, str] | None:
    """(agent, run id) of the corral run a process is in, from its cgroup path (the same
    name on both backends); None outside runs. The kernel's word, not the process's: a
    run cannot unset it the way it can unset ``CORRAL_RUN_ID`` (and escaping its cgroup
    needs write access the run does not have)."""
    from ..names import parse_scope_name

    for part in own_cgroup(pid).split("/"):
        if part.endswith(".scope") and (found := parse_scope_name(part)) is not None:
            return found
    return None


def parse_pressure(text: str) -> dict[str, dict[str, float]]:
    """A PSI file (``some avg10=0.12 avg60=... total=N`` / ``full ...``, as in
    /proc/pressure/* and a cgroup's ``*.pressure``) as ``{"some": {"avg10": 0.12, ...}}``."""
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        kind, *fields = line.split()
        out[kind] = {k: float(v) for k, _, v in (f.partition("=") for f in fields)}
    return out


PAYLOAD = "payload"  # the command and everything it starts
SUPERVISOR = "supervisor"  # corral's own processes for the run (watchdog, detached owner)


def join(cgroup: str | os.PathLike[str]) -> None:
    """Move the calling process into *cgroup* (write 0 to cgroup.procs). Fork-safe."""
    fd = _open(os.path.join(cgroup, "cgroup.procs"), os.O_WRONLY)
    try:
        os.write(fd, b"0")
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Events:
    populated: bool
    frozen: bool


class CgroupDir:
    """One cgroup v2 directory and the files corral uses in it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._leaves: dict[str, CgroupDir] = {}

    def __repr__(self) -> str:
        return f"CgroupDir({str(self.path)!r})"

    def exists(self) -> bool:
        return self.path.is_dir()

    def child(self, name: str) -> CgroupDir:
        return CgroupDir(self.path / name)

    @property
    def payload(self) -> CgroupDir:
        return self._leaf(PAYLOAD)

    @property
    def supervisor(self) -> CgroupDir:
        return self._leaf(SUPERVISOR)

    @property
    def commands(self) -> CgroupDir:
        """Where the run's command and what it started live: the payload leaf, or the scope
        itself where there is none (a run adopted from another corral, or not yet split)."""
        payload = self.payload
        return payload if payload.exists() else self

    def _leaf(self, name: str) -> CgroupDir:
        """The run's leaves, made once per object (`ps` asks for them many times a run)."""
        leaf = self._leaves.get(name)
        if leaf is None:
            leaf = self._leaves[name] = self.child(name)
        return leaf

    def _read(self, name: str) -> str:
        return _read_text(self.path / name)

    def _write(self, name: str, value: str, *, missing_ok: bool = False) -> None:
        """Write a cgroup file; with *missing_ok*, a cgroup that is gone is not an error."""
        target = self.path / name
        try:
            fd = _open(target, os.O_WRONLY)
        except FileNotFoundError as err:
            if missing_ok:
                return
            raise translate_oserror(err, what=f"open {name}", path=str(target)) from err
        except OSError as err:
            raise translate_oserror(err, what=f"open {name}", path=str(target)) from err
        try:
            os.write(fd, value.encode())
        except OSError as err:
            if missing_ok and err.errno in (errno.ENODEV, errno.ENOENT):
                return
            raise translate_oserror(err, what=f"write {name}", path=str(target)) from err
        finally:
            os.close(fd)

    # --- reading -----------------------------------------------------------------

    def events(self) -> Events:
        """``cgroup.events``; a missing directory reads as empty and not frozen."""
        try:
            text = self._read("cgroup.events")
        except FileNotFoundError:
            return Events(populated=False, frozen=False)
        fields = dict(line.split() for line in text.splitlines() if line)
        return Events(populated=fields.get("populated") == "1", frozen=fields.get("frozen") == "1")

    def pids(self) -> list[int]:
        """Live pids in this cgroup and every child cgroup below it."""
        out: list[int] = []
        try:
            for dirpath, _dirs, _files in os.walk(self.path):
                try:
                    text = _read_text(Path(dirpath, "cgroup.procs"))
                except FileNotFoundError:
                    continue
                out.extend(int(p) for p in text.split())
        except OSError:
            pass
        return out

    def cpu_usec(self) -> int | None:
        try:
            for line in self._read("cpu.stat").splitlines():
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    return int(value)
        except (OSError, ValueError):
            pass
        return None

    def read_words(self, name: str) -> list[str]:
        """The whitespace-separated words of a file; FileNotFoundError if the cgroup is gone."""
        return self._read(name).split()

    def read_int(self, name: str) -> int | None:
        """An integer file such as ``memory.current``; None if absent; 'max' -> -1."""
        try:
            text = self._read(name).strip()
        except OSError:
            return None
        if text == "max":
            return -1
        try:
            return int(text.split()[0])
        except (ValueError, IndexError):
            return None

    def pressure(self, resource: str) -> dict[str, dict[str, float]] | None:
        """``cpu.pressure``/``memory.pressure``/``io.pressure`` (PSI) as ``{"some": {"avg10":
        ..., "avg60": ..., "avg300": ..., "total": ...}, "full": {...}}``; None where the
        file is absent (no PSI, a cgroup that is gone). cgroup v2 keeps these per cgroup
        whether or not the controller itself is enabled there (hybrid hosts included)."""
        try:
            return parse_pressure(self._read(f"{resource}.pressure"))
        except (OSError, ValueError):
            return None

    def controllers(self) -> set[str]:
        try:
            return set(self._read("cgroup.controllers").split())
        except OSError:
            return set()

    # --- acting ------------------------------------------------------------------

    def kill(self) -> None:
        """SIGKILL every process below, atomically with respect to forks (kernel >= 5.14)."""
        try:
            self._write("cgroup.kill", "1", missing_ok=True)  # already gone: nothing to kill
        except Exception:
            if not self.exists():
                return
            raise

    def signal_all(self, sig: int, *, skip: Callable[[list[int]], Iterable[int]] | None = None) -> list[int]:
        """Send *sig* to every process below (but those *skip* picks from the list, e.g. a
        sandbox's own helpers). Frozen around it so forks cannot outrun us."""
        was_frozen = self.events().frozen
        if not was_frozen:
            self.set_frozen(True, timeout=2.0)
        sent: list[int] = []
        try:
            pids = self.pids()
            skipped = set(skip(pids)) if skip is not None else set()
            for pid in pids:
                if pid in skipped:
                    continue
                try:
                    os.kill(pid, sig)
                    sent.append(pid)
                except (ProcessLookupError, PermissionError):  # gone, or not ours: cgroup.kill follows
                    pass
        finally:
            if not was_frozen:
                self.set_frozen(False, timeout=2.0)
        return sent

    def set_frozen(self, frozen: bool, *, timeout: float = 5.0) -> bool:
        """Write ``cgroup.freeze`` and wait for ``frozen`` to follow; True if it did."""
        self._write("cgroup.freeze", "1" if frozen else "0")
        return self.wait_events(lambda ev: ev.frozen == frozen or not ev.populated, timeout)

    def wait_empty(self, timeout: float) -> bool:
        """Block until ``populated 0`` (or the directory is gone); True if it happened."""
        return self.wait_events(lambda ev: not ev.populated, timeout)

    def wait_events(self, predicate: Callable[[Events], bool], timeout: float) -> bool:
        """Wait on ``cgroup.events`` with poll(2): the kernel signals changes as POLLPRI."""
        deadline = time.monotonic() + timeout
        path = self.path / "cgroup.events"
        try:
            fd = _open(path, os.O_RDONLY)
        except FileNotFoundError:
            return predicate(Events(populated=False, frozen=False))
        try:
            poller = select.poll()
            poller.register(fd, select.POLLPRI | select.POLLERR)
            while True:
                try:
                    os.lseek(fd, 0, os.SEEK_SET)
                    text = os.read(fd, 4096).decode()
                except OSError as err:
                    if err.errno == errno.ENODEV:  # cgroup removed under us
                        return predicate(Events(populated=False, frozen=False))
                    raise
                fields = dict(line.split() for line in text.splitlines() if line)
                ev = Events(fields.get("populated") == "1", fields.get("frozen") == "1")
                if predicate(ev):
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                # Cap each wait: kernfs notifies reliably, the cap only bounds a missed edge.
                poller.poll(min(left, 0.5) * 1000)
        finally:
            os.close(fd)

    def rmdir(self) -> bool:
        """Remove the directory; False if it still has processes (EBUSY) or children."""
        try:
            os.rmdir(self.path)
            return True
        except FileNotFoundError:
            return True
        except OSError as err:
            if err.errno in (errno.EBUSY, errno.ENOTEMPTY):
                return False
            raise translate_oserror(err, what="remove cgroup", path=str(self.path)) from err
