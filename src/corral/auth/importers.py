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
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

from ..errors import UsageError
from .oauth import jwt_expiry

_NESTS = ("tokens", "claudeAiOauth", "oauth", "credentials", "token")
_REFRESH = ("refresh_token", "refreshToken")
_ACCESS = ("access_token", "accessToken")
_EXPIRES_AT = ("expires_at", "expiresAt", "expiry_date", "expiry", "expires")


@dataclass(frozen=True)
class Imported:
    refresh_token: str
    access_token: str | None
    expires_at: float | None
    scope: str | None


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
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
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
    return Imported(refresh, access, expires_at, scope if isinstance(scope, str) else None)


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


__all__ = ["Imported", "parse_auth_json", "read_auth_file"]
