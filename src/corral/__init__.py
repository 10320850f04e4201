"""corral: run many AI coding agents in parallel on one Linux machine, each run its own cgroup.

The names below are imported on first use (PEP 562), so that ``corral ps`` does not pay
for tomlkit and the auth client at every start.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_WHERE = {
    "Corral": "runs.corral", "Run": "runs.corral", "RunView": "runs.listing",
    "AgentConfig": "config.settings", "ConfigStore": "config.settings", "Settings": "config.settings",
    "ConfigBusy": "config.lock", "ConfigParseError": "config.store",
    "Dirs": "paths", "RunRecord": "records", "Limits": "spec", "RunSpec": "spec", "Isolation": "isolation.policy", "Outcome": "runs.supervise",
    "Lease": "leases.sessions",
    **{name: "leases.session_files" for name in ("HolderInfo", "SessionInfo", "Waiting", "list_sessions")},
    **{name: "errors" for name in (
        "AgentNotFound", "ArgumentTypeError", "AuthBusy", "AuthError", "BackendError", "Busy", "CommandNotExecutable",
        "CommandNotFound", "ConfigError", "CorralError", "InvalidName",
        "IsolationUnavailable", "NoBackend", "NotFound", "PermissionDenied", "ProfileNotFound", "RunNotFound", "SessionBusy", "SignInAgain",
        "SpawnError", "TeardownIncomplete", "UsageError")},
}

__all__ = [  # a literal, for static tools; tests/test_library.py checks it against _WHERE
    "AgentConfig",
    "AgentNotFound",
    "ArgumentTypeError",
    "AuthBusy",
    "AuthError",
    "BackendError",
    "Busy",
    "CommandNotExecutable",
    "CommandNotFound",
    "ConfigBusy",
    "ConfigError",
    "ConfigParseError",
    "ConfigStore",
    "Corral",
    "CorralError",
    "Dirs",
    "HolderInfo",
    "InvalidName",
    "Isolation",
    "IsolationUnavailable",
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


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'corral' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly (`X as X`: re-exported)
    from .config.lock import ConfigBusy as ConfigBusy
    from .config.settings import AgentConfig as AgentConfig, ConfigStore as ConfigStore, Settings as Settings
    from .config.store import ConfigParseError as ConfigParseError
    from .errors import (
        AgentNotFound as AgentNotFound,
        ArgumentTypeError as ArgumentTypeError,
        AuthBusy as AuthBusy,
        AuthError as AuthError,
        BackendError as BackendError,
        Busy as Busy,
        CommandNotExecutable as CommandNotExecutable,
        CommandNotFound as CommandNotFound,
        ConfigError as ConfigError,
        CorralError as CorralError,
        InvalidName as InvalidName,
        IsolationUnavailable as IsolationUnavailable,
        NoBackend as NoBackend,
        NotFound as NotFound,
        PermissionDenied as PermissionDenied,
        ProfileNotFound as ProfileNotFound,
        RunNotFound as RunNotFound,
        SessionBusy as SessionBusy,
        SignInAgain as SignInAgain,
        SpawnError as SpawnError,
        TeardownIncomplete as TeardownIncomplete,
        UsageError as UsageError,
    )
    from .isolation.policy import Isolation as Isolation
    from .leases.session_files import (
        HolderInfo as HolderInfo,
        SessionInfo as SessionInfo,
        Waiting as Waiting,
        list_sessions as list_sessions,
    )
    from .leases.sessions import Lease as Lease
    from .paths import Dirs as Dirs
    from .records import RunRecord as RunRecord
    from .runs.corral import Corral as Corral, Run as Run
    from .runs.listing import RunView as RunView
    from .runs.supervise import Outcome as Outcome
    from .spec import Limits as Limits, RunSpec as RunSpec
