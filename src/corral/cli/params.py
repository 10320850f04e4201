"""click parameter types shared by the command groups: values are parsed by the same
functions the library uses (units.py), so the CLI and the API accept the same inputs."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import click

from ..errors import UsageError
from ..units import parse_duration

if TYPE_CHECKING:
    from ..runs.corral import Corral


class Ctx:
    """What every command gets: the library front, made on first use (``--help`` and
    completion never open a backend)."""

    def __init__(self, backend: str | None) -> None:
        self.backend_name = backend
        self._corral: Corral | None = None

    @property
    def corral(self) -> Corral:
        if self._corral is None:
            from ..runs.corral import Corral

            self._corral = Corral(self.backend_name)
        return self._corral


pass_ctx = click.make_pass_decorator(Ctx)


class Duration(click.ParamType):  # type: ignore[type-arg]  # generic only in click's stubs of 8.2+
    """``90``, ``90s``, ``30m``, ``1h30m`` -> seconds (finite, at most a year); zero only
    where it means something (a grace of 0 is an immediate SIGKILL, a lock timeout of 0
    means "don't wait")."""

    name = "duration"

    def __init__(self, *, allow_zero: bool = False) -> None:
        self.allow_zero = allow_zero

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        try:
            return parse_duration(value, allow_zero=self.allow_zero)
        except UsageError as err:
            self.fail(err.message + (f" ({err.hint})" if err.hint else ""), param, ctx)


DURATION = Duration()
DURATION_OR_ZERO = Duration(allow_zero=True)


def complete_runs(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """Run ids of this state dir (newest first) and, where agents fit, agent names: what
    `corral show <TAB>` and `corral kill <TAB>` offer. Reads directory listings only."""
    from click.shell_completion import CompletionItem

    from ..paths import Dirs

    dirs = Dirs.from_env()
    try:
        entries = sorted(os.scandir(dirs.runs), key=lambda e: e.stat().st_mtime, reverse=True)
    except OSError:
        entries = []
    ids = [e.name[:-5] for e in entries if e.name.endswith(".json") and not e.name.startswith(".")]
    out = [CompletionItem(i, help="run") for i in ids if i.startswith(incomplete)]
    if param.name in ("targets", "agents"):
        out += [CompletionItem(a, help="agent") for a in complete_agent_names(incomplete)]
    return out


def _config_table_names(table: str, incomplete: str) -> list[str]:
    """Names under [TABLE.*] of config.toml (tomllib: read-only, and fast enough for a TAB)."""
    from ..paths import Dirs

    try:
        import tomllib

        with open(Dirs.from_env().config / "config.toml", "rb") as f:
            names = tomllib.load(f).get(table) or {}
    except (OSError, ValueError):
        return []
    return [str(a) for a in names if str(a).startswith(incomplete)] if isinstance(names, dict) else []


def complete_agent_names(incomplete: str) -> list[str]:
    return _config_table_names("agents", incomplete)


def complete_agents(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    return complete_agent_names(incomplete)


def complete_profiles(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    return _config_table_names("auth", incomplete)


SIGNAL_NAMES = ["TERM", "KILL", "INT", "HUP", "QUIT", "USR1", "USR2", "STOP", "CONT"]


def complete_signals(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    return [s for s in SIGNAL_NAMES if s.startswith(incomplete.upper().removeprefix("SIG"))]


class CommandLineCommand(click.Command):
    """A command shaped ``NAME [OPTIONS] FIRST [--] COMMAND [ARGS...]`` (``corral run``), as
    systemd-run, docker run and pueue add are: corral's options come before FIRST or, when
    the word after FIRST is an option of ours, between FIRST and a ``--``; everything from
    the command on is the command's own, options included (``corral run lane1 ls -la``,
    ``corral run lane1 grep --help``).

    The line is rewritten as ``[OPTIONS...] -- FIRST COMMAND...`` before click parses it,
    so click still checks and converts every option of ours."""

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        first = next(p for p in self.get_params(ctx) if isinstance(p, click.Argument))
        return [self.options_metavar or "[OPTIONS]", first.human_readable_name.upper(), "[--] COMMAND [ARGS]..."]

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        takes_value: dict[str, bool] = {}
        for param in self.get_params(ctx):
            if isinstance(param, click.Option):
                for opt in (*param.opts, *param.secondary_opts):
                    takes_value[opt] = not (param.is_flag or param.count)

        def options_end(tokens: list[str]) -> int:
            """Index of the first of *tokens* that is not an option (or an option's value):
            a word, a lone ``-``, or the ``--`` that ends the options. An unknown ``-x`` is
            kept with the options, for click to reject by name."""
            i = 0
            while i < len(tokens):
                tok = tokens[i]
                if tok == "--" or tok == "-" or not tok.startswith("-"):
                    return i
                i += 2 if takes_value.get(tok.split("=", 1)[0]) and "=" not in tok else 1
            return i

        i = options_end(args)
        ours, rest = args[:i], args[i:]
        if rest[:1] == ["--"]:
            rest = rest[1:]
        if rest:
            first, after = rest[0], rest[1:]
            if after and after[0] not in ("--", "-") and after[0].startswith("-"):
                j = options_end(after)  # `corral run lane1 --timeout 3 -- make`: ours up to the --
                ours, after = ours + after[:j], after[j:]
            if after[:1] == ["--"]:
                after = after[1:]
            rest = [first, *after]
        return super().parse_args(ctx, ours + (["--", *rest] if rest else []))
