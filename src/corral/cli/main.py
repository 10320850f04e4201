"""The ``corral`` command: parse, call the library, print a table or JSON.

Exit codes come from the error tree (``CorralError.exit_code``), mapped in ``main``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from .. import __version__
from ..errors import CorralError, UsageError
from ..units import parse_env_pairs
from .output import WaitProgress, ago, command_line, duration, echo_json, local_time, process_tree, table
from .params import (
    DURATION_OR_ZERO,
    CommandLineCommand,
    Ctx,
    complete_agents,
    complete_profiles,
    complete_runs,
    complete_signals,
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
    _settle_lost_runs()


def _settle_lost_runs() -> None:
    """Every command first records the ends the watchdogs noted (an owner that died) and
    removes those runs' empty cgroup dirs: nobody has to run ps or gc for that."""
    try:
        from ..paths import Dirs
        from ..records import RecordStore

        RecordStore(Dirs.from_env().runs).settle_lost()
    except Exception:  # noqa: BLE001, S110 -- housekeeping must never break the command asked for
        pass


# --- run ----------------------------------------------------------------------------------




@cli.command(cls=CommandLineCommand)
@click.argument("agent", shell_complete=complete_agents)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.option("--detach", "-d", is_flag=True, help="Print the run id and return; output goes to the run's log.")
@click.option("--session", metavar="KEY", help="Hold the exclusive lease on (AGENT, KEY) for the whole run.")
@click.option("--lock-timeout", type=DURATION_OR_ZERO, metavar="DURATION",
              help="Wait at most SECS for the session lease (0: fail at once; default: no limit). Exit 75.")
@click.option("--timeout", metavar="DURATION", help="End the whole run after DURATION (90s, 30m, 2h): exit 124.")
@click.option("--grace", type=DURATION_OR_ZERO, default=10.0, show_default=True, metavar="DURATION",
              help="After a forwarded signal, kill the whole run if it has not ended within SECS.")
@click.option("--keep-leftovers", is_flag=True,
              help="When the command exits, let what it left behind finish (state: draining).")
@click.option("--no-wait", is_flag=True, help="If the agent is at its max_runs, fail (exit 75) instead of waiting.")
@click.option("--auth", metavar="PROFILE", multiple=True, shell_complete=complete_profiles,
              help="Grant auth PROFILE to the run (repeatable; default: the agent's auth). See corral auth --help.")
@click.option("--cwd", metavar="DIR", help="Working directory (default: the agent's workspace, else here).")
@click.option("--env", "env_pairs", multiple=True, metavar="K=V", help="Extra environment variable (repeatable).")
@click.option("--memory-max", metavar="SIZE", help="Hard memory limit, e.g. 2G.")
@click.option("--memory-high", metavar="SIZE", help="Memory throttling threshold, e.g. 1G.")
@click.option("--cpu-quota", metavar="PCT", help="CPU quota in percent of one CPU, e.g. 150%.")
@click.option("--tasks-max", metavar="N", help="Most processes/threads the run may have.")
@click.option("--isolation", type=click.Choice(["none", "standard", "strict"]), default=None,
              help="The boundary around the run (default: the agent's, else standard). none: containment only.")
@click.option("--network", type=click.Choice(["host", "loopback", "none"]), default=None,
              help="host (default), loopback (own network namespace with lo only), or none.")
@click.option("--user", metavar="NAME", help="As root: run as NAME (default: the workspace's owner).")
@click.option("--log-max", metavar="SIZE", help="A detached run's log rotates at SIZE (it keeps one rotated file; "
                                               "default: the agent's log_max, else 10M).")
@click.option("--strict-limits/--no-strict-limits", default=None,
              help="Refuse to start (exit 1) if a requested limit would not be enforced here, instead of a "
                   "warning (default: the agent's strict_limits, else off).")
