"""Read a credential out of another tool's JSON auth file (``corral auth login --from-file``).

Shapes seen in the field, all handled by one search:

- Codex ``~/.codex/auth.json``: ``{"tokens": {"access_token", "refresh_token", "id_token",
  "account_id"}, "last_refresh": ISO}``; the expiry is the access token's JWT ``exp``.
- Claude Code ``~/.claude/.credentials.json``: ``{"claudeAiOauth": {"accessToken",
  "refreshToken", "expiresAt": epoch ms, "scopes": [...]}}``.
- A plain RFC 6749 token response: ``{"access_token", "refresh_token", "expires_in"}``,
  or Google-style ``{"access_token", "refresh_token", "expiry_date": epoch ms}``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .oauth import jwt_expiry

_NESTS = ("tokens", "claudeAiOauth", "oauth", "credentials", "token")
_REFRESH = ("refresh_token", "refreshToken")
_ACCESS = ("access_token", "accessToken")
_EXPIRES_AT = ("expires_at", "expiresAt", "expiry_date", "expiry", "expires")


# What a CLI needs besides the tokens to accept a credential file corral writes for it
# (auth/adapters.py): codex's id_token (a JWT it reads the plan and email from) and account
# id (its ChatGPT-Account-Id header); Claude Code's subscription and rate-limit tier.
_EXTRA = ("id_token", "account_id", "subscriptionType", "rateLimitTier")
MOVED_SENTINEL = "moved-to-corral"  # what an imported file's refresh token is replaced with


@dataclass(frozen=True)
class Imported:
    refresh_token: str
    access_token: str | None
    expires_at: float | None
    scope: str | None
    extra: dict[str, str] = field(default_factory=dict)


def _first(table: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        if table.get(key) not in (None, ""):
            return table[key]
    return None


def _epoch(value: Any) -> float | None:
    """Seconds since the epoch from seconds, milliseconds or an ISO 8601 string."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) / 1000 if value > 1e11 else float(value)  # 1e11 s is year 5138: it is ms
    if isinstance(value, str):
        try:
            return _epoch(float(value))
        except ValueError:
            pass
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        return parsed.timestamp() if parsed.tzinfo else None
    return None


def _find(data: Any) -> Mapping[str, Any] | None:
    if not isinstance(data, Mapping):
        return None
    if _first(data, _REFRESH) is not None:
        return data
    for key in _NESTS:
        found = _find(data.get(key))
        if found is not None:
            return found
    return None


def parse_auth_json(data: Any, *, mtime: float | None = None, where: str = "the file") -> Imported:
    table = _find(data)
    if table is None:
        raise UsageError(f"{where}: no refresh token found",
                         hint="expected e.g. codex's auth.json (tokens.refresh_token) or a token response")
    refresh = _first(table, _REFRESH)
    access = _first(table, _ACCESS)
    if not isinstance(refresh, str) or (access is not None and not isinstance(access, str)):
        raise UsageError(f"{where}: the tokens are not strings")
    expires_at = _epoch(_first(table, _EXPIRES_AT))
    if expires_at is None and access:
        expires_at = jwt_expiry(access)
    if expires_at is None and access and isinstance(table.get("expires_in"), (int, float)) and mtime:
        expires_at = mtime + float(table["expires_in"])  # relative to when the file was written
    scope = table.get("scope")
    if isinstance(table.get("scopes"), list):
        scope = " ".join(str(s) for s in table["scopes"])
    extra = {key: table[key] for key in _EXTRA if isinstance(table.get(key), str) and table[key]}
    if refresh == MOVED_SENTINEL:
        raise UsageError(f"{where}: its refresh token was already moved into corral",
                         hint="sign in with that tool again, then import the file once more")
    return Imported(refresh, access, expires_at, scope if isinstance(scope, str) else None, extra)


def read_auth_file(path: str | os.PathLike[str]) -> Imported:
    p = Path(path)
    try:
        raw = p.read_bytes()
        mtime = p.stat().st_mtime
    except OSError as err:
        raise UsageError(f"cannot read {p}: {err.strerror or err}") from None
    try:
        data = json.loads(raw)
    except ValueError as err:
        raise UsageError(f"{p}: not JSON ({err})") from None
    return parse_auth_json(data, mtime=mtime, where=str(p))


def move_out(path: str | os.PathLike[str], refresh_token: str) -> bool:
    """Replace *refresh_token* in the file with a sentinel, so the tool that owns the file
    no longer spends the credential corral now holds (a rotated token has one user: a
    second refresher gets ``refresh_token_reused``). The file keeps its access token, mode
    and owner; written atomically, under codex's own ``auth.lock`` where there is one.
    False when the file changed meanwhile (nothing written)."""
    import fcntl
    import tempfile

    p = Path(path).resolve()
    lock_fd = -1
    if p.name == "auth.json":  # codex: flock(<CODEX_HOME>/auth.lock), as codex itself writes it
        try:
            lock_fd = os.open(p.parent / "auth.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
        except OSError:
            lock_fd = -1
    try:
        st = p.stat()
        data = json.loads(p.read_bytes())
        table = _find(data)
        if table is None or _first(table, _REFRESH) != refresh_token:
            return False
        for key in _REFRESH:
            if table.get(key) == refresh_token:
                table[key] = MOVED_SENTINEL  # type: ignore[index]
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
        try:
            os.fchmod(fd, st.st_mode & 0o7777)
            if os.geteuid() == 0:
                os.fchown(fd, st.st_uid, st.st_gid)
            os.write(fd, json.dumps(data, indent=2).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, p)
        return True
    finally:
        if lock_fd >= 0:
            os.close(lock_fd)


__all__ = ["MOVED_SENTINEL", "Imported", "move_out", "parse_auth_json", "read_auth_file"]
