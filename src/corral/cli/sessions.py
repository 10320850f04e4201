"""``corral sessions``: list session leases, held, draining or free with their last holder."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from ..paths import Dirs
from .output import echo_json, table

if TYPE_CHECKING:
    from ..leases.session_files import SessionInfo


@click.group()
def sessions() -> None:
    """Session leases (corral run --session KEY)."""


def _row(s: SessionInfo) -> list[str]:
    h = s.holder
    run = pid = when = "-"
    if h is not None:
        run = h.run_id or "-"
        pid = str(h.main_pid or h.owner_pid or "-")
        when = (h.ended_at if s.state != "held" and h.ended_at else h.since) or "-"
    reason = s.reason or ""
    if s.waiters:
        reason = f"{s.waiters} waiting" + (f"; {reason}" if reason else "")
    key = s.key if s.key.isprintable() else repr(s.key)  # a newline in a key would break the table
    return [s.agent, key, s.state, run, pid, when, reason]


@sessions.command("list")
@click.option("--agent", metavar="AGENT", help="Only this agent's sessions.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def list_(agent: str | None, as_json: bool) -> None:
    """Every session: held (with its holder run), draining (and why), free (last holder)."""
    from ..leases.session_files import (
        list_sessions,  # lazily: corral's other commands do not need it
    )

    found = list_sessions(Dirs.from_env(), agent=agent)
    if as_json:
        echo_json([s.to_json() for s in found])
        return
    header = ["AGENT", "KEY", "STATE", "HOLDER/LAST RUN", "PID", "SINCE/ENDED", "REASON"]
    rows = [_row(s) for s in found]
    table(rows, header)
