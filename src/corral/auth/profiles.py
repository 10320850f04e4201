"""Auth profiles: ``[auth.NAME]`` tables in config.toml.

::

    [auth.openai]
    token_url = "https://auth.openai.com/oauth/token"
    client_id = "app_..."
    scope = "openid offline_access"      # optional
    env_var = "OPENAI_ACCESS_TOKEN"      # where a run gets the access token
    refresh_window = 300                 # refresh this many seconds before expiry
    token_format = "form"                # the refresh request's body: form (RFC 6749) or json
    kind = "env"                         # how a run gets it: env, codex, claude, claude-api-key, openclaw
    provider = "openai"                  # kind openclaw: openclaw's provider id (default: from token_url)

A profile holds no secret: tokens live in the token store (:mod:`corral.auth.store`).
The endpoint settings (token_url, client_id, scope, token_format) are copied into the
store at sign-in and refreshes use that copy: a run that can write config.toml must not
be able to point a refresh, and the refresh token in it, at a listener of its own.
Agents reference a profile by name (``agents add --auth NAME``); nothing is copied.
Every change goes through :class:`~corral.config.store.ConfigStore` (locked, atomic).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import stat
import tomllib
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import tomlkit

from ..config.settings import normalize as _normalize_setting, open_store
from ..errors import (
    ConfigError,
    PermissionDenied,
    ProfileNotFound,
    UsageError,
    translate_oserror,
)
from ..paths import Dirs

DEFAULT_ENV_VAR = "CORRAL_ACCESS_TOKEN"
DEFAULT_REFRESH_WINDOW = 300.0  # seconds; never more than half a token's lifetime (see store.Token)
PROFILE_KEYS = ("token_url", "client_id", "scope", "env_var", "refresh_window", "token_format", "kind", "provider")
ENDPOINT_KEYS = ("token_url", "client_id", "scope", "token_format")  # pinned at sign-in
TOKEN_FORMATS = ("form", "json")
# The CLI a run's credential is written for (auth/adapters.py).
KINDS = ("env", "codex", "claude", "claude-api-key", "openclaw")

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PROVIDER = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
# Variables a token must never overwrite: the run would break or load foreign code.
_RESERVED_ENV = {"PATH", "HOME", "USER", "SHELL", "PWD", "TERM", "CORRAL_AUTH_SOCKET", "CORRAL_AUTH_PROFILE"}


@dataclass(frozen=True)
class Profile:
    name: str
    token_url: str
    client_id: str
    scope: str | None = None
    env_var: str = DEFAULT_ENV_VAR
    refresh_window: float = DEFAULT_REFRESH_WINDOW
    token_format: str = "form"
    kind: str = "env"
    provider: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "token_url": self.token_url, "client_id": self.client_id, "scope": self.scope,
                "env_var": self.env_var, "refresh_window": self.refresh_window, "token_format": self.token_format,
                "kind": self.kind, "provider": self.provider}

    def openclaw_provider(self) -> str:
        """The provider id openclaw files this credential under: ``provider``, else read
        off the token endpoint's host (OpenAI's or Anthropic's)."""
        if self.provider:
            return self.provider
        host = "." + (urlsplit(self.token_url).hostname or "").lower()
        for suffix, provider in ((".openai.com", "openai"), (".anthropic.com", "anthropic"),
                                 (".claude.com", "anthropic")):
            if host.endswith(suffix):
                return provider
        raise UsageError(f"auth profile {self.name!r} (kind openclaw): which openclaw provider is it for?",
                         hint=f"corral auth add {self.name} --update --provider NAME (e.g. openai, anthropic)")

    def endpoint(self) -> dict[str, Any]:
        """What sign-in pins in the token store."""
        return {key: getattr(self, key) for key in ENDPOINT_KEYS}

    def pinned_to(self, endpoint: Mapping[str, Any] | None) -> Profile:
        """This profile with the endpoint pinned at sign-in (re-checked: https, or plain
        http to loopback only). None: a credential stored before pinning existed."""
        if not endpoint:
            return self
        if not endpoint.get("token_url") or not endpoint.get("client_id"):
            raise ConfigError(f"auth profile {self.name!r}: the endpoint pinned in the token store is incomplete",
                              hint=f"sign in again: corral auth login {self.name}")
        values: dict[str, Any] = {"scope": None, "token_format": "form"}
        for key in ENDPOINT_KEYS:
            if endpoint.get(key) is not None:
                values[key] = _normalize(key, endpoint[key])
        return dataclasses.replace(self, **values)

    def endpoint_differences(self, endpoint: Mapping[str, Any] | None) -> list[str]:
        """The endpoint keys config.toml has changed since sign-in."""
        if not endpoint:
            return []
        pinned = self.pinned_to(endpoint)
        return [key for key in ENDPOINT_KEYS if getattr(pinned, key) != getattr(self, key)]

