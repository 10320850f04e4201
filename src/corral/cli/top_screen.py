"""The full-screen view of ``corral top``, drawn with the standard library's curses.

Why curses: it is in the standard library (no new dependency) and imports in ~3 ms here,
where rich or textual would cost 50-200 ms on every start; and only ``corral top`` imports
it (this module is loaded inside the command), so ``corral ps`` does not pay even that.

The screen owns no data: each refresh is a :class:`corral.runs.top.Sampler` frame. Keys are
read with a timeout that ends at the next sample, so the view redraws on time and answers
keys at once. pause/resume/stop/kill ask ``... run ID (agent)? [y/N]`` on the bottom line
and run in a thread with a ``Corral`` of their own (a stop waits out its grace), so the
view keeps refreshing meanwhile; their errors show on the bottom line.

It survives what a terminal does: a resize (KEY_RESIZE), a tiny window (20x5 draws a
title, a header, the rows that fit and the footer), a run that ends between samples (the
selection moves to its neighbour), a locale that is not UTF-8 (ASCII sparklines and
arrows; text the locale cannot show becomes ``?``).
"""

from __future__ import annotations

import curses
import locale
import os
import threading
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import CorralError
from ..runs.top import SORT_KEYS, SPARK_ASCII, SPARK_UTF8, sort_rows, sparkline
from .output import duration
from .top_text import cells, host_pressure, title

if TYPE_CHECKING:
    from ..runs.corral import Corral
    from ..runs.top import Frame, RunRow, Sampler

SORT_LETTERS = {ord("P"): "cpu", ord("M"): "mem", ord("T"): "age", ord("N"): "agent"}
ACTIONS = {ord("p"): "pause", ord("r"): "resume", ord("s"): "stop", ord("k"): "kill"}
STATUS_SECONDS = 6.0
SPARK_WIDTH = 10


@dataclass(frozen=True)
class Column:
    name: str
    width: int
    keep: int  # the smaller, the longer it stays when the window is narrow
    right: bool = False


COLUMNS = (
    Column("ID", 8, 0),
    Column("AGENT", 5, 1),  # widened to the longest agent shown (up to AGENT_MAX)
    Column("STATE", 8, 2),
    Column("PIDS", 4, 4, right=True),
    Column("CPU%", 5, 0, right=True),
    Column("CPU 1m", SPARK_WIDTH, 5),
    Column("MEM", 11, 0, right=True),
    Column("MEM 1m", SPARK_WIDTH, 6),
    Column("CPUPSI", 6, 7, right=True),
    Column("MEMPSI", 6, 8, right=True),
    Column("AGE", 6, 3, right=True),
)
AGENT_MAX = 16
COMMAND_MIN = 8


def run_screen(sampler: Sampler, *, delay: float, sort: str, grace: float) -> None:
    """Run the view until q (or Ctrl-C) in the terminal on stdin/stdout."""
    locale.setlocale(locale.LC_ALL, "")  # curses writes UTF-8 only with the locale set
    utf8 = locale.nl_langinfo(locale.CODESET).upper().replace("-", "") == "UTF8"
    # The terminal's own size, not $LINES/$COLUMNS: a shell may have exported those at
    # another size, and ncurses would then draw for that size even after a resize.
    # (use_env(False) is no cure: without use_tioctl, which Python lacks, it also stops
    # ncurses from asking the terminal, and the size becomes terminfo's 80x24.)
    for var in ("LINES", "COLUMNS"):
        os.environ.pop(var, None)
    try:
        curses.wrapper(lambda stdscr: Screen(stdscr, sampler, delay=delay, sort=sort, grace=grace,
                                             utf8=utf8).loop())
    except curses.error as err:  # no terminfo for $TERM, a terminal curses cannot drive
        raise CorralError(f"cannot draw on this terminal: {err}",
                          hint="use corral top --once, -n N or --json") from None


def cut(text: str, width: int) -> str:
    """*text* in at most *width* terminal cells: wide (East Asian) characters count two,
    control characters become ``?`` (they would move the cursor)."""
    out, used = [], 0
    for ch in text:
        if not ch.isprintable():
            ch = "?"
        w = 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
        if used + w > width:
            break
        out.append(ch)
        used += w
    return "".join(out)


def pad(text: str, width: int, *, right: bool = False) -> str:
    text = cut(text, width)
    fill = " " * (width - sum(2 if unicodedata.east_asian_width(c) in ("W", "F") else 1 for c in text))
    return fill + text if right else text + fill


