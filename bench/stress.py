"""corral's fault-injection and load suite (`make stress`): longer than `make test`, run by hand.

    python bench/stress.py [--quick] [--only NAME[,NAME...]] [--seed N]

Scenarios (cgroupfs backend on this host's cgroup v2 mount):

  owner   SIGKILL attached `corral run` owners (and detached runs' shared owner) whose
          command left setsid, double-forked and nohup'd children: all must be gone in 2 s
  crash   SIGKILL `corral run` (attached and detached) at random points of its start;
          `ps --all` must agree with the cgroups, `gc` must leave no ownerless populated scope
  config  SIGKILL `corral agents add` writers at random moments while others write: the
          file parses, no acknowledged agent is lost, no temp file is left
  token   8 concurrent `corral auth token` at expiry, one SIGKILLed at a random moment:
          the store parses, the next call succeeds or says "sign in again" (exit 77)
  fuzz    hypothesis-generated agent names and limit/env/timeout values through the CLI
          and the library: valid -> exit 0, invalid -> exit 2 and nothing created
  load    500 detached runs: `ps` sees them all, `kill --all` ends them all
  hostile 200 isolated runs each trying 2-5 random attacks (leave the cgroup, freeze or
          kill cgroups, signal the owner, read the token store/config/records, overwrite
          its record, unmount, nested namespaces, the user bus, daemons, the caller's env),
          then `corral kill`: 0 survivors, 0 secrets read, 0 ghosts
  gcrace  200 launches (attached and detached) beside `corral gc` loops from the runs'
          own state dir and from another: 0 failed launches, nothing left
  records 200 live runs whose record is mangled (missing keys, wrong types, odd cgroup
          paths, garbage): ps, show, gc answer, the run stays listed and is killed
  options every option of every command with junk values (drawn by hypothesis): never a
          traceback, a hang or an exit code the README does not document
  enospc  the state and config filesystems fill up at random moments (tiny tmpfs mounts in a
          private mount namespace): an attached run that ran passes its status through, one
          that could not be recorded is refused before its command runs, files still parse
  clock   the wall clock jumps (libfaketime, one process at a time) around token refreshes:
          no token the provider has expired is ever handed out
  powerloss  the start and running records are renamed into place without fsync: a power
          loss takes every run and cgroup and may leave such a record as it was, empty,
          NUL-filled or missing; after the "reboot" ps/show/gc/kill answer, nothing is
          listed live, every run that had ended keeps its (synced) end

Everything runs in private XDG dirs under one temp dir and in a private cgroup subtree
(``CORRAL_CGROUP_ROOT``): `corral ps`, `gc` and `kill --all` look at every corral scope
under their root, and must not see (or reap) other people's runs on this machine. Every
process started here carries ``STRESS_TAG=<tag>`` in its environment; cleanup kills what
is left by cgroup (our subtree's ``cgroup.kill``) and by pid (tagged processes only).

"faults injected" counts SIGKILLs that hit a live process (a process that had already
exited is not counted); for the fuzz rows, the invalid inputs tried; the load row injects
none. "lost" is work or data that vanished or escaped: processes alive after corral said
they were gone, acknowledged agents missing from the config, a credential the store holds
that the provider has already rotated without the store knowing, started runs `ps` does
not list. Kill moments are random; the config and token rows also aim some kills at the
process inside the critical section (holding the lock), found via /proc/locks.

Progress goes to stderr; the summary table to stdout. Exit status 1 if any scenario has a
failure or lost something.
"""

from __future__ import annotations

import argparse
import contextlib
import threading
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))  # _auth_util: the real OAuth server of the auth tests

from corral.linux.cgroup import find_cgroup2_mount  # noqa: E402
from corral.linux.procs import process_start  # noqa: E402
from corral.paths import Dirs  # noqa: E402

CORRAL = [sys.executable, "-m", "corral.cli.main"]
DOCUMENTED_EXITS = (0, 1, 2, 3, 69, 75, 77, 78, 124, 126, 127)  # README, "Exit codes"
LIVE_STATES = ("starting", "running", "paused", "draining")
SCENARIOS = ("owner", "crash", "config", "token", "fuzz", "load", "hostile", "gcrace", "records", "options", "enospc", "clock",
             "powerloss")

# Every process it starts writes its own pid to $M: setsid, double-forked, nohup'd, and main.
_SELF = 'echo $$ >> "$M"; exec sleep 1000'
SPAWNER = (f"setsid sh -c '{_SELF}' & (sh -c '{_SELF}' &); nohup sh -c '{_SELF}' >/dev/null 2>&1 & "
           'echo $$ >> "$M"; exec sleep 1003')
SPAWNER_PIDS = 4
CRASHER = 'echo $$ >> "$M"; sleep 1000 & echo $! >> "$M"; exec sleep 1001'


