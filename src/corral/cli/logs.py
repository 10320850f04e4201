"""``corral logs``: a detached run's output, as it printed it or line by line (runlog.py)."""

from __future__ import annotations

import json
import sys

import click

from .params import Ctx, complete_runs, pass_ctx


@click.command()
@click.argument("run_ref", metavar="RUN", shell_complete=complete_runs)
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the run ends.")
@click.option("--lines", "-n", "tail", type=click.IntRange(min=0), metavar="N", help="Only the last N lines.")
@click.option("--since", metavar="TIME", help="Only lines from TIME on: a duration ago (10m, 2h) or a time "
                                              "(2026-12-07 12:00, local unless it names its zone).")
@click.option("--timestamps", "-t", is_flag=True, help="Start each line with when it was printed (UTC).")
@click.option("--stream", type=click.Choice(["stdout", "stderr"]), help="Only this stream.")
@click.option("--json", "as_json", is_flag=True,
              help='One JSON object a line: {"time", "stream", "line"} ("partial": true for a line without '
                   "its newline).")
@pass_ctx
def logs(c: Ctx, run_ref: str, follow: bool, tail: int | None, since: str | None, timestamps: bool,
         stream: str | None, as_json: bool) -> None:
    """Print the output of a detached RUN: stdout and stderr in the order it printed them.

    Logs rotate at the agent's log_max (default 10M): a run keeps its current log and the
    one before it. On systemd the lines are in the journal too:
    journalctl -u corral-AGENT-ID.scope, journalctl CORRAL_AGENT=AGENT.

    \b
    Examples:
      corral logs -n 20 -f 1a2b3c4d          # the last 20 lines, then follow
      corral logs --stream stderr -t 1a2b    # errors only, with times
      corral logs --since 10m --json 1a2b | jq -r .line"""
    from ..runs.runlog import since_stamp

    since_utc = since_stamp(since) if since is not None else None
    out = sys.stdout.buffer
    at_line_start = True
    for line in c.corral.log_lines(run_ref, follow=follow, tail=tail, since=since_utc, stream=stream):
        if as_json:
            out.write(json.dumps(line.to_json()).encode() + b"\n")
        else:
            if timestamps and at_line_start:
                out.write((line.time or "-").encode() + b" ")
            out.write(line.data + b"\n" if line.newline else line.data)
            at_line_start = line.newline
        if follow:
            out.flush()
    out.flush()
