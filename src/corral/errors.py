"""One error tree for corral.

Every error corral raises is a :class:`CorralError`; each subclass also inherits the
built-in it resembles, so callers can catch ``LookupError`` or ``PermissionError``
without knowing corral. Exit codes live here, in one table, and nowhere else.
"""

from __future__ import annotations

import errno as _errno


class CorralError(Exception):
    """Base of every error corral raises. ``exit_code`` is what the CLI exits with."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


class UsageError(CorralError, ValueError):
    """Bad usage or invalid input: names, values, flags."""

    exit_code = 2


class ArgumentTypeError(UsageError, TypeError):
    """A library argument of the wrong type (``argv="echo hi"``); exit 2 like other usage errors."""


class InvalidName(UsageError):
    """A name that cannot become a unit name or a cgroup directory."""


class NotFound(CorralError, LookupError):
    """A run, agent or profile that does not exist."""

    exit_code = 3


class RunNotFound(NotFound):
    def __init__(self, run_id: str, *, hint: str | None = "list runs with: corral ps --all") -> None:
        super().__init__(f"no run {run_id!r}", hint=hint)
        self.run_id = run_id


class AgentNotFound(NotFound):
    def __init__(self, agent: str, *, hint: str | None = "list agents with: corral agents list") -> None:
        super().__init__(f"no agent {agent!r} in the config", hint=hint)
        self.agent = agent


class NoBackend(CorralError, RuntimeError):
    """Neither a reachable systemd nor a writable cgroup v2 tree."""

    exit_code = 69


class IsolationUnavailable(CorralError, RuntimeError):
    """The requested isolation level cannot be built here (no bubblewrap, no namespaces)."""

    exit_code = 69


class Busy(CorralError, TimeoutError):
    """A lease or a slot was not granted in time."""

    exit_code = 75


class PermissionDenied(CorralError, PermissionError):
    exit_code = 77


class ConfigError(CorralError, ValueError):
    """The config file is malformed or holds an invalid value."""

    exit_code = 78


class BackendError(CorralError, OSError):
    """A backend operation failed (D-Bus call, cgroup file write)."""

    exit_code = 1


class SpawnError(CorralError, OSError):
    """The command could not be started (not found, not executable)."""

    def __init__(self, message: str, *, errno: int, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.errno = errno
        # Shells use 127 for "not found" and 126 for "found but not executable".
        self.exit_code = 127 if errno == _errno.ENOENT else 126


class CommandNotFound(SpawnError, FileNotFoundError):
    """The command does not exist (exit 127): ``except FileNotFoundError`` catches it."""


class CommandNotExecutable(SpawnError, PermissionError):
    """The command exists but cannot be executed (exit 126)."""


def spawn_error(message: str, *, errno: int, hint: str | None = None) -> SpawnError:
    """The SpawnError for *errno*, as the matching built-in: FileNotFoundError for ENOENT,
    PermissionError for EACCES/EPERM."""
    cls = CommandNotFound if errno == _errno.ENOENT else \
        CommandNotExecutable if errno in (_errno.EACCES, _errno.EPERM) else SpawnError
    return cls(message, errno=errno, hint=hint)


class TeardownIncomplete(CorralError, RuntimeError):
    """A cgroup could not be emptied; carries what is still alive."""

    def __init__(self, message: str, *, survivors: list[int], hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.survivors = survivors


def translate_oserror(err: OSError, *, what: str, path: str | None = None) -> CorralError:
    """Turn an OSError from a cgroup or state file into corral's tree, once, at the edge."""
    where = f" ({path})" if path else ""
    if err.errno in (_errno.EACCES, _errno.EPERM, _errno.EROFS):
        return PermissionDenied(
            f"{what}: permission denied{where}",
            hint="run as root, or as the user who owns this cgroup tree (see: corral doctor)",
        )
    if err.errno in (_errno.ENOSPC, _errno.EDQUOT):
        return BackendError(f"{what}: no space left on the filesystem{where}",
                            hint=f"free space there (df -h {path or '.'}), then try again")
    return BackendError(f"{what}: {err.strerror or err}{where}")


class SessionBusy(Busy):
    """A session lease was not granted in time. Carries whom it waited for."""

    def __init__(self, message: str, *, agent: str, key: str, holder: object = None, pids: list[int] | None = None,
                 waited: float = 0.0, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.agent = agent
        self.key = key
        self.holder = holder  # a corral.leases.session_files.HolderInfo, or None if nobody said who they are
        self.pids = pids or []  # live processes of the previous run, when it was still draining
        self.waited = waited

    @property
    def run_id(self) -> str | None:
        return getattr(self.holder, "run_id", None)


# --- auth (issue 6) -----------------------------------------------------------------------


class ProfileNotFound(NotFound):
    """An auth profile that is not in the config."""

    def __init__(self, profile: str, *, hint: str | None = None) -> None:
        super().__init__(f"no auth profile {profile!r}",
                         hint=hint or "add one with: corral auth add PROFILE --token-url URL --client-id ID")
        self.profile = profile


class SignInAgain(PermissionDenied):
    """The stored credential cannot be refreshed any more; only a new sign-in helps (exit 77).

    Raised once, never retried: re-sending a rotated refresh token can make a provider
    revoke the whole token family."""

    def __init__(self, profile: str, reason: str) -> None:
        super().__init__(f"auth profile {profile!r}: {reason}; sign in again: corral auth login {profile}")
        self.profile = profile
        self.reason = reason


class AuthBusy(Busy):
    """Another process holds the profile's refresh lock past our timeout (exit 75)."""

    def __init__(self, profile: str, *, waited: float, holder: int | None = None) -> None:
        who = f" (refresher pid {holder})" if holder else ""
        super().__init__(
            f"auth profile {profile!r}: a refresh in another process{who} did not finish within {waited:g}s",
            hint="it may be hung; retry later, or end it (kill PID) and retry",
        )
        self.profile = profile
        self.waited = waited
        self.holder = holder


class AuthError(CorralError, RuntimeError):
    """The token endpoint failed in a way a retry later may fix (network, 5xx, bad answer)."""

    exit_code = 1