def validate_profile_name(name: str) -> str:
    """The same rule ``agents add --auth`` applies (it also names the store file)."""
    return str(_normalize_setting("auth", name))


def check_token_url(url: Any) -> str:
    """https, or plain http to a loopback address only: the body carries a refresh token."""
    if not isinstance(url, str) or not url:
        raise UsageError(f"invalid token URL {url!r}")
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url
    if parts.scheme == "http" and parts.hostname and _is_loopback(parts.hostname):
        return url
    raise UsageError(f"invalid token URL {url!r}: use https:// (plain http only to a loopback address)")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_env_var(name: Any) -> str:
    if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
        raise UsageError(f"invalid environment variable name {name!r}")
    if name in _RESERVED_ENV or name.startswith(("LD_", "PYTHON")):
        raise UsageError(f"environment variable {name} is reserved; pick another name for the access token")
    return name


def _check_window(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UsageError(f"invalid refresh window {value!r}")
    try:
        seconds = float(value)
    except ValueError:
        raise UsageError(f"invalid refresh window {value!r}: give seconds, e.g. 300") from None
    if not 0 <= seconds <= 86400:
        raise UsageError(f"refresh window {value!r} must be between 0 and 86400 seconds")
    return seconds


def _check_text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or any(c in value for c in "\0\r\n"):
        raise UsageError(f"invalid {what} {value!r}")
    return value


def _normalize(key: str, value: Any) -> Any:
    if key == "token_url":
        return check_token_url(value)
    if key == "client_id":
        return _check_text(value, "client id")
    if key == "scope":
        return _check_text(value, "scope")
    if key == "env_var":
        return check_env_var(value)
    if key == "refresh_window":
        seconds = _check_window(value)
        return int(seconds) if seconds.is_integer() else seconds
    if key == "token_format":
        if value not in TOKEN_FORMATS:
            raise UsageError(f"invalid token format {value!r}: form (RFC 6749) or json (e.g. Anthropic's endpoint)")
        return value
    if key == "kind":
        if value not in KINDS:
            raise UsageError(f"invalid kind {value!r}: one of {', '.join(KINDS)}",
                             hint="env gives the token in a variable; codex, claude and openclaw write what that CLI reads")
        return value
    if key == "provider":
        if not isinstance(value, str) or not _PROVIDER.fullmatch(value):
            raise UsageError(f"invalid provider {value!r}: openclaw's provider id, e.g. openai or anthropic")
        return value
    raise UsageError(f"unknown profile setting {key!r}", hint=f"known: {', '.join(PROFILE_KEYS)}")


def _from_table(name: str, table: Any, where: str) -> Profile:
    """TOML -> Profile; any problem is a ConfigError (exit 78) naming the key."""
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: auth.{name} must be a table")
    unknown = sorted(set(table) - set(PROFILE_KEYS))
    if unknown:
        raise ConfigError(f"{where}: auth.{name}: unknown key(s) {', '.join(unknown)}",
                          hint=f"known: {', '.join(PROFILE_KEYS)}")
    missing = [k for k in ("token_url", "client_id") if k not in table]
    if missing:
        raise ConfigError(f"{where}: auth.{name}: missing {', '.join(missing)}")
    try:
        values = {k: _normalize(k, table[k]) for k in PROFILE_KEYS if k in table}
        return Profile(name=validate_profile_name(name), **values)
    except UsageError as err:
        raise ConfigError(f"{where}: auth.{name}: {err.message}") from None


def _read_config(dirs: Dirs) -> tuple[Mapping[str, Any], str]:
    """The config as plain values, read with tomllib: every ``corral auth token`` reads it,
    and tomlkit's parse costs ~2 ms against ~0.3 ms (a 10-agent config, measured here).

    Whoever can write the config can point ``token_url`` elsewhere and collect the refresh
    token, so a config others can write is refused here for every user, not only root."""
    store = open_store(dirs)
    target = store.target
    try:
        with open(target, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
    except FileNotFoundError:
        return {}, str(store.path)
    except OSError as err:
        raise translate_oserror(err, what="read config", path=str(target)) from err
    if stat.S_IMODE(st.st_mode) & (stat.S_IWGRP | stat.S_IWOTH) or st.st_uid not in (os.geteuid(), 0):
        raise PermissionDenied(f"{target}: writable by others (mode {stat.S_IMODE(st.st_mode):04o}, owner uid "
                               f"{st.st_uid}); refusing to read auth profiles from it",
                               hint=f"chmod go-w {target}")
    try:
        return tomllib.loads(data.decode("utf-8")), str(store.path)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError):
        store.document()  # raises ConfigParseError, with line and column
        raise


def _auth_table(doc: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    table = doc.get("auth") or {}
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: 'auth' must be a table")
    return table


def get_profile(dirs: Dirs, name: str) -> Profile:
    """The profile *name*, or :class:`ProfileNotFound` (exit 3)."""
    validate_profile_name(name)
    doc, where = _read_config(dirs)
    table = _auth_table(doc, where)
    if name not in table:
        raise ProfileNotFound(name)
    return _from_table(name, table[name], where)


def list_profiles(dirs: Dirs) -> list[Profile]:
    doc, where = _read_config(dirs)
    return [_from_table(name, entry, where) for name, entry in _auth_table(doc, where).items()]


def add_profile(dirs: Dirs, name: str, *, token_url: str | None = None, client_id: str | None = None,
                scope: str | None = None, env_var: str | None = None, refresh_window: float | str | None = None,
                token_format: str | None = None, kind: str | None = None, provider: str | None = None,
                update: bool = False) -> Profile:
    """Add ``[auth.NAME]``. An existing NAME is an error (exit 2) unless *update*, which
    changes only the keys given."""
    validate_profile_name(name)
    given = {"token_url": token_url, "client_id": client_id, "scope": scope, "env_var": env_var,
             "refresh_window": refresh_window, "token_format": token_format, "kind": kind, "provider": provider}
    values = {k: _normalize(k, v) for k, v in given.items() if v is not None}  # before the lock
    store = open_store(dirs)

    def change(doc: Any) -> Profile:
        auth = doc.get("auth")
        if auth is None:
            doc["auth"] = tomlkit.table(is_super_table=True)  # prints [auth.NAME] without an empty [auth]
            auth = doc["auth"]
        if not isinstance(auth, MutableMapping):
            raise ConfigError(f"{store.path}: 'auth' must be a table")
        if name in auth and not update:
            raise UsageError(f"auth profile {name!r} already exists", hint="use --update to change it")
        if name not in auth:
            missing = [f"--{k.replace('_', '-')}" for k in ("token_url", "client_id") if k not in values]
            if missing:
                raise UsageError(f"a new profile needs {' and '.join(missing)}")
            auth[name] = tomlkit.table()
        entry = auth[name]
        for key in PROFILE_KEYS:  # a stable key order
            if key in values:
                entry[key] = values[key]
        profile = _from_table(name, entry, str(store.path))
        if profile.kind == "openclaw":
            profile.openclaw_provider()  # raises before the write if it can't be told
        return profile

    return store.update(change)


def remove_profile(dirs: Dirs, name: str, *, force: bool = False) -> bool:
    """Remove ``[auth.NAME]`` and its stored credential. Agents that name it keep it
    unless *force* (a UsageError naming them). Returns whether a stored credential was
    removed too. Neither a profile nor a credential: :class:`ProfileNotFound` (exit 3)."""
    from .store import TokenStore

    validate_profile_name(name)
    store = open_store(dirs)

    def change(doc: Any) -> bool:
        auth = doc.get("auth")
        present = isinstance(auth, MutableMapping) and name in auth
        if not present:
            return False  # perhaps a credential left without its profile: removed below
        agents = doc.get("agents")
        users = sorted(agent for agent, table in (agents.items() if isinstance(agents, Mapping) else ())
                       if isinstance(table, Mapping) and table.get("auth") == name)
        if users and not force:
            raise UsageError(f"auth profile {name!r} is used by agent(s) {', '.join(users)}",
                             hint=f"change them first (corral agents set {users[0]} auth=OTHER), or use --force")
        del auth[name]
        return True

    tokens = TokenStore.of(dirs, name)
    had_profile = store.update(change)
    removed = False
    if tokens.path.exists() or tokens.marker_path.exists():
        with tokens.locked(timeout=30.0):  # not under a refresh that would store it again
            for path in (tokens.path, tokens.marker_path):
                try:
                    path.unlink()
                    removed = removed or path == tokens.path
                except FileNotFoundError:
                    pass
                except OSError as err:
                    raise translate_oserror(err, what="remove the stored credential", path=str(path)) from err
    if not had_profile and not removed:
        raise ProfileNotFound(name)
    return removed


__all__ = ["DEFAULT_ENV_VAR", "DEFAULT_REFRESH_WINDOW", "ENDPOINT_KEYS", "KINDS", "Profile", "add_profile", "check_env_var",
           "check_token_url", "get_profile", "list_profiles", "remove_profile", "validate_profile_name"]