@pass_ctx
def run(c: Ctx, agent: str, command: tuple[str, ...], detach: bool, session: str | None,
        lock_timeout: float | None, timeout: str | None, grace: float, keep_leftovers: bool, no_wait: bool,
        auth: tuple[str, ...], cwd: str | None, env_pairs: tuple[str, ...], memory_max: str | None,
        memory_high: str | None, cpu_quota: str | None, tasks_max: str | None, isolation: str | None,
        network: str | None, user: str | None, log_max: str | None, strict_limits: bool | None) -> None:
    """Run COMMAND for AGENT in its own cgroup (a systemd scope where systemd runs).

    corral's options come before AGENT, or between AGENT and a `--`; from the command on,
    everything is the command's own, as with systemd-run and docker run. A configured
    agent (corral agents add) gives the workspace, env, limits, auth and default command;
    options override them. Any valid name may also be used ad hoc.

    \b
    Examples:
      corral run lane1 make test
      corral run --timeout 30m --memory-max 2G lane1 codex exec "fix the tests"
      corral run lane1 --session main -- claude -p "review"
      corral run -d lane2 npm run build      # detached: prints the run id

    Exit status: the command's own (128+N if it was killed by signal N), 124 on --timeout,
    126/127 if it cannot be started; corral's own errors as listed in corral --help."""
    from ..config.runconf import resolve_run
    from ..names import validate_agent
    from ..spec import Limits

    validate_agent(agent)
    spec = resolve_run(
        c.corral.dirs, agent, argv=command, cwd=cwd, env=parse_env_pairs(env_pairs), auth=auth,
        limits=Limits.parse(memory_max=memory_max, memory_high=memory_high, cpu_quota=cpu_quota, tasks_max=tasks_max),
        session=session, lock_timeout=lock_timeout, timeout=timeout, grace=grace, keep_leftovers=keep_leftovers,
        wait_for_slot=not no_wait, isolation=isolation, network=network, user=user, strict_limits=strict_limits,
        log_max=log_max, notice=lambda message: click.echo(f"corral: note: {message}", err=True),
    )
    with WaitProgress() as progress:
        handle = c.corral.run(spec, detach=detach, reap_orphans=not detach, hold_signals=not detach,
                              terminal=not detach, on_wait=progress)
    from ..runs.launch import unenforced_limits

    for problem in unenforced_limits((handle.record.limits or {}).get("effective") or {}):
        click.echo(f"corral: warning: {problem}", err=True)
    if detach:
        click.echo(handle.id)
        return
    handle.wait(handle_signals=True, notify=lambda message: click.echo(message, err=True))
    outcome = handle.outcome
    assert outcome is not None
    if outcome.state == "timeout":
        click.echo(f"corral: run {handle.id} hit its --timeout and was ended", err=True)
    elif outcome.ended_by == "lost-supervisor":
        click.echo(f"corral: run {handle.id}: its watchdog died; the run was killed whole", err=True)
    sys.exit(outcome.shell_status)


# --- listing ------------------------------------------------------------------------------


def _fmt_cpu(usec: int | None) -> str:
    return "-" if usec is None else f"{usec / 1e6:.1f}s"