class Screen:
    def __init__(self, stdscr: Any, sampler: Sampler, *, delay: float, sort: str, grace: float, utf8: bool) -> None:
        self.scr = stdscr
        self.sampler = sampler
        self.delay = delay
        self.sort = sort
        self.grace = grace
        self.utf8 = utf8
        self.encoding = locale.getpreferredencoding(False) or "ascii"
        self.frame: Frame | None = None
        self.selected: str | None = None  # a run id: the selection follows the run, not the line
        self.selected_index = 0
        self.scroll = 0
        self.filter = ""
        self.mode: str | None = None  # None | "confirm" | "filter"
        self.confirm: tuple[str, RunRow] | None = None
        self.typed = ""
        self.status = ""
        self.status_until = 0.0
        self.next_sample = 0.0
        self.workers: list[threading.Thread] = []
        self.results: list[str] = []  # from the action threads (list.append is atomic)

    # --- the loop -------------------------------------------------------------------------

    def loop(self) -> None:
        try:
            curses.curs_set(0)
        except curses.error:
            pass  # a terminal without an invisible cursor
        try:
            curses.set_escdelay(25)  # Esc cancels a prompt at once, not after a second
        except (AttributeError, curses.error):
            pass
        self.scr.keypad(True)
        try:
            while True:
                now = time.monotonic()
                if now >= self.next_sample:
                    self._sample()
                    self.next_sample = max(self.next_sample + self.delay, now + self.delay / 2)
                while self.results:
                    self._say(self.results.pop(0))
                    self.next_sample = time.monotonic()  # show what the action did, now
                self.draw()
                wait = max(0.0, min(self.next_sample - time.monotonic(), 0.5 if self._busy() else 60.0))
                self.scr.timeout(int(wait * 1000) + 1)
                ch = self.scr.getch()
                if ch != -1 and not self.key(ch):
                    break
        except KeyboardInterrupt:
            pass
        self._finish_actions()

    def _sample(self) -> None:
        try:
            self.frame = self.sampler.sample()
        except CorralError as err:  # keep the last frame; say why there is no new one
            self._say(f"sampling failed: {err.message}")
        except OSError as err:
            self._say(f"sampling failed: {err}")

    def _busy(self) -> bool:
        self.workers = [t for t in self.workers if t.is_alive()]
        return bool(self.workers)

    def _finish_actions(self) -> None:
        """A stop in flight finishes (its SIGKILL after the grace) before we exit."""
        if not self._busy():
            return
        self._say("waiting for the actions in flight to finish...")
        self.mode = None
        self.draw()
        for t in self.workers:
            t.join()

    def _say(self, text: str) -> None:
        self.status = text
        self.status_until = time.monotonic() + STATUS_SECONDS

    # --- rows -------------------------------------------------------------------------------

    def rows(self) -> list[RunRow]:
        if self.frame is None:
            return []
        rows = [r for r in self.frame.runs if self.filter in r.agent]
        return sort_rows(rows, self.sort)

    def _selection(self, rows: list[RunRow]) -> int:
        """Index of the selected run in *rows*; a run that is gone leaves the selection on
        the line it was on."""
        if not rows:
            self.selected, self.selected_index = None, 0
            return 0
        for i, r in enumerate(rows):
            if r.id == self.selected:
                self.selected_index = i
                return i
        i = min(self.selected_index, len(rows) - 1)
        self.selected, self.selected_index = rows[i].id, i
        return i

    def _move(self, delta: int) -> None:
        rows = self.rows()
        if not rows:
            return
        i = max(0, min(len(rows) - 1, self._selection(rows) + delta))
        self.selected, self.selected_index = rows[i].id, i

    # --- keys -------------------------------------------------------------------------------

    def key(self, ch: int) -> bool:
        """Handle one key; False to quit."""
        if ch == curses.KEY_RESIZE:
            curses.update_lines_cols()
            self.scr.clear()  # repaint all: the terminal cropped or reflowed what it had
            return True
        if self.mode == "confirm":
            return self._confirm_key(ch)
        if self.mode == "filter":
            self._filter_key(ch)
            return True
        if ch in (ord("q"), ord("Q")):
            return False
        page = max(1, self.scr.getmaxyx()[0] - 4)
        moves = {curses.KEY_UP: -1, 16: -1, curses.KEY_DOWN: 1, 14: 1, curses.KEY_PPAGE: -page,
                 curses.KEY_NPAGE: page, curses.KEY_HOME: -10**9, curses.KEY_END: 10**9}
        if ch in moves:
            self._move(moves[ch])
        elif ch in SORT_LETTERS:
            self.sort = SORT_LETTERS[ch]
            self._say(f"sorted by {self.sort}")
        elif ch in (ord("<"), ord(">")):
            i = SORT_KEYS.index(self.sort) + (1 if ch == ord(">") else -1)
            self.sort = SORT_KEYS[i % len(SORT_KEYS)]
            self._say(f"sorted by {self.sort}")
        elif ch in (ord("/"), ord("f")):
            self.mode, self.typed = "filter", self.filter
        elif ch in ACTIONS:
            rows = self.rows()
            if not rows:
                self._say("no run selected")
            else:
                self.mode, self.confirm = "confirm", (ACTIONS[ch], rows[self._selection(rows)])
        elif ch in (12, ord(" ")):  # Ctrl-L, space: redraw and sample now
            self.scr.clear()
            self.next_sample = 0.0
        return True

    def _confirm_key(self, ch: int) -> bool:
        assert self.confirm is not None
        action, row = self.confirm
        self.mode, self.confirm = None, None
        if ch in (ord("y"), ord("Y")):
            self._start(action, row)
        else:
            self._say(f"{action} of {row.id} cancelled")
        return True

    def _filter_key(self, ch: int) -> None:
        if ch in (10, 13, curses.KEY_ENTER):
            self.filter, self.mode = self.typed.strip(), None
            self.scroll = 0
            self._say(f"showing agents matching {self.filter!r}" if self.filter else "showing all agents")
        elif ch == 27:  # Esc: leave the filter as it was
            self.mode = None
        elif ch in (curses.KEY_BACKSPACE, 127, 8):
            self.typed = self.typed[:-1]
        elif ch == 21:  # Ctrl-U
            self.typed = ""
        elif 32 <= ch < 127:
            self.typed += chr(ch)

    def _start(self, action: str, row: RunRow) -> None:
        verb = {"pause": "pausing", "resume": "resuming", "stop": "stopping", "kill": "killing"}[action]
        self._say(f"{verb} {row.id} ({row.agent})"
                  + (f": SIGTERM, SIGKILL after {self.grace:g}s" if action == "stop" else "") + "...")
        done = {"pause": "paused", "resume": "resumed", "stop": "stopped", "kill": "killed"}[action]
        make = self._corral_factory()

        def work() -> None:
            try:
                with make() as c:
                    if action == "pause":
                        c.pause(row.id)
                    elif action == "resume":
                        c.resume(row.id)
                    elif action == "stop":
                        c.stop_run(row.id, self.grace)
                    else:
                        c.kill_run(row.id)
                self.results.append(f"{done} {row.id} ({row.agent})")
            except CorralError as err:
                self.results.append(f"{action} {row.id}: {err.message}")
            except Exception as err:  # noqa: BLE001 -- the view must outlive whatever an action hits
                self.results.append(f"{action} {row.id} failed: {err}")

        t = threading.Thread(target=work, name=f"corral-top-{action}", daemon=True)
        self.workers.append(t)
        t.start()

    def _corral_factory(self) -> Callable[[], Corral]:
        """A Corral of the same backend and dirs for an action's thread: a backend's bus
        connection is not shared between threads."""
        from ..runs.corral import Corral

        base = self.sampler.corral
        name = base.backend.name
        return lambda: Corral(name, dirs=base.dirs)

    # --- drawing ----------------------------------------------------------------------------

    def put(self, y: int, x: int, text: str, attr: int = 0) -> None:
        h, w = self.scr.getmaxyx()
        if not (0 <= y < h and 0 <= x < w):
            return
        text = cut(text, w - x)
        if not self.utf8 or self.encoding.lower() not in ("utf-8", "utf8"):
            text = text.encode(self.encoding, "replace").decode(self.encoding, "replace")
        try:
            self.scr.addstr(y, x, text, attr)
        except curses.error:
            pass  # the bottom-right cell: curses writes it, then fails to move the cursor on

    def draw(self) -> None:
        self.scr.erase()
        h, w = self.scr.getmaxyx()
        frame = self.frame
        rows = self.rows()
        sel = self._selection(rows)
        y = 0
        second = h >= 8  # room for a second line: the host's pressure, sort, filter
        if frame is not None:
            self.put(y, 0, title(frame, pressure=not second), curses.A_BOLD)
        else:
            self.put(y, 0, "corral top: sampling...", curses.A_BOLD)
        y += 1
        if second:
            bits = [host_pressure(frame) if frame is not None else "", f"sort {self.sort}",
                    f"every {duration(self.delay) if self.delay >= 1 else f'{self.delay:g}s'}"]
            if self.filter:
                bits.append(f"filter {self.filter!r}")
            if frame is not None and len(rows) != len(frame.runs):
                bits.append(f"{len(rows)} of {len(frame.runs)} shown")
            self.put(y, 0, "  ".join(b for b in bits if b))
            y += 1
        if h < 3:
            self._footer(h - 1, w)
            return
        shown = self._layout(w, rows)
        names = {c.name: c.name for c in shown} | {"COMMAND": "COMMAND"}
        self.put(y, 0, " " + self._line(shown, names, w - 1, header=True), curses.A_BOLD | curses.A_UNDERLINE)
        y += 1
        space = h - 1 - y
        if space > 0 and rows:
            if sel < self.scroll:
                self.scroll = sel
            elif sel >= self.scroll + space:
                self.scroll = sel - space + 1
            self.scroll = max(0, min(self.scroll, max(0, len(rows) - space)))
            now = frame.mono if frame is not None else time.monotonic()
            # one memory scale for all runs shown: the sparklines compare runs as well as
            # show each one's trend (each to its own peak, a steady run is a full bar)
            mem_top = max((p.memory_bytes or 0 for r in rows for p in r.history), default=0)
            for i, row in enumerate(rows[self.scroll:self.scroll + space]):
                values = self._values(row, now, float(mem_top))
                mine = self.scroll + i == sel
                line = (">" if mine else " ") + self._line(shown, values, w - 1)
                self.put(y + i, 0, pad(line, w), curses.A_REVERSE if mine else 0)
        elif space > 0 and frame is not None:
            self.put(y, 1, "no live runs" + (f" of agents matching {self.filter!r}" if self.filter else ""))
        self._footer(h - 1, w)
        self.scr.refresh()

    def _layout(self, width: int, rows: list[RunRow]) -> list[Column]:
        """The columns that fit in *width* with room for COMMAND; the least needed go first."""
        agent = min(AGENT_MAX, max([5, *(len(r.agent) for r in rows)]))
        shown = [Column(c.name, agent, c.keep) if c.name == "AGENT" else c for c in COLUMNS]
        while shown and sum(c.width + 1 for c in shown) + 1 + COMMAND_MIN > width:
            drop = max(shown, key=lambda c: c.keep)
            if drop.keep == 0:
                break
            shown.remove(drop)
        return shown

    def _line(self, shown: list[Column], values: dict[str, str], width: int, *, header: bool = False) -> str:
        parts = [pad(values[c.name], c.width, right=c.right and not (header and c.name.endswith("1m")))
                 for c in shown]
        return cut(" ".join(parts) + " " + values["COMMAND"], width)

    def _values(self, row: RunRow, now: float, mem_top: float) -> dict[str, str]:
        v = cells(row)
        blocks = SPARK_UTF8 if self.utf8 else SPARK_ASCII
        v["CPU 1m"] = sparkline(row.history, "cpu", now=now, width=SPARK_WIDTH, blocks=blocks)
        v["MEM 1m"] = sparkline(row.history, "mem", now=now, width=SPARK_WIDTH, blocks=blocks, top=mem_top)
        return v

    def _footer(self, y: int, w: int) -> None:
        if self.mode == "confirm" and self.confirm is not None:
            action, row = self.confirm
            extra = f" (SIGTERM, SIGKILL after {self.grace:g}s)" if action == "stop" else ""
            self.put(y, 0, f"{action} run {row.id} ({row.agent}){extra}? [y/N] ", curses.A_BOLD)
        elif self.mode == "filter":
            self.put(y, 0, f"filter by agent (empty: all): {self.typed}_", curses.A_BOLD)
        elif self.status and time.monotonic() < self.status_until:
            self.put(y, 0, self.status, curses.A_BOLD)
        else:
            arrows = "\u2191\u2193" if self.utf8 else "up/dn"
            self.put(y, 0, f"q quit  {arrows} select  P cpu  M mem  T age  N agent  / filter  "
                           "p pause  r resume  s stop  k kill", curses.A_REVERSE)
