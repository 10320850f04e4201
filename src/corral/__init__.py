"""corral: run many AI coding agents in parallel on one Linux machine, each run its own cgroup.

The names below are imported on first use (PEP 562), so that ``corral ps`` does not pay
for tomlkit, filelock and the auth client at every start.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_WHERE = {
    "Corral": "core", "Run": "core", "RunView": "core",
    "AgentConfig": "config", "ConfigStore": "config", "Settings": "config",
    "ConfigBusy": "configfile", "ConfigParseError": "configfile",
    "Dirs": "paths", "RunRecord": "records", "Limits": "spec", "RunSpec": "spec", "Isolation": "isolation", "Outcome": "supervise",
    "HolderInfo": "sessions", "Lease": "sessions", "SessionInfo": "sessions", "Waiting": "sessions",
    "list_sessions": "sessions",
    **{name: "errors" for name in (
        "AgentNotFound", "AuthBusy", "AuthError", "BackendError", "Busy", "ConfigError", "CorralError", "InvalidName",
        "IsolationUnavailable", "NoBackend", "NotFound", "PermissionDenied", "ProfileNotFound", "RunNotFound", "SessionBusy", "SignInAgain",
        "SpawnError", "TeardownIncomplete", "UsageError")},
}

__all__ = sorted([*_WHERE, "__version__"])


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'corral' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from .config import AgentConfig, ConfigStore, Settings
    from .configfile import ConfigBusy, ConfigParseError
    from .core import Corral, Run, RunView
    from .errors import (AgentNotFound, AuthBusy, AuthError, BackendError, Busy, ConfigError, CorralError,
                         InvalidName, IsolationUnavailable, NoBackend, NotFound, PermissionDenied, ProfileNotFound, RunNotFound,
                         SessionBusy, SignInAgain, SpawnError, TeardownIncomplete, UsageError)
    from .isolation import Isolation
    from .paths import Dirs
    from .records import RunRecord
    from .sessions import HolderInfo, Lease, SessionInfo, Waiting, list_sessions
    from .spec import Limits, RunSpec
    from .supervise import Outcome
