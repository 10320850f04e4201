"""``corral agents add|list|show|set|rm``: parse, call the library, print a table or JSON.

Errors are raised as CorralError subclasses; ``corral.cli.main.main`` maps them to exit codes.
"""

from __future__ import annotations

from typing import Any

import click

from ..errors import AgentNotFound
from ..paths import Dirs
from ..units import format_bytes, parse_env_pairs
from .output import echo_json, table
from .params import DURATION_OR_ZERO, complete_agents, complete_profiles


def _backend(obj: Any) -> str | None:
    return getattr(obj, "backend_name", None)


@click.group()
def agents() -> None:
    """Add, list, show, change and remove agents (config.toml, edited atomically)."""


@agents.command()
@click.argument("name")
@click.option("--workspace", metavar="DIR", help="Directory the agent's runs start in.")
@click.option("--command", "command", metavar="CMD",
              help="Default command of `corral run NAME` (and corral-agent@NAME.service), e.g. \"codex exec ...\".")
@click.option("--worktree", metavar="REPO[@BRANCH]",
              help="Create a git worktree of REPO on its own branch (default corral/NAME) and use it as workspace.")
@click.option("--env", "env_pairs", multiple=True, metavar="K=V", help="Environment variable (repeatable).")
@click.option("--memory-max", metavar="SIZE", help="Hard memory limit per run, e.g. 2G.")
@click.option("--memory-high", metavar="SIZE", help="Memory throttling threshold per run, e.g. 1G.")
@click.option("--cpu-quota", metavar="PCT", help="CPU quota per run, in percent of one CPU, e.g. 150%.")
@click.option("--tasks-max", metavar="N", help="Most processes/threads per run.")
@click.option("--max-runs", metavar="N", help="Most runs of this agent at once.")
@click.option("--auth", metavar="PROFILE", shell_complete=complete_profiles, help="Auth profile the agent's runs use.")
@click.option("--update", is_flag=True, help="Change an existing agent (only the options given).")
def add(name: str, workspace: str | None, command: str | None, worktree: str | None, env_pairs: tuple[str, ...], memory_max: str | None,
        memory_high: str | None, cpu_quota: str | None, tasks_max: str | None, max_runs: str | None,
        auth: str | None, update: bool) -> None:
    """Add agent NAME (an existing NAME fails unless --update)."""
    from ..agents import create_agent

    given = {"workspace": workspace, "command": command, "memory_max": memory_max, "memory_high": memory_high, "cpu_quota": cpu_quota,
             "tasks_max": tasks_max, "max_runs": max_runs, "auth": auth}
    changes: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if env_pairs:
        changes["env"] = parse_env_pairs(env_pairs)
    agent = create_agent(Dirs.from_env(), name, changes, worktree=worktree, update=update)
    where = f" (worktree {agent.worktree.path}, branch {agent.worktree.branch})" if agent.worktree and worktree else ""
    click.echo(f"{agent.name}: {'updated' if update else 'added'}{where}")


def _limits_text(a: Any) -> str:
    parts = []
    if a.limits.memory_max is not None:
        parts.append(f"mem<={format_bytes(a.limits.memory_max)}")
    if a.limits.memory_high is not None:
        parts.append(f"high={format_bytes(a.limits.memory_high)}")
    if a.limits.cpu_quota is not None:
        parts.append(f"cpu={a.limits.cpu_quota:g}%")
    if a.limits.tasks_max is not None:
        parts.append(f"tasks<={a.limits.tasks_max}")
    return " ".join(parts) or "-"


@agents.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def list_(as_json: bool) -> None:
    """List configured agents."""
    from ..config.settings import list_agents, open_store

    found = list_agents(open_store(Dirs.from_env()))
    if as_json:
        echo_json([a.to_json() for a in found])
        return
    rows = [[a.name, a.workspace or "-", _limits_text(a), str(a.max_runs or "-"), a.auth or "-"] for a in found]
    header = ["NAME", "WORKSPACE", "LIMITS", "MAX_RUNS", "AUTH"]
    table(rows, header)


@agents.command()
@click.argument("name", shell_complete=complete_agents)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object (with the effective values).")
def show(name: str, as_json: bool) -> None:
    """Show agent NAME as configured, and what its runs get with [corral.defaults]."""
    from ..config.settings import load_agent, load_effective_agent

    dirs = Dirs.from_env()
    agent = load_agent(dirs, name)
    effective = load_effective_agent(dirs, name)
    if agent is None or effective is None:
        raise AgentNotFound(name)
    data = agent.to_json()
    data["effective"] = {k: v for k, v in effective.to_json().items() if k != "name"}
    if as_json:
        echo_json(data)
        return
    for key, value in data.items():
        if key in ("effective", "env", "worktree") or value is None:
            continue
        shown = format_bytes(value) if key.startswith("memory_") else f"{value:g}%" if key == "cpu_quota" else value
        click.echo(f"{key + ':':14}{shown}")
    for var, value in agent.env.items():
        click.echo(f"{'env:':14}{var}={value}")
    if agent.worktree:
        wt = agent.worktree
        click.echo(f"{'worktree:':14}{wt.path} ({wt.repo}, branch {wt.branch}, "
                   f"{'created by corral' if wt.created else 'not created by corral'})")
    click.echo(f"{'effective:':14}{_limits_text(effective)}, max_runs {effective.max_runs or '-'}, "
               f"auth {effective.auth or '-'}")


@agents.command("set")
@click.argument("name", shell_complete=complete_agents)
@click.argument("assignments", nargs=-1, required=True, metavar="KEY=VALUE...")
def set_(name: str, assignments: tuple[str, ...]) -> None:
    """Change keys of agent NAME: workspace, command, memory_max, memory_high, cpu_quota,
    tasks_max, strict_limits, max_runs, auth, log_max, isolation, network, user,
    env_passthrough, rw_paths, home_ro, env.VAR. An empty value removes the key (KEY=)."""
    from ..config.settings import open_store, parse_assignments, set_agent

    set_agent(open_store(Dirs.from_env()), name, parse_assignments(assignments))
    click.echo(f"{name}: updated")


@agents.command()
@click.argument("name", shell_complete=complete_agents)
@click.option("--force", is_flag=True, help="Remove the agent's worktree even with uncommitted changes.")
@click.option("--grace", type=DURATION_OR_ZERO, default=10.0, show_default=True, metavar="DURATION",
              help="How long its runs get between SIGTERM and SIGKILL.")
@click.pass_obj
def rm(obj: Any, name: str, force: bool, grace: float) -> None:
    """Stop agent NAME's runs, remove the worktree corral created for it, remove its entry."""
    from ..agents import delete_agent

    done = delete_agent(Dirs.from_env(), name, force=force, backend=_backend(obj), grace=grace)
    if not done.found:
        click.echo(f"{name}: not configured; nothing to remove", err=True)
        return
    for run_id in done.stopped:
        click.echo(f"{name}: run {run_id} stopped")
    if done.worktree is not None:
        click.echo(f"{name}: worktree {done.worktree}")
    click.echo(f"{name}: removed")
