"""Where corral keeps config, state and runtime files.

XDG variables win when set, for root too; otherwise root uses /etc, /var/lib and /run
and users the XDG defaults. Computed when asked, never at import time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Dirs:
    config: Path
    state: Path
    runtime: Path

    @property
    def runs(self) -> Path:
        return self.state / "runs"

    @classmethod
    def from_env(cls, env: os._Environ[str] | dict[str, str] | None = None) -> Dirs:
        env = os.environ if env is None else env
        root = os.geteuid() == 0
        home = Path(env.get("HOME") or os.path.expanduser("~"))

        def pick(var: str, root_default: str, user_default: Path) -> Path:
            value = env.get(var)
            if value:
                return Path(value) / "corral"
            return Path(root_default) if root else user_default / "corral"

        runtime_user = Path(env.get("XDG_RUNTIME_DIR") or f"/run/user/{os.geteuid()}")
        return cls(
            config=pick("XDG_CONFIG_HOME", "/etc/corral", home / ".config"),
            state=pick("XDG_STATE_HOME", "/var/lib/corral", home / ".local" / "state"),
            runtime=pick("XDG_RUNTIME_DIR", "/run/corral", runtime_user),
        )


def current_dir() -> str:
    """The working directory, or a UsageError if it was removed under us (os.getcwd()
    raises FileNotFoundError then)."""
    from .errors import UsageError

    try:
        return os.getcwd()
    except FileNotFoundError:
        raise UsageError("the current directory no longer exists",
                         hint="cd to a directory that does, or give one (--cwd / --workspace)") from None
