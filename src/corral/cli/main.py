"""The ``corral`` command: parse, call the library, print a table or JSON.

Exit codes come from the error tree (``CorralError.exit_code``), mapped in ``main``.
"""

from __future__ import annotations

import sys

import click

from .. import __version__
from ..errors import CorralError
from .housekeeping import settle_lost_runs
from .output import echo_json
from .params import (
    Ctx,
    pass_ctx,
)

EXIT_STATUS = (
    ("0", "success (attached run: the command's own status)"),
    ("1", "corral failed at run time"),
    ("2", "bad usage or invalid input"),
    ("3", "not found: run, agent, auth profile"),
    ("69", "no usable backend (see: corral doctor)"),
    ("75", "busy: session lease, max_runs, a wait timed out"),
    ("77", "permission denied"),
    ("78", "config file malformed or invalid"),
    ("124", "the run hit its --timeout"),
    ("126/127", "the command is not executable / not found"),
    ("128+N", "the run's main process was killed by signal N"),
)

ENVIRONMENT = (
    ("CORRAL_BACKEND", "systemd or cgroupfs, as --backend (default: detected)"),
    ("CORRAL_CGROUP_ROOT", "cgroupfs: the cgroup v2 directory runs go under"),
    ("XDG_CONFIG_HOME", "config.toml, under corral/ (root: /etc/corral)"),
    ("XDG_STATE_HOME", "records, logs, tokens (root: /var/lib/corral)"),
    ("XDG_RUNTIME_DIR", "leases, broker socket (root: /run/corral)"),
    ("CORRAL_SHARED_OWNER", "0: each detached run gets an owner of its own (default: corral's shared owner)"),
    ("CORRAL_RUN_ID", "set in every run (with CORRAL_AGENT, CORRAL_UNIT)"),
)


def _epilog() -> str:
    """Examples, exit status and environment for `corral --help` (README's tables, too)."""
    def rows(pairs: tuple[tuple[str, str], ...]) -> list[str]:
        width = max(len(k) for k, _ in pairs)
        return [f"  {k.ljust(width)}  {v}" for k, v in pairs]

    return "\n".join([
        "\b", "Examples:",
        "  corral agents add lane1 --workspace ~/src/app",
        "  corral run lane1 -- codex exec \"fix the tests\"",
        "  corral run -d --memory-max 4G lane1 -- npm test",
        "  corral ps; corral logs -f RUN; corral kill lane1",
        "", "\b", "Exit status:", *rows(EXIT_STATUS),
        "", "\b", "Environment:", *rows(ENVIRONMENT),
        "", "Each command has its own --help.",
    ])


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=_epilog())
@click.option("--backend", type=click.Choice(["systemd", "cgroupfs"]), default=None,
              help="Override backend detection (also: CORRAL_BACKEND).")
@click.version_option(version=__version__, prog_name="corral")  # not importlib.metadata: that costs ~9 ms
@click.pass_context
def cli(ctx: click.Context, backend: str | None) -> None:
    """Run AI coding agents side by side, each run in its own cgroup."""
    ctx.obj = Ctx(backend)
    settle_lost_runs()


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as a JSON object.")
@click.option("--keep", metavar="DURATION", default="7d", show_default=True,
              help="Keep records of ended runs this long.")
@pass_ctx
def gc(c: Ctx, as_json: bool, keep: str) -> None:
    """Kill runs whose owner is gone, remove empty cgroups, prune old records."""
    from ..units import parse_duration

    report = c.corral.gc(retention=parse_duration(keep))
    if as_json:
        echo_json(report.to_json())
        return
    for r in report.reaped:
        click.echo(f"reaped {r['id']} ({r['agent']}): owner gone, {r['processes_killed']} process(es) killed")
    click.echo(f"{len(report.reaped)} run(s) reaped, {len(report.removed_cgroups)} cgroup(s) removed, "
               f"{len(report.pruned_records)} old record(s) pruned")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the diagnosis as a JSON object.")
@pass_ctx
def doctor(c: Ctx, as_json: bool) -> None:
    """Say which backend is usable here, why, and what is missing."""
    from ..doctor import diagnose

    report = diagnose(c.backend_name)
    if as_json:
        echo_json(report)
    else:
        for b in report["backends"]:
            mark = "usable" if b["usable"] else "not usable"
            click.echo(f"{b['name']}: {mark}")
            for r in b["reasons"]:
                click.echo(f"  - {r}")
            for m in b["missing"]:
                click.echo(f"  missing: {m}")
        click.echo(f"chosen: {report['chosen'] or 'none'}")
        for level, entry in report["isolation"]["levels"].items():
            click.echo(f"isolation {level}: {'usable' if entry['usable'] else 'not usable'} ({entry['reason']})")
        for k, v in report["dirs"].items():
            click.echo(f"{k} dir: {v}")
    if not report["chosen"]:
        sys.exit(69)


@cli.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script for SHELL; it completes commands, options, run
    ids, agent names and signals.

    \b
    Examples:
      eval "$(corral completion bash)"                 # in ~/.bashrc
      corral completion fish > ~/.config/fish/completions/corral.fish"""
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    assert cls is not None  # the three choices are click's own
    click.echo(cls(cli, {}, "corral", "_CORRAL_COMPLETE").source())


from .runs import ps as _ps, run as _run, show as _show

for _command in (_run, _ps, _show):
    cli.add_command(_command)


from .control import kill as _kill, pause as _pause, resume as _resume, stop as _stop, wait as _wait

for _command in (_stop, _kill, _wait, _pause, _resume):
    cli.add_command(_command)


from .sessions import sessions as _sessions

cli.add_command(_sessions)


from .agents import agents as _agents

cli.add_command(_agents)


from .auth import auth as _auth, broker as _broker

cli.add_command(_auth)
cli.add_command(_broker)


from .deploy import install_units as _install_units

cli.add_command(_install_units)


from .top import top as _top

cli.add_command(_top)


from .logs import logs as _logs

cli.add_command(_logs)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI and map errors to exit codes, in one place."""
    try:
        rv = cli.main(args=argv, prog_name="corral", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(2 if isinstance(err, click.UsageError) else err.exit_code)
    except CorralError as err:
        click.echo(f"corral: {err}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