@cli.command()
@click.argument("agents", nargs=-1, metavar="[AGENT]...", shell_complete=complete_agents)
@click.option("--all", "-a", "all_", is_flag=True, help="Include ended runs.")
@click.option("--all-users", is_flag=True, help="Also the live runs of other state dirs (other users, checkouts).")
@click.option("--quiet", "-q", is_flag=True, help="Print run ids only, one a line.")
@click.option("--no-trunc", is_flag=True, help="Do not cut commands to the terminal's width.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array (times in UTC, ISO 8601).")
@pass_ctx
def ps(c: Ctx, agents: tuple[str, ...], all_: bool, all_users: bool, quiet: bool, no_trunc: bool,
       as_json: bool) -> None:
    """List runs (this state dir's; --all-users for everyone's), of AGENTs if given.

    \b
    Examples:
      corral ps                 # live runs
      corral ps -a lane1 lane2  # every run of two agents, ended ones too
      corral kill $(corral ps -q lane1)"""
    from ..names import validate_agent
    from ..units import format_bytes

    for name in agents:
        validate_agent(name)
    views = c.corral.ps(all=all_, all_users=all_users)
    if agents:
        views = [v for v in views if v.record.agent in agents]
    if as_json:
        echo_json([v.to_json() for v in views])
        return
    if quiet:
        for v in views:
            click.echo(v.record.id)
        return
    rows = []
    for v in views:
        r = v.record
        status = v.state
        if v.state in ("exited", "failed") and r.exit_code is not None:
            status += f"({r.exit_code})"
        elif r.signal:
            status += f"(sig {r.signal})"
        memory = format_bytes(v.memory_bytes)
        if r.ended:  # its numbers, kept in the record (meter.py)
            seconds = v.to_json()["duration_s"]
            if seconds is not None:
                status += f" after {duration(seconds, precise=True)}"
            memory = f"{format_bytes(r.peak_memory_bytes)} peak" if r.peak_memory_bytes is not None else "-"
        rows.append([r.id, r.agent, status, str(v.pids if v.pids is not None else "-"),
                     memory, _fmt_cpu(v.cpu_usec), ago(r.started_at), command_line(r.argv)])
    table(rows, ["ID", "AGENT", "STATE", "PIDS", "MEM", "CPU", "STARTED", "COMMAND"], no_trunc=no_trunc)


@cli.command()
@click.argument("run_refs", metavar="RUN...", nargs=-1, required=True, shell_complete=complete_runs)
@click.option("--utc", is_flag=True, help="Times in UTC (default: local time, with its zone).")
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON: an object for one RUN, an array for several (times in UTC, ISO 8601).")
@pass_ctx
def show(c: Ctx, run_refs: tuple[str, ...], utc: bool, as_json: bool) -> None:
    """Show runs: record, cgroup, processes, limits, isolation (RUN: an id or unique prefix)."""
    found = [_show_data(c, ref) for ref in run_refs]
    if as_json:
        echo_json(found[0] if len(found) == 1 else found)
        return
    for i, data in enumerate(found):
        if i:
            click.echo()
        _print_show(data, utc=utc)


def _show_data(c: Ctx, run_ref: str) -> dict[str, Any]:
    from ..records import END_STATES

    view = c.corral.view(run_ref)
    data = view.to_json()
    data["cgroup"] = view.record.cgroup
    data["processes"] = c.corral.processes(run_ref) if view.state not in END_STATES else []
    data["limits"] = view.record.limits
    data["log"] = view.record.log
    data["inspect"] = _inspect_hints(view.record)
    return data


def _print_show(data: dict[str, Any], *, utc: bool) -> None:
    from ..records import END_STATES
    from ..units import format_bytes, format_limit

    def line(key: str, value: Any) -> None:
        click.echo(f"{key + ':':18}{value}")

    for key in ("id", "agent", "state", "unit", "backend", "cgroup", "main_pid", "pids"):
        if data.get(key) is not None:
            line(key, data[key])
    for key in ("started_at", "ended_at"):
        if data.get(key):
            line(key, f"{local_time(data[key], utc=utc)} ({ago(data[key])})")
    for key in ("exit_code", "signal", "ended_by", "leftovers_killed", "session", "cwd", "log"):
        if data.get(key) is not None:
            line(key, data[key])
    line("command", command_line(data["argv"]))
    if data["state"] in END_STATES:
        if data.get("peak_memory_bytes") is not None:
            line("memory", f"{format_bytes(data['peak_memory_bytes'])} at its peak ({data['peak_memory_source']})")
        if data.get("duration_s") is not None:
            line("duration", duration(data["duration_s"], precise=True))
    else:
        line("memory", f"{format_bytes(data['memory_bytes'])} ({data.get('memory_source') or '-'})")
    line("cpu", _fmt_cpu(data["cpu_usec"]))
    effective = (data["limits"] or {}).get("effective") or {}
    for key, entry in effective.items():
        note = "" if entry.get("enforced") else f"  ({entry.get('note') or 'not enforced here'})"
        line(f"limit {key}", f"requested {format_limit(key, entry.get('requested'))}, "
                             f"effective {format_limit(key, entry.get('effective'))}{note}")
    if data["processes"]:
        click.echo("processes:")
        process_tree(data["processes"])
    iso = data.get("isolation")
    if iso:
        who = f"uid {iso.get('uid')}" + (f" ({iso['user']})" if iso.get("user") else "")
        if iso.get("root"):
            who += f": {iso['root']}"
        line("isolation", f"{iso.get('level')}, network {iso.get('network')}, {who}")
        for layer in iso.get("layers") or []:
            click.echo(f"{'':18}- {layer}")
    for hint in data["inspect"]:
        line("inspect", hint)