def progress(msg: str) -> None:
    print(f"[stress {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- processes ----------------------------------------------------------------------------


def _state(pid: int) -> str | None:
    """The /proc state letter of *pid*, None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return stat[stat.rindex(b")") + 2:][:1].decode()


def _environ_has(pid: int, entry: bytes) -> bool:
    try:
        return entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def alive_with(pids: list[int], entry: bytes) -> list[int]:
    """Those of *pids* that run (zombies are dead) and carry *entry* in their environment:
    pids are reused quickly here (pid_max may be 32768), so a bare pid proves nothing."""
    return [p for p in pids if _state(p) not in (None, "Z", "X") and _environ_has(p, entry)]


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def lock_holders(lock: Path, *, exclusive: bool = False) -> set[int]:
    """Pids holding a flock on *lock* (from /proc/locks); only exclusive ones if asked."""
    try:
        ino = os.stat(lock).st_ino
        text = Path("/proc/locks").read_text()
    except OSError:
        return set()
    out = set()
    for line in text.splitlines():
        parts = line.split()
        if "->" in parts:  # a waiter, not a holder
            continue
        try:
            if parts[1] == "FLOCK" and int(parts[5].rsplit(":", 1)[1]) == ino and \
                    (not exclusive or parts[3] == "WRITE"):
                out.add(int(parts[4]))
        except (IndexError, ValueError):
            continue
    return out


def kill_one(procs: list[subprocess.Popen], rng: random.Random, *, lock: Path, holder_mode: bool,
             span: float, hold: float) -> tuple[int | None, bool]:
    """SIGKILL one of *procs* (all just started) at a random moment. Random mode: a random
    one, uniform(0, *span*) seconds after the start. Holder mode: once one of them holds
    *lock* exclusively, uniform(0, *hold*) seconds later, that one (the process inside the
    critical section; the others are waiting for it). Returns (index or None, was the
    victim holding the lock when it was killed)."""
    t0 = time.monotonic()
    if not holder_mode:
        victim = rng.randrange(len(procs))
        sleep_until(t0 + rng.uniform(0, span))
    else:
        by_pid = {p.pid: i for i, p in enumerate(procs)}
        victim = None
        while victim is None and time.monotonic() - t0 < max(5.0, 3 * span):
            got = [by_pid[pid] for pid in lock_holders(lock, exclusive=True) if pid in by_pid]
            if got:
                victim = got[0]
            elif all(p.poll() is not None for p in procs):
                return None, False
            else:
                time.sleep(0.0005)
        if victim is None:
            return None, False
        sleep_until(time.monotonic() + rng.uniform(0, hold))
    proc = procs[victim]
    holding = proc.poll() is None and proc.pid in lock_holders(lock)
    sigkill(proc)
    return victim, holding


def observe(procs: list[subprocess.Popen], lock: Path) -> tuple[list[float], list[float]]:
    """Watch *procs* (just started) to their end: when each ended, and how long each held
    *lock* exclusively (seconds, per holder seen)."""
    t0 = time.monotonic()
    ends = [0.0] * len(procs)
    held: dict[int, list[float]] = {}
    while not all(ends):
        now = time.monotonic() - t0
        for pid in lock_holders(lock, exclusive=True):
            held.setdefault(pid, [now, now])[1] = now
        for i, p in enumerate(procs):
            if not ends[i] and p.poll() is not None:
                ends[i] = now or 1e-9
        time.sleep(0.0005)
    return ends, [b - a for a, b in held.values()]


def read_pids(marker: Path) -> list[int]:
    try:
        return [int(x) for x in marker.read_text().split()]
    except (OSError, ValueError):
        return []


def host_pids_with(entry: bytes) -> list[int]:
    """Processes whose environment holds *entry*: the run's processes as this PID namespace
    numbers them (a sandboxed payload writes its own namespace's pids into the marker)."""
    me = os.getpid()
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and int(e) != me and _environ_has(int(e), entry)
            and _state(int(e)) not in (None, "Z", "X")]


def wait_pids(marker: Path, n: int, timeout: float, proc: subprocess.Popen | None = None,
              entry: bytes | None = None) -> list[int] | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = read_pids(marker)
        if len(pids) >= n:
            return host_pids_with(entry) if entry is not None else pids
        if proc is not None and proc.poll() is not None:
            return None
        time.sleep(0.005)
    return None


def gone_within(pids: list[int], entry: bytes, seconds: float) -> tuple[float | None, list[int]]:
    """(seconds until every pid was dead, or None) and the pids still alive at the deadline."""
    t0 = time.monotonic()
    while True:
        left = alive_with(pids, entry)
        if not left:
            return time.monotonic() - t0, []
        if time.monotonic() - t0 > seconds:
            return None, left
        time.sleep(0.001)


def sigkill(proc: subprocess.Popen) -> None:
    """SIGKILL our child if it has not ended; it stays unreaped until wait(), so the pid
    cannot have been reused. Whether it landed shows as returncode -9."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGKILL)
        except ProcessLookupError:
            pass


def sleep_until(t: float) -> None:
    while True:
        left = t - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.002) if left < 0.004 else left - 0.002)


# --- results ------------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    trials: int = 0
    faults: int = 0
    failures: int = 0
    lost: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def fail(self, what: str, *, count: int = 1) -> None:
        self.failures += count
        if len(self.problems) < 12:
            self.problems.append(what)
        progress(f"  FAILURE ({self.name}): {what}")

    def lose(self, what: str, *, count: int = 1) -> None:
        self.lost += count
        if len(self.problems) < 12:
            self.problems.append(f"LOST: {what}")
        progress(f"  LOST ({self.name}): {what}")


def tail(text: str, n: int = 300) -> str:
    text = " | ".join(line.strip() for line in text.strip().splitlines()[-3:])
    return text[-n:]


# --- the harness --------------------------------------------------------------------------


class Harness:
    def __init__(self, seed: int, quick: bool) -> None:
        self.seed = seed
        self.quick = quick
        self.tag = os.urandom(4).hex()
        self.tmp = Path(tempfile.mkdtemp(prefix=f"corral-stress-{self.tag}-"))
        mount = find_cgroup2_mount()
        if mount is None:
            raise SystemExit("stress: no cgroup2 mount found")
        self.cg_root = mount / f"corral-stress-{self.tag}"
        self.cg_root.mkdir()
        self.tag_entry = f"STRESS_TAG={self.tag}".encode()
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and not k.startswith("CORRAL_")}
        env.update(CORRAL_BACKEND="cgroupfs", CORRAL_CGROUP_ROOT=str(self.cg_root), PYTHONDONTWRITEBYTECODE="1",
                   STRESS_TAG=self.tag)
        self.base_env = env
        self._n = 0

    def rng(self, scenario: str) -> random.Random:
        return random.Random(f"{self.seed}:{scenario}")

    def env(self, scenario: str) -> dict[str, str]:
        """Private config/state/runtime dirs for one scenario."""
        env = dict(self.base_env)
        for var, sub in (("XDG_CONFIG_HOME", "config"), ("XDG_STATE_HOME", "state"), ("XDG_RUNTIME_DIR", "run")):
            path = self.tmp / scenario / sub
            path.mkdir(parents=True, exist_ok=True)
            env[var] = str(path)
        return env

    @staticmethod
    def pass_env(env: dict[str, str], *names: str) -> None:
        """Let *names* through the runs' environment allowlist (isolation standard)."""
        config = Path(env["XDG_CONFIG_HOME"]) / "corral"
        config.mkdir(parents=True, exist_ok=True)
        (config / "config.toml").write_text(f"[corral.defaults]\nenv_passthrough = {json.dumps(list(names))}\n")

    @staticmethod
    def dirs(env: dict[str, str]) -> Dirs:
        return Dirs.from_env(env)

    def agent(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}{self.tag}n{self._n}"

    def cli(self, env: dict[str, str], *args: str, timeout: float = 120, input: str | None = None
            ) -> subprocess.CompletedProcess:
        return subprocess.run([*CORRAL, *args], env=env, capture_output=True, text=True, timeout=timeout,
                              input=input, stdin=None if input is not None else subprocess.DEVNULL)

    def cli_within(self, res: "Result", env: dict[str, str], *args: str, timeout: float = 60
                   ) -> subprocess.CompletedProcess | None:
        """`cli`, but a hang is a failure of *res* (and its processes are killed): None."""
        try:
            return self.cli(env, *args, timeout=timeout)
        except subprocess.TimeoutExpired:
            res.fail(f"corral {' '.join(args)[:150]!r} did not end within {timeout:.0f} s")
            self.kill_tree()
            return None

    def popen(self, env: dict[str, str], *args: str, capture: bool = False) -> subprocess.Popen:
        out = subprocess.PIPE if capture else subprocess.DEVNULL
        return subprocess.Popen([*CORRAL, *args], env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                text=True)

    def json(self, env: dict[str, str], *args: str) -> Any:
        proc = self.cli(env, *args)
        if proc.returncode != 0:
            raise RuntimeError(f"corral {' '.join(args)} -> {proc.returncode}: {tail(proc.stderr)}")
        return json.loads(proc.stdout)

    # --- cgroups ---------------------------------------------------------------------

    @property
    def slice_dir(self) -> Path:
        return self.cg_root / "corral.slice"

    def scopes(self, agent: str) -> dict[str, Path]:
        d = self.slice_dir / f"corral-{agent}.slice"
        try:
            names = os.listdir(d)
        except OSError:
            return {}
        out = {}
        for name in names:
            m = re.fullmatch(rf"corral-{re.escape(agent)}-([0-9a-f]{{8}})\.scope", name)
            if m:
                out[m.group(1)] = d / name
        return out

    @staticmethod
    def populated(path: Path) -> bool:
        try:
            return "populated 1" in (path / "cgroup.events").read_text()
        except OSError:
            return False

    def populated_scopes(self, agent: str) -> dict[str, Path]:
        return {rid: p for rid, p in self.scopes(agent).items() if self.populated(p)}

    def tree(self) -> set[str]:
        """Every directory under our cgroup root (relative), to prove nothing was created."""
        out = set()
        for dirpath, dirnames, _ in os.walk(self.cg_root):
            for d in dirnames:
                out.add(os.path.relpath(os.path.join(dirpath, d), self.cg_root))
        return out

    def tagged(self) -> list[int]:
        me = os.getpid()
        out = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != me:
                pid = int(entry)
                if _environ_has(pid, self.tag_entry) and _state(pid) not in (None, "Z", "X"):
                    out.append(pid)
        return out

    def kill_tree(self) -> None:
        """Kill everything in our cgroup subtree at once and wait until it is empty."""
        try:
            (self.cg_root / "cgroup.kill").write_text("1")
        except OSError:
            return
        deadline = time.monotonic() + 10
        while self.populated(self.cg_root) and time.monotonic() < deadline:
            time.sleep(0.01)

    def remove_tree(self) -> None:
        for dirpath, _dirnames, _ in sorted(os.walk(self.cg_root, topdown=False), key=lambda w: -len(w[0])):
            try:
                os.rmdir(dirpath)
            except OSError:
                pass

    def cleanup(self) -> str:
        self.kill_tree()
        strays = self.tagged()
        kill_pids(strays)
        self.remove_tree()
        shutil.rmtree(self.tmp, ignore_errors=True)
        left = "left in place: " + str(self.cg_root) if self.cg_root.exists() else "nothing left"
        return (f"cleanup: {len(strays)} tagged process(es) outside our cgroup subtree killed by pid (corral CLIs still "
                f"running, or escapees); {left}")


# --- 1. owner SIGKILL -----------------------------------------------------------------------


def scenario_owner(h: Harness, scale: float) -> list[Result]:
    rng = h.rng("owner")
    env = h.env("owner")
    h.pass_env(env, "M", "STRESS_TAG")
    att, det = Result("1a owner SIGKILL: attached `corral run`"), Result("1b owner SIGKILL: detached run's owner")
    n_att, n_det = max(1, round(100 * scale)), max(3, round(25 * scale))
    markers = h.tmp / "owner" / "markers"
    markers.mkdir()
    a_agent, d_agent = h.agent("oa"), h.agent("od")
    teardown: list[float] = []

    def check_gone(res: Result, trial: int, pids: list[int], entry: bytes) -> None:
        took, left = gone_within(pids, entry, 2.0)
        if took is None:
            res.fail(f"trial {trial}: pids {left} of {pids} still alive 2 s after the owner's SIGKILL")
            kill_pids(left)
        else:
            teardown.append(took)

    progress(f"owner: {n_att} attached runs, SIGKILL of `corral run` once its children exist")
    for trial in range(n_att):
        att.trials += 1
        marker = markers / f"a{trial}"
        entry = f"M={marker}".encode()
        proc = h.popen(dict(env, M=str(marker)), "run", a_agent, "--", "sh", "-c", SPAWNER)
        pids = wait_pids(marker, SPAWNER_PIDS, 30, proc, entry)
        if pids is None:
            sigkill(proc)
            proc.wait()
            att.fail(f"trial {trial}: the run's {SPAWNER_PIDS} processes did not appear (corral exit {proc.returncode})")
            continue
        time.sleep(rng.uniform(0, 0.2))
        sigkill(proc)
        proc.wait()
        att.faults += proc.returncode == -signal.SIGKILL
        check_gone(att, trial, pids, entry)
        if (trial + 1) % max(1, n_att // 5) == 0:
            progress(f"  attached {trial + 1}/{n_att}, failures {att.failures}")
    att_teardown, teardown = teardown, []

    progress(f"owner: {n_det} detached runs, SIGKILL of the run's owner process")
    for trial in range(n_det):
        det.trials += 1
        marker = markers / f"d{trial}"
        entry = f"M={marker}".encode()
        e = dict(env, M=str(marker))
        out = h.cli(e, "run", "--detach", d_agent, "--", "sh", "-c", SPAWNER)
        if out.returncode != 0:
            det.fail(f"trial {trial}: corral run --detach exited {out.returncode}: {tail(out.stderr)}")
            continue
        run_id = out.stdout.strip()
        pids = wait_pids(marker, SPAWNER_PIDS, 30, entry=entry)
        if pids is None:
            det.fail(f"trial {trial}: run {run_id}: its {SPAWNER_PIDS} processes did not appear")
            continue
        try:
            info = h.json(e, "show", run_id, "--json")
        except (RuntimeError, ValueError) as err:
            det.fail(f"trial {trial}: run {run_id}: {err}")
            continue
        owners = [info["owner_pid"]] if info.get("owner_pid") else []  # corral's shared owner
        if len(owners) != 1:
            det.fail(f"trial {trial}: run {run_id}: show names no owner")
            continue
        # The shared owner has no tag in its /proc/PID/environ: its start time, read now
        # and again before the kill, tells it from a process that took its pid meanwhile.
        started = process_start(owners[0])
        time.sleep(rng.uniform(0, 0.2))
        if started is not None and process_start(owners[0]) == started:
            os.kill(owners[0], signal.SIGKILL)
            det.faults += 1
        check_gone(det, trial, pids, entry)
    # One shared owner owns every detached run of a state dir: its SIGKILL ends them all,
    # each by its own watchdog, within the same 2 s.
    group: list[tuple[list[int], bytes]] = []
    owners: set[int] = set()
    for k in range(4):
        marker = markers / f"g{k}"
        entry = f"M={marker}".encode()
        out = h.cli(dict(env, M=str(marker)), "run", "--detach", d_agent, "--", "sh", "-c", SPAWNER)
        pids = wait_pids(marker, SPAWNER_PIDS, 30, entry=entry) if out.returncode == 0 else None
        if pids is None:
            det.fail(f"group run {k}: did not start: {tail(out.stderr)}")
            continue
        owners.add(h.json(env, "show", out.stdout.strip(), "--json").get("owner_pid") or 0)
        group.append((pids, entry))
    det.trials += 1
    if len(owners) != 1 or 0 in owners:
        det.fail(f"4 detached runs of one state dir: owners {sorted(owners)}, expected one shared owner")
        for pids, _entry in group:
            kill_pids(pids)
    else:
        os.kill(owners.pop(), signal.SIGKILL)
        det.faults += 1
        for pids, entry in group:
            check_gone(det, n_det, pids, entry)
    det_teardown = teardown

    states = Counter((r["agent"], r["state"], r.get("ended_by")) for r in h.json(env, "ps", "--all", "--json")
                     if r["agent"] in (a_agent, d_agent))
    for res, agent, times in ((att, a_agent, att_teardown), (det, d_agent, det_teardown)):
        st = ", ".join(f"{s}/{e}: {n}" for (a, s, e), n in sorted(states.items()) if a == agent)
        if times:
            res.notes.append(f"teardown after the SIGKILL: p50 {statistics.median(times) * 1e3:.0f} ms, "
                             f"max {max(times) * 1e3:.0f} ms; records: {st}")
    gc = h.cli(env, "gc", "--json")
    if gc.returncode != 0:
        det.fail(f"corral gc exited {gc.returncode}: {tail(gc.stderr)}")
    return [att, det]


# --- 2. crash at random points ------------------------------------------------------------


def _owner_alive_of(h: Harness, env: dict[str, str], run_id: str, scope: Path) -> bool:
    from corral.linux.procs import owner_alive

    try:
        rec = json.loads((h.dirs(env).runs / f"{run_id}.json").read_text())
    except (OSError, ValueError):
        rec = None
    if rec and rec.get("owner_pid"):
        return owner_alive(rec["owner_pid"], rec.get("owner_start"))
    # no record / no owner yet: a detached owner would be a python process in supervisor/
    try:
        pids = [int(x) for x in (scope / "supervisor" / "cgroup.procs").read_text().split()]
    except OSError:
        return False
    return any("python" in os.path.basename(os.readlink(f"/proc/{p}/exe")) for p in pids
               if os.path.exists(f"/proc/{p}/exe"))


def scenario_crash(h: Harness, scale: float) -> list[Result]:
    rng = h.rng("crash")
    env = h.env("crash")
    h.pass_env(env, "M", "STRESS_TAG")
    res = Result("2 crash at random points of `corral run`")
    total = max(2, round(100 * scale))
    batch = min(25, total)
    stats = Counter()
    trial = 0
    while trial < total:
        agent = h.agent("cr")
        marker = h.tmp / "crash" / f"m-{agent}"
        entry = f"M={marker}".encode()
        e = dict(env, M=str(marker))
        n = min(batch, total - trial)
        for _ in range(n):
            detach = trial % 2 == 1
            proc = h.popen(e, "run", *(["--detach"] if detach else []), agent, "--", "sh", "-c", CRASHER)
            time.sleep(rng.uniform(0, 0.25))
            sigkill(proc)
            proc.wait()
            res.trials += 1
            hit = proc.returncode == -signal.SIGKILL
            res.faults += hit
            stats["detached" if detach else "attached", "killed" if hit else f"exit {proc.returncode}"] += 1
            trial += 1
        time.sleep(0.5)  # let watchdogs finish what they started
        runs = [r for r in h.json(e, "ps", "--all", "--json") if r["agent"] == agent]
        populated = set(h.populated_scopes(agent))
        live = {r["id"] for r in runs if r["state"] in LIVE_STATES}
        for rid in sorted(live - populated):
            res.fail(f"{agent}: ps --all says run {rid} is live, its cgroup is not populated")
        for rid in sorted(populated - live):
            st = next((r["state"] for r in runs if r["id"] == rid), "absent")
            res.fail(f"{agent}: run {rid}'s cgroup is populated, ps --all says {st}")
        stats["runs listed"] += len(runs)
        stats["live before gc"] += len(live)
        gc = h.cli(e, "gc", "--json")
        if gc.returncode != 0:
            res.fail(f"{agent}: corral gc exited {gc.returncode}: {tail(gc.stderr)}")
        else:
            reaped = {r["id"] for r in json.loads(gc.stdout)["reaped"] if r["agent"] == agent}
            stats["reaped by gc"] += len(reaped)
            if not reaped <= populated:
                res.fail(f"{agent}: gc reaped {sorted(reaped - populated)}, which were not populated")
        for rid, scope in sorted(h.populated_scopes(agent).items()):
            if not _owner_alive_of(h, e, rid, scope):
                res.fail(f"{agent}: after gc, run {rid}'s cgroup is populated and its owner is gone")
        # what is left are detached runs with a live owner: end them the documented way
        left = h.populated_scopes(agent)
        stats["left to their owners"] += len(left)
        if left:
            k = h.cli(e, "kill", agent)
            if k.returncode != 0:
                res.fail(f"{agent}: corral kill {agent} exited {k.returncode}: {tail(k.stderr)}")
        time.sleep(0.2)
        still = h.populated_scopes(agent)
        if still:
            res.lose(f"{agent}: {len(still)} cgroup(s) still populated after corral kill: {sorted(still)}",
                     count=len(still))
        escaped = alive_with(host_pids_with(entry), entry)
        if escaped:
            res.lose(f"{agent}: {len(escaped)} process(es) of the runs alive after gc and kill: {escaped}",
                     count=len(escaped))
            kill_pids(escaped)
        h.cli(e, "gc", "--json")
        progress(f"  crash {trial}/{total}, failures {res.failures}, lost {res.lost}")
    res.notes.append("; ".join(f"{' '.join(k) if isinstance(k, tuple) else k}: {v}" for k, v in sorted(stats.items(), key=str)))
    return [res]


# --- 3. config writers --------------------------------------------------------------------


def scenario_config(h: Harness, scale: float) -> list[Result]:
    from corral.config.store import TEMP_SUFFIX

    rng = h.rng("config")
    env = h.env("config")
    res = Result("3 config writers (`corral agents add`)")
    trials = max(2, round(200 * scale))
    writers = 4
    cfg = Path(env["XDG_CONFIG_HOME"]) / "corral" / "config.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text("# corral stress: config writers\n[corral.defaults]\nmax_runs = 8  # kept\n")
    lock = cfg.with_name(cfg.name + ".lock")
    expected: set[str] = set()
    stats = Counter()

    def temps() -> list[str]:
        return [n for n in os.listdir(cfg.parent) if n.endswith(TEMP_SUFFIX)]

    # warm-up (no kill): how long writers live among their peers and hold the lock
    names = [h.agent("cw") for _ in range(writers)]
    procs = [h.popen(env, "agents", "add", name, capture=True) for name in names]
    ends, holds = observe(procs, lock)
    for name, p in zip(names, procs):
        p.communicate()
        if p.returncode == 0:
            expected.add(name)
    span = statistics.median(ends)
    hold = max(0.002, statistics.median(holds) if holds else 0.01)
    progress(f"config: {trials} trials of {writers} parallel `agents add`, one SIGKILLed: odd trials a random "
             f"writer at uniform(0, {span * 1.1 * 1e3:.0f} ms), even trials the lock holder at uniform(0, "
             f"{hold * 1.5 * 1e3:.1f} ms) after it took the lock")
    for trial in range(trials):
        res.trials += 1
        names = [h.agent("cw") for _ in range(writers)]
        procs = [h.popen(env, "agents", "add", name, capture=True) for name in names]
        victim, holding = kill_one(procs, rng, lock=lock, holder_mode=trial % 2 == 0, span=span * 1.1,
                                   hold=hold * 1.5)
        stats["kills landing while the victim held the config lock"] += holding
        for i, (name, p) in enumerate(zip(names, procs)):
            _, err = p.communicate()
            if i == victim and p.returncode == -signal.SIGKILL:
                res.faults += 1
                continue
            if p.returncode == 0:
                expected.add(name)
            else:
                res.fail(f"trial {trial}: `agents add {name}` (not killed) exited {p.returncode}: {tail(err)}")
        try:
            tomllib.loads(cfg.read_text())
        except (OSError, tomllib.TOMLDecodeError) as err:
            res.fail(f"trial {trial}: config.toml does not parse: {err}")
        left = temps()
        stats["trials leaving a temp file until the next write"] += bool(left)
        killed = victim is not None and procs[victim].returncode == -signal.SIGKILL
        if len(left) > 1 or (left and not killed):
            res.fail(f"trial {trial}: temp files {left} (victim killed: {killed})")
        if (trial + 1) % max(1, trials // 5) == 0:
            progress(f"  config {trial + 1}/{trials}, failures {res.failures}")
    final = h.agent("cw")
    out = h.cli(env, "agents", "add", final)
    if out.returncode != 0:
        res.fail(f"final `agents add {final}` exited {out.returncode}: {tail(out.stderr)}")
    else:
        expected.add(final)
    if temps():
        res.fail(f"temp files left after the last (clean) write: {temps()}")
    try:
        doc = tomllib.loads(cfg.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        res.fail(f"config.toml does not parse at the end: {err}")
        doc = {}
    present = set(doc.get("agents", {}))
    missing = expected - present
    if missing:
        res.lose(f"{len(missing)} agent(s) whose `agents add` exited 0 are missing: {sorted(missing)[:5]}",
                 count=len(missing))
    if "# kept" not in cfg.read_text() or doc.get("corral", {}).get("defaults", {}).get("max_runs") != 8:
        res.fail("the hand-written part of config.toml did not survive")
    listed = h.cli(env, "agents", "list", "--json")
    if listed.returncode != 0:
        res.fail(f"agents list --json exited {listed.returncode}: {tail(listed.stderr)}")
    res.notes.append(f"{len(expected)} agents acknowledged, {len(present)} in the file "
                     f"(killed writers' agents present: {len(present - expected)}); "
                     f"writer lifetime p50 {span * 1e3:.0f} ms, lock held p50 {hold * 1e3:.1f} ms; "
                     + "; ".join(f"{k}: {v}" for k, v in stats.items()))
    return [res]


# --- 4. token refreshers ------------------------------------------------------------------


def scenario_token(h: Harness, scale: float) -> list[Result]:
    from _auth_util import OAuthServer
    from corral.auth import Token, login

    rng = h.rng("token")
    env = h.env("token")
    dirs = h.dirs(env)
    res = Result("4 token refreshers (`corral auth token`)")
    trials = max(2, round(50 * scale))
    n = 8
    profile = "stress"
    server = OAuthServer()
    stats = Counter()
    try:
        server.configure(latency=0.05)
        add = h.cli(env, "auth", "add", profile, "--token-url", server.token_url, "--client-id", "corral-test")
        if add.returncode != 0:
            res.fail(f"auth add exited {add.returncode}: {tail(add.stderr)}")
            return [res]
        store = dirs.state / "auth" / f"{profile}.json"
        lock = dirs.state / "auth" / f"{profile}.lock"

        def sign_in() -> None:
            pair = server.mint()
            login(dirs, profile, refresh_token=pair["refresh_token"], access_token=pair["access_token"],
                  expires_at=time.time() - 1, source="stress")

        sign_in()
        procs = [h.popen(env, "auth", "token", profile, capture=True) for _ in range(n)]
        ends, holds = observe(procs, lock)
        for p in procs:
            p.communicate()
        span = max(ends)
        hold = max(0.06, max(holds) if holds else 0.06)
        progress(f"token: {trials} rounds of {n} `auth token` at expiry (server latency 50 ms), one SIGKILLed: "
                 f"1 round in 4 a random one at uniform(0, {span * 1e3:.0f} ms), the others the refresher at "
                 f"uniform(0, {hold * 1.3 * 1e3:.0f} ms) after it took the lock")
        for trial in range(trials):
            res.trials += 1
            sign_in()
            before = server.stats()
            procs = [h.popen(env, "auth", "token", profile, capture=True) for _ in range(n)]
            victim, holding = kill_one(procs, rng, lock=lock, holder_mode=trial % 4 != 3, span=span, hold=hold * 1.3)
            stats["kills landing on the refresher (lock holder)"] += holding
            for i, p in enumerate(procs):
                _, err = p.communicate(timeout=120)
                if i == victim and p.returncode == -signal.SIGKILL:
                    res.faults += 1
                    continue
                stats[f"peer exit {p.returncode}"] += 1
                if p.returncode not in (0, 77) or "Traceback" in err:
                    res.fail(f"trial {trial}: a refresher that was not killed exited {p.returncode}: {tail(err)}")
            try:
                stored = json.loads(store.read_text())
                Token.from_json(stored)
            except (OSError, ValueError) as err:
                res.fail(f"trial {trial}: the token store does not parse: {err}")
                stored = None
            nxt = h.cli(env, "auth", "token", profile)
            if nxt.returncode == 0:
                stats["next auth token: ok"] += 1
            elif nxt.returncode == 77 and "sign in again" in nxt.stderr:
                stats["next auth token: 77 sign in again"] += 1
            else:
                res.fail(f"trial {trial}: next `auth token` exited {nxt.returncode}: {tail(nxt.stderr)}")
            after = server.stats()
            for key in ("token_requests", "refreshed", "reused"):
                stats[f"server {key}"] += after.get(key, 0) - before.get(key, 0)
            try:
                stored = json.loads(store.read_text())
            except (OSError, ValueError):
                stored = None
            if stored is not None and not stored.get("dead") and \
                    stored.get("refresh_token") != after.get("newest_refresh_token"):
                res.lose(f"trial {trial}: the store holds a spent refresh token and does not know it")
            if (trial + 1) % max(1, trials // 5) == 0:
                progress(f"  token {trial + 1}/{trials}, failures {res.failures}")
    finally:
        server.stop()
    res.notes.append(f"{trials} rounds: refreshes reaching the server {stats.pop('server refreshed', 0)} "
                     f"(token requests {stats.pop('server token_requests', 0)}, rejected as reused "
                     f"{stats.pop('server reused', 0)}); " + "; ".join(f"{k}: {v}" for k, v in sorted(stats.items())))
    return [res]


# --- 5. fuzz ------------------------------------------------------------------------------

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_]{0,63}", re.ASCII)  # README: letters, digits, '_'
EDGE_NAMES = ["", "-", "_", "a", "a-b", "a/b", "..", "../x", ".", "a..b", " a", "a ", "a b", "\t", "é", "ａｂ",
              "١٢", "a\n", "x" * 64, "x" * 65, "A" * 1000, "-rf", "--help", "--detach", "lane1", "lane_1", "_lane",
              "0", "a.slice", "a\\b", "$(id)", "a;b", "*"]


def _strategies(cli: bool) -> Any:
    from hypothesis import strategies as st

    chars = st.characters(exclude_characters="\x00", exclude_categories=("Cs",)) if cli else st.characters()
    text = lambda **kw: st.text(chars, **kw)  # noqa: E731
    valid_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_]{0,40}", fullmatch=True)
    junk_names = st.one_of(
        text(max_size=80),                                                  # any characters
        st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_]{55,70}", fullmatch=True),  # around the length limit
        st.text(st.sampled_from(list("aZ09_-/. \t\né") + ["\u0661", "\uff41"]), max_size=70),
        st.sampled_from(EDGE_NAMES + ([] if cli else ["a\x00b", "\x00"])),
        text(min_size=60, max_size=300),                                    # long
    )
    # about half of them valid, so that the values get exercised too
    names = st.integers(0, 2).flatmap(lambda k: junk_names if k == 0 else valid_names)
    num = {} if cli else {  # the library also takes numbers
        "sizes": [st.integers(-2, 2**70)],
        "quotas": [st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 10**6)],
        "tasks": [st.integers(-2, 2**70)],
        "timeouts": [st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 10**12)],
    }

    def opt(kind: str, *choices: Any) -> Any:
        """Mostly absent: an example then probes one or two values at a time."""
        some = st.one_of(*choices, *num.get(kind, []))
        return st.integers(0, 7).flatmap(lambda k: some if k == 0 else st.none())

    sizes = opt(
        "sizes",
        st.from_regex(r" ?[0-9]{1,6}(\.[0-9]{1,3})? ?[KMGTkmgt]?(i?[Bb])? ?", fullmatch=True),
        st.builds("{}{}".format, st.integers(0, 10**7), st.sampled_from(["", "K", "M", "G", "T", "k", "GiB", "gb"])),
        st.sampled_from(["0", "-1", "1", "2G", "1.5G", "0.5", "nan", "inf", "1e9", "1GB", "2gib", "\u0663G",
                         "99999999999999999999T", "", " ", "G", "1 G", "-2G"]),
        text(max_size=12))
    quotas = opt(
        "quotas",
        st.from_regex(r"[0-9]{1,7}(\.[0-9]{1,3})?%?", fullmatch=True),
        st.builds("{:g}%".format, st.floats(-10, 2e5)),
        st.sampled_from(["150%", "nan", "nan%", "NaN", "inf", "-inf", "1e3", "0", "-5", "100000", "100001",
                         "0.001%", " 50 % ", "%", ""]),
        text(max_size=10))
    tasks = opt(
        "tasks",
        st.integers(-5, 10**6).map(str),
        st.sampled_from(["0", "-1", "1", "1_000", "\u0661\u0662", " 7 ", "9" * 30, "0x10", "1.5", ""]),
        text(max_size=8))
    timeouts = opt(
        "timeouts",
        st.from_regex(r"[0-9]{1,5}(\.[0-9]{1,3})?(ms|s|min|m|h|d|w)?", fullmatch=True),
        st.builds("{}{}".format, st.integers(0, 10**6), st.sampled_from(["", "ms", "s", "m", "min", "h", "d", "w"])),
        st.sampled_from(["90s", "30m", "2h", "1ms", "0", "0s", "1e3", "-1s", "24d", "25d", "4w", "1.5",
                         "99999999999999999999d", " 5 s ", "nan", "inf", ""]),
        text(max_size=8))
    env_key = text(max_size=8).filter(lambda k: not k.startswith("LD_") and k != "PATH")
    pairs = st.lists(st.one_of(st.tuples(env_key, text(max_size=8)).map("=".join), text(max_size=10)),
                     min_size=1, max_size=3)
    envs = st.integers(0, 7).flatmap(lambda k: pairs if k == 0 else st.just([]))
    return st.fixed_dictionaries({"name": names, "memory_max": sizes, "cpu_quota": quotas, "tasks_max": tasks,
                                  "timeout": timeouts, "env": envs})


