"""corral benchmarks: each row is corral against its anchor, measured in the same run.

    python bench/bench.py [--backend cgroupfs|systemd] [--quick] >> bench/RESULTS.md

Medians of repeated runs. The Makefile runs it on the host (cgroupfs) and inside a
throwaway systemd container (systemd) and appends both tables to bench/RESULTS.md.

It measures what users get: run by the Python of ``.bench-venv`` (``make bench`` makes
it), where corral is installed from a wheel as pip leaves it, bytecode compiled, and the
CLI rows call that venv's ``corral`` script. Run by another Python (the editable
development venv, where these machines' PYTHONDONTWRITEBYTECODE=1 means every start
compiles the sources), it says so in the table's heading; ``--editable-cli`` adds that
venv's CLI launch as a second row.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
try:
    import corral as _installed
except ImportError:  # not installed in this Python: the checkout's sources
    sys.path.insert(0, str(REPO / "src"))
    import corral as _installed

from corral import Corral, Dirs, RunSpec  # noqa: E402
from corral.linux.cgroup import CgroupDir  # noqa: E402

# The installed console script, as a user runs it (python -m would skip its fast path).
_SCRIPT = Path(sys.executable).parent / "corral"
CORRAL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "corral.cli.main"]


def _product() -> str:
    """How the corral being measured is installed: what the table's heading says."""
    where = Path(_installed.__file__).resolve()
    if REPO / "src" in where.parents:
        return "editable checkout (sources compiled on every start: PYTHONDONTWRITEBYTECODE=1)"
    cached = any(where.parent.glob(f"__pycache__/{where.stem}.*.pyc")) and any(
        where.parent.glob("runs/__pycache__/launch.*.pyc"))
    return f"installed package ({'bytecode compiled' if cached else 'NO bytecode'}), {where.parent}"


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _pss_kib(pid: int) -> int:
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    return int(next(line for line in rollup.splitlines() if line.startswith("Pss:")).split()[1])


