"""Config values: user input -> TOML text, TOML -> typed values, and edits of tomlkit tables
that leave every byte they do not change as it was. Private to :mod:`corral.config.settings`.

User input that is wrong is a :class:`UsageError` (exit 2), raised before any lock is
taken; a wrong value found in the file is a :class:`ConfigError` (exit 78) naming its key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError, UsageError
from ..paths import current_dir
from ..spec import Limits
from ..units import MAX_TASKS, parse_log_max, parse_percent, parse_positive_int, parse_size
from ..worktree import Worktree

LIMIT_KEYS = ("memory_max", "memory_high", "cpu_quota", "tasks_max")
ISOLATION_KEYS = ("isolation", "network", "user", "env_passthrough", "rw_paths", "home_ro")
AGENT_KEYS = ("workspace", "command", "env", *LIMIT_KEYS, "strict_limits", "max_runs", "auth", "log_max",
              *ISOLATION_KEYS, "worktree")
DEFAULT_KEYS = ("env", *LIMIT_KEYS, "strict_limits", "max_runs", "auth", "log_max", *ISOLATION_KEYS)  # [corral.defaults]
SETTABLE_KEYS = tuple(k for k in AGENT_KEYS if k != "worktree")  # `agents set KEY=VALUE`

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _profile(value: Any) -> str:
    if not isinstance(value, str) or not _PROFILE_NAME.fullmatch(value):
        raise UsageError(f"invalid auth profile name {value!r}", hint="use letters, digits, '_', '.', '-'")
    return value


def _env(value: Any) -> dict[str, str | None]:
    if not isinstance(value, Mapping):
        raise UsageError(f"env must be a table of NAME = value, not {value!r}")
    out: dict[str, str | None] = {}
    for key, val in value.items():
        if not isinstance(key, str) or not _ENV_NAME.fullmatch(key):
            raise UsageError(f"invalid environment variable name {key!r}")
        if val is not None and (not isinstance(val, str) or "\0" in val):
            raise UsageError(f"invalid value for environment variable {key}: {val!r}")
        out[key] = val
    return out


def _scalar(value: Any, what: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise UsageError(f"invalid {what} {value!r}")
    return value


def parse_command(value: Any) -> tuple[str, ...]:
    """An agent's default command: a list of strings, or one string split like a shell."""
    import shlex

    if isinstance(value, str):
        try:
            argv = shlex.split(value)
        except ValueError as err:
            raise UsageError(f"invalid command {value!r}: {err}") from None
    elif isinstance(value, (list, tuple)) and all(isinstance(a, str) for a in value):
        argv = [str(a) for a in value]
    else:
        raise UsageError(f"invalid command {value!r}: use a string or a list of strings")
    if not argv:
        raise UsageError("invalid command: it is empty")
    return tuple(argv)