def _ex(name: str = "probe1", **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"name": name, "memory_max": None, "cpu_quota": None, "tasks_max": None, "timeout": None,
                            "env": []}
    base.update(kw)
    return base


# Probes that always run (hypothesis's explicit phase), before the generated examples: the
# edges named in the README and DESIGN (names; limits; --timeout 30m, ...).
EXPLICIT = [
    _ex(), _ex("a-b"), _ex("a/b"), _ex(".."), _ex("../x"), _ex(""), _ex(" "), _ex("x" * 64), _ex("x" * 65),
    _ex("\u00e9"), _ex("lane_1"), _ex("_lane"),
    _ex(memory_max="2G"), _ex(memory_max="0"), _ex(memory_max="lots"), _ex(cpu_quota="150%"), _ex(cpu_quota="0"),
    _ex(cpu_quota="nan"), _ex(cpu_quota="inf"), _ex(tasks_max="512"), _ex(tasks_max="0"), _ex(timeout="30m"),
    _ex(timeout="24d"), _ex(timeout="25d"), _ex(timeout="0"), _ex(env=["A=b"]), _ex(env=["=b"]), _ex(env=["NOEQ"]),
]
EXPLICIT_LIBRARY = [_ex(cpu_quota=float("nan")), _ex(timeout=float("nan")), _ex(timeout=float("inf")),
                    _ex(memory_max=2**70), _ex(name="a\x00b")]