def median_cpu_ms(argv: list[str], n: int, env: dict[str, str] | None = None) -> float:
    """Median CPU time (user + system) of one run of *argv*: what a start-up costs when
    many start at once and the cores, not the clock, are the limit."""
    import resource

    times = []
    for i in range(n):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([a.replace("{i}", str(i)) for a in argv], env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        times.append((after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) * 1000)
    return statistics.median(times)


def median_ms(fn: Callable[[], object], n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


class Bench:
    def __init__(self, backend: str, quick: bool, editable_cli: str | None = None) -> None:
        self.backend = backend
        self.editable_cli = editable_cli
        self.n = 5 if quick else 20
        self.tmp = Path(tempfile.mkdtemp(prefix="corral-bench-"))
        self.env = dict(os.environ, XDG_STATE_HOME=str(self.tmp / "state"), CORRAL_BACKEND=backend,
                        XDG_CONFIG_HOME=str(self.tmp / "config"))
        self.dirs = Dirs(config=self.tmp / "config", state=self.tmp / "state", runtime=self.tmp / "rt")
        self.corral = Corral(backend, dirs=self.dirs)
        self.rows: list[tuple[str, str, float, str, float]] = []

    def row(self, what: str, value: float, anchor_name: str, anchor: float, unit: str = "ms",
            anchor_unit: str | None = None) -> None:
        """One line: corral's number, its anchor's, and their ratio (none where the anchor
        is a count of another kind, e.g. entries lost)."""
        aunit = unit if anchor_unit is None else anchor_unit
        anchor_text = f"{anchor_name}: {anchor:.2f} {aunit}".rstrip() if aunit else f"{anchor_name}: {anchor:g}"
        self.rows.append((what, f"{value:.2f} {unit}", value, anchor_text, anchor if aunit == unit else 0.0))
        ratio = value / anchor if anchor else float("nan")
        print(f"  {what:<44} {value:9.2f} {unit}   vs {anchor_text}   x{ratio:.2f}", file=sys.stderr, flush=True)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*CORRAL, *args], env=self.env, capture_output=True, text=True, check=True)

    # --- rows --------------------------------------------------------------------------

    def launch_cli(self) -> None:
        corral = median_ms(lambda: self.cli("run", "benchcli", "--", "true"), self.n)
        bare = median_ms(lambda: subprocess.run(["true"], check=True), self.n)
        if self.backend == "systemd":
            user = ["--user"] if os.geteuid() else []
            sdrun = median_ms(lambda: subprocess.run(["systemd-run", *user, "--scope", "-q", "true"], check=True,
                                                     capture_output=True), self.n)
            self.row("CLI: corral run A -- true", corral, "systemd-run --scope true", sdrun)
        self.row("CLI: corral run A -- true", corral, "bare true", bare)
        if self.editable_cli:
            dev = median_ms(lambda: subprocess.run([self.editable_cli, "run", "benchcli", "--", "true"], env=self.env,
                                                   capture_output=True, check=True), self.n)
            self.row("CLI, editable dev venv (bytecode only where a __pycache__ was left)", dev, "installed", corral)

    def launch_library(self) -> None:
        def lib() -> None:
            self.corral.run(RunSpec(agent="benchlib", argv=("true",))).wait()

        corral = median_ms(lib, self.n)
        if self.backend == "systemd":
            raw = median_ms(self._raw_pystemd, self.n)
            self.row("library: Corral.run(true).wait()", corral, "raw pystemd StartTransientUnit", raw)
            steps = median_ms(self._same_dbus_steps, self.n)
            self.row("library: Corral.run(true).wait()", corral,
                     "the same D-Bus steps bare (held fork, start + JobRemoved, exec true, wait, UnitRemoved)", steps)
        else:
            raw = median_ms(self._raw_cgroupfs, self.n)
            self.row("library: Corral.run(true).wait()", corral, "raw mkdir+fork+join+wait+rmdir", raw)

    def _raw_cgroupfs(self) -> None:
        base = self.corral.backend.slice_dir() / "corral-benchraw.slice"
        base.mkdir(parents=True, exist_ok=True)
        cg = base / f"raw-{time.monotonic_ns()}"
        cg.mkdir()
        pid = os.fork()
        if pid == 0:
            try:
                (cg / "cgroup.procs").write_text("0")
                os.execvp("true", ["true"])
            finally:
                os._exit(127)
        os.waitpid(pid, 0)
        CgroupDir(cg).wait_empty(5)
        cg.rmdir()

    def _raw_pystemd(self) -> None:
        from pystemd.systemd1 import Manager
        from pystemd.dbuslib import DBus

        if not hasattr(self, "_mgr"):
            self._bus = DBus(user_mode=os.geteuid() != 0)
            self._bus.open()
            self._mgr = Manager(bus=self._bus, _autoload=True)
        pid = os.fork()
        if pid == 0:
            time.sleep(0.05)  # held, as corral holds its child until placed
            os._exit(0)
        name = f"benchraw-{time.monotonic_ns()}.scope".encode()
        self._mgr.Manager.StartTransientUnit(name, b"fail", {b"Description": b"bench",
                                                              b"_custom": (b"PIDs", b"au", [pid])})
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)

    def _same_dbus_steps(self) -> None:
        """What a launch cannot do without: a child held until systemd has its scope, then
        exec'd, waited for, and its scope gone. No record, lease, watchdog or sandbox."""
        from corral.spec import Limits

        backend = self.corral.backend
        gate_r, gate_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(gate_w)
                os.read(gate_r, 1)
                os.execvp("true", ["true"])
            finally:
                os._exit(127)
        os.close(gate_r)
        run_id = os.urandom(4).hex()
        backend.adopt("benchsteps", run_id, [pid], description="bench", limits=Limits(), timeout=None, grace=1.0)
        os.write(gate_w, b"g")
        os.close(gate_w)
        os.waitpid(pid, 0)
        backend.release("benchsteps", run_id, backend.run_cgroup("benchsteps", run_id))

    def kill_big_run(self) -> None:
        n = 1000
        script = (f"i=0; while [ $i -lt {n // 2} ]; do sleep 1000 & (sleep 1000 &); i=$((i+1)); done; wait")
        # corral
        run = self.corral.run(RunSpec(agent="benchkill", argv=("sh", "-c", script)), detach=True)
        payload = run.cgroup.payload
        self._wait_pids(payload, n)
        t0 = time.perf_counter()
        assert run.kill() == []
        corral_ms = (time.perf_counter() - t0) * 1000
        # raw cgroup.kill + wait for populated 0 on an identical tree
        run2 = self.corral.run(RunSpec(agent="benchkill", argv=("sh", "-c", script)), detach=True)
        payload2 = run2.cgroup.payload
        self._wait_pids(payload2, n)
        t0 = time.perf_counter()
        payload2.kill()
        payload2.wait_empty(30)
        raw_ms = (time.perf_counter() - t0) * 1000
        run2.kill()
        self.row(f"kill a {n}-process run (half double-forked)", corral_ms, "raw cgroup.kill + populated 0", raw_ms)
        # psutil tree kill of the same tree started outside corral (nothing else reacts to
        # main's death): children of main only; the double-forked half has left the tree.
        import psutil

        proc = subprocess.Popen(["sh", "-c", script], start_new_session=True)
        sid = proc.pid
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            tree = [p for p in psutil.process_iter(["pid"]) if _sid(p.pid) == sid]
            if len(tree) >= n:
                break
            time.sleep(0.05)
        t0 = time.perf_counter()
        main = psutil.Process(sid)
        procs = [main, *main.children(recursive=True)]
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)
        ps_ms = (time.perf_counter() - t0) * 1000
        survivors = [p.pid for p in psutil.process_iter(["pid"]) if _sid(p.pid) == sid and _alive(p.pid)]
        for pid in survivors:  # ours, by pid: the double-forked sleepers psutil could not see
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.row(f"  ... psutil tree kill ({len(survivors)} survivors)", ps_ms, "corral kill (0 survivors)", corral_ms)

    @staticmethod
    def _wait_pids(cg: CgroupDir, n: int) -> None:
        deadline = time.monotonic() + 60
        while len(cg.pids()) < n and time.monotonic() < deadline:
            time.sleep(0.05)

    def ps_many(self, count: int) -> None:
        runs = [self.corral.run(RunSpec(agent="benchps", argv=("sleep", "1000")), detach=True) for _ in range(count)]
        try:
            corral_ms = median_ms(lambda: self.cli("ps", "--json"), max(3, self.n // 4))
            if self.backend == "systemd":
                user = ["--user"] if os.geteuid() else []
                anchor = median_ms(lambda: subprocess.run(["systemctl", *user, "list-units", "--type=scope",
                                                           "--no-pager"], capture_output=True, check=True),
                                   max(3, self.n // 4))
                self.row(f"corral ps --json, {count} live runs", corral_ms, "systemctl list-units --type=scope", anchor)
            else:
                anchor = median_ms(lambda: subprocess.run(["ps", "-e"], capture_output=True, check=True),
                                   max(3, self.n // 4))
                self.row(f"corral ps --json, {count} live runs", corral_ms, "ps -e", anchor)
            t0 = time.perf_counter()
            self.cli("kill", "--all")
            kill_ms = (time.perf_counter() - t0) * 1000
            self.row(f"corral kill --all, {count} live runs (until every cgroup is empty)", kill_ms,
                     "per run, ms", round(kill_ms / count, 2), anchor_unit="")
        finally:
            for r in runs:
                if r.cgroup.exists():
                    r.cgroup.kill()

    def agents_add(self, n: int = 64) -> None:
        """n parallel `corral agents add` vs the seed failure: n unlocked read-modify-writes
        (tomlkit's TOMLFile read + write, as the field did it), counting entries lost."""
        cfg = self.tmp / "config" / "corral" / "config.toml"
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text("# bench\n")
        t0 = time.perf_counter()
        procs = [subprocess.Popen([*CORRAL, "agents", "add", f"lane{i}"], env=self.env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL) for i in range(n)]
        times = []
        for p in procs:
            p.wait()
            times.append((time.perf_counter() - t0) * 1000)
        import tomllib

        kept = len(tomllib.loads(cfg.read_text()).get("agents", {}))
        naive = self.tmp / "naive.toml"
        naive.write_text("# bench\n")
        script = ("import sys, tomlkit; from tomlkit.toml_file import TOMLFile; f = TOMLFile(sys.argv[1]); "
                  "d = f.read(); d.setdefault('agents', tomlkit.table(is_super_table=True))[sys.argv[2]] = "
                  "tomlkit.table(); f.write(d)")
        naive_procs = [subprocess.Popen([sys.executable, "-c", script, str(naive), f"lane{i}"],
                                        stderr=subprocess.DEVNULL) for i in range(n)]
        for p in naive_procs:
            p.wait()
        try:
            naive_kept = len(tomllib.loads(naive.read_text()).get("agents", {}))
        except tomllib.TOMLDecodeError:
            naive_kept = 0
        times.sort()
        self.row(f"{n} parallel agents add: p50 (lost {n - kept})", times[len(times) // 2],
                 f"p99 {times[int(len(times) * 0.99) - 1]:.0f} ms; naive unlocked RMW, entries lost", n - naive_kept,
                 anchor_unit="")

    def token_at_expiry(self, n: int = 64) -> None:
        """n processes want a token at expiry: refreshes reaching the server, and the naive
        anchor (each refreshes with its copy of the credential) counting rejections."""
        sys.path.insert(0, str(REPO / "tests"))
        from _auth_util import OAuthServer

        server = OAuthServer()
        try:
            server.configure(latency=0.05)
            env = {k: v for k, v in self.env.items() if "proxy" not in k.lower()}
            subprocess.run([*CORRAL, "auth", "add", "bench", "--token-url", server.token_url, "--client-id",
                            "corral-test"], env=env, check=True, capture_output=True)
            pair = server.mint()
            subprocess.run([*CORRAL, "auth", "login", "bench", "--refresh-token-stdin"], env=env, check=True,
                           capture_output=True, input=(pair["refresh_token"] + "\n").encode())
            before = server.stats().get("refreshed", 0)
            t0 = time.perf_counter()
            procs = [subprocess.Popen([*CORRAL, "auth", "token", "bench"], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL) for _ in range(n)]
            times, tokens, errors = [], set(), 0
            for p in procs:
                out, _ = p.communicate()
                times.append((time.perf_counter() - t0) * 1000)
                errors += p.returncode != 0
                tokens.add(out.strip())
            refreshes = server.stats().get("refreshed", 0) - before
            # naive: n holders of one copy each refresh it themselves
            shared = server.mint()["refresh_token"]
            rejected = sum(server.refresh_directly(shared)[0] != 200 for _ in range(n))
            times.sort()
            self.row(f"{n} want a token at expiry: refreshes {refreshes}, errors {errors}, tokens {len(tokens)}",
                     times[int(len(times) * 0.99) - 1], f"p99 wait; naive copies, of {n} rejected", rejected,
                     anchor_unit="")
        finally:
            server.stop()

    def overhead(self) -> None:
        # A fresh shared owner (its own state dir), and the bench's own one, which by now
        # has owned the ps rows' hundreds of runs: what it keeps after they ended.
        fresh = Corral(self.backend, dirs=Dirs(config=self.tmp / "config", state=self.tmp / "mem-state",
                                               runtime=self.tmp / "mem-rt"))
        run = fresh.run(RunSpec(agent="benchmem", argv=("sleep", "1000")), detach=True)
        after = self.corral.run(RunSpec(agent="benchmem", argv=("sleep", "1000")), detach=True)
        bare = subprocess.Popen([sys.executable, "-S", "-c", "import time; time.sleep(1000)"])
        time.sleep(0.5)
        owner = fresh.get(run.id).record.owner_pid
        owner_pss = _pss_kib(owner) if owner else 0
        used = self.corral.get(after.id).record.owner_pid
        used_pss = _pss_kib(used) if used else 0
        bare_pss = _pss_kib(bare.pid)
        bare.kill()
        bare.wait()
        run.kill()
        after.kill()
        self.row("one detached run: its owner's PSS (a new shared owner)", owner_pss / 1024,
                 "a bare `python3 -S` asleep: PSS", bare_pss / 1024, unit="MiB")
        self.row("... the bench's shared owner, 1 run, after the ps rows' runs ended", used_pss / 1024,
                 "a new shared owner", owner_pss / 1024, unit="MiB")
        # What many runs cost, started as users start them: `corral run -d`, a process that
        # exits. One shared owner owns them all (its PSS shared out over the runs, plus each
        # run's watchdog); the anchor is the same runs with each owner forked by the exiting
        # CLI (CORRAL_SHARED_OWNER=0), as before the shared owner.
        for n in (1, 10, 50):
            served = self._pss_of_detached(n, f"benchmems{n}", {})
            forked = self._pss_of_detached(n, f"benchmemf{n}", {"CORRAL_SHARED_OWNER": "0"})
            self.row(f"per detached run, {n} runs of `corral run -d`: corral's PSS (shared owner)", served / 1024,
                     "each owner forked by its CLI", forked / 1024, unit="MiB")

    def _pss_of_detached(self, n: int, agent: str, env: dict[str, str]) -> float:
        """KiB of PSS per run of corral's processes for *n* runs started by `corral run -d`:
        what is in each run's supervisor leaf (its watchdog; a forked owner), and each
        shared owner once."""
        ids = [subprocess.run([*CORRAL, "run", "-d", agent, "--", "sleep", "1000"], env={**self.env, **env},
                              capture_output=True, text=True, check=True).stdout.strip() for _ in range(n)]
        cli_corral = Corral(self.backend, dirs=Dirs.from_env(self.env))  # where the CLI keeps its records
        runs = [cli_corral.get(run_id) for run_id in ids]
        time.sleep(1.0)
        total, shared = 0, set()
        try:
            for run in runs:
                for pid in run.cgroup.supervisor.pids():
                    total += _pss_kib(pid)
                owner = cli_corral.get(run.id).record.owner_pid
                try:
                    if owner and Path(f"/proc/{owner}/cmdline").read_bytes().startswith(b"corral-ownerd"):
                        shared.add(owner)
                except OSError:
                    pass
            total += sum(_pss_kib(pid) for pid in shared)
        finally:
            cli_corral.kill_runs([run.record for run in runs])
        return total / n

    def floors(self) -> None:
        """CPU per start-up, against the interpreter and click alone: what is left to cut."""
        py = [sys.executable]
        env = dict(self.env, XDG_CONFIG_HOME=str(self.tmp / "floor-config"))
        bare = median_cpu_ms([*py, "-c", "pass"], self.n)
        click_ = median_cpu_ms([*py, "-c", "import click"], self.n)
        self.row("CPU: python -c 'import click'", click_, "python -c pass", bare)
        version = median_cpu_ms([*CORRAL, "--version"], self.n, env)
        self.row("CPU: corral --version", version, "python -c 'import click'", click_)
        for what, argv in (("corral ps (no runs)", ["ps"]), ("corral agents list", ["agents", "list"]),
                           ("corral agents add", ["agents", "add", "floor{i}"])):
            self.row(f"CPU: {what}", median_cpu_ms([*CORRAL, *argv], self.n, env), "corral --version", version)

    def isolation_levels(self) -> None:
        """What each isolation level costs a launch and a run's memory, against ``none``."""
        from corral import Isolation

        lib: dict[str, float] = {}
        cli: dict[str, float] = {}
        mem: dict[str, float] = {}
        for level in ("none", "standard", "strict"):
            spec = RunSpec(agent="benchiso", argv=("true",), isolation=Isolation(level))
            lib[level] = median_ms(lambda: self.corral.run(spec).wait(), self.n)
            cli[level] = median_ms(lambda: self.cli("run", "--isolation", level, "benchiso", "--", "true"), self.n)
            run = self.corral.run(RunSpec(agent="benchiso", argv=("sleep", "1000"), isolation=Isolation(level)),
                                  detach=True)
            time.sleep(0.3)
            # corral's own processes: owner and watchdog, plus bwrap and its init where sandboxed
            ours = set(run.cgroup.supervisor.pids())
            ours |= {p["pid"] for p in self.corral.processes(run.id) if p["role"] == "sandbox"}
            mem[level] = sum(_pss_kib(pid) for pid in ours) / 1024
            run.kill()
        for level in ("standard", "strict"):
            self.row(f"isolation {level}: library launch+wait", lib[level], "isolation none", lib["none"])
            self.row(f"isolation {level}: CLI run A -- true", cli[level], "isolation none", cli["none"])
            self.row(f"isolation {level}: corral's PSS per detached run", mem[level], "isolation none", mem["none"],
                     unit="MiB")

    def cleanup(self) -> None:
        # corral's own teardown and release: kill, verify empty, remove what the backend made
        backend = self.corral.backend
        for scope in backend.live_scopes():
            if scope.agent in ("benchcli", "benchlib", "benchkill", "benchps", "benchmem", "benchmems", "benchmemf",
                               "benchiso"):
                backend.teardown(scope.cgroup)
                backend.release(scope.agent, scope.run_id, scope.cgroup)
        raw = backend.slice_dir() / "corral-benchraw.slice"  # _raw_cgroupfs's own cgroups, not runs
        if raw.exists():
            for d in raw.iterdir():
                if d.is_dir():
                    CgroupDir(d).kill()
                    CgroupDir(d).wait_empty(5)
                    d.rmdir()
            raw.rmdir()
            if self.backend == "cgroupfs":
                try:
                    backend.slice_dir().rmdir()  # release() leaves it while benchraw was in it
                except OSError:
                    pass
        shutil.rmtree(self.tmp, ignore_errors=True)

    def table(self) -> str:
        who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
        lines = [f"### backend: {self.backend} ({who}), medians of {self.n}", "", f"corral: {_product()}", "",
                 "| measurement | corral | anchor | ratio |", "|---|---|---|---|"]
        for what, value, _v, anchor, a in self.rows:
            ratio = f"{_v / a:.2f}" if a else "-"
            lines.append(f"| {what.strip(' .')} | {value} | {anchor} | {ratio} |")
        return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default=os.environ.get("CORRAL_BACKEND", "cgroupfs"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["isolation", "launch", "ps", "agents", "floors", "memory"], help="just one group of rows")
    ap.add_argument("--editable-cli", metavar="PATH", help="also time this corral script (the dev venv's)")
    args = ap.parse_args()
    b = Bench(args.backend, args.quick, args.editable_cli)
    print(f"corral bench, backend {args.backend}", file=sys.stderr, flush=True)
    try:
        if args.only == "isolation":
            b.isolation_levels()
        elif args.only == "launch":
            b.launch_cli()
            b.launch_library()
        elif args.only == "ps":
            b.ps_many(200)
            b.ps_many(500)
        elif args.only == "agents":
            b.agents_add()
        elif args.only == "floors":
            b.floors()
            b.overhead()
        elif args.only == "memory":
            b.overhead()
        else:
            b.launch_cli()
            b.launch_library()
            b.kill_big_run()
            b.ps_many(50 if args.quick else 200)
            if not args.quick:
                b.ps_many(500)
            b.overhead()
            b.isolation_levels()
            if args.backend == "cgroupfs":  # backend-independent rows: once
                b.floors()
                b.agents_add()
                b.token_at_expiry()
    finally:
        b.cleanup()
    print(b.table())  # stdout carries the table only: the Makefile appends it to RESULTS.md
    return 0


if __name__ == "__main__":
    sys.exit(main())
