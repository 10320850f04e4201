"""``corral top``: live CPU, memory, pressure and processes of every run.

On a terminal, a full-screen view (``top_screen``, curses); piped, or with ``--once``,
``-n N`` or ``--json``, plain frames for scripts. The sampler (``top``) and curses are
imported inside the command only, so that ``corral ps`` and every other command start as
fast as before.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING, Any

import click

from ..errors import UsageError
from .output import table
from .params import DURATION
from .top_text import COLUMNS, cells, title

if TYPE_CHECKING:
    from ..runs.corral import Corral
    from ..runs.top import Frame

SORT_KEYS = ("cpu", "mem", "pids", "age", "agent")  # top.SORT_KEYS, spelled out: no import here
MIN_DELAY = 0.1

KEYS = (
    ("q", "quit"),
    ("up/down", "select a run (also Ctrl-P/Ctrl-N, PgUp/PgDn, Home/End)"),
    ("P M T N", "sort by CPU, memory, age (oldest first), agent; < > the previous/next key"),
    ("/ or f", "filter by agent (a part of its name; empty: all)"),
    ("p r", "pause, resume the selected run"),
    ("s", "stop it: SIGTERM, SIGKILL after --grace"),
    ("k", "kill it (SIGKILL, whole cgroup)"),
)


def _keys_help() -> str:
    width = max(len(k) for k, _ in KEYS)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in KEYS)


@click.command(epilog="\b\nKeys (p, r, s and k ask \"... run ID (agent)? [y/N]\" first):\n" + _keys_help())
@click.option("--once", is_flag=True, help="Print one frame and exit (two samples DELAY apart: CPU % is a real delta).")
@click.option("-n", "--iterations", type=click.IntRange(min=1), metavar="N",
              help="Print N frames, DELAY apart, and exit.")
@click.option("-d", "--delay", type=DURATION, default="1s", show_default=True, metavar="DURATION",
              help=f"Time between samples (at least {MIN_DELAY:g}s).")
@click.option("--json", "as_json", is_flag=True,
              help="Print each frame as one line of JSON: {\"time\", \"host\", \"runs\": [...]}.")
@click.option("--agent", "agents", multiple=True, metavar="NAME", help="Only the runs of agent NAME (repeatable).")
@click.option("--sort", type=click.Choice(SORT_KEYS), default="cpu", show_default=True,
              help="Order of the runs: CPU, memory and processes the largest first, age the oldest first.")
@click.option("--all-users", is_flag=True, help="Also the live runs of other state dirs (other users, checkouts).")
@click.option("--grace", type=DURATION, default="10s", show_default=True, metavar="DURATION",
              help="For the s key: SIGKILL what is left this long after SIGTERM.")
@click.pass_obj
def top(c: Any, once: bool, iterations: int | None, delay: float, as_json: bool, agents: tuple[str, ...], sort: str,
        all_users: bool, grace: float) -> None:
    """Show live runs with their CPU %, memory, pressure and processes, refreshed.

    On a terminal: a full-screen view with a one-minute CPU and memory sparkline per run
    and keys to sort, filter, pause, resume, stop and kill. Piped, or with --once, -n or
    --json: plain text (or JSON) frames; piped with neither --once nor -n, one frame.
    CPU % is the cgroup's cpu.stat usage over the time between two samples (100% = one
    CPU); memory is the cgroup's memory.current, or where memory is not a cgroup v2
    controller the PSS of the run's processes (shown as "pss"); CPUPSI and MEMPSI are the
    run cgroup's pressure ("some avg10", % of time stalled).

    \b
    Examples:
      corral top
      corral top --once --sort mem
      corral top -n 60 -d 5s --json --agent lane1 > lane1.jsonl"""
    from ..names import validate_agent

    for name in agents:
        validate_agent(name)
    if delay < MIN_DELAY:
        raise UsageError(f"invalid delay {delay:g}s: the shortest is {MIN_DELAY:g}s")
    if once and iterations not in (None, 1):
        raise UsageError("--once and -n disagree", hint="give one of them")
    frames = 1 if once else iterations
    interactive = frames is None and not as_json and sys.stdout.isatty() and sys.stdin.isatty()
    corral: Corral = c.corral
    from ..runs.top import Sampler

    sampler = Sampler(corral, agents=agents, all_users=all_users)
    if interactive:
        from .top_screen import run_screen

        run_screen(sampler, delay=delay, sort=sort, grace=grace)
        return
    if frames is None and not sys.stdout.isatty():
        frames = 1  # a script piping us must never hang
    _batch(sampler, frames=frames, delay=delay, sort=sort, as_json=as_json)


def _batch(sampler: Any, *, frames: int | None, delay: float, sort: str, as_json: bool) -> None:
    """*frames* frames (None: until interrupted), each after DELAY: the first sample is
    the baseline that the first frame's CPU % is measured against."""
    import json

    from ..runs.top import sort_rows

    sampler.sample()
    start = time.monotonic()
    done = 0
    try:
        while frames is None or done < frames:
            time.sleep(max(0.0, start + (done + 1) * delay - time.monotonic()))
            frame = sampler.sample()
            frame.runs[:] = sort_rows(frame.runs, sort)
            if as_json:
                click.echo(json.dumps(frame.to_json(), separators=(",", ":")))
            else:
                if done:
                    click.echo("")
                print_frame(frame)
            sys.stdout.flush()
            done += 1
    except BrokenPipeError:
        # `corral top -n 100 --json | head -1`: the reader has what it wanted. Point stdout
        # at /dev/null so that the interpreter's last flush does not fail (exit 0).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def print_frame(frame: Frame) -> None:
    click.echo(title(frame))
    rows = [[cells(r)[col] for col in COLUMNS] for r in frame.runs]
    table(rows, COLUMNS)