def _inspect_hints(record: Any) -> list[str]:
    if record.backend == "systemd":
        user = " --user" if "/user@" in record.cgroup else ""
        cgls = "--user-unit" if user else "--unit"
        hints = [f"systemctl{user} status {record.unit}", f"systemd-cgls {cgls} {record.unit}"]
        if record.journal:
            hints.append(f"journalctl {cgls} {record.unit}")
        return hints
    return [f"cat {record.cgroup}/cgroup.procs"]


# --- ending -------------------------------------------------------------------------------


def _still_live(c: Ctx, records: list[Any]) -> list[Any]:
    """Drop (and say so) runs that have ended and have nothing left in their cgroup."""
    from ..linux.cgroup import CgroupDir
    from ..records import END_STATES

    live = []
    for r in records:
        view = c.corral.view(r.id) if not r.adopted else None
        if view is not None and view.state in END_STATES and not CgroupDir(r.cgroup).events().populated:
            click.echo(f"{r.id}: already ended ({view.state}), nothing to do")
        else:
            live.append(r)
    return live


def _report_end(c: Ctx, records: list[Any], verb: str, survivors_of: dict[str, list[int]]) -> None:
    bad = {rid: s for rid, s in survivors_of.items() if s}
    escaped_any = False
    for r in records:
        if r.id in bad:
            click.echo(f"{r.id}: still alive after {verb}: pids {bad[r.id][:20]}", err=True)
        else:
            click.echo(f"{r.id}: {verb}, 0 processes left")
        for p in c.corral.escaped(r):
            escaped_any = True
            click.echo(f"{r.id}: pid {p['pid']} ({' '.join(p['argv'])[:60]}) left the run's cgroup for "
                       f"{p['cgroup']} and is still alive; end it there, e.g. kill {p['pid']}", err=True)
    if bad or escaped_any:
        sys.exit(1)


def _targeting(f: Callable[..., Any]) -> Callable[..., Any]:
    """TARGET and the options that pick runs, shared by stop and kill."""
    for option in reversed([
        click.argument("targets", nargs=-1, metavar="[TARGET]...", shell_complete=complete_runs),
        click.option("--agent", "agent", metavar="NAME", help="The live runs of agent NAME."),
        click.option("--id", "run_id", metavar="RUN", help="The run RUN (an id or unique prefix)."),
        click.option("--all", "all_", is_flag=True, help="Every live run of this state dir."),
        click.option("--all-users", is_flag=True, help="Every live run, other state dirs' too (root)."),
    ]):
        f = option(f)
    return f


def _targets(c: Ctx, targets: tuple[str, ...], agent: str | None, run_id: str | None, all_: bool,
             all_users: bool) -> list[Any]:
    """The runs named by TARGETs (each a run id/prefix or an agent), --agent, --id or --all,
    each once, in the order given."""
    if sum(bool(x) for x in (targets, agent is not None, run_id is not None)) > 1:
        raise UsageError("give TARGETs, or --agent, or --id")
    if all_ or all_users or not (targets or agent is not None or run_id is not None):
        return c.corral.targets(None, all_runs=all_, all_users=all_users)
    kind = "agent" if agent is not None else "id" if run_id is not None else None
    picked: dict[str, Any] = {}
    for name in targets or (agent if agent is not None else run_id,):
        for record in c.corral.targets(name, kind=kind):
            picked.setdefault(record.id, record)
    return list(picked.values())


