"""What a run's isolation asks for: the level (``none``, ``standard``, ``strict``), the
network, the identity it runs as, and the environment it may see.

Plain values, parsed and checked here; :mod:`.sandbox` turns them into a bubblewrap
command line. Kept apart so that reading a run's spec or the config does not load the
sandbox builder.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError

LEVELS = ("none", "standard", "strict")
NETWORKS = ("host", "loopback", "none")
DEFAULT_LEVEL = "standard"

# What a run sees of the caller's environment, besides what corral and the agent's config
# give it. Everything else (cloud keys, DBUS_SESSION_BUS_ADDRESS, XDG_*) stays behind.
ENV_ALLOWLIST = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LC_*", "TERM", "COLORTERM", "TZ", "TMPDIR",
                 "NO_COLOR")


def parse_level(value: Any) -> str:
    if value not in LEVELS:
        raise UsageError(f"invalid isolation level {value!r}", hint=f"use one of: {', '.join(LEVELS)}")
    return str(value)


def parse_network(value: Any) -> str:
    if value not in NETWORKS:
        raise UsageError(f"invalid network {value!r}", hint=f"use one of: {', '.join(NETWORKS)}")
    return str(value)


def parse_user(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > 64 or any(c in value for c in ":/\0\n "):
        raise UsageError(f"invalid user name {value!r}")
    return value


def parse_names(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v and "\0" not in v for v in value):
        raise UsageError(f"invalid {what} {value!r}: use a list of strings")
    return tuple(value)


@dataclass(frozen=True)
class Isolation:
    """What a caller asks for. ``user`` None: the workspace owner (when started by root)."""

    level: str = DEFAULT_LEVEL
    network: str = "host"
    user: str | None = None
    env_passthrough: tuple[str, ...] = ()  # names or fnmatch patterns (AWS_*) to let through
    rw_paths: tuple[str, ...] = ()  # strict: writable besides the workspace
    home_ro: tuple[str, ...] = ()  # strict: files of the real home bound read-only

    def __post_init__(self) -> None:
        parse_level(self.level)
        parse_network(self.network)
        if self.user is not None:
            parse_user(self.user)
        for name in ("env_passthrough", "rw_paths", "home_ro"):
            object.__setattr__(self, name, parse_names(getattr(self, name), name.replace("_", " ")))


@dataclass(frozen=True)
class Identity:
    """Who the run executes as. ``uid`` None: as the caller."""

    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] = ()
    name: str | None = None
    home: str | None = None
    shell: str | None = None

    def become(self) -> None:
        """In the forked child, after it joined its cgroup (which needs the caller's rights)."""
        if self.uid is None:
            return
        os.setgroups(list(self.groups))
        os.setgid(self.gid if self.gid is not None else self.uid)
        os.setuid(self.uid)


def resolve_identity(iso: Isolation, cwd: str) -> Identity:
    """Root drops to the configured user, else to the workspace's owner (root stays uid 0,
    without capabilities). Others run as themselves; asking for another user is an error."""
    import pwd

    if iso.user is not None:
        try:
            entry = pwd.getpwnam(iso.user) if not iso.user.isdigit() else pwd.getpwuid(int(iso.user))
        except KeyError:
            raise UsageError(f"no user {iso.user!r} on this machine") from None
        if os.geteuid() != 0:
            if entry.pw_uid == os.geteuid():
                return Identity()
            from ..errors import PermissionDenied

            raise PermissionDenied(f"only root can run as another user ({iso.user!r})",
                                   hint="drop --user, or start corral as root")
    elif os.geteuid() != 0 or iso.level == "none":
        return Identity()
    else:
        owner = os.stat(cwd).st_uid
        if owner == 0:
            return Identity()  # uid 0 without capabilities (bwrap --cap-drop ALL)
        try:
            entry = pwd.getpwuid(owner)
        except KeyError:  # a uid with no passwd entry: run as it, with its group
            return Identity(uid=owner, gid=os.stat(cwd).st_gid, groups=(os.stat(cwd).st_gid,))
    if entry.pw_uid == 0:
        return Identity()
    groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
    return Identity(uid=entry.pw_uid, gid=entry.pw_gid, groups=groups, name=entry.pw_name, home=entry.pw_dir,
                    shell=entry.pw_shell)


def filter_env(caller: Mapping[str, str], passthrough: Sequence[str]) -> dict[str, str]:
    """The caller's variables that match the allowlist or *passthrough* (shell patterns,
    case-sensitive): one regex for all patterns, not one fnmatch per variable and pattern."""
    allowed = re.compile("|".join(fnmatch.translate(p) for p in (*ENV_ALLOWLIST, *passthrough)))
    return {k: v for k, v in caller.items() if allowed.match(k)}
