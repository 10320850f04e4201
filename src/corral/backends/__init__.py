"""The backends, and the choice between them, made in one place by reading the machine.

:class:`~.base.Backend` is the one abstract interface: make a run's scope, place pids in
it, read its usage, freeze, kill and release it. :mod:`.systemd` does that with transient
scopes over D-Bus (pystemd), :mod:`.cgroupfs` with cgroup v2 directories of its own where
systemd is not PID 1. Both kill through the same ``cgroup.kill`` (:mod:`corral.linux.cgroup`).

May import: corral.errors, corral.names, corral._log, corral.spec, corral.linux.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import NoBackend, UsageError
from .base import Backend, LiveScope, Probe, Usage

__all__ = ["BACKENDS", "Backend", "LiveScope", "Probe", "Usage", "detect", "open_backend", "probe_all"]

BACKENDS = ("systemd", "cgroupfs")


def _systemd_booted() -> bool:
    # sd_booted(3): systemd creates this directory when it is PID 1.
    return Path("/run/systemd/system").is_dir()


def open_backend(name: str) -> Backend:
    if name == "systemd":
        if not _systemd_booted():
            raise NoBackend(
                "the systemd backend needs systemd as PID 1, and it is not here",
                hint="use --backend cgroupfs (see: corral doctor)",
            )
        from .systemd import SystemdBackend

        return SystemdBackend()
    if name == "cgroupfs":
        from .cgroupfs import CgroupfsBackend, probe

        p = probe()
        if not p.usable:
            raise NoBackend("the cgroupfs backend cannot run here: " + "; ".join(p.reasons), hint="; ".join(p.missing))
        return CgroupfsBackend()
    raise UsageError(f"unknown backend {name!r}", hint=f"choose one of: {', '.join(BACKENDS)}")


def detect(preferred: str | None = None) -> Backend:
    """The backend to use: *preferred*, ``$CORRAL_BACKEND``, else systemd if it is the init
    and reachable, else a writable cgroup v2 tree."""
    choice = preferred or os.environ.get("CORRAL_BACKEND") or None
    if choice:
        return open_backend(choice)
    reasons: list[str] = []
    if _systemd_booted():
        try:
            return open_backend("systemd")
        except NoBackend as err:
            reasons.append(err.message)
    else:
        reasons.append("systemd is not PID 1")
    try:
        return open_backend("cgroupfs")
    except NoBackend as err:
        reasons.append(err.message)
    raise NoBackend("no usable backend: " + "; ".join(reasons), hint="run `corral doctor` for details")


def probe_all() -> list[Probe]:
    from . import cgroupfs, systemd

    return [systemd.probe(), cgroupfs.probe()]