@cli.command()
@_targeting
@click.option("--grace", type=DURATION_OR_ZERO, default=10.0, show_default=True, metavar="DURATION",
              help="How long to wait after SIGTERM before SIGKILL (e.g. 30s, 2m; 0: at once).")
@pass_ctx
def stop(c: Ctx, targets: tuple[str, ...], agent: str | None, run_id: str | None, all_: bool, all_users: bool,
         grace: float) -> None:
    """SIGTERM every process of each TARGET (run id, agent, --all); SIGKILL what remains after --grace."""
    records = _still_live(c, _targets(c, targets, agent, run_id, all_, all_users))
    def say(line: str) -> None:
        click.echo(f"corral: {line}", err=True)

    _report_end(c, records, "stopped", {r.id: c.corral.stop_run(r.id, grace, notify=say) for r in records})


@cli.command()
@_targeting
@click.option("--signal", "-s", "sig", default="KILL", show_default=True, shell_complete=complete_signals,
              help="Signal name or number.")
@pass_ctx
def kill(c: Ctx, targets: tuple[str, ...], agent: str | None, run_id: str | None, all_: bool, all_users: bool,
         sig: str) -> None:
    """Kill every process of each TARGET (run id, agent, --all) and verify the cgroup is empty."""
    from ..units import parse_signal

    signum = parse_signal(sig)
    records = _still_live(c, _targets(c, targets, agent, run_id, all_, all_users))
    _report_end(c, records, "killed", c.corral.kill_runs(records, signum))


@cli.command()
@click.argument("run_refs", metavar="RUN...", nargs=-1, required=True, shell_complete=complete_runs)
@click.option("--timeout", type=DURATION_OR_ZERO, default=None, metavar="DURATION",
              help="Give up after this long in all (e.g. 90s, 5m): exit 75.")
@pass_ctx
def wait(c: Ctx, run_refs: tuple[str, ...], timeout: float | None) -> None:
    """Wait for each RUN to end; exit with the status of the first that did not succeed
    (124 timeout, 128+N signal, 1 lost), else 0."""
    import time

    from ..runs.supervise import Outcome

    records = [c.corral.get(ref).record for ref in run_refs]  # every id checked before any wait
    deadline = None if timeout is None else time.monotonic() + timeout
    status = 0
    for rec in records:
        left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        record = c.corral.wait(rec.id, timeout=left)
        leftovers = f", {record.leftovers_killed} leftover process(es) killed" if record.leftovers_killed else ""
        click.echo(f"{record.id}: {record.state}{leftovers}", err=True)
        code = 1 if record.state == "lost" else \
            Outcome(record.state, record.ended_by or "", record.exit_code, record.signal, 0).shell_status
        status = status or code
    sys.exit(status)


@cli.command()
@click.argument("run_refs", metavar="RUN...", nargs=-1, required=True, shell_complete=complete_runs)
@pass_ctx
def pause(c: Ctx, run_refs: tuple[str, ...]) -> None:
    """Freeze every process of each RUN (cgroup.freeze); corral's own keep running."""
    for record in [c.corral.get(ref).record for ref in run_refs]:
        c.corral.pause(record.id)
        click.echo(f"{record.id}: paused")


@cli.command()
@click.argument("run_refs", metavar="RUN...", nargs=-1, required=True, shell_complete=complete_runs)
@pass_ctx
def resume(c: Ctx, run_refs: tuple[str, ...]) -> None:
    """Thaw each paused RUN."""
    for record in [c.corral.get(ref).record for ref in run_refs]:
        c.corral.resume(record.id)
        click.echo(f"{record.id}: resumed")


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
