"""corral: run many AI coding agents in parallel on one Linux machine, each run its own cgroup."""

from __future__ import annotations

from .core import Corral, Run, RunView
from .errors import (
    BackendError,
    Busy,
    ConfigError,
    CorralError,
    InvalidName,
    NoBackend,
    NotFound,
    PermissionDenied,
    RunNotFound,
    SpawnError,
    TeardownIncomplete,
    UsageError,
)
from .paths import Dirs
from .records import RunRecord
from .spec import Limits, RunSpec
from .supervise import Outcome

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "Busy",
    "ConfigError",
    "Corral",
    "CorralError",
    "Dirs",
    "InvalidName",
    "Limits",
    "NoBackend",
    "NotFound",
    "Outcome",
    "PermissionDenied",
    "Run",
    "RunNotFound",
    "RunRecord",
    "RunSpec",
    "RunView",
    "SpawnError",
    "TeardownIncomplete",
    "UsageError",
    "__version__",
]
