"""The token store: one JSON file per profile in ``<state>/auth/``, 0600 in a 0700 dir.

Three files per profile, all in that directory:

- ``NAME.json``: the token pair, written atomically (temp file, fsync, rename, dir fsync),
  so a reader sees the old or the new pair, never a torn one, even after a SIGKILL.
- ``NAME.lock``: the refresh lock, an ``flock`` (close-on-exec, and closed in fork
  children) that the kernel drops when its holder dies: it can never go stale.
- ``NAME.inflight``: the in-flight marker. A refresher writes it before it sends the
  refresh token and removes it after the answer is stored. Whoever next holds the lock
  and finds it knows the previous refresher died mid-refresh, and how far it got.

A store that anyone but its owner can read (or a directory others can write, where the
file could be swapped) is refused, not used: it may already have leaked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..errors import AuthBusy, PermissionDenied, SignInAgain, translate_oserror
from ..linux import flock as _flock
from ..paths import Dirs
from ..records import atomic_write

STORE_VERSION = 1


def boot_clock() -> tuple[str | None, float]:
    """(this boot's id, CLOCK_BOOTTIME): a clock that never jumps and counts suspend."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot: str | None = f.read().strip()
    except OSError:
        boot = None
    return boot, time.clock_gettime(time.CLOCK_BOOTTIME)


def fingerprint(secret: str) -> str:
    """Tells two refresh tokens apart without writing either one down again."""
    return hashlib.sha256(secret.encode()).hexdigest()[:16]


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Token:
    """One stored credential. ``generation`` grows with every write: a waiter that saw
    generation N expiring and finds N+1 under the lock knows someone refreshed for it."""

    refresh_token: str
    access_token: str | None = None
    token_type: str = "Bearer"
    expires_at: float | None = None  # epoch seconds; None: unknown, treated as expired
    obtained_at: float = 0.0  # when the access token was issued (or imported)
    scope: str | None = None
    last_refresh: float | None = None
    refresh_count: int = 0
    generation: int = 0
    source: str = ""
    dead: str | None = None  # why the refresh token is known to be unusable (sign in again)
    # token_url, client_id, scope, token_format as they were at sign-in: refreshes go there,
    # whatever config.toml says now (profiles.py). None: stored before pinning existed.
    endpoint: dict[str, Any] | None = None
    # Kept from the imported file for the CLI adapters: codex's id_token and account_id,
    # Claude Code's subscriptionType (importers._EXTRA). Never a refresh token.
    extra: dict[str, str] | None = None
    # The boot clock when the access token was obtained, and which boot: the wall clock can
    # jump (NTP, a VM resumed, a hand), the boot clock only moves forward.
    boot_id: str | None = None
    boot_obtained: float | None = None

    def lifetime(self) -> float | None:
        if self.expires_at is None:
            return None
        return self.expires_at - self.obtained_at

    def window(self, wanted: float) -> float:
        # Never refresh more than half a lifetime early: a short-lived token with a long
        # window would be "expiring" the moment it is issued and refresh on every call.
        life = self.lifetime()
        return min(wanted, life / 2) if life and life > 0 else wanted

    def effective_expiry(self, now: float, boot_now: tuple[str | None, float] | None = None) -> float | None:
        """When the access token expires, on the wall clock of *now*: ``expires_at``, but
        never later than its lifetime counted on the boot clock since it was obtained. A
        wall clock that jumped forward at sign-in and back since would otherwise make a
        10-minute token look valid for hours (the provider, whose clock is right, says no)."""
        if self.expires_at is None:
            return None
        life = self.lifetime()
        if self.boot_obtained is None or not self.boot_id or life is None:
            return self.expires_at
        boot, clock = boot_now if boot_now is not None else boot_clock()
        if boot != self.boot_id:
            return self.expires_at  # rebooted since: the boot clock says nothing
        by_boot = now + life - (clock - self.boot_obtained)
        # Clocks that agree differ by microseconds: keep expires_at as stored then.
        return by_boot if by_boot < self.expires_at - 1.0 else self.expires_at

    def valid(self, now: float, margin: float = 0.0) -> bool:
        expiry = self.effective_expiry(now)
        return self.access_token is not None and expiry is not None and expiry - margin > now

    def needs_refresh(self, window: float, now: float) -> bool:
        return not self.valid(now, self.window(window))

    def to_json(self) -> dict[str, Any]:
        return {"version": STORE_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: Any) -> Token:
        if not isinstance(data, dict) or not isinstance(data.get("refresh_token"), str):
            raise ValueError("no refresh_token")  # noqa: TRY004 -- "bad data" is ValueError to every caller
        names = {f.name for f in dataclasses.fields(cls)}
        if data.get("endpoint") is not None and not isinstance(data["endpoint"], dict):
            raise ValueError("endpoint is not an object")
        if data.get("extra") is not None and not isinstance(data["extra"], dict):
            raise ValueError("extra is not an object")
        return cls(**{k: v for k, v in data.items() if k in names})

    def replace(self, **changes: Any) -> Token:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Marker:
    """A refresh in flight. ``phase``: ``sending`` (the request may or may not have
    reached the provider) or ``answered`` (the provider answered: the old refresh token
    is spent, the new one is only in the refresher's memory until it is stored)."""

    pid: int
    started_at: float
    phase: str
    generation: int  # of the stored token being refreshed: a newer one in the store means it was stored
    refresh_fp: str = ""  # fingerprint of the refresh token being spent (for people reading the file)
    answered_at: float | None = None

    def describe(self) -> str:
        return f"pid {self.pid}, started {iso(self.started_at)}"


class RefreshLock:
    """The profile's flock, on a close-on-exec fd no fork child keeps.

    Exclusive for the one refresher; *shared* for those waiting for it: when the
    refresher lets go, the kernel grants every shared waiter at once and each re-reads the
    store in parallel. (Queueing all of them for the exclusive lock would hand it from
    waiter to waiter, one context switch each: measured ~100 ms for 63 waiters.)"""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def try_exclusive(self) -> bool:
        return _flock.try_flock(self.fd, fcntl.LOCK_EX)

    def wait(self, op: int, deadline: float | None) -> bool:
        """Take (or convert to) *op* by *deadline* (monotonic). flock converts shared to
        exclusive by letting go and queueing again, so re-check whatever was read."""
        return _flock.flock_until(self.fd, op, deadline)


class TokenStore:
    """The files of one profile. Paths are parameters (``Dirs``) so tests use a tmp dir."""

    def __init__(self, directory: Path, profile: str) -> None:
        self.dir = Path(directory)
        self.profile = profile
        self.path = self.dir / f"{profile}.json"
        self.lock_path = self.dir / f"{profile}.lock"
        self.marker_path = self.dir / f"{profile}.inflight"

    @classmethod
    def of(cls, dirs: Dirs, profile: str) -> TokenStore:
        return cls(auth_dir(dirs), profile)

    # --- safety checks ------------------------------------------------------------------

    def _check(self, st: os.stat_result, path: Path, *, is_dir: bool) -> None:
        me = os.geteuid()
        if st.st_uid != me:
            raise PermissionDenied(f"{path} belongs to uid {st.st_uid}, not to uid {me}; refusing to use it",
                                   hint=f"sign in again as its owner, or remove it: corral auth login {self.profile}")
        bad = stat.S_IWGRP | stat.S_IWOTH if is_dir else 0o077
        if stat.S_IMODE(st.st_mode) & bad:
            what = "writable by group or others" if is_dir else "readable or writable by others"
            raise PermissionDenied(
                f"{path} is {what} (mode {stat.S_IMODE(st.st_mode):04o}); refusing to use it: the token may have leaked",
                hint=f"chmod {'700' if is_dir else '600'} {path}, and consider: corral auth login {self.profile}",
            )

    def ensure_dir(self) -> None:
        try:
            self.dir.parent.mkdir(parents=True, exist_ok=True)
            self.dir.mkdir(mode=0o700, exist_ok=True)
            st = os.stat(self.dir)
            if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != 0o700:
                os.chmod(self.dir, 0o700)  # a dir made by hand or another umask: tighten it
                st = os.stat(self.dir)
        except OSError as err:
            raise translate_oserror(err, what="create token store dir", path=str(self.dir)) from err
        self._check(st, self.dir, is_dir=True)

    # --- the token ----------------------------------------------------------------------

    def load(self) -> Token | None:
        """The stored token, None if there is none. Refuses a store others can read."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise PermissionDenied(f"{self.path} is a symlink; refusing to follow it") from None
            raise translate_oserror(err, what="read token store", path=str(self.path)) from err
        try:
            self._check(os.fstat(fd), self.path, is_dir=False)
            self._check(os.stat(self.dir), self.dir, is_dir=True)
            with os.fdopen(fd, "rb", closefd=False) as f:
                raw = f.read()
        finally:
            os.close(fd)
        try:
            return Token.from_json(json.loads(raw))
        except (ValueError, TypeError) as err:
            raise SignInAgain(self.profile, f"the token store {self.path} is unreadable ({err})") from None

    def save(self, token: Token) -> None:
        self.ensure_dir()
        data = json.dumps(token.to_json(), indent=1, sort_keys=True).encode()
        try:
            atomic_write(self.path, data, mode=0o600)
        except OSError as err:
            raise translate_oserror(err, what="write token store", path=str(self.path)) from err

    def sweep_temps(self) -> None:
        """Remove temp files of writers killed mid-write (only lock holders write)."""
        prefixes = (f".{self.path.name}.", f".{self.marker_path.name}.")
        try:
            names = os.listdir(self.dir)
        except OSError:
            return
        for name in names:
            for prefix in prefixes:
                middle = name[len(prefix):-len(".tmp")]
                # Exactly mkstemp's 8 random characters: profile "a" must not sweep the
                # temp files of a profile "a.json" (".a.json.json.XXXXXXXX.tmp").
                if name.startswith(prefix) and name.endswith(".tmp") and len(middle) == 8 and "." not in middle:
                    with contextlib.suppress(OSError):
                        os.unlink(self.dir / name)

    # --- the in-flight marker -----------------------------------------------------------

    def read_marker(self) -> Marker | None:
        try:
            data = json.loads(self.marker_path.read_bytes())
            return Marker(**{f.name: data[f.name] for f in dataclasses.fields(Marker) if f.name in data})
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError):
            # Written atomically, so a bad one was not written by us: say "someone died
            # mid-refresh, phase unknown", which is the careful reading.
            return Marker(pid=0, started_at=0.0, phase="sending", generation=-1)

    def write_marker(self, marker: Marker) -> None:
        """Atomic (temp file + rename) but not fsynced: the marker is there to outlive a
        killed *process*, which the page cache does. After a power loss the refresher's new
        token is gone with its memory anyway; then the next caller sends the stored refresh
        token once and a rejection still ends in the sign-in-again message. Two fsyncs less
        before the request leaves: measured, they cost tens of ms with 64 processes
        competing for 2 CPUs."""
        self.ensure_dir()
        try:
            atomic_write(self.marker_path, json.dumps(dataclasses.asdict(marker)).encode(), mode=0o600, durable=False)
        except OSError as err:
            raise translate_oserror(err, what="write in-flight marker", path=str(self.marker_path)) from err

    def clear_marker(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.marker_path)

    # --- the lock -----------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self) -> Iterator[RefreshLock]:
        """The open lock file; the flock (if taken) is dropped when this block ends."""
        try:
            try:
                fd = _flock.open_private(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            except FileNotFoundError:  # no dir yet (a first sign-in): make it, 0700
                self.ensure_dir()
                fd = _flock.open_private(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as err:
            raise translate_oserror(err, what="open refresh lock", path=str(self.lock_path)) from err
        try:
            yield RefreshLock(fd)
        finally:
            _flock.close_private(fd)  # closing the last fd drops the flock

    @contextlib.contextmanager
    def locked(self, timeout: float | None) -> Iterator[None]:
        """Hold the lock exclusively; :class:`AuthBusy` (exit 75) after *timeout* s."""
        started = time.monotonic()
        with self.lock() as lock:
            if not lock.wait(fcntl.LOCK_EX, None if timeout is None else started + timeout):
                raise self.busy(started)
            yield

    def busy(self, started: float) -> AuthBusy:
        marker = self.read_marker()
        return AuthBusy(self.profile, waited=round(time.monotonic() - started, 2),
                        holder=marker.pid if marker and marker.pid else None)

    def lock_is_free(self) -> bool:
        """Whether nobody holds the lock right now (for ``status``; never waits)."""
        try:
            fd = _flock.open_private(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return True
        try:
            return _flock.try_flock(fd, fcntl.LOCK_EX)
        finally:
            _flock.close_private(fd)


def auth_dir(dirs: Dirs) -> Path:
    return dirs.state / "auth"


__all__ = ["Marker", "RefreshLock", "Token", "TokenStore", "auth_dir", "fingerprint", "iso"]
