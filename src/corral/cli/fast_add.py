"""``corral agents add NAME [OPTION VALUE]... [--update]`` without click.

Why: 64 agents added at once on 2 cores are CPU-bound, and importing click is about half
of an add's CPU (bench/ANALYSIS.md). This path takes only the plain form of the command,
the one scripts use: the agent's name, then options from :data:`OPTIONS`, each with its
value (``--opt VALUE`` or ``--opt=VALUE``), and ``--update``. Anything else (``--help``,
``--worktree``, an unknown or incomplete option, ``--``, a global option before
``agents``) returns False untouched, and click parses it as before: so every message for
a malformed command line stays click's. tests/test_fast_add.py checks that :data:`OPTIONS`
is exactly ``agents add``'s click options, and that both paths leave the same file.

What it does with the parsed values is what the click command does
(:func:`corral.agents.create_agent`), and it prints and exits as ``cli.main.main`` does.
"""

from __future__ import annotations

import sys

# --option -> create_agent's key, for the options that take one value each.
OPTIONS = {
    "--workspace": "workspace", "--command": "command", "--memory-max": "memory_max",
    "--memory-high": "memory_high", "--cpu-quota": "cpu_quota", "--tasks-max": "tasks_max",
    "--max-runs": "max_runs", "--auth": "auth",
}
REPEATED = {"--env": "env"}  # may be given more than once (K=V)
FLAGS = {"--update": "update"}


def parse(args: list[str]) -> tuple[str, dict[str, str], list[str], bool] | None:
    """``(name, values, env pairs, update)``, or None if this is not the plain form."""
    if not args or args[0].startswith("-"):
        return None
    name, rest = args[0], args[1:]
    values: dict[str, str] = {}
    env: list[str] = []
    update = False
    i = 0
    while i < len(rest):
        word = rest[i]
        option, eq, inline = word.partition("=")
        if option in FLAGS and not eq:
            update = True
            i += 1
            continue
        if option not in OPTIONS and option not in REPEATED:
            return None  # a positional, `--`, -h, --worktree, a typo: click's to answer
        if eq:
            value = inline
            i += 1
        elif i + 1 < len(rest):
            value = rest[i + 1]
            i += 2
        else:
            return None  # a missing value: click says so
        if option in REPEATED:
            env.append(value)
        elif option in values:
            return None  # given twice: whatever click makes of it
        else:
            values[OPTIONS[option]] = value
    return name, values, env, update


def main(args: list[str]) -> bool:
    """Run ``agents add`` for *args* (what follows ``agents add``) and exit; False if
    *args* are not the plain form (then nothing was done)."""
    parsed = parse(args)
    if parsed is None:
        return False
    name, values, env_pairs, update = parsed
    from ..errors import CorralError
    from .housekeeping import settle_lost_runs

    settle_lost_runs()
    try:
        from ..agents import create_agent
        from ..paths import Dirs
        from ..units import parse_env_pairs

        changes: dict[str, object] = dict(values)
        if env_pairs:
            changes["env"] = parse_env_pairs(env_pairs)
        agent = create_agent(Dirs.from_env(), name, changes, update=update)
    except CorralError as err:
        print(f"corral: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    print(f"{agent.name}: {'updated' if update else 'added'}")
    sys.exit(0)
