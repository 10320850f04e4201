"""``corral stop``, ``kill``, ``wait``, ``pause`` and ``resume``: act on runs by id, agent or all."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from ..errors import UsageError
from .params import (
    DURATION_OR_ZERO,
    Ctx,
    complete_runs,
    complete_signals,
    pass_ctx,
)


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


@click.command()
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


@click.command()
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


@click.command()
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


@click.command()
@click.argument("run_refs", metavar="RUN...", nargs=-1, required=True, shell_complete=complete_runs)
@pass_ctx
def pause(c: Ctx, run_refs: tuple[str, ...]) -> None:
    """Freeze every process of each RUN (cgroup.freeze); corral's own keep running."""
    for record in [c.corral.get(ref).record for ref in run_refs]:
        c.corral.pause(record.id)
        click.echo(f"{record.id}: paused")


@click.command()
@click.argument("run_refs", metavar="RUN...", nargs=-1, required=True, shell_complete=complete_runs)
@pass_ctx
def resume(c: Ctx, run_refs: tuple[str, ...]) -> None:
    """Thaw each paused RUN."""
    for record in [c.corral.get(ref).record for ref in run_refs]:
        c.corral.resume(record.id)
        click.echo(f"{record.id}: resumed")
