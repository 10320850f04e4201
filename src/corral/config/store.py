"""The one write path for corral's TOML config: locked, atomic, comment-preserving.

Every change is a read-modify-write under a sidecar lock (the seed failure this closes:
parallel ``agents add`` each read the file, changed it and renamed their copy over the
others, so some agents were lost):

1. lock ``<target>.lock`` with flock(2), exclusive: the kernel drops it when a holder
   dies, so a killed writer never leaves a stale lock behind. It is the lock filelock's
   ``UnixFileLock`` takes on the same path (why corral takes it itself, and how it differs
   from the leases' locks: :mod:`.lock`);
2. re-read and parse the file with tomlkit, under the lock, so comments, key order and
   layout outside the edited keys survive byte for byte;
3. apply the caller's change to the document;
4. write a uniquely named temp file next to the *resolved* target, fsync it, ``os.replace``
   it over the target, fsync the directory.

Readers take no lock: ``os.replace`` is atomic, so they see the old or the new file,
never a torn one. The lock and the temp files live next to the resolved target, not next
to a symlink to it: two links to one file then share one lock, and only a lock holder ever
creates a temp file there, so a holder may delete temp files a killed writer left.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .._log import log
from ..errors import ConfigError, CorralError, PermissionDenied
from ..linux import flock as _flock
from .lock import config_os_error, take_lock

if TYPE_CHECKING:
    from tomlkit.toml_document import TOMLDocument

T = TypeVar("T")

DEFAULT_LOCK_TIMEOUT = 10.0
MAX_CONFIG_BYTES = 1 << 20  # a config is a few KiB; a huge "config" is a mistake or an attack
TEMP_SUFFIX = ".corral-tmp"
_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH


class ConfigParseError(ConfigError):
    """The config file is not valid TOML (exit 78). ``line`` and ``column`` are 1-based."""

    def __init__(self, path: Path, line: int | None, column: int | None, reason: str) -> None:
        where = f"{path}:{line}:{column}" if line is not None else str(path)
        at = f" (line {line}, column {column})" if line is not None else ""
        super().__init__(f"{where}: malformed TOML{at}: {reason}", hint="fix the file by hand; it was left untouched")
        self.path = path
        self.line = line
        self.column = column


def resolve_target(path: Path) -> Path:
    """The file a write to *path* must replace: symlinks followed, each relative to its own
    directory (``os.path.realpath`` does that; resolving against the cwd is the classic bug).
    A dangling link resolves to the file it names, which the first write creates."""
    try:
        return Path(os.path.realpath(path, strict=True))
    except FileNotFoundError:
        return Path(os.path.realpath(path))
    except OSError as err:  # ELOOP: a cycle of links
        raise ConfigError(f"{path}: cannot resolve symlinks: {err.strerror}") from err


def _umask() -> int:
    # os.umask can only be read by setting it, which races with other threads; Linux >= 4.7
    # shows it in /proc.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def parse_toml(text: bytes, path: Path) -> TOMLDocument:
    """Bytes -> tomlkit document; every failure becomes :class:`ConfigParseError`."""
    import tomlkit
    from tomlkit.exceptions import TOMLKitError

    try:
        source = text.decode("utf-8")
    except UnicodeDecodeError as err:
        line = text.count(b"\n", 0, err.start) + 1
        column = err.start - (text.rfind(b"\n", 0, err.start) + 1) + 1
        raise ConfigParseError(path, line, column, "not UTF-8") from None
    try:
        return tomlkit.parse(source)
    except (TOMLKitError, ValueError) as err:
        at_line: int | None = getattr(err, "line", None)
        col: int | None = getattr(err, "col", None)
        reason = re.sub(r"\s*at line \d+ col \d+$", "", str(err)) or type(err).__name__
        col = col + 1 if col is not None else None  # tomlkit counts from 0; editors from 1
        if "'\\x00'" in reason:
            # tomlkit's end-of-input marker, reported at a position that is not the end.
            reason, at_line, col = "unexpected end of file", source.count("\n") + 1, len(source.rsplit("\n", 1)[-1]) + 1
        raise ConfigParseError(path, at_line, col, reason) from None


class ConfigStore:
    """One TOML file, read freely and changed only through :meth:`update`."""

    def __init__(self, path: Path | str, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        self.path = Path(os.path.abspath(path))
        self.lock_timeout = lock_timeout

    def __repr__(self) -> str:
        return f"ConfigStore({str(self.path)!r})"

    @property
    def target(self) -> Path:
        return resolve_target(self.path)

    @property
    def lock_path(self) -> Path:
        target = self.target
        return target.with_name(target.name + ".lock")

    # --- reading --------------------------------------------------------------------------

    def _load(self, target: Path) -> tuple[bytes | None, os.stat_result | None]:
        # O_NONBLOCK: a FIFO put there must not hang every command; it is refused below.
        try:
            fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None, None
        except IsADirectoryError as err:
            raise ConfigError(f"{target}: is a directory, not a config file") from err
        except OSError as err:
            raise config_os_error(err, "read config", target) from err
        try:
            try:
                st = os.fstat(fd)
            except OSError as err:
                raise config_os_error(err, "read config", target) from err
            self._check_file(target, st)
            self._check_mode(target, st)
            try:
                with os.fdopen(fd, "rb", closefd=False) as f:
                    data = f.read(MAX_CONFIG_BYTES + 1)
            except OSError as err:
                raise config_os_error(err, "read config", target) from err
        finally:
            os.close(fd)
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{target}: larger than {MAX_CONFIG_BYTES // 1024} KiB; that is not a config file",
                              hint="check what the file is; corral's own config is a few KiB")
        return data, st

    @staticmethod
    def _check_file(target: Path, st: os.stat_result) -> None:
        if not stat.S_ISREG(st.st_mode):
            kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode) or \
                stat.S_ISBLK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file"
            raise ConfigError(f"{target}: is {kind}, not a config file", hint="replace it with a TOML file")
        if st.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{target}: {st.st_size} bytes is larger than {MAX_CONFIG_BYTES // 1024} KiB; that is "
                              "not a config file", hint="check what the file is; corral's own config is a few KiB")

    def _precheck(self, target: Path) -> None:
        try:
            st = os.stat(target)
        except FileNotFoundError:
            return
        except OSError as err:
            raise config_os_error(err, "read config", target) from err
        self._check_file(target, st)
        self._check_mode(target, st)

    @staticmethod
    def _check_mode(target: Path, st: os.stat_result) -> None:
        # Whoever can write root's config can make root run anything: refuse it. (A file
        # another user owns may be edited; check_trusted_for_root refuses running from it.)
        if os.geteuid() == 0 and st.st_mode & _WRITABLE_BY_OTHERS:
            raise PermissionDenied(
                f"{target}: config is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                "refusing to use it as root",
                hint=f"chmod go-w {target}",
            )

    def check_trusted_for_root(self) -> None:
        """Before root runs commands from the config: the file and its directory must be
        root's. (Root may still edit a user's file, keeping it theirs; it must not run
        what that user wrote into it.)"""
        if os.geteuid() != 0:
            return
        target = self.target
        for path in (target, target.parent):
            owner = _owner(path)
            if owner not in (0, None):
                raise PermissionDenied(
                    f"{path}: belongs to uid {owner}; refusing to run commands from it as root",
                    hint=f"chown root {path}, or run corral as that user")

    def document(self) -> TOMLDocument:
        """The current file, parsed (an empty document if there is none). No lock needed."""
        target = self.target
        data, _ = self._load(target)
        return parse_toml(data if data is not None else b"", target)

    def values(self) -> dict[str, Any]:
        """The current file as plain values, parsed by the stdlib's tomllib: what a run
        reads, without tomlkit's import and slower parser (~15 ms of a ``corral run``). A
        file tomllib refuses is reported through :func:`parse_toml`, whose line and
        column are exact where tomllib says only "at end of document"."""
        target = self.target
        data, _ = self._load(target)
        if data is None:
            return {}
        try:
            return tomllib.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
            parse_toml(data, target)  # raises ConfigParseError with the position
            raise ConfigParseError(target, None, None, str(err)) from None  # tomlkit took what tomllib did not

    def read(self) -> dict[str, Any]:
        """The current file as plain Python values."""
        return self.document().unwrap()

    # --- writing --------------------------------------------------------------------------

    def update(self, change: Callable[[TOMLDocument], T]) -> T:
        """Lock, re-read, ``change(document)``, write atomically if the text changed, unlock.

        Returns what *change* returns. If *change* raises, nothing is written. *change*
        must not call :meth:`update` itself (the lock is per open file, not re-entrant)."""
        for _ in range(8):
            target = self.target
            self._precheck(target)  # refuse a bad file before creating a lock next to it
            self._ensure_dir(target.parent)
            lock_path = target.with_name(target.name + ".lock")
            started = time.monotonic()
            fd = take_lock(lock_path, self._lock_mode(target), self.lock_timeout)
            try:
                if self.target != target:
                    continue  # a link in the chain changed while we waited: lock the new target
                log.debug("config lock %s acquired after %.1f ms", lock_path, (time.monotonic() - started) * 1e3)
                return self._locked_update(target, lock_path, change)
            finally:
                _flock.close_private(fd)  # the last reference: the lock goes with it
        raise ConfigError(f"{self.path}: its symlinks keep changing; not writing through them")

    def _locked_update(self, target: Path, lock_path: Path, change: Callable[[TOMLDocument], T]) -> T:
        self._sweep_temps(target)
        old, st = self._load(target)
        if st is not None:
            self._chown_like(lock_path, st)
        doc = parse_toml(old if old is not None else b"", target)
        result = change(doc)
        new = doc.as_string().encode("utf-8")
        if new == old:
            return result
        try:
            # Never write what we could not read back (tomlkit has had dump bugs).
            tomllib.loads(new.decode("utf-8"))
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{target}: refusing to write: the changed document is not valid TOML ({err})") from err
        self._write(target, new, st)
        return result

    @staticmethod
    def _ensure_dir(directory: Path) -> None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise config_os_error(err, "create config dir", directory) from err

    @staticmethod
    def _lock_mode(target: Path) -> int:
        # Whoever may write the config may take its lock; no one else needs to open it.
        try:
            return stat.S_IMODE(os.stat(target).st_mode) & 0o666 | 0o600
        except OSError:
            return 0o644

    @staticmethod
    def _chown_like(path: Path, st: os.stat_result) -> None:
        """Root editing a user's config must not leave a root-owned lock the user can't open."""
        if os.geteuid() != 0:
            return
        try:
            lst = os.stat(path)
            if (lst.st_uid, lst.st_gid) != (st.st_uid, st.st_gid):
                os.chown(path, st.st_uid, st.st_gid)
        except OSError:
            pass

    @staticmethod
    def _sweep_temps(target: Path) -> None:
        """Remove temp files of writers that were killed mid-write. Only a lock holder creates
        them, and we hold the lock, so any that exist are orphans."""
        prefix = f".{target.name}."
        try:
            names = os.listdir(target.parent)
        except OSError:
            return
        for name in names:
            if name.startswith(prefix) and name.endswith(TEMP_SUFFIX):
                try:
                    os.unlink(target.parent / name)
                    log.info("removed %s, left by a writer that died mid-write", target.parent / name)
                except FileNotFoundError:
                    pass
                except OSError as err:
                    log.warning("cannot remove stale temp file %s: %s", target.parent / name, err)

    def _write(self, target: Path, data: bytes, st: os.stat_result | None) -> None:
        directory = target.parent
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=directory)
        except OSError as err:
            raise config_os_error(err, "write config", directory) from err
        try:
            try:
                self._copy_owner_and_mode(fd, target, st)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, target)
        except BaseException as err:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            if isinstance(err, OSError) and not isinstance(err, CorralError):
                raise config_os_error(err, "write config", target) from err
            raise
        try:
            dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as err:
            # The new file is already in place and visible; only its durability across a
            # power loss is in doubt. Say so, but do not report the change as failed.
            log.warning("config %s written, but fsync of %s failed: %s", target, directory, err)

    @staticmethod
    def _copy_owner_and_mode(fd: int, target: Path, st: os.stat_result | None) -> None:
        if st is None:
            os.fchmod(fd, 0o600)  # a new file: agents' env may hold secrets
            return
        mine = os.fstat(fd)
        if (mine.st_uid, mine.st_gid) != (st.st_uid, st.st_gid):
            try:
                os.fchown(fd, st.st_uid, st.st_gid)  # root editing a user's file keeps it theirs
            except PermissionError:
                if mine.st_uid != st.st_uid:
                    raise PermissionDenied(
                        f"{target} belongs to uid {st.st_uid}; rewriting it would make it yours",
                        hint="edit it as its owner (or as root)",
                    ) from None
                log.debug("cannot keep group %d of %s", st.st_gid, target)
        # After chown: chown clears set-id bits, chmod restores the full mode.
        os.fchmod(fd, stat.S_IMODE(st.st_mode))


def _owner(path: Path) -> int | None:
    try:
        return os.stat(path).st_uid
    except OSError:
        return None


__all__ = [
    "DEFAULT_LOCK_TIMEOUT",
    "ConfigParseError",
    "ConfigStore",
    "parse_toml",
    "resolve_target",
]