def _library_verdict(ex: dict[str, Any]) -> tuple[bool, float | None, str | None]:
    """(accepted, timeout in seconds, problem) for one example, through the library alone."""
    import math

    from corral.errors import UsageError
    from corral.names import validate_agent
    from corral.spec import Limits, RunSpec
    from corral.units import parse_env_pairs

    name = ex["name"]
    try:
        validate_agent(name)
        limits = Limits.parse(memory_max=ex["memory_max"], cpu_quota=ex["cpu_quota"], tasks_max=ex["tasks_max"])
        spec = RunSpec(agent=name, argv=("/bin/true",), env=parse_env_pairs(ex["env"]), limits=limits,
                       timeout=ex["timeout"])
    except UsageError:
        ok_name = bool(_NAME_RE.fullmatch(name)) if isinstance(name, str) else False
        try:
            validate_agent(name)
        except UsageError:
            if ok_name:
                return False, None, f"validate_agent rejects {name!r}, a name the documented rule allows"
        return False, None, None
    except Exception as err:  # noqa: BLE001 - anything but a UsageError is a bug
        return False, None, f"{type(err).__name__} (not UsageError): {err}"
    problems = []
    if not _NAME_RE.fullmatch(name):
        problems.append(f"agent name {name!r} accepted against the documented rule")
    for key, value in limits.requested().items():
        if not math.isfinite(value) or value <= 0:
            problems.append(f"{key}={value!r} accepted (from {ex[key]!r})")
    if spec.timeout is not None and (not math.isfinite(spec.timeout) or spec.timeout <= 0):
        problems.append(f"timeout={spec.timeout!r} accepted (from {ex['timeout']!r})")
    return True, spec.timeout, "; ".join(problems) or None


def _cli_args(ex: dict[str, Any]) -> list[str]:
    flags = [f"--{k.replace('_', '-')}={ex[k]}" for k in ("memory_max", "cpu_quota", "tasks_max", "timeout")
             if ex[k] is not None]
    flags += [f"--env={pair}" for pair in ex["env"]]
    if ex["name"].startswith("-"):  # would be read as an option: pass it after --
        return ["run", *flags, "--", ex["name"], "/bin/true"]
    return ["run", ex["name"], *flags, "--", "/bin/true"]


