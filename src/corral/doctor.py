"""``corral doctor``: what this machine offers, and why a backend was or was not chosen."""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

from .backends import detect, probe_all
from .errors import NoBackend
from .isolation.sandbox import probe as probe_isolation
from .paths import Dirs


def diagnose(preferred: str | None = None) -> dict[str, Any]:
    probes = probe_all()
    chosen: str | None = None
    error: str | None = None
    try:
        backend = detect(preferred)
        chosen = backend.name
        backend.close()
    except NoBackend as err:
        error = str(err)
    dirs = Dirs.from_env()
    return {
        "chosen": chosen,
        "error": error,
        "uid": os.geteuid(),
        "backends": [asdict(p) for p in probes],
        "isolation": probe_isolation(),
        "dirs": {"config": str(dirs.config), "state": str(dirs.state), "runtime": str(dirs.runtime)},
    }