def parse_bool(value: Any, what: str) -> bool:
    """true/false in TOML; on the command line (`agents set NAME strict_limits=yes`) also the
    words systemd takes for a boolean."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("1", "yes", "true", "on"):
            return True
        if word in ("0", "no", "false", "off"):
            return False
    raise UsageError(f"invalid {what} {value!r}: use true or false")


def normalize(key: str, value: Any, *, cwd: str | None = None) -> Any:
    """Validate one user-given value and return what goes into the TOML file.
    ``None`` means "remove the key". Raises :class:`UsageError` (exit 2)."""
    if value is None:
        return None
    if key == "log_max":
        parse_log_max(_scalar(value, "log_max"))
        return value.strip() if isinstance(value, str) else value
    if key in ("memory_max", "memory_high"):
        parse_size(_scalar(value, key.replace("_", " ")))
        return value.strip() if isinstance(value, str) else value  # keep "2G" as the user wrote it
    if key == "cpu_quota":
        return f"{parse_percent(_scalar(value, 'CPU quota')):g}%"
    if key in ("tasks_max", "max_runs"):
        return parse_positive_int(_scalar(value, key.replace("_", " ")), key.replace("_", " "), maximum=MAX_TASKS)
    if key == "auth":
        return _profile(value)
    if key == "strict_limits":
        return parse_bool(value, key)
    if key == "command":
        return list(parse_command(value))
    if key == "env":
        return _env(value)
    if key == "workspace":
        if not isinstance(value, str) or not value:
            raise UsageError(f"invalid workspace {value!r}")
        given = os.path.expanduser(value)
        path = os.path.normpath(given if os.path.isabs(given) else os.path.join(cwd or current_dir(), given))
        if not os.path.isdir(path):
            raise UsageError(f"workspace {path} does not exist or is not a directory")
        return path
    if key in ISOLATION_KEYS:
        return _isolation_value(key, value)
    if key == "worktree" and isinstance(value, Worktree):
        return value.to_toml()
    raise UsageError(f"unknown setting {key!r}", hint=f"known: {', '.join(SETTABLE_KEYS)}")


def _isolation_value(key: str, value: Any) -> Any:
    from ..isolation.policy import parse_level, parse_names, parse_network, parse_user

    if key == "isolation":
        return parse_level(value)
    if key == "network":
        return parse_network(value)
    if key == "user":
        return parse_user(value)
    if isinstance(value, str):  # `agents set NAME rw_paths=/a,/b`
        value = [v.strip() for v in value.split(",") if v.strip()]
    return list(parse_names(value, key.replace("_", " ")))


def normalize_changes(changes: Mapping[str, Any], *, allowed: Iterable[str] = AGENT_KEYS,
                      cwd: str | None = None) -> dict[str, Any]:
    allowed = tuple(allowed)
    out = {}
    for key, value in changes.items():
        if key not in allowed:
            raise UsageError(f"unknown setting {key!r}", hint=f"known: {', '.join(allowed)}")
        out[key] = normalize(key, value, cwd=cwd)
    return out


def _parse_limits(table: Mapping[str, Any]) -> Limits:
    return Limits.parse(**{k: _scalar(table[k], k) for k in LIMIT_KEYS if k in table})


def parse_entry(table: Mapping[str, Any], keys: tuple[str, ...], where: str, path: Path) -> dict[str, Any]:
    """TOML values -> typed values; any problem is a ConfigError naming the key."""
    if not isinstance(table, Mapping):
        raise ConfigError(f"{path}: {where} must be a table")
    unknown = sorted(set(table) - set(keys))
    if unknown:
        raise ConfigError(f"{path}: {where}: unknown key(s) {', '.join(unknown)}", hint=f"known: {', '.join(keys)}")
    try:
        out: dict[str, Any] = {"limits": _parse_limits(table)}
        if "env" in table:
            out["env"] = {k: v for k, v in _env(table["env"]).items() if v is not None}
        if "strict_limits" in table:
            if not isinstance(table["strict_limits"], bool):
                raise UsageError("strict_limits must be true or false")
            out["strict_limits"] = table["strict_limits"]
        if "log_max" in table:
            out["log_max"] = parse_log_max(_scalar(table["log_max"], "log_max"))
        if "max_runs" in table:
            out["max_runs"] = parse_positive_int(_scalar(table["max_runs"], "max runs"), "max runs")
        if "auth" in table:
            out["auth"] = _profile(table["auth"])
        if "workspace" in table:
            if not isinstance(table["workspace"], str):
                raise UsageError("workspace must be a string")
            out["workspace"] = table["workspace"]
        if "command" in table:
            out["command"] = parse_command(table["command"])
        for key in ISOLATION_KEYS:
            if key in table:
                value = _isolation_value(key, table[key])
                out[key] = tuple(value) if isinstance(value, list) else value
        if "worktree" in table:
            if not isinstance(table["worktree"], Mapping):
                raise UsageError("worktree must be a table")
            out["worktree"] = Worktree.from_toml(table["worktree"])
    except (UsageError, ValueError) as err:
        raise ConfigError(f"{path}: {where}: {getattr(err, 'message', err)}") from None
    return out


# --- the document ---------------------------------------------------------------------


def mapping_in(doc: MutableMapping[str, Any], key: str, path: Path, *, create: bool,
              super_table: bool = False) -> MutableMapping[str, Any] | None:
    value = doc.get(key)
    if value is None:
        if not create:
            return None
        import tomlkit  # edits only: reading the config needs no tomlkit (ConfigStore.values)

        # A super table prints as [agents.NAME] headers without an empty [agents] above them.
        doc[key] = tomlkit.table(is_super_table=super_table)
        return doc[key]  # type: ignore[no-any-return]
    if not isinstance(value, MutableMapping):
        raise ConfigError(f"{path}: {key!r} must be a table")
    return value


def _set(table: MutableMapping[str, Any], key: str, value: Any) -> None:
    """Set or remove *key*, leaving every other byte of the table as it was."""
    from tomlkit.items import AoT, Table

    if value is None:
        if key in table:
            del table[key]
        return
    if key in table or not isinstance(table, Table):
        table[key] = value  # tomlkit keeps the key's place and its trailing comment
        return
    # A new key goes after the table's last key, not after its trailing comments or
    # sub-tables (tomlkit appends at the very end of the table's body).
    last = None
    for index, (k, item) in enumerate(table.value.body):
        if k is not None and not isinstance(item, (Table, AoT)):
            last = index
    try:
        if last is None:
            raise AttributeError
        table.value._insert_at(last + 1, key, value)
    except (AttributeError, KeyError, TypeError, ValueError):
        table[key] = value


def apply_changes(table: MutableMapping[str, Any], values: Mapping[str, Any]) -> None:
    for key in AGENT_KEYS:  # a stable order for new keys
        if key not in values:
            continue
        value = values[key]
        if key == "env" and value is not None:
            env = table.get("env")
            if isinstance(env, MutableMapping):  # edit in place: its layout and comments stay
                for var, val in value.items():
                    _set(env, var, val)
                if not len(env):
                    del table["env"]
                continue
            value = {var: val for var, val in value.items() if val is not None} or None
        if isinstance(value, dict):
            import tomlkit

            inline = tomlkit.inline_table()
            inline.update(value)
            value = inline
        _set(table, key, value)


def parse_assignments(pairs: Iterable[str]) -> dict[str, Any]:
    """``["memory-max=2G", "env.FOO=bar", "auth="]`` -> changes for :func:`set_agent`.
    An empty value removes the key (``env.FOO=`` removes FOO)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"invalid assignment {pair!r}", hint="use KEY=VALUE, e.g. memory_max=2G or env.FOO=bar")
        if key.startswith("env."):
            var = key[4:]
            out.setdefault("env", {})[var] = value if value != "" else None
            continue
        key = key.replace("-", "_")
        if key == "worktree":
            raise UsageError("the worktree cannot be set", hint="remove the agent and add it with --worktree")
        if key not in SETTABLE_KEYS:
            raise UsageError(f"unknown setting {key!r}", hint=f"known: {', '.join(SETTABLE_KEYS)}, env.NAME")
        out[key] = value if value != "" else None
    return out
