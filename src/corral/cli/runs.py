"""``corral run``, ``ps`` and ``show``: start a run, list runs, inspect one."""

from __future__ import annotations

import sys
from typing import Any

import click

from ..units import parse_env_pairs
from .output import WaitProgress, ago, command_line, duration, echo_json, local_time, process_tree, table
from .params import (
    DURATION_OR_ZERO,
    CommandLineCommand,
    Ctx,
    complete_agents,
    complete_profiles,
    complete_runs,
    pass_ctx,
)


@click.command(cls=CommandLineCommand)
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


@click.command()
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


@click.command()
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

    for key in ("id", "agent", "state", "unit", "backend", "cgroup", "main_pid", "owner_pid", "pids"):
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