def scenario_fuzz(h: Harness, scale: float) -> list[Result]:
    from hypothesis import HealthCheck, Phase, example, given, settings

    env = h.env("fuzz")
    runs_dir = h.dirs(env).runs
    cli_res, lib_res = Result("5a fuzz: names and values through the CLI"), Result("5b fuzz: through the library")
    n_cli, n_lib = max(10, round(300 * scale)), max(100, round(2000 * scale))
    common = dict(deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))

    def explicit(examples: list[dict[str, Any]]) -> Callable[[Any], Any]:
        def wrap(fn: Any) -> Any:
            for ex in reversed(examples):
                fn = example(ex=ex)(fn)
            return fn
        return wrap
    kinds: Counter = Counter()
    lib_kinds: Counter = Counter()
    verdicts: Counter = Counter()

    @settings(max_examples=n_lib, **common)
    @given(ex=_strategies(cli=False))
    @explicit(EXPLICIT + EXPLICIT_LIBRARY)
    def library(ex: dict[str, Any]) -> None:
        lib_res.trials += 1
        accepted, _timeout, problem = _library_verdict(ex)
        lib_res.faults += not accepted
        if problem:
            kind = re.sub(r" \(from .*?\)", "", problem)[:90]
            lib_kinds[kind] += 1
            if lib_kinds[kind] <= 2:
                lib_res.fail(f"{problem}  (example {ex!r:.200})")
            else:
                lib_res.failures += 1

    def snapshot() -> tuple[set[str], set[str]]:
        try:
            records = set(os.listdir(runs_dir))
        except FileNotFoundError:
            records = set()
        return records, h.tree()

    @settings(max_examples=n_cli, **common)
    @given(ex=_strategies(cli=True))
    @explicit(EXPLICIT)
    def through_cli(ex: dict[str, Any]) -> None:
        cli_res.trials += 1
        accepted, timeout, problem = _library_verdict(ex)
        args = _cli_args(ex)
        before = snapshot()
        out = h.cli_within(cli_res, env, *args)
        if out is None:
            return
        after = snapshot()
        code, err = out.returncode, out.stderr
        verdicts["valid" if accepted else "invalid", code] += 1
        why = None
        if "Traceback" in err:
            frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', err)
            at = f" at {frames[-1][0].split('/src/')[-1]}:{frames[-1][1]} ({frames[-1][2]})" if frames else ""
            why = f"traceback, exit {code}: {err.strip().splitlines()[-1]}{at}"
        elif accepted:
            allowed = (0, 124) if timeout is not None and timeout < 2 else (0,)
            if code not in allowed:
                why = f"valid input exited {code}: {tail(err, 160)}"
        else:
            cli_res.faults += 1
            if code != 2:
                why = f"invalid input exited {code} (not 2): {tail(err, 160)}"
            # Only what appeared counts: an idle shared owner's cgroup may go meanwhile.
            elif after[0] - before[0] or after[1] - before[1]:
                why = (f"invalid input created something: records {sorted(after[0] - before[0])}, "
                       f"cgroups {sorted(after[1] - before[1])}")
        if why:
            last = err.strip().splitlines()[-1] if err.strip() else ""
            kind = f"exit {code}: {last}" if "Traceback" in err else re.sub(r"[0-9a-f]{8}|\d+", "N", why)[:90]
            kinds[kind] += 1
            if kinds[kind] <= 2:
                cli_res.fail(f"{why}  <- corral {' '.join(map(repr, args))[:240]}")
            else:
                cli_res.failures += 1
        if cli_res.trials % max(1, n_cli // 5) == 0:
            progress(f"  fuzz CLI {cli_res.trials}/{n_cli}, failures {cli_res.failures}")
        if accepted:  # the contract: torn down before an attached corral exits (within 2 s if it died)
            t0 = time.monotonic()
            while h.populated_scopes(ex["name"]) and time.monotonic() - t0 < 2.0:
                time.sleep(0.005)
            if time.monotonic() - t0 > 0.001:
                cli_res.notes.append(f"run of {ex['name']!r} (exit {code}) was still populated when `corral run` "
                                     f"had exited; empty {(time.monotonic() - t0) * 1e3:.0f} ms later")
            for rid, scope in h.populated_scopes(ex["name"]).items():
                cli_res.lose(f"run {rid} of {ex['name']!r} still populated 2 s after its `corral run` ended")
                (scope / "cgroup.kill").write_text("1")

    progress(f"fuzz: {n_lib} library examples, {n_cli} CLI examples (hypothesis, derandomized)")
    library()
    through_cli()
    cli_res.notes.append("outcomes: " + ", ".join(f"{v} exit {c}: {n}" for (v, c), n in sorted(verdicts.items())))
    for kind, count in kinds.most_common():
        cli_res.notes.append(f"{count} x {kind}")
    for kind, count in lib_kinds.most_common():
        lib_res.notes.append(f"{count} x {kind}")
    h.cli(env, "gc", "--json")
    return [cli_res, lib_res]


# --- 6. load ------------------------------------------------------------------------------


def scenario_load(h: Harness, scale: float) -> list[Result]:
    env = h.env("load")
    res = Result("6 load: detached runs, ps, kill --all")
    total = max(10, round(500 * scale))
    agents = [h.agent("ld") for _ in range(5)]
    res.trials = total

    def start(i: int) -> tuple[int, subprocess.CompletedProcess]:
        return i, h.cli(env, "run", "--detach", agents[i % len(agents)], "--", "sleep", "1000")

    progress(f"load: starting {total} detached runs, 8 at a time")
    t0 = time.monotonic()
    ids: dict[str, str] = {}
    pool = ThreadPoolExecutor(max_workers=8)
    try:
        for i, out in pool.map(start, range(total)):
            if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{8}", out.stdout.strip()):
                ids[out.stdout.strip()] = agents[i % len(agents)]
            else:
                res.fail(f"run {i}: corral run --detach exited {out.returncode}: {tail(out.stderr)}")
            if (i + 1) % max(1, total // 5) == 0:
                progress(f"  started {i + 1}/{total}")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on Ctrl-C: start no more, then clean up
    t_start = time.monotonic() - t0

    t0 = time.monotonic()
    ps = h.cli(env, "ps", "--json")
    t_ps = time.monotonic() - t0
    seen = {r["id"]: r for r in json.loads(ps.stdout)} if ps.returncode == 0 else {}
    if ps.returncode != 0:
        res.fail(f"ps --json exited {ps.returncode}: {tail(ps.stderr)}")
    missing = [rid for rid in ids if rid not in seen]
    if missing:
        res.lose(f"{len(missing)} started run(s) not listed by ps: {missing[:5]}", count=len(missing))
    bad = [rid for rid in ids if rid in seen and not (seen[rid]["state"] == "running" and (seen[rid]["pids"] or 0) >= 1)]
    if bad:
        res.fail(f"{len(bad)} run(s) listed without a live process: "
                 f"{[(r, seen[r]['state'], seen[r]['pids']) for r in bad[:5]]}", count=len(bad))
    pids_before = sum(len(h.populated_scopes(a)) for a in agents)

    t0 = time.monotonic()
    kill = h.cli(env, "kill", "--all", timeout=600)
    t_kill = time.monotonic() - t0
    if kill.returncode != 0:
        res.fail(f"kill --all exited {kill.returncode}: {tail(kill.stderr)}")
    still = sum(len(h.populated_scopes(a)) for a in agents)
    if still:
        res.lose(f"{still} scope(s) still populated after kill --all", count=still)
    t0 = time.monotonic()
    after = h.cli(env, "ps", "--json")
    t_ps2 = time.monotonic() - t0
    listed = [r for r in json.loads(after.stdout or "[]") if r["agent"] in agents]
    if listed:
        res.fail(f"ps --json after kill --all still lists {len(listed)} run(s)", count=len(listed))
    ended = Counter(r["state"] for r in h.json(env, "ps", "--all", "--json") if r["id"] in ids)
    res.notes.append(f"{len(ids)} started in {t_start:.1f} s ({t_start / max(1, total) * 1e3:.0f} ms/run wall, "
                     f"8 parallel); ps --json with {len(seen)} live: {t_ps * 1e3:.0f} ms; populated scopes before "
                     f"kill {pids_before}; kill --all: {t_kill * 1e3:.0f} ms; ps after: {t_ps2 * 1e3:.0f} ms; "
                     f"final states {dict(ended)}")
    h.cli(env, "gc", "--json")
    return [res]


# --- 8. gc racing launches ------------------------------------------------------------------


def scenario_gcrace(h: Harness, scale: float) -> list[Result]:
    """`corral gc` in a loop, from the runs' own state dir and from a second one (as the
    gc timer and another user's corral would), beside attached and detached launches:
    gc must never take the cgroup of a run that is starting, and never touch another
    state dir's runs."""
    env, other = h.env("gcrace"), h.env("gcrace-other")
    res = Result("8 gc racing launches")
    total = max(20, round(200 * scale))
    agents = [h.agent("gr") for _ in range(4)]
    res.trials = total
    stop = threading.Event()
    gc_runs = Counter()

    def gc_loop(e: dict[str, str], name: str) -> None:
        while not stop.is_set():
            out = h.cli(e, "gc", "--json")
            gc_runs[name] += 1
            if out.returncode != 0:
                res.fail(f"gc ({name}) exited {out.returncode}: {tail(out.stderr)}")

    def launch(i: int) -> None:
        agent = agents[i % len(agents)]
        if i % 4 == 3:
            out = h.cli(env, "run", "--detach", agent, "--", "sleep", "0.2")
            if out.returncode == 0:
                out = h.cli(env, "wait", out.stdout.strip(), "--timeout", "60")
        else:
            out = h.cli(env, "run", agent, "--", "sh", "-c", f"exit {i % 3}")
        want = 0 if i % 4 == 3 else i % 3
        if out.returncode != want:
            res.fail(f"launch {i} ({'detached' if i % 4 == 3 else 'attached'}): exit {out.returncode}, "
                     f"not {want}: {tail(out.stderr)}")

    loops = [threading.Thread(target=gc_loop, args=(e, n), daemon=True) for e, n in ((env, "own"), (other, "other"))]
    for t in loops:
        t.start()
    progress(f"gcrace: {total} launches, 4 at a time, beside two gc loops")
    pool = ThreadPoolExecutor(max_workers=4)
    try:
        list(pool.map(launch, range(total)))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        stop.set()
        for t in loops:
            t.join(timeout=60)
    left = {a: h.scopes(a) for a in agents}
    leftover = sum(len(v) for v in left.values())
    h.cli(env, "gc", "--json")
    after = sum(len(h.scopes(a)) for a in agents)
    if after:
        res.lose(f"{after} run cgroup(s) still there after the runs ended and a final gc", count=after)
    res.notes.append(f"gc ran {gc_runs['own']} times from the runs' state dir and {gc_runs['other']} times from "
                     f"another beside {total} launches; {leftover} empty run cgroup(s) before the final gc")
    return [res]


# --- 9. corrupt and wrong-typed records ----------------------------------------------------

_ODD_VALUES = [None, 5, -1, 2**70, 1.5, float("inf"), "", "x" * 5000, [], [1, "a"], {}, {"a": 1}, True, "\u0000",
               "../../etc/passwd", "/sys/fs/cgroup", "running", "lost"]


def _mangle(record: dict[str, Any], rng: random.Random) -> str:
    """A record as a buggy writer, a disk error or a hostile hand might leave it."""
    how = rng.randrange(6)
    if how == 0:
        return rng.choice(["", "{", "{garbage", "[]", "null", "5", '"x"', "\x00" * 10, "{" * 5000])
    data = dict(record)
    for key in rng.sample(sorted(data), k=rng.randint(1, 4)):
        if how == 1:
            del data[key]
        else:
            data[key] = rng.choice(_ODD_VALUES)
    if how == 5:
        data["cgroup"] = rng.choice(["/", "/sys/fs/cgroup", "/proc", "relative/path", "/nonexistent"])
    return json.dumps(data, allow_nan=True)


def scenario_records(h: Harness, scale: float) -> list[Result]:
    """A live run whose record is mangled: ps (table and JSON), show, kill and gc must
    answer without a traceback, the run stays listed (never hidden), and it can be killed."""
    env = h.env("records")
    rng = h.rng("records")
    res = Result("9 corrupt and wrong-typed records")
    total = max(20, round(200 * scale))
    res.trials = total
    agent = h.agent("rc")
    for i in range(total):
        out = h.cli(env, "run", "--detach", agent, "--", "sleep", "1000")
        if out.returncode != 0:
            res.fail(f"trial {i}: run --detach exited {out.returncode}: {tail(out.stderr)}")
            continue
        run_id = out.stdout.strip()
        path = Path(env["XDG_STATE_HOME"]) / "corral" / "runs" / f"{run_id}.json"
        mangled = _mangle(json.loads(path.read_text()), rng)
        path.write_text(mangled)
        res.faults += 1
        for args in (("ps",), ("ps", "--all", "--json"), ("show", run_id), ("gc", "--json")):
            got = h.cli(env, *args)
            if "Traceback" in got.stderr or got.returncode not in (0, 3):
                res.fail(f"trial {i}: {' '.join(args)} exited {got.returncode} on {mangled[:80]!r}: "
                         f"{tail(got.stderr)}")
        listed = h.cli(env, "ps", "--json")
        alive = h.populated(h.scopes(agent).get(run_id, Path("/nonexistent")))
        if alive and listed.returncode == 0 and run_id not in listed.stdout:
            res.lose(f"trial {i}: a live run hidden by its record {mangled[:80]!r}")
        got = h.cli(env, "kill", run_id)
        if h.populated(h.scopes(agent).get(run_id, Path("/nonexistent"))):
            res.lose(f"trial {i}: kill {run_id} exited {got.returncode} and the run lives: {tail(got.stderr)}")
            h.cli(env, "kill", "--all-users")
    h.cli(env, "gc", "--json")
    left = len(h.scopes(agent))
    if left:
        res.lose(f"{left} run cgroup(s) left after kill and gc", count=left)
    res.notes.append(f"{total} live runs with mangled records (missing keys, wrong types, odd cgroup paths, "
                     "garbage); ps, show, gc, kill on each")
    return [res]


# --- 10. every option of every command -----------------------------------------------------

_NASTY = ["", " ", "-1", "0", "1", "1.5", "nan", "inf", "-inf", "1e300", str(2**70), "99999999999T", "0.00001%",
          "1h30m", "30s", "5m", "abc", "a" * 300, "../x", "/", "\u00e9", "\u0661", "--", "-x", "K=V", "A B=1", "=",
          "x=", "lane1", "deadbeef", "dead", "cafe", "KILL", "SIGTERM", "64", "999", "json", "form", "none", "strict",
          "loopback", "root", "nobody", "$(id)", "a\nb", "%s%s", "\\"]


def _commands() -> list[tuple[list[str], Any]]:
    """(path, click command) for every leaf command of corral's CLI."""
    import click

    from corral.cli.main import cli

    out: list[tuple[list[str], Any]] = []

    def walk(cmd: Any, path: list[str]) -> None:
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                walk(sub, [*path, name])
        else:
            out.append((path, cmd))

    walk(cli, [])
    return out


# Commands that serve or follow forever by design: driven with a deadline of their own.
_FOREVER = {("auth", "broker"), ("broker",)}


def _option_values() -> Any:
    """What a user (or a script gone wrong) types as an option's value: the known nasty ones,
    numbers of every shape, durations, and arbitrary text."""
    from hypothesis import strategies as st

    number = st.one_of(st.integers(min_value=-2**80, max_value=2**80).map(str),
                       st.floats(allow_nan=True, allow_infinity=True).map(repr))
    duration = st.builds(lambda n, u: f"{n}{u}", st.integers(-5, 10**12), st.sampled_from(["", "s", "m", "h", "d",
                                                                                           "ms", "x", "h30m"]))
    text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=40)
    return st.one_of(st.sampled_from(_NASTY), number, duration, text)


def _cap_top(args: list[str]) -> list[str]:
    """`top` takes N frames DELAY apart (piped, one frame when neither is given): a valid
    `-n 10**20` or `-d 2w` is a long wait by request, not a hang. Such values are capped
    (3 frames, 0.2 s); every junk value still goes through as drawn."""
    from corral.errors import UsageError
    from corral.units import parse_duration

    out = list(args)
    for i, tok in enumerate(out[:-1]):
        value = out[i + 1]
        try:
            if tok in ("-n", "--iterations") and int(value) > 3:
                out[i + 1] = "3"
            elif tok in ("-d", "--delay") and parse_duration(value) > 0.2:
                out[i + 1] = "0.2"
        except (ValueError, UsageError):  # junk: passed as drawn, for top to refuse
            pass
    return out


def scenario_options(h: Harness, scale: float) -> list[Result]:
    """Each option of each command, given junk or edge values (and junk positional
    arguments), drawn by hypothesis (derandomized: the same on every run): whatever it is,
    a user gets an exit code and a message, never a traceback or a hang."""
    import click
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    env = h.env("options")
    res = Result("10 every option of every command, junk values")
    commands = [(path, cmd) for path, cmd in _commands() if tuple(path) not in _FOREVER]
    per_option = max(3, round(20 * scale))
    covered: set[str] = set()
    values = _option_values()

    def attempt(path: list[str], args: list[str]) -> None:
        if path == ["wait"]:
            args += ["--timeout", "1"]
        if path == ["logs"] and ("--follow" in args or "-f" in args):
            return
        if path and path[0] == "run" and "--" not in args:
            args += ["--", "true"]
        if path == ["install-units"]:
            # never the host's /etc/systemd/system (nor a junk --dest in the cwd): the last
            # --dest wins, and no daemon-reload of the machine's manager
            args += ["--dest", str(Path(env["XDG_STATE_HOME"]).parent / "units"), "--no-reload"]
        if path == ["top"]:
            args = _cap_top(args)
        res.trials += 1
        out = h.cli_within(res, env, *args)
        if out is None:
            return
        if "Traceback" in out.stderr:
            res.fail(f"corral {' '.join(args)[:150]!r}: traceback: {tail(out.stderr, 200)}")
        elif out.returncode not in DOCUMENTED_EXITS:
            res.fail(f"corral {' '.join(args)[:150]!r}: undocumented exit {out.returncode}: {tail(out.stderr, 200)}")

    def fuzz_option(path: list[str], first: Any, others: list[Any], positionals: list[Any]) -> None:
        """*first* on every call (so every option is covered), with up to two of *others*."""
        @settings(max_examples=per_option, deadline=None, derandomize=True, database=None,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        @given(data=st.data())
        def one_call(data: Any) -> None:
            args: list[str] = list(path)
            chosen = [first, *data.draw(st.lists(st.sampled_from(others), max_size=2, unique_by=id))] if others \
                else [first]
            for param in chosen:
                name = max(param.opts, key=len)
                covered.add(f"{' '.join(path)} {name}")
                args += [name] if param.is_flag else [name, data.draw(values)]
            for other in positionals:  # positional arguments: junk too
                n = 1 if other.nargs == 1 else data.draw(st.integers(1, 2))
                args += [data.draw(values) or "x" for _ in range(n)]
            attempt(path, args)

        one_call()

    for path, cmd in commands:
        options = [p for p in cmd.params if isinstance(p, click.Option) and p.name != "help"]
        for first in options:
            fuzz_option(path, first, [o for o in options if o is not first],
                        [p for p in cmd.params if isinstance(p, click.Argument)])
    h.cli(env, "kill", "--all")
    h.cli(env, "gc", "--json")
    total = sum(1 for _, c in commands for p in c.params if isinstance(p, click.Option))
    res.notes.append(f"{len(covered)} of {total} options of {len(commands)} commands, {res.trials} calls drawn by "
                     "hypothesis (1-3 options a call, nasty/numeric/duration/free-text values)")
    return [res]


# --- 11. full filesystems ---------------------------------------------------------------------


def _fill(directory: str) -> int:
    """Write a file in *directory* until its filesystem says ENOSPC; the bytes written."""
    n = 0
    try:
        with open(os.path.join(directory, ".stress-filler"), "ab") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
                n += 4096
    except OSError:
        return n


def enospc_trial(spec: dict[str, Any]) -> dict[str, Any]:
    """One trial of the enospc scenario, run by ``stress.py --enospc-trial`` inside a private
    mount namespace (``unshare -m``): tiny tmpfs mounts over this trial's state and config
    dirs, filled up at a random moment while corral works on them. Returns every step."""
    env, steps = spec["env"], []
    state, config = env["XDG_STATE_HOME"], env["XDG_CONFIG_HOME"]
    for d in (state, config):
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={spec['size_kb']}k,mode=0755", "tmpfs", d], check=True)

    def cli(phase: str, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
        try:
            out = subprocess.run([*CORRAL, *args], env=env, capture_output=True, text=True, timeout=60, input=input,
                                 stdin=None if input is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            out = subprocess.CompletedProcess(args, -1, "", "did not end within 60 s")
        steps.append({"phase": phase, "args": list(args), "rc": out.returncode, "err": out.stderr[-600:],
                      "out": out.stdout})
        return out

    agent, other, profile = spec["agent"], spec["other"], spec["profile"]
    cli("setup", "agents", "add", agent)
    cli("setup", "auth", "add", profile, "--token-url", spec["token_url"], "--client-id", "corral-test")
    cli("setup", "auth", "login", profile, "--refresh-token-stdin", input=spec["refresh_token"] + "\n")
    cli("setup", "run", "-d", agent, "--", "sleep", "60")
    marks = spec["marks"]  # outside the tmpfs: each command says there that it ran
    slow = f"touch {marks}/slow; sleep 1.2; exit 3"
    attached = subprocess.Popen([*CORRAL, "run", agent, "--", "sh", "-c", slow], env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(spec["fill_after"])
    filled = {d: _fill(d) for d in (state, config)}
    cli("full", "agents", "add", other)
    cli("full", "auth", "token", profile, "--no-broker")
    cli("full", "run", agent, "--", "sh", "-c", f"touch {marks}/quick; exit 3")
    steps[-1]["ran"] = os.path.exists(f"{marks}/quick")
    cli("full", "run", "-d", agent, "--", "sleep", "60")
    cli("full", "ps", "--all", "--json")
    cli("full", "gc", "--json")
    out, err = attached.communicate(timeout=60)
    steps.append({"phase": "full", "args": ["run", agent, "--", "sh", "-c", slow], "rc": attached.returncode,
                  "err": err[-600:], "out": out, "ran": os.path.exists(f"{marks}/slow")})
    try:
        config_text = Path(config, "corral", "config.toml").read_text()
    except OSError as e:
        config_text = f"<unreadable: {e}>"
    try:
        store_text = Path(state, "corral", "auth", f"{profile}.json").read_text()
    except OSError as e:
        store_text = f"<unreadable: {e}>"
    for d in (state, config):
        os.unlink(os.path.join(d, ".stress-filler"))
    cli("after", "ps", "--all", "--json")
    cli("after", "auth", "token", profile, "--no-broker")
    cli("after", "kill", "--all")
    cli("after", "gc", "--json")
    temps = [os.path.join(dp, f) for dp, _, fs in os.walk(state) for f in fs if f.endswith(".tmp")]
    temps += [os.path.join(dp, f) for dp, _, fs in os.walk(config) for f in fs if f.endswith(".tmp")]
    return {"steps": steps, "filled": filled, "config": config_text, "store": store_text, "temps": temps}


def scenario_enospc(h: Harness, scale: float) -> list[Result]:
    """The state and config filesystems fill up at a random moment (tiny tmpfs mounts in a
    private mount namespace): every command says what went wrong with a documented exit
    code, an attached run's status reaches its caller, the config and token store still
    parse, what was acknowledged is kept, and nothing is left running."""
    from _auth_util import OAuthServer

    res = Result("11 full state and config filesystems")
    if os.geteuid() != 0 or not shutil.which("unshare"):
        res.notes.append("skipped: tmpfs mounts in a private mount namespace need root and unshare")
        return [res]
    rng = h.rng("enospc")
    trials = max(4, round(30 * scale))
    server = OAuthServer()
    outcomes: Counter = Counter()
    refused = 0
    said: dict[str, str] = {}
    try:
        for trial in range(trials):
            res.trials += 1
            env = h.env(f"enospc{trial}")
            agent, other, profile = h.agent("sp"), h.agent("sq"), f"p{trial}"
            spec = {"env": env, "agent": agent, "other": other, "profile": profile, "token_url": server.token_url,
                    "refresh_token": server.mint()["refresh_token"], "size_kb": rng.choice([96, 128, 256, 512]),
                    "fill_after": rng.uniform(0.05, 1.0)}
            spec["marks"] = str(h.tmp / f"enospc{trial}-marks")
            os.makedirs(spec["marks"])
            spec_file = h.tmp / f"enospc{trial}.json"
            spec_file.write_text(json.dumps(spec))
            proc = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, __file__,
                                   "--enospc-trial", str(spec_file)], env=env, capture_output=True, text=True,
                                  timeout=300)
            if proc.returncode != 0:
                res.fail(f"trial {trial}: the trial itself failed ({proc.returncode}): {tail(proc.stderr)}")
                h.kill_tree()
                continue
            got = json.loads(proc.stdout)
            for step in got["steps"]:
                what = f"trial {trial} ({step['phase']}): corral {' '.join(step['args'])[:80]}"
                key = f"{step['phase']} {' '.join(step['args'][:2 if step['args'][0] in ('auth', 'agents') else 1])}" \
                      f"{' -d' if '-d' in step['args'] else ''} exit {step['rc']}"
                outcomes[key] += 1
                if step["rc"] != 0 and key not in said:
                    said[key] = re.sub(r"/tmp/\S+", "PATH", tail(step["err"], 240))
                if "Traceback" in step["err"]:
                    res.fail(f"{what}: traceback: {tail(step['err'])}")
                elif step["rc"] not in DOCUMENTED_EXITS:
                    res.fail(f"{what}: undocumented exit {step['rc']}: {tail(step['err'])}")
                elif step["rc"] != 0 and not step["err"].strip():
                    res.fail(f"{what}: exit {step['rc']} without a word")
                if step["phase"] == "setup" and step["rc"] != 0:
                    res.fail(f"{what}: setup failed with room to spare: {tail(step['err'])}")
                if "ran" in step and step["ran"] and step["rc"] != 3:
                    res.lose(f"{what}: the command ran, but its status 3 reached the caller as {step['rc']}: "
                             f"{tail(step['err'])}")
                elif "ran" in step and not step["ran"]:
                    refused += 1
                    if step["rc"] in (0, 3) or "not started" not in step["err"]:
                        res.fail(f"{what}: the command did not run, and corral said {step['rc']}: "
                                 f"{tail(step['err'])}")
                if step["phase"] == "after" and step["args"][0] in ("ps", "kill", "gc") and step["rc"] != 0:
                    res.fail(f"{what}: exit {step['rc']} once there was room again: {tail(step['err'])}")
                if step["phase"] == "after" and step["args"][:2] == ["auth", "token"] and not (
                        step["rc"] == 0 or (step["rc"] == 77 and "sign in again" in step["err"])):
                    res.fail(f"{what}: exit {step['rc']} once there was room again: {tail(step['err'])}")
            try:
                conf = tomllib.loads(got["config"])
                if agent not in conf.get("agents", {}):
                    res.lose(f"trial {trial}: acknowledged agent {agent} missing from the config")
                added = next(s for s in got["steps"] if s["args"][:3] == ["agents", "add", other])
                if added["rc"] == 0 and other not in conf.get("agents", {}):
                    res.lose(f"trial {trial}: `agents add {other}` said 0 on a full disk but the agent is missing")
            except tomllib.TOMLDecodeError as err:
                res.lose(f"trial {trial}: the config no longer parses: {err}")
            try:
                json.loads(got["store"])["refresh_token"]
            except (ValueError, KeyError, TypeError) as err:
                res.lose(f"trial {trial}: the token store no longer parses: {err}: {got['store'][:100]!r}")
            if got["temps"]:
                res.fail(f"trial {trial}: temp files left: {got['temps'][:3]}")
            started = [s["out"].split()[0] for s in got["steps"] if s["args"][:2] == ["run", "-d"] and s["rc"] == 0
                       and s["out"].split()]
            listed = next(s for s in got["steps"] if s["phase"] == "after" and s["args"][0] == "ps")
            for rid in started:
                if rid not in listed["out"]:
                    res.lose(f"trial {trial}: detached run {rid} (started with exit 0) missing from ps")
            res.faults += sum(1 for d, n in got["filled"].items())
            for a in (agent, other):
                for rid, scope in h.populated_scopes(a).items():
                    res.lose(f"trial {trial}: run {rid} of {a} still populated after kill --all")
                    (scope / "cgroup.kill").write_text("1")
            if trial % max(1, trials // 4) == 0:
                progress(f"  enospc trial {trial + 1}/{trials}, failures {res.failures}, lost {res.lost}")
    finally:
        server.stop()
    res.notes.append(f"{refused} attached runs asked for on a full disk were refused before their command ran "
                     "(no start record); every one that ran passed its status through")
    res.notes.append("outcomes: " + ", ".join(f"{k}: {n}" for k, n in sorted(outcomes.items())))
    res.notes += [f"{k} said: {v}" for k, v in sorted(said.items())]
    return [res]


# --- 12. wall-clock jumps ---------------------------------------------------------------------


def _libfaketime() -> str | None:
    import glob

    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    return found[0] if found else None


def scenario_clock(h: Harness, scale: float) -> list[Result]:
    """The wall clock jumps (libfaketime moves it for one corral process at a time; the boot
    clock, as in life, does not move): a token obtained while the clock ran ahead, or asked
    for while it runs behind, must never be handed out once the provider (whose clock is
    right) considers it expired. Every token `corral auth token` prints is tried at once
    against the provider's API."""
    import urllib.error

    from _auth_util import _LOCAL, OAuthServer
    from corral.auth import login

    res = Result("12 wall-clock jumps and token expiry")
    lib = _libfaketime()
    if lib is None:
        res.notes.append("skipped: libfaketime is not installed (apt-get install faketime)")
        return [res]
    rng = h.rng("clock")
    env = h.env("clock")
    dirs = h.dirs(env)
    trials = max(4, round(24 * scale))
    lifetime = 3.0
    server = OAuthServer()
    stats: Counter = Counter()
    try:
        server.configure(lifetime=lifetime)
        add = h.cli(env, "auth", "add", "clk", "--token-url", server.token_url, "--client-id", "corral-test")
        if add.returncode != 0:
            res.fail(f"auth add exited {add.returncode}: {tail(add.stderr)}")
            return [res]

        def accepted(token: str) -> bool:
            req = urllib.request.Request(server.base + "/v1/responses", data=b"{}", method="POST",
                                         headers={"Authorization": f"Bearer {token}"})
            try:
                with _LOCAL.open(req, timeout=10) as resp:
                    return resp.status == 200
            except urllib.error.HTTPError:
                return False

        def ask(jump: str | None, trial: int, label: str) -> None:
            e = dict(env)
            if jump is not None:
                e.update(LD_PRELOAD=lib, FAKETIME=jump, FAKETIME_DONT_FAKE_MONOTONIC="1")
            out = subprocess.run([*CORRAL, "auth", "token", "clk", "--no-broker"], env=e, capture_output=True,
                                 text=True, timeout=60, stdin=subprocess.DEVNULL)
            stats["asked"] += 1
            if out.returncode != 0 or "Traceback" in out.stderr:
                res.fail(f"trial {trial} ({label}, clock {jump or 'right'}): exit {out.returncode}: "
                         f"{tail(out.stderr)}")
                return
            if accepted(out.stdout.strip()):
                stats["accepted"] += 1
            else:
                res.lose(f"trial {trial} ({label}, clock {jump or 'right'}): handed out a token the provider "
                         "had already expired")

        jumps = ["+3h", "+10m", "+1d", "-2h", "-10m", "-1d"]
        progress(f"clock: {trials} trials, tokens of {lifetime:.0f} s, wall clock jumps {', '.join(jumps)}")
        for trial in range(trials):
            res.trials += 1
            res.faults += 1
            jump = rng.choice(jumps)
            ahead_first = trial % 2 == 0
            pair = server.mint()
            login(dirs, "clk", refresh_token=pair["refresh_token"], access_token=None, expires_at=None,
                  source="stress")
            before = server.stats()["refreshed"] if "refreshed" in server.stats() else 0
            # Either obtained under the jumped clock and then asked with the right one, or
            # obtained with the right clock and asked under the jump: for lifetime + 2 s.
            ask(jump if ahead_first else None, trial, "obtained")
            t0 = time.monotonic()
            while time.monotonic() - t0 < lifetime + 2.0:
                ask(None if ahead_first else jump, trial, "asked later")
                time.sleep(0.25)
            stats["refreshes"] += server.stats().get("refreshed", 0) - before
    finally:
        server.stop()
    res.notes.append(f"{stats['asked']} tokens handed out, {stats['accepted']} accepted by the provider, "
                     f"{stats['refreshes']} refreshes over {res.trials} trials of {lifetime + 2:.0f} s")
    return [res]


# --- 7. hostile payload ---------------------------------------------------------------------

# Attacks an LLM-written payload may try (issue 11), as sh. $ROOT is the cgroup2 mount,
# $SLICES corral.slice, $SCOPE the run's own scope, $STATE/$CONFIG corral's dirs.
ATTACKS = {
    "escape": 'for f in $ROOT/cgroup.procs $SLICES/cgroup.procs $SCOPE/supervisor/cgroup.procs; do '
              'echo $$ > $f 2>/dev/null && echo "HIT escape $f"; done',
    "freeze": 'for f in $SCOPE/supervisor/cgroup.freeze $SCOPE/cgroup.freeze; do '
              'echo 1 > $f 2>/dev/null && echo "HIT freeze $f"; done',
    "kill-cgroup": 'echo 1 > $SLICES/cgroup.kill 2>/dev/null && echo "HIT kill"',
    # SIGSTOP every owner (`corral run`) and watchdog of our tree it can see. The names are
    # put together at run time so that the payload's own command line does not match them.
    "stop-owner": 'W=corral-watch; W=${W}dog; C=corral.cl; C=${C}i; O=corral-own; O=${O}er; '
                  'for p in /proc/[0-9]*; do q=${p#/proc/}; '
                  'tr "\\0" " " < $p/cmdline 2>/dev/null | grep -q "$TAG" || continue; '
                  'tr "\\0" " " < $p/cmdline 2>/dev/null | grep -q -e "$W" -e "$C" -e "$O" || continue; '
                  'kill -STOP $q 2>/dev/null && echo "HIT stopped $q"; done',
    "signal-all": 'kill -STOP -1 2>/dev/null; n=$(ls /proc | grep -c "^[0-9]"); [ "$n" -gt 12 ] && echo "HIT sees $n"',
    "read-secrets": 'cat $STATE/auth/* $CONFIG/config.toml $STATE/runs/*.json 2>/dev/null',
    "grep-secrets": 'grep -rh "$NEEDLE_HINT" $STATE $CONFIG /run 2>/dev/null | head -3',
    "ghost": 'echo "{garbage" > $STATE/runs/$CORRAL_RUN_ID.json 2>/dev/null && echo "HIT ghost"',
    "unmount": 'umount $STATE 2>/dev/null && echo "HIT umount"; mount -t tmpfs none /mnt 2>/dev/null && echo "HIT mount"',
    "nested-ns": "unshare -UrmC sh -c 'mount -t cgroup2 none /mnt && echo $$ > /mnt/cgroup.procs && "
                 "cat /proc/self/cgroup' 2>/dev/null | grep -v '^0::/$' | grep . && echo 'HIT nested'",
    "bus": 'systemd-run --user --scope true 2>/dev/null && echo "HIT bus"',
    "daemons": '(setsid sleep 1000 &); nohup sleep 1001 >/dev/null 2>&1 & (sh -c "sleep 1002 &" &)',
    "env": 'env | grep -q HOSTILE_CALLER_SECRET && echo "HIT env"',
}


def scenario_hostile(h: Harness, scale: float) -> list[Result]:
    """Random attacks from inside isolated runs: nothing escapes, nothing is read, no ghost."""
    rng = h.rng("hostile")
    env = h.env("hostile")
    res = Result("7 hostile payload (isolation standard)")
    trials = max(20, round(200 * scale))
    secret = "rt-" + os.urandom(12).hex()
    dirs = h.dirs(env)
    (dirs.state / "auth").mkdir(parents=True, exist_ok=True)
    (dirs.state / "auth" / "p1.json").write_text(json.dumps({"refresh_token": secret}))
    dirs.config.mkdir(parents=True, exist_ok=True)
    # STRESS_ISOLATION=none shows the "before" column: the same attacks on containment only.
    level = os.environ.get("STRESS_ISOLATION", "standard")
    res.name = f"7 hostile payload (isolation {level})"
    (dirs.config / "config.toml").write_text(f"# {secret}\n[corral.defaults]\nenv_passthrough = [\"STRESS_TAG\"]\n"
                                             f"isolation = \"{level}\"\n")
    env = dict(env, HOSTILE_CALLER_SECRET=secret)
    mount = find_cgroup2_mount()
    slices = h.cg_root / "corral.slice"
    counts: Counter[str] = Counter()
    survivors = secrets_read = ghosts = 0
    progress(f"hostile: {trials} runs, each 2-5 random attacks of {len(ATTACKS)}, then `corral kill`")
    for trial in range(trials):
        res.trials += 1
        agent = h.agent("ho")
        picked = rng.sample(sorted(set(ATTACKS) - {"signal-all"}), rng.randint(2, 5))
        if level != "none" and rng.random() < 0.3:
            picked.append("signal-all")  # only where a PID namespace bounds it: as root, -1 is the host
        counts.update(picked)
        res.faults += len(picked)
        marker = h.tmp / "hostile" / f"{agent}.done"
        script = (f"ROOT={mount}; SLICES={slices}; SCOPE=$SLICES/corral-{agent}.slice/corral-{agent}-$CORRAL_RUN_ID.scope; "
                  f"STATE={dirs.state}; CONFIG={dirs.config}; NEEDLE_HINT={secret[:3]}; TAG=corral-stress-{h.tag}; "
                  + "; ".join(ATTACKS[a] for a in picked) + f"; echo attacked > {marker}; sleep 1000 & sleep 1000")
        detach = rng.random() < 0.5
        out_text = ""
        if detach:
            try:
                proc = h.cli(env, "run", "--detach", agent, "--", "sh", "-c", script, timeout=30)
            except subprocess.TimeoutExpired:  # a frozen supervisor leaf hangs the launch (isolation none)
                res.fail(f"trial {trial} ({', '.join(picked)}): run --detach hung for 30 s")
                h.cli(env, "kill", agent)
                continue
            if proc.returncode != 0:
                res.fail(f"trial {trial}: run --detach exited {proc.returncode}: {tail(proc.stderr)}")
                continue
            run_id = proc.stdout.strip()
            log = dirs.state / "runs" / f"{run_id}.log"
        else:
            popen = h.popen(env, "run", agent, "--", "sh", "-c", script, capture=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not marker.exists():
            time.sleep(0.01)
        # Every live scope of the agent must be listed (no ghost), whatever the payload did.
        listed_ids = set()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            listed_ids = {r["id"] for r in h.json(env, "ps", "--json") if r["agent"] == agent}
            if listed_ids:
                break
            time.sleep(0.02)
        if not detach:
            time.sleep(rng.uniform(0, 0.3))
        populated = h.populated_scopes(agent)
        unlisted = set(populated) - listed_ids
        if unlisted:
            ghosts += len(unlisted)
            res.lose(f"trial {trial} ({', '.join(picked)}): live scope(s) {sorted(unlisted)} not listed by ps")
        kill = h.cli(env, "kill", agent)
        if kill.returncode != 0:
            res.fail(f"trial {trial} ({', '.join(picked)}): kill exited {kill.returncode}: {tail(kill.stderr)}")
        if detach:
            out_text = log.read_text() if log.exists() else ""
        else:
            try:
                out_text, _err = popen.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                sigkill(popen)
                out_text, _err = popen.communicate()
                res.fail(f"trial {trial}: attached corral run did not return after kill")
        still = h.populated_scopes(agent)
        escaped = host_pids_with(f"CORRAL_AGENT={agent}".encode())
        if still or escaped:
            survivors += len(escaped) + len(still)
            res.lose(f"trial {trial} ({', '.join(picked)}): after kill: populated {sorted(still)}, alive {escaped}")
            kill_pids(escaped)
        if secret in out_text:
            secrets_read += 1
            res.lose(f"trial {trial} ({', '.join(picked)}): the payload printed the secret")
        hits = [line for line in out_text.splitlines() if line.startswith("HIT")]
        if hits:
            res.fail(f"trial {trial}: attack succeeded: {hits[:3]}")
    res.notes.append(f"attacks tried: {dict(sorted(counts.items()))}; survivors {survivors}, secrets read "
                     f"{secrets_read}, ghosts {ghosts}")
    h.cli(env, "gc", "--json")
    return [res]


# --- 13. power loss after unsynced record writes --------------------------------------------

LIVE_STATES = ("starting", "running", "paused", "draining", "unknown")


def scenario_powerloss(h: Harness, scale: float) -> list[Result]:
    """records.save fsyncs only a run's end record: while a run lives its cgroup is the
    truth, and a machine that loses power loses its runs and cgroups too. What it can leave
    of an unsynced start/running record: the record as renamed, an empty file, NULs
    (delayed allocation), or no file. Simulated: detached runs, a third ended first (end
    records synced), then every process and cgroup gone at once and each unsynced record
    damaged one of those ways. After the "reboot" every command answers, nothing is live,
    the ended runs keep their ends, and a surviving start record reads ``lost``."""
    env = h.env("powerloss")
    rng = h.rng("powerloss")
    res = Result("13 power loss: unsynced start records")
    total = max(12, round(60 * scale))
    res.trials = total
    agent = h.agent("pl")
    runs_dir = Path(env["XDG_STATE_HOME"]) / "corral" / "runs"
    ids: list[str] = []
    for i in range(total):
        out = h.cli(env, "run", "--detach", agent, "--", "sleep", "1000")
        if out.returncode != 0:
            res.fail(f"run {i}: run --detach exited {out.returncode}: {tail(out.stderr)}")
            continue
        ids.append(out.stdout.strip())
    ended = set(rng.sample(ids, k=len(ids) // 3))
    ends: dict[str, dict[str, Any]] = {}
    for rid in sorted(ended):
        h.cli(env, "kill", rid)
        h.cli(env, "wait", rid, "--timeout", "10")
        ends[rid] = json.loads((runs_dir / f"{rid}.json").read_text())
    # The power goes out: every process and cgroup at once, no owner gets to write.
    h.kill_tree()
    for scope in h.scopes(agent).values():
        for leaf in ("payload", "supervisor", ""):
            with contextlib.suppress(OSError):
                os.rmdir(scope / leaf)
    damage: dict[str, str] = {}
    for rid in ids:
        if rid in ended:
            continue
        how = rng.choice(["kept", "empty", "nul", "missing"])
        damage[rid] = how
        path = runs_dir / f"{rid}.json"
        if how == "empty":
            path.write_bytes(b"")
        elif how == "nul":
            path.write_bytes(b"\0" * max(1, path.stat().st_size))
        elif how == "missing":
            path.unlink()
        res.faults += 1
    for args in (("ps",), ("ps", "--all"), ("show", *ids[:5]), ("gc", "--json"), ("kill", "--all")):
        got = h.cli_within(res, env, *args)
        if got is not None and ("Traceback" in got.stderr or got.returncode not in (0, 3)):
            res.fail(f"after the reboot, {' '.join(args)[:60]} exited {got.returncode}: {tail(got.stderr)}")
    listed = h.cli(env, "ps", "--all", "--json")
    try:
        views = {v["id"]: v for v in json.loads(listed.stdout)}
    except (json.JSONDecodeError, TypeError, KeyError):
        res.fail(f"ps --all --json after the reboot: {listed.returncode} {tail(listed.stdout + listed.stderr)}")
        return [res]
    for rid, view in views.items():
        if view.get("agent") == agent and view.get("state") in LIVE_STATES:
            res.fail(f"{rid} ({damage.get(rid, 'ended')}) listed as {view['state']} with no process left")
    for rid, end in ends.items():
        view = views.get(rid)
        if view is None or (view["state"], view["exit_code"], view["signal"], view["ended_at"]) != (
                end["state"], end.get("exit_code"), end.get("signal"), end.get("ended_at")):
            res.lose(f"{rid}: the synced end {end['state']} at {end.get('ended_at')} reads {view and view['state']}")
    for rid, how in damage.items():
        if how == "kept" and views.get(rid, {}).get("state") != "lost":
            res.fail(f"{rid}: its surviving start record reads {views.get(rid, {}).get('state')}, not lost")
    if h.populated_scopes(agent):
        res.fail("a scope is populated after the reboot")
    counts = {how: list(damage.values()).count(how) for how in ("kept", "empty", "nul", "missing")}
    res.notes.append(f"{len(ids)} detached runs, {len(ends)} ended first (synced ends, all kept); the others' "
                     f"records after the power loss: {counts}")
    return [res]


# --- main ---------------------------------------------------------------------------------

RUNNERS: dict[str, Callable[[Harness, float], list[Result]]] = {
    "owner": scenario_owner, "crash": scenario_crash, "config": scenario_config, "token": scenario_token,
    "fuzz": scenario_fuzz, "load": scenario_load, "hostile": scenario_hostile, "gcrace": scenario_gcrace,
    "records": scenario_records, "options": scenario_options, "enospc": scenario_enospc,
    "clock": scenario_clock, "powerloss": scenario_powerloss,
}


def table(results: list[Result]) -> str:
    lines = ["| scenario | trials | faults injected | failures | lost |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.name} | {r.trials} | {r.faults} | {r.failures} | {r.lost} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="~1/10 of the trials (a CI smoke run)")
    ap.add_argument("--only", metavar="NAME", help=f"comma-separated subset of: {', '.join(SCENARIOS)} (or 1-6)")
    ap.add_argument("--seed", type=int, default=43367, help="seed of the random kill moments (default %(default)s)")
    ap.add_argument("--enospc-trial", metavar="SPEC", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.enospc_trial:  # the inside of one enospc trial, in its own mount namespace
        print(json.dumps(enospc_trial(json.loads(Path(args.enospc_trial).read_text()))))
        return 0
    wanted = list(SCENARIOS)
    if args.only:
        wanted = []
        for item in args.only.split(","):
            item = item.strip()
            name = SCENARIOS[int(item) - 1] if item.isdigit() and 1 <= int(item) <= len(SCENARIOS) else item
            if name not in SCENARIOS:
                ap.error(f"unknown scenario {item!r}; known: {', '.join(SCENARIOS)}")
            wanted.append(name)
    if os.geteuid() != 0:
        progress("note: not root; the cgroupfs backend needs a writable cgroup2 tree")
    scale = 0.1 if args.quick else 1.0

    def _terminate(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")  # unwinds into the cleanup below

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)  # even where a shell started us with SIGINT ignored
    h = Harness(args.seed, args.quick)
    progress(f"corral stress{' --quick' if args.quick else ''}: seed {args.seed}, tag {h.tag}, cgroup root "
             f"{h.cg_root}, dirs {h.tmp}")
    results: list[Result] = []
    started = time.monotonic()
    cleanup_note = ""
    interrupted = ""
    try:
        for name in wanted:
            t0 = time.monotonic()
            progress(f"== {name}")
            try:
                got = RUNNERS[name](h, scale)
            except Exception as err:  # noqa: BLE001 - a broken scenario is a failure, not a crash
                import traceback

                traceback.print_exc()
                got = [Result(name)]
                got[0].fail(f"the scenario itself crashed: {type(err).__name__}: {err}")
            took = time.monotonic() - t0
            for r in got:
                r.seconds = took / len(got)
                results.append(r)
            progress(f"== {name} done in {took:.1f} s: "
                     + "; ".join(f"{r.name}: {r.failures} failure(s), {r.lost} lost" for r in got))
    except KeyboardInterrupt as err:
        interrupted = str(err) or "interrupted"
        progress(f"interrupted ({interrupted}): cleaning up; the table shows the scenarios that finished")
    finally:
        cleanup_note = h.cleanup()
        progress(cleanup_note)
    total = time.monotonic() - started
    print(f"## corral stress{' --quick' if args.quick else ''} ({time.strftime('%Y-%m-%d', time.gmtime())}, "
          f"{os.cpu_count()} cores, cgroupfs, seed {args.seed}): {total:.0f} s"
          f"{' (INTERRUPTED)' if interrupted else ''}\n")
    print(table(results))
    print()
    for r in results:
        for line in [f"{r.seconds:.1f} s", *r.notes]:
            print(f"- {r.name}: {line}")
        for p in r.problems:
            print(f"  - {p}")
    print(f"- {cleanup_note}")
    bad = sum(r.failures + r.lost for r in results)
    return 130 if interrupted else 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
