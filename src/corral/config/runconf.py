"""What ``corral run AGENT`` runs: the agent's entry in config.toml merged with the flags.

Kept apart from the config modules so that a run of an ad hoc agent (no config file)
does not import tomlkit at all.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..errors import UsageError
from ..isolation.policy import Isolation
from ..names import validate_agent
from ..paths import Dirs
from ..spec import Limits, RunSpec


def _isolation_fields(conf: Any, asked: Mapping[str, str | None]) -> dict[str, Any]:
    """Flags over the agent's config over ``[corral.defaults]`` (already merged into conf)."""
    out: dict[str, Any] = {}
    for field, key in (("level", "isolation"), ("network", "network"), ("user", "user")):
        value = asked[field] if asked[field] is not None else getattr(conf, key, None)
        if value is not None:
            out[field] = value
    for key in ("env_passthrough", "rw_paths", "home_ro"):
        value = getattr(conf, key, None)
        if value is not None:
            out[key] = tuple(value)
    return out


def resolve_run(dirs: Dirs, agent: str, *, argv: Sequence[str] = (), cwd: str | None = None,
                env: Mapping[str, str] | None = None, limits: Limits | None = None,
                auth: Sequence[str] | str | None = None, isolation: str | None = None, network: str | None = None,
                user: str | None = None, notice: Callable[[str], None] | None = None,
                **spec_fields: Any) -> RunSpec:
    """What ``corral run AGENT`` runs: the agent's config (if it has an entry; any valid
    name may be used ad hoc), then ``[corral.defaults]``, then the caller's flags on top.

    *auth*: profiles to grant instead of the agent's ``auth``. *notice* hears, in one line,
    that AGENT is not one of the configured agents (a typo, or a command word taken for
    the agent), when there are configured agents at all."""
    validate_agent(agent)
    asked_auth = ((auth,) if isinstance(auth, str) else tuple(auth)) if auth else ()
    conf = defaults = None
    settings_names: tuple[str, ...] = ()
    if (dirs.config / "config.toml").exists():  # no file: an ad hoc agent, and no tomlkit to load
        from .settings import load_run_config

        conf, settings = load_run_config(dirs, agent)
        defaults = settings.defaults  # isolation defaults hold for ad hoc agents too
        settings_names = settings.agent_names
        budget = settings.budget
        if budget.requested():
            spec_fields["budget"] = budget
    flags = limits or Limits()
    if spec_fields.get("strict_limits") is None:  # not asked either way: the agent's, else [corral.defaults]
        source = conf if conf is not None else defaults
        spec_fields["strict_limits"] = bool(source is not None and source.strict_limits)
    if spec_fields.get("log_max") is None:
        source = conf if conf is not None and conf.log_max is not None else defaults
        spec_fields["log_max"] = getattr(source, "log_max", None)
    asked = {"level": isolation, "network": network, "user": user}
    spec_fields["isolation"] = Isolation(**_isolation_fields(conf if conf is not None else defaults, asked))
    if conf is None:
        if notice is not None and settings_names:
            import difflib

            close = difflib.get_close_matches(agent, settings_names, n=1)
            notice(f"{agent!r} is not a configured agent; running it ad hoc"
                   + (f" (did you mean {close[0]!r}?)" if close else
                      f" (configured: {', '.join(settings_names[:6])}{', ...' if len(settings_names) > 6 else ''})"))
        if not argv:
            raise UsageError(f"no command given, and {agent!r} is not a configured agent with a default command",
                             hint="put the command after --, e.g. corral run lane1 -- make test")
        return RunSpec(agent=agent, argv=tuple(argv), cwd=cwd, env=dict(env or {}), limits=flags, auth=asked_auth,
                       **spec_fields)
    command = tuple(argv) or conf.command
    if not command:
        raise UsageError(f"no command given, and agent {agent!r} has no default command",
                         hint=f"give one after --, or set it: corral agents set {agent} command=\"...\"")
    merged = Limits(**{k: getattr(flags, k) if getattr(flags, k) is not None else getattr(conf.limits, k)
                       for k in ("memory_max", "memory_high", "cpu_quota", "tasks_max")})
    return RunSpec(agent=agent, argv=command, cwd=cwd or conf.workspace, env={**conf.env, **(env or {})},
                   limits=merged, max_runs=conf.max_runs, auth=asked_auth or ((conf.auth,) if conf.auth else ()),
                   **spec_fields)
