"""The cgroupfs backend: corral's own directories on the cgroup v2 mount.

Used where systemd is not PID 1 (containers, the VMs here). The tree mirrors the
systemd names, so ``corral.slice/corral-lane1.slice/corral-lane1-<id>.scope`` looks
the same with or without systemd. A child joins its cgroup itself (writes ``0`` to
``cgroup.procs``) between fork and exec, so nothing it starts can be outside.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from .._log import log
from ..errors import NoBackend, translate_oserror
from ..linux.cgroup import CgroupDir, find_cgroup2_mount
from ..names import ROOT_SLICE, agent_slice, scope_name
from ..spec import Limits
from .base import Backend, Probe, v2_limit_files

_CONTROLLER_OF = {"memory_max": "memory", "memory_high": "memory", "cpu_quota": "cpu", "tasks_max": "pids"}


class CgroupfsBackend(Backend):
    name = "cgroupfs"

    def __init__(self, mount: Path | None = None, *, root: Path | None = None) -> None:
        found = mount or find_cgroup2_mount()
        if found is None:
            raise NoBackend("no cgroup2 mount found in /proc/self/mountinfo", hint="mount cgroup2 or use systemd")
        super().__init__(found)
        # root: the directory that holds corral.slice (a delegated subtree for non-root users)
        env_root = os.environ.get("CORRAL_CGROUP_ROOT")
        self.root = Path(root or env_root or found)

    def slice_dir(self) -> Path:
        return self.root / ROOT_SLICE

    def _enable_controllers(self, wanted: set[str]) -> None:
        """Enable *wanted* controllers top-down where the parent offers them."""
        chain = [self.root, self.slice_dir()]
        for parent in chain:
            have = CgroupDir(parent).controllers()
            todo = wanted & have
            if not todo:
                return
            try:
                (parent / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in sorted(todo)))
            except OSError as err:
                log.debug("could not enable %s in %s: %s", todo, parent, err)
                return

    def prepare(self, agent: str, run_id: str, limits: Limits) -> CgroupDir:
        wanted = {_CONTROLLER_OF[k] for k in limits.requested()}
        agent_dir = self.slice_dir() / agent_slice(agent)
        cg = CgroupDir(agent_dir / scope_name(agent, run_id))
        for _attempt in range(5):
            try:
                agent_dir.mkdir(parents=True, exist_ok=True)
                if wanted:
                    self._enable_controllers(wanted)
                    # the agent slice passes them on to the scope
                    offered = CgroupDir(agent_dir).controllers() & wanted
                    if offered:
                        try:
                            (agent_dir / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in sorted(offered)))
                        except OSError as err:
                            log.debug("could not enable %s in %s: %s", offered, agent_dir, err)
                cg.path.mkdir()
                self.make_leaves(cg)
                break
            except FileNotFoundError:
                # a concurrent gc removed the (empty) agent slice between our mkdirs: retry
                continue
            except OSError as err:
                raise translate_oserror(err, what="create run cgroup", path=str(cg.path)) from err
        self._apply_limits(cg, limits)
        return cg

    def _apply_limits(self, cg: CgroupDir, limits: Limits) -> None:
        for name, value in v2_limit_files(limits).items():
            if not (cg.path / name).exists():
                continue  # controller not enabled here: reported as not enforced
            try:
                (cg.path / name).write_text(value)
            except OSError as err:
                raise translate_oserror(err, what=f"set {name}", path=str(cg.path / name)) from err

    def adopt(self, agent, run_id, pids, *, description, limits, timeout, grace):  # type: ignore[no-untyped-def]
        # The children join their leaves themselves once released from the gate.
        return self.effective_limits(self.run_cgroup(agent, run_id), limits)

    def release(self, agent: str, run_id: str, cgroup: CgroupDir) -> None:
        super().release(agent, run_id, cgroup)
        if not cgroup.rmdir():
            cgroup.wait_empty(2.0)
            cgroup.rmdir()
        # The agent slice, then corral.slice, go when empty (nothing is left behind when the
        # last run ends); a concurrent prepare() recreates them, retrying on ENOENT.
        for parent in (cgroup.path.parent, self.slice_dir()):
            try:
                os.rmdir(parent)
            except OSError as err:
                if err.errno not in (errno.EBUSY, errno.ENOTEMPTY, errno.ENOENT):
                    log.debug("could not remove %s: %s", parent, err)
                return

    def probe(self) -> Probe:
        return probe(self.mount, self.root)


def probe(mount: Path | None = None, root: Path | None = None) -> Probe:
    p = Probe("cgroupfs", False)
    mount = mount or find_cgroup2_mount()
    if mount is None:
        p.reasons.append("no cgroup2 mount in /proc/self/mountinfo")
        p.missing.append("a cgroup v2 mount (mount -t cgroup2 none /sys/fs/cgroup)")
        return p
    root = Path(root or os.environ.get("CORRAL_CGROUP_ROOT") or mount)
    p.facts["mount"] = str(mount)
    p.facts["root"] = str(root)
    controllers = CgroupDir(root).controllers()
    p.facts["controllers"] = sorted(controllers)
    for _attempt in range(3):  # corral.slice comes and goes with the runs (release removes it when empty)
        writable_dir = root / ROOT_SLICE if (root / ROOT_SLICE).exists() else root
        if os.access(writable_dir, os.W_OK) or writable_dir.exists():
            break
    if not os.access(writable_dir, os.W_OK):
        p.reasons.append(f"{writable_dir} is not writable by uid {os.geteuid()}")
        p.missing.append("root, or a delegated cgroup subtree (set CORRAL_CGROUP_ROOT to it)")
        return p
    # cgroup.kill exists only in non-root cgroups: at the mount root, look at a child
    probe_dir = root if root != mount else next((c for c in root.iterdir() if c.is_dir()), None)
    if probe_dir is not None and not (probe_dir / "cgroup.kill").exists():
        p.reasons.append("cgroup.kill missing (kernel older than 5.14)")
        p.missing.append("Linux >= 5.14 for cgroup.kill")
        return p
    missing_ctl = sorted({"memory", "pids", "cpu"} - controllers)
    if missing_ctl:
        p.facts["limits_not_enforced"] = missing_ctl
        p.reasons.append(
            f"controllers {', '.join(missing_ctl)} are not on cgroup v2 here: their limits are not enforced; "
            "memory usage is the sum of the processes' RSS"
        )
    p.usable = True
    p.reasons.insert(0, f"cgroup2 at {mount} is writable; runs go under {root / ROOT_SLICE}")
    return p
