"""corral: run many AI coding agents in parallel on one Linux machine, each run its own cgroup."""

from __future__ import annotations

from .core import Corral, Run, RunView
from .config import AgentConfig, ConfigBusy, ConfigParseError, ConfigStore, Settings
from .errors import (
    AgentNotFound,
    AuthBusy,
    AuthError,
    BackendError,
    Busy,
    ConfigError,
    CorralError,
    InvalidName,
    NoBackend,
    NotFound,
    PermissionDenied,
    ProfileNotFound,
    RunNotFound,
    SessionBusy,
    SignInAgain,
    SpawnError,
    TeardownIncomplete,
    UsageError,
)
from .paths import Dirs
from .records import RunRecord
from .sessions import HolderInfo, Lease, SessionInfo, Waiting, list_sessions
from .spec import Limits, RunSpec
from .supervise import Outcome

__version__ = "0.1.0"

__all__ = [
    "AgentConfig",
    "AgentNotFound",
    "AuthBusy",
    "AuthError",
    "BackendError",
    "Busy",
    "ConfigBusy",
    "ConfigError",
    "ConfigParseError",
    "ConfigStore",
    "Corral",
    "CorralError",
    "Dirs",
    "HolderInfo",
    "InvalidName",
    "Lease",
    "Limits",
    "NoBackend",
    "NotFound",
    "Outcome",
    "PermissionDenied",
    "ProfileNotFound",
    "Run",
    "RunNotFound",
    "RunRecord",
    "RunSpec",
    "RunView",
    "SessionBusy",
    "SessionInfo",
    "Settings",
    "SignInAgain",
    "SpawnError",
    "TeardownIncomplete",
    "UsageError",
    "Waiting",
    "__version__",
    "list_sessions",
]
