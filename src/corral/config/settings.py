"""corral's config: agents and global settings, in ``$XDG_CONFIG_HOME/corral/config.toml``.

::

    [corral]                  # the whole budget: limits on corral.slice
    memory_max = "16G"
    cpu_quota = "400%"

    [corral.defaults]         # for every agent that does not set its own
    memory_max = "2G"
    max_runs = 2
    log_max = "10M"           # a detached run's log rotates here (it keeps one rotated file)

    [agents.lane1]
    workspace = "/home/me/src/app"
    env = { OPENAI_BASE_URL = "http://localhost:8080" }
    memory_max = "4G"
    cpu_quota = "150%"
    tasks_max = 512
    max_runs = 1
    strict_limits = true      # refuse to run where a limit would not be enforced
    auth = "openai"           # a profile name: credentials are never copied into agents

Every change goes through :class:`~corral.config.store.ConfigStore` (locked, atomic,
comment-preserving). Values are validated before the lock is taken, so bad input
(exit 2) never writes anything; a bad value found *in* the file is a config error
(exit 78) that names its key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import AgentNotFound, ConfigError, UsageError
from ..names import validate_agent
from ..paths import Dirs
from ..spec import Limits
from ..worktree import Worktree
from .lock import ConfigBusy
from .store import DEFAULT_LOCK_TIMEOUT, ConfigParseError, ConfigStore
from .values import (
    AGENT_KEYS,
    DEFAULT_KEYS,
    ISOLATION_KEYS,
    LIMIT_KEYS,
    SETTABLE_KEYS,
    apply_changes,
    mapping_in,
    normalize,
    normalize_changes,
    parse_assignments,
    parse_entry,
)


@dataclass(frozen=True)
class AgentConfig:
    """One ``[agents.NAME]`` entry, parsed. ``None`` means "not set here"."""

    name: str
    workspace: str | None = None
    command: tuple[str, ...] | None = None  # what `corral run NAME` runs when no command is given
    env: dict[str, str] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    strict_limits: bool | None = None  # refuse to run where a limit would not be enforced
    max_runs: int | None = None
    auth: str | None = None
    log_max: int | None = None  # bytes at which a detached run's log rotates
    isolation: str | None = None  # none | standard | strict
    network: str | None = None  # host | loopback | none
    user: str | None = None  # who a root-started run executes as
    env_passthrough: tuple[str, ...] | None = None
    rw_paths: tuple[str, ...] | None = None
    home_ro: tuple[str, ...] | None = None
    worktree: Worktree | None = None

    def with_defaults(self, settings: Settings) -> AgentConfig:
        """What a run of this agent gets: its own values, else ``[corral.defaults]``."""
        d = settings.defaults
        limits = Limits(**{k: getattr(self.limits, k) if getattr(self.limits, k) is not None else getattr(d.limits, k)
                           for k in LIMIT_KEYS})
        own = {k: getattr(self, k) if getattr(self, k) is not None else getattr(d, k)
               for k in ("strict_limits", "max_runs", "auth", "log_max", *ISOLATION_KEYS)}
        return replace(self, env={**d.env, **self.env}, limits=limits, **own)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "workspace": self.workspace,
                "command": list(self.command) if self.command else None, "env": dict(self.env), **self.limits.__dict__,
                "strict_limits": self.strict_limits, "max_runs": self.max_runs, "auth": self.auth, "log_max": self.log_max,
                **{k: list(v) if isinstance(v, tuple) else v for k in ISOLATION_KEYS for v in [getattr(self, k)]},
                "worktree": self.worktree.to_toml() if self.worktree else None}


@dataclass(frozen=True)
class Defaults:
    env: dict[str, str] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    strict_limits: bool | None = None
    max_runs: int | None = None
    auth: str | None = None
    log_max: int | None = None
    isolation: str | None = None
    network: str | None = None
    user: str | None = None
    env_passthrough: tuple[str, ...] | None = None
    rw_paths: tuple[str, ...] | None = None
    home_ro: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Settings:
    """The ``[corral]`` table: *budget* is the limit on corral.slice (all agent work)."""

    budget: Limits = field(default_factory=Limits)
    defaults: Defaults = field(default_factory=Defaults)
    agent_names: tuple[str, ...] = ()  # the configured agents (to name them when one is not)


def _agent_from(doc: Mapping[str, Any], name: str, path: Path) -> AgentConfig | None:
    agents = doc.get("agents")
    if agents is None:
        return None
    if not isinstance(agents, Mapping):
        raise ConfigError(f"{path}: 'agents' must be a table")
    if name not in agents:
        return None
    return AgentConfig(name=name, **parse_entry(agents[name], AGENT_KEYS, f"agents.{name}", path))


def _settings_from(doc: Mapping[str, Any], path: Path) -> Settings:
    top = doc.get("corral") or {}
    own = {k: v for k, v in top.items() if k != "defaults"} if isinstance(top, Mapping) else top
    budget = parse_entry(own, LIMIT_KEYS, "corral", path)["limits"]
    defaults = parse_entry(top.get("defaults") or {}, DEFAULT_KEYS, "corral.defaults", path)
    agents = doc.get("agents")
    names = tuple(str(k) for k in agents) if isinstance(agents, Mapping) else ()
    return Settings(budget=budget, defaults=Defaults(**defaults), agent_names=names)


# --- the API ----------------------------------------------------------------------------


def config_path(dirs: Dirs) -> Path:
    return dirs.config / "config.toml"


def open_store(dirs: Dirs | None = None, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> ConfigStore:
    return ConfigStore(config_path(dirs or Dirs.from_env()), lock_timeout=lock_timeout)


def get_agent(store: ConfigStore, name: str) -> AgentConfig | None:
    validate_agent(name)
    return _agent_from(store.document(), name, store.path)


def list_agents(store: ConfigStore) -> list[AgentConfig]:
    doc = store.document()
    agents = doc.get("agents") or {}
    if not isinstance(agents, Mapping):
        raise ConfigError(f"{store.path}: 'agents' must be a table")
    out = []
    for name in agents:
        try:
            validate_agent(name)
        except UsageError as err:
            raise ConfigError(f"{store.path}: agents.{name}: {err.message}") from None
        agent = _agent_from(doc, name, store.path)
        assert agent is not None
        out.append(agent)
    return out


def add_agent(store: ConfigStore, name: str, changes: Mapping[str, Any] | None = None, *, update: bool = False,
              cwd: str | None = None) -> AgentConfig:
    """Add ``[agents.NAME]``. An existing name is an error (exit 2) unless *update*, which
    changes only the keys given."""
    validate_agent(name)
    values = normalize_changes(changes or {}, cwd=cwd)  # before the lock: bad input writes nothing

    def change(doc: Any) -> AgentConfig:
        agents = mapping_in(doc, "agents", store.path, create=True, super_table=True)
        assert agents is not None
        if name in agents and not update:
            raise UsageError(f"agent {name!r} already exists",
                             hint=f"use --update to change it, or: corral agents set {name} KEY=VALUE")
        if name in agents:
            apply_changes(agents[name], values)
        else:
            import tomlkit

            entry = tomlkit.table()
            apply_changes(entry, values)
            agents[name] = entry
        agent = _agent_from(doc, name, store.path)
        assert agent is not None
        return agent

    return store.update(change)


def set_agent(store: ConfigStore, name: str, changes: Mapping[str, Any], *, cwd: str | None = None) -> AgentConfig:
    """Change keys of an existing agent (``None`` removes a key). Unknown agent: exit 3."""
    validate_agent(name)
    values = normalize_changes(changes, cwd=cwd)

    def change(doc: Any) -> AgentConfig:
        agents = mapping_in(doc, "agents", store.path, create=False)
        if agents is None or name not in agents:
            raise AgentNotFound(name)
        apply_changes(agents[name], values)
        agent = _agent_from(doc, name, store.path)
        assert agent is not None
        return agent

    return store.update(change)


def remove_agent(store: ConfigStore, name: str) -> AgentConfig | None:
    """Remove the entry only (see :func:`corral.agents.delete_agent` for runs and worktree).
    Returns what was removed, None if there was nothing to remove."""
    validate_agent(name)

    def change(doc: Any) -> AgentConfig | None:
        agent = _agent_from(doc, name, store.path)
        if agent is not None:
            del doc["agents"][name]
        return agent

    return store.update(change)


def set_settings(store: ConfigStore, changes: Mapping[str, Any]) -> Settings:
    """Change ``[corral]``: ``memory_max`` etc. (the budget of corral.slice) or
    ``defaults.KEY`` (``[corral.defaults]``). ``None`` removes a key."""
    own = {k: v for k, v in changes.items() if not k.startswith("defaults.")}
    dflt = {k[len("defaults."):]: v for k, v in changes.items() if k.startswith("defaults.")}
    own_values = normalize_changes(own, allowed=LIMIT_KEYS)
    dflt_values = normalize_changes(dflt, allowed=DEFAULT_KEYS)

    def change(doc: Any) -> Settings:
        top = mapping_in(doc, "corral", store.path, create=True)
        assert top is not None
        apply_changes(top, own_values)
        if dflt_values:
            defaults = mapping_in(top, "defaults", store.path, create=True)
            assert defaults is not None
            apply_changes(defaults, dflt_values)
        return _settings_from(doc, store.path)

    return store.update(change)


# --- for `corral run` -----------------------------------------------------------------


def load_agent(dirs: Dirs, name: str) -> AgentConfig | None:
    """The agent's own entry, or None if it is not configured."""
    return get_agent(open_store(dirs), name)


def load_settings(dirs: Dirs) -> Settings:
    store = open_store(dirs)
    return _settings_from(store.document(), store.path)


def load_run_config(dirs: Dirs, name: str) -> tuple[AgentConfig | None, Settings]:
    """What a run needs, from one read of the file: the agent with ``[corral.defaults]``
    filled in (None if it is not configured) and the ``[corral]`` settings (the budget)."""
    validate_agent(name)
    store = open_store(dirs)
    doc = store.values()  # plain values through tomllib: a run does not load tomlkit
    if _agent_from(doc, name, store.path) is not None:
        store.check_trusted_for_root()  # what it names is about to run
    settings = _settings_from(doc, store.path)
    agent = _agent_from(doc, name, store.path)
    return (agent.with_defaults(settings) if agent else None), settings


def load_effective_agent(dirs: Dirs, name: str) -> AgentConfig | None:
    """The agent with ``[corral.defaults]`` filled in; None if the agent is not configured.
    Flags given to ``corral run`` override these values."""
    return load_run_config(dirs, name)[0]


__all__ = [
    "AGENT_KEYS",
    "SETTABLE_KEYS",
    "AgentConfig",
    "ConfigBusy",
    "ConfigParseError",
    "ConfigStore",
    "Defaults",
    "Settings",
    "add_agent",
    "config_path",
    "get_agent",
    "list_agents",
    "load_agent",
    "load_effective_agent",
    "load_run_config",
    "load_settings",
    "normalize",
    "normalize_changes",
    "open_store",
    "parse_assignments",
    "remove_agent",
    "set_agent",
    "set_settings",
]
