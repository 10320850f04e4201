"""The config store and `corral agents`: real processes, real files, real git.

Config is backend-independent, so nothing here takes the ``backend`` fixture (except the
one test that checks `agents rm` stops live runs, which picks a usable backend itself).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from corral import AgentNotFound, ConfigBusy, ConfigParseError, ConfigStore, CorralError, Dirs, UsageError
from corral.config.settings import (
    add_agent,
    get_agent,
    list_agents,
    load_agent,
    load_effective_agent,
    load_settings,
    open_store,
    parse_assignments,
    remove_agent,
    set_agent,
    set_settings,
)
from corral.config.store import TEMP_SUFFIX

CORRAL = [sys.executable, "-m", "corral.cli.main"]
WORKERS = Path(__file__).with_name("_config_workers.py")

START = """\
# corral config: written by hand, edited by `corral agents`
# every comment here must survive every write

[corral]   # the whole budget
memory_max = "64G"    # all agents together

# agents follow
[agents.seed]
workspace = "/"   # the seed agent's workspace
max_runs = 3      # at most three at once

# a comment at the very end
"""


class Env:
    """A private config/state dir pair and a CLI runner for it."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.dirs = Dirs(config=tmp_path / "config" / "corral", state=tmp_path / "state" / "corral",
                         runtime=tmp_path / "run" / "corral")
        self.env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "config"), XDG_STATE_HOME=str(tmp_path / "state"),
                        PYTHONDONTWRITEBYTECODE="1")
        self.config = self.dirs.config / "config.toml"

    def __call__(self, *args: str, cwd: Path | None = None, umask: int | None = None,
                 timeout: float = 60) -> subprocess.CompletedProcess[str]:
        preexec = (lambda: os.umask(umask)) if umask is not None else None  # noqa: E731
        return subprocess.run([*CORRAL, *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                              cwd=cwd, preexec_fn=preexec)

    def ok(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        proc = self(*args, **kw)
        assert proc.returncode == 0, f"corral {' '.join(args)} -> {proc.returncode}\n{proc.stdout}{proc.stderr}"
        return proc

    def write(self, text: str, mode: int = 0o644) -> None:
        self.config.parent.mkdir(parents=True, exist_ok=True)
        self.config.write_text(text)
        os.chmod(self.config, mode)

    def store(self) -> ConfigStore:
        return open_store(self.dirs)


@pytest.fixture
def cfg(tmp_path: Path) -> Env:
    return Env(tmp_path)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _comments(text: str) -> list[str]:
    return [line[line.index("#"):] for line in text.splitlines() if "#" in line]


def _temps(directory: Path) -> list[str]:
    return [n for n in os.listdir(directory) if n.endswith(TEMP_SUFFIX) or n.endswith(".tmp")]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


# --- acceptance: concurrency ------------------------------------------------------------


@pytest.mark.timeout(180)
def test_64_parallel_cli_adds_lose_nothing(cfg: Env) -> None:
    cfg.write(START)
    procs = []
    for n in range(64):
        procs.append((time.perf_counter(), subprocess.Popen(
            [*CORRAL, "agents", "add", f"lane{n}", "--memory-max", "1G", "--env", f"LANE={n}"], env=cfg.env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    latencies = []
    for started, proc in procs:
        out, err = proc.communicate(timeout=120)
        latencies.append(time.perf_counter() - started)
        assert proc.returncode == 0, err
    text = cfg.config.read_text()
    names = {a.name for a in list_agents(cfg.store())}
    assert names == {"seed"} | {f"lane{n}" for n in range(64)}
    assert _comments(text) == _comments(START)  # every comment, in order
    assert text.startswith(START.rsplit("# a comment at the very end", 1)[0])  # untouched bytes stay
    assert _temps(cfg.config.parent) == []
    assert get_agent(cfg.store(), "lane7").env == {"LANE": "7"}  # type: ignore[union-attr]
    print(f"\n64 parallel `corral agents add` (process start to exit): p50 {_pct(latencies, .5) * 1e3:.0f} ms, "
          f"p99 {_pct(latencies, .99) * 1e3:.0f} ms")


@pytest.mark.timeout(300)
def test_32_processes_x_50_updates_through_the_library(cfg: Env) -> None:
    cfg.write("# stress test\n[stress]  # shared table\ncounter = 0\n")
    workers = [subprocess.Popen([sys.executable, str(WORKERS), "hammer", str(cfg.config), str(n), "50"],
                                stdin=subprocess.PIPE, env=cfg.env, stderr=subprocess.PIPE, text=True)
               for n in range(32)]
    time.sleep(0.5)  # let them import, then start them together
    for w in workers:
        assert w.stdin is not None
        w.stdin.close()
    for w in workers:
        w.wait(timeout=280)
        assert w.stderr is not None
        assert w.returncode == 0, w.stderr.read()
    data = cfg.store().read()["stress"]
    assert data["counter"] == 1600
    assert {k for k in data if k != "counter"} == {f"w{n}_{i}" for n in range(32) for i in range(50)}
    assert cfg.config.read_text().startswith("# stress test\n[stress]  # shared table\n")
    assert _temps(cfg.config.parent) == []


@pytest.mark.timeout(180)
def test_sigkill_at_random_moments_leaves_old_or_new_content(cfg: Env) -> None:
    body = "".join(f'[agents.a{n}]  # agent {n}\nworkspace = "/"\nmemory_max = "{n + 1}G"\n\n' for n in range(4))
    cfg.write(f"# sigkill trials\n[state]\ntrial = -1\n\n{body}")
    proc = subprocess.run([sys.executable, str(WORKERS), "sigkill", str(cfg.config), "500", "4242"], input="",
                          env=cfg.env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    print(f"\nSIGKILL trials: {summary}")
    assert summary["bad"] == []
    assert summary["outcomes"]["old"] + summary["outcomes"]["new"] == 500
    # The kill moments really spread over the write: both outcomes occur, and some kills
    # landed after the temp file was created and before it was renamed.
    assert summary["outcomes"]["old"] > 0 and summary["outcomes"]["new"] > 0
    assert summary["temps_left_by_kill"] > 0
    # The next writer never waits on a dead writer's lock: free on the first try, every
    # time. (Wall clock adds the VM's scheduling noise, so its p99 is what is bounded.)
    assert summary["lock_free_at_once"] == 500
    assert summary["p99_lock_wait_ms"] < 100
    assert _temps(cfg.config.parent) == []
    assert "# sigkill trials" in cfg.config.read_text()


# --- acceptance: paths, modes, owners -------------------------------------------------------


def test_two_link_relative_symlink_chain_from_another_directory(cfg: Env, tmp_path: Path) -> None:
    real = tmp_path / "dotfiles" / "real" / "corral.toml"
    real.parent.mkdir(parents=True)
    real.write_text(START)
    hop = tmp_path / "dotfiles" / "hop"
    hop.mkdir()
    # config.toml -> ../../dotfiles/hop/link2 -> ../real/corral.toml, both relative to
    # their own directories (resolving them against the cwd would miss both).
    cfg.config.parent.mkdir(parents=True)
    os.symlink("../../dotfiles/hop/link2", cfg.config)
    os.symlink("../real/corral.toml", hop / "link2")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cfg.ok("agents", "add", "viachain", "--max-runs", "2", cwd=elsewhere)
    assert os.readlink(cfg.config) == "../../dotfiles/hop/link2"
    assert os.readlink(hop / "link2") == "../real/corral.toml"
    assert "[agents.viachain]" in real.read_text() and real.read_text().startswith(START)
    assert (real.parent / "corral.toml.lock").exists()  # the lock sits by the file it guards
    for d in (cfg.config.parent, hop, real.parent, elsewhere):
        assert _temps(d) == []
    assert get_agent(cfg.store(), "viachain").max_runs == 2  # type: ignore[union-attr]


def test_mode_0640_survives_umask_077(cfg: Env) -> None:
    cfg.write(START, mode=0o640)
    cfg.ok("agents", "add", "private", umask=0o077)
    assert (cfg.config.stat().st_mode & 0o7777) == 0o640
    cfg.ok("agents", "set", "private", "max_runs=4", umask=0o077)
    assert (cfg.config.stat().st_mode & 0o7777) == 0o640


def test_new_config_follows_the_umask(cfg: Env) -> None:
    cfg.ok("agents", "add", "first", umask=0o077)
    assert (cfg.config.stat().st_mode & 0o777) == 0o600


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_root_editing_a_users_config_keeps_the_owner(cfg: Env) -> None:
    cfg.write(START, mode=0o600)
    os.chown(cfg.config, 4321, 4322)
    cfg.ok("agents", "add", "roots")
    st = cfg.config.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (4321, 4322, 0o600)
    lock = cfg.config.with_name("config.toml.lock").stat()
    assert (lock.st_uid, lock.st_gid) == (4321, 4322)  # the user can still take the lock


# --- acceptance: bad input, nothing lost ---------------------------------------------------


def test_malformed_toml_exits_78_with_line_and_column(cfg: Env) -> None:
    cfg.write(START + "[agents.broken\nworkspace = 1\n")
    before = _sha(cfg.config)
    for args in (("agents", "add", "x"), ("agents", "list"), ("agents", "set", "seed", "max_runs=1"),
                 ("agents", "rm", "seed")):
        proc = cfg(*args)
        assert proc.returncode == 78, (args, proc.stderr)
        line = START.count("\n") + 1
        assert f"{cfg.config}:{line}:" in proc.stderr and f"line {line}, column" in proc.stderr, proc.stderr
        assert _sha(cfg.config) == before
    assert _temps(cfg.config.parent) == []


def test_parse_error_positions_are_one_based(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("a = 1\nb = \n")
    with pytest.raises(ConfigParseError) as err:
        ConfigStore(path).read()
    assert (err.value.line, err.value.column) == (2, 5)
    assert err.value.exit_code == 78
    path.write_bytes(b'a = "ok"\nb = "\xff"\n')
    with pytest.raises(ConfigParseError) as err:
        ConfigStore(path).read()
    assert (err.value.line, err.value.column) == (2, 6)


@pytest.mark.parametrize("args", [
    ("agents", "add", "bad-name"),
    ("agents", "add", "x" * 65),
    ("agents", "add", "ok1", "--memory-max", "lots"),
    ("agents", "add", "ok1", "--memory-high", "0"),
    ("agents", "add", "ok1", "--cpu-quota", "fast"),
    ("agents", "add", "ok1", "--cpu-quota", "-5%"),
    ("agents", "add", "ok1", "--tasks-max", "0"),
    ("agents", "add", "ok1", "--max-runs", "many"),
    ("agents", "add", "ok1", "--workspace", "/does/not/exist"),
    ("agents", "add", "ok1", "--env", "NOEQUALS"),
    ("agents", "add", "ok1", "--env", "1BAD=x"),
    ("agents", "add", "ok1", "--auth", "../etc"),
    ("agents", "add", "ok1", "--worktree", "/does/not/exist"),
    ("agents", "add", "seed"),
    ("agents", "set", "seed", "memory_max=huge"),
    ("agents", "set", "seed", "nonsense=1"),
    ("agents", "set", "seed", "worktree=/x"),
    ("agents", "set", "seed", "noequals"),
])
def test_invalid_values_exit_2_before_any_write(cfg: Env, args: tuple[str, ...]) -> None:
    cfg.write(START)
    before = _sha(cfg.config)
    listing = sorted(os.listdir(cfg.config.parent))
    proc = cfg(*args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("corral: ")
    assert _sha(cfg.config) == before
    if args[1] != "add" or args[2] != "seed":  # a duplicate name is known only under the lock
        assert sorted(os.listdir(cfg.config.parent)) == listing  # not even a lock file
    assert not (cfg.dirs.state / "worktrees").exists()


def test_unknown_agent_exits_3(cfg: Env) -> None:
    cfg.write(START)
    assert cfg("agents", "show", "ghost").returncode == 3
    assert cfg("agents", "set", "ghost", "max_runs=1").returncode == 3
    with pytest.raises(AgentNotFound):
        set_agent(cfg.store(), "ghost", {"max_runs": 1})


@pytest.mark.skipif(os.geteuid() != 0, reason="the check applies to root")
@pytest.mark.parametrize("mode", [0o666, 0o620, 0o602])
def test_group_or_world_writable_config_refused_for_root(cfg: Env, mode: int) -> None:
    cfg.write(START, mode=mode)
    before = _sha(cfg.config)
    for args in (("agents", "add", "x"), ("agents", "list"), ("agents", "show", "seed")):
        proc = cfg(*args)
        assert proc.returncode == 77, proc.stderr
        assert "writable by group or others" in proc.stderr and "chmod go-w" in proc.stderr
    assert _sha(cfg.config) == before
    assert not cfg.config.with_name("config.toml.lock").exists()
    with pytest.raises(PermissionError):
        load_agent(cfg.dirs, "seed")  # `corral run` is refused too


# --- the store -------------------------------------------------------------------------------


def test_edits_keep_every_other_byte(cfg: Env) -> None:
    cfg.write(START)
    store = cfg.store()
    set_agent(store, "seed", {"max_runs": 5, "cpu_quota": "50"})
    text = cfg.config.read_text()
    assert "max_runs = 5      # at most three at once" in text  # the value's own comment stays
    assert 'cpu_quota = "50%"\n\n# a comment at the very end' in text  # new key after the last key
    set_agent(store, "seed", {"max_runs": 3, "cpu_quota": None})
    assert cfg.config.read_text() == START  # and back, byte for byte
    add_agent(store, "extra", {"memory_max": "512M"})
    remove_agent(store, "extra")
    assert cfg.config.read_text().rstrip("\n") == START.rstrip("\n")


def test_failed_change_writes_nothing_and_leaves_no_temp(cfg: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg.write(START)
    before = _sha(cfg.config)
    store = cfg.store()

    def boom(doc: Any) -> None:
        doc["corral"]["memory_max"] = "1G"
        raise RuntimeError("halfway")

    with pytest.raises(RuntimeError):
        store.update(boom)
    assert _sha(cfg.config) == before

    def fail_replace(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail_replace)
    with pytest.raises(CorralError) as err:  # translated from the OSError where it entered
        add_agent(store, "nospace")
    assert "no space left" in str(err.value).lower() and "not changed" in str(err.value)
    monkeypatch.undo()
    assert _sha(cfg.config) == before
    assert _temps(cfg.config.parent) == []


def test_lock_timeout_names_the_lock_and_holder(cfg: Env) -> None:
    cfg.write(START)
    store = ConfigStore(cfg.config, lock_timeout=0.3)
    fd = os.open(store.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another open file: conflicts even within this process
        t0 = time.monotonic()
        with pytest.raises(ConfigBusy) as err:
            add_agent(store, "waits")
        assert 0.25 < time.monotonic() - t0 < 2
    finally:
        os.close(fd)
    assert err.value.exit_code == 75 and isinstance(err.value, TimeoutError)
    assert str(store.lock_path) in str(err.value) and f"pid {os.getpid()}" in str(err.value)
    add_agent(store, "waits")  # and once it is free, it works


def test_the_config_lock_is_the_one_filelock_takes(cfg: Env) -> None:
    """corral takes flock(2) itself, on the path filelock would: a tool holding filelock's
    FileLock there keeps corral's writer out, and a corral writer keeps filelock out."""
    import filelock

    cfg.write(START)
    store = ConfigStore(cfg.config, lock_timeout=0.3)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import filelock, sys; lock = filelock.FileLock(sys.argv[1]); lock.acquire(); "
        "print('held', flush=True); sys.stdin.read()"), str(store.lock_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigBusy) as err:
            add_agent(store, "blocked")
        assert f"pid {holder.pid}" in str(err.value)
    finally:
        holder.communicate("")
    entered: list[bool] = []

    def change(doc: Any) -> None:
        entered.append(True)
        with pytest.raises(filelock.Timeout):  # inside corral's lock, filelock must wait
            filelock.FileLock(store.lock_path, timeout=0.2).acquire()

    store.update(change)
    assert entered == [True]
    add_agent(store, "blocked")  # free again
    assert "blocked" in cfg.config.read_text()


def test_settings_and_effective_agent(cfg: Env) -> None:
    cfg.write(START)
    store = cfg.store()
    set_settings(store, {"cpu_quota": "400", "defaults.memory_max": "2G", "defaults.max_runs": 2,
                         "defaults.env": {"SHARED": "1"}, "defaults.auth": "team"})
    add_agent(store, "eff", {"memory_max": "4G", "env": {"OWN": "x"}})
    settings = load_settings(cfg.dirs)
    assert settings.budget.memory_max == 64 * 2**30 and settings.budget.cpu_quota == 400
    agent = load_effective_agent(cfg.dirs, "eff")
    assert agent is not None
    assert agent.limits.memory_max == 4 * 2**30 and agent.max_runs == 2 and agent.auth == "team"
    assert agent.env == {"SHARED": "1", "OWN": "x"}
    assert load_agent(cfg.dirs, "eff").max_runs is None  # type: ignore[union-attr]
    assert load_agent(cfg.dirs, "nobody") is None
    assert "# the whole budget" in cfg.config.read_text()
    with pytest.raises(UsageError):
        set_settings(store, {"defaults.workspace": "/"})


def test_invalid_value_in_the_file_is_a_config_error_naming_the_key(cfg: Env) -> None:
    cfg.write(START + '\n[agents.typo]\nmemroy_max = "1G"\n')
    proc = cfg("agents", "list")
    assert proc.returncode == 78 and "agents.typo" in proc.stderr and "memroy_max" in proc.stderr
    cfg.write(START + '\n[agents.bad]\nmemory_max = "lots"\n')
    proc = cfg("agents", "show", "bad")
    assert proc.returncode == 78 and "agents.bad" in proc.stderr


def test_cli_list_show_set_json(cfg: Env, tmp_path: Path) -> None:
    cfg.write(START)
    cfg.ok("agents", "add", "j1", "--workspace", ".", "--memory-max", "2G", "--cpu-quota", "150%", "--tasks-max",
           "64", "--max-runs", "2", "--auth", "openai", "--env", "A=1", cwd=tmp_path)
    shown = json.loads(cfg.ok("agents", "show", "j1", "--json").stdout)
    assert shown["workspace"] == str(tmp_path)  # relative paths are stored absolute
    assert (shown["memory_max"], shown["cpu_quota"], shown["tasks_max"], shown["max_runs"]) == (2 * 2**30, 150, 64, 2)
    assert shown["env"] == {"A": "1"} and shown["auth"] == "openai" and shown["worktree"] is None
    cfg.ok("agents", "set", "j1", "memory-max=", "env.A=", "env.B=2", "max_runs=1")
    listed = json.loads(cfg.ok("agents", "list", "--json").stdout)
    j1 = next(a for a in listed if a["name"] == "j1")
    assert j1["memory_max"] is None and j1["env"] == {"B": "2"} and j1["max_runs"] == 1
    assert "j1" in cfg.ok("agents", "list").stdout
    cfg.ok("agents", "add", "j1", "--update", "--tasks-max", "10")
    assert get_agent(cfg.store(), "j1").limits.tasks_max == 10  # type: ignore[union-attr]
    assert get_agent(cfg.store(), "j1").auth == "openai"  # type: ignore[union-attr]  # --update keeps the rest


def test_parse_assignments() -> None:
    assert parse_assignments(["memory-max=2G", "env.FOO=bar", "auth="]) == {
        "memory_max": "2G", "env": {"FOO": "bar"}, "auth": None}


# --- worktrees with real git ---------------------------------------------------------------


@pytest.fixture
def repo(tmp_path: Path, cfg: Env) -> Path:
    ident = {"GIT_AUTHOR_NAME": "corral test", "GIT_AUTHOR_EMAIL": "test@corral.invalid",
             "GIT_COMMITTER_NAME": "corral test", "GIT_COMMITTER_EMAIL": "test@corral.invalid",
             "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
    cfg.env.update(ident)
    path = tmp_path / "repo"
    path.mkdir()
    env = dict(os.environ, **ident)
    for args in (["init", "-q", "-b", "main"], ["commit", "-q", "--allow-empty", "-m", "init"]):
        subprocess.run(["git", *args], cwd=path, env=env, check=True)
    (path / "README").write_text("hello\n")
    subprocess.run(["git", "add", "README"], cwd=path, env=env, check=True)
    subprocess.run(["git", "commit", "-q", "-m", "readme"], cwd=path, env=env, check=True)
    return path


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout


def test_worktree_created_used_and_removed(cfg: Env, repo: Path) -> None:
    cfg.write(START)
    cfg.ok("agents", "add", "wt", "--worktree", str(repo), "--memory-max", "1G")
    agent = get_agent(cfg.store(), "wt")
    assert agent is not None and agent.worktree is not None and agent.worktree.created
    path = Path(agent.worktree.path)
    assert agent.workspace == str(path) and path == cfg.dirs.state / "worktrees" / "wt"
    assert (path / "README").read_text() == "hello\n"
    assert _git(path, "rev-parse", "--abbrev-ref", "HEAD").strip() == "corral/wt"
    assert str(path) in _git(repo, "worktree", "list")

    proc = cfg.ok("agents", "rm", "wt")
    assert "worktree removed" in proc.stdout
    assert not path.exists() and str(path) not in _git(repo, "worktree", "list")
    assert "corral/wt" in _git(repo, "branch", "--list", "corral/wt")  # the branch (the agent's work) stays
    assert get_agent(cfg.store(), "wt") is None
    assert "# a comment at the very end" in cfg.config.read_text()
    assert cfg("agents", "rm", "wt").returncode == 0  # idempotent


def test_worktree_with_named_branch_and_reused_branch(cfg: Env, repo: Path) -> None:
    cfg.ok("agents", "add", "nb", "--worktree", f"{repo}@feature/x")
    path = cfg.dirs.state / "worktrees" / "nb"
    assert _git(path, "rev-parse", "--abbrev-ref", "HEAD").strip() == "feature/x"
    # The same branch cannot be checked out twice: exit 2, and nothing is recorded or left.
    proc = cfg("agents", "add", "nb2", "--worktree", f"{repo}@feature/x")
    assert proc.returncode == 2 and "git worktree add" in proc.stderr and "feature/x" in proc.stderr
    assert get_agent(cfg.store(), "nb2") is None and not (cfg.dirs.state / "worktrees" / "nb2").exists()
    cfg.ok("agents", "rm", "nb")
    cfg.ok("agents", "add", "nb", "--worktree", f"{repo}@feature/x")  # an existing branch is reused


def test_uncommitted_changes_protect_the_worktree_unless_force(cfg: Env, repo: Path) -> None:
    cfg.ok("agents", "add", "dirty", "--worktree", str(repo))
    path = cfg.dirs.state / "worktrees" / "dirty"
    (path / "README").write_text("changed\n")
    (path / "new-file").write_text("untracked\n")
    proc = cfg("agents", "rm", "dirty")
    assert proc.returncode == 2 and "uncommitted changes" in proc.stderr and "--force" in proc.stderr
    assert (path / "new-file").exists() and get_agent(cfg.store(), "dirty") is not None  # nothing removed
    proc = cfg.ok("agents", "rm", "dirty", "--force")
    assert not path.exists() and get_agent(cfg.store(), "dirty") is None


def test_worktree_corral_did_not_create_is_never_removed(cfg: Env, repo: Path, tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    _git(repo, "worktree", "add", "-q", "-b", "mine", str(mine))
    cfg.ok("agents", "add", "uses", "--workspace", str(mine))
    cfg.ok("agents", "rm", "uses")
    assert (mine / "README").exists()
    # Even an entry that claims corral made it is refused outside corral's worktree dir.
    cfg.write(START + f'\n[agents.forged]\nworktree = {{ repo = "{repo}", branch = "mine", path = "{mine}", '
                      "created = true }\n")
    proc = cfg.ok("agents", "rm", "forged")
    assert "kept" in proc.stdout and (mine / "README").exists()


def test_rm_finishes_after_the_worktree_vanished(cfg: Env, repo: Path) -> None:
    cfg.ok("agents", "add", "gone", "--worktree", str(repo))
    path = cfg.dirs.state / "worktrees" / "gone"
    subprocess.run(["rm", "-rf", str(path)], check=True)
    proc = cfg.ok("agents", "rm", "gone")
    assert "worktree gone" in proc.stdout and get_agent(cfg.store(), "gone") is None
    assert str(path) not in _git(repo, "worktree", "list")  # pruned


def _usable_backend() -> str | None:
    wanted = [b for b in os.environ.get("CORRAL_TEST_BACKENDS", "").split(",") if b]
    if wanted:
        return wanted[0]
    from corral.backends import probe_all

    return next((p.name for p in probe_all() if p.usable), None)


def test_rm_stops_the_agents_live_runs_first(cfg: Env, tmp_path: Path) -> None:
    run_backend = _usable_backend()
    if run_backend is None:
        pytest.skip("no usable backend to start a run")
    env = dict(cfg.env, CORRAL_BACKEND=run_backend)
    cfg.env = env
    agent = "rmruns" + os.urandom(3).hex()
    cfg.ok("agents", "add", agent, "--workspace", str(tmp_path))
    run_id = cfg.ok("run", "--detach", agent, "--", "sleep", "1000").stdout.strip()
    try:
        proc = cfg.ok("agents", "rm", agent, "--grace", "1")
        assert f"run {run_id} stopped" in proc.stdout
        state = json.loads(cfg.ok("show", run_id, "--json").stdout)["state"]
        assert state not in ("running", "starting", "paused")
    finally:
        cfg("kill", agent)


def test_rm_of_unknown_agent_is_a_no_op(cfg: Env) -> None:
    cfg.write(START)
    before = _sha(cfg.config)
    proc = cfg("agents", "rm", "never")
    assert proc.returncode == 0 and "nothing to remove" in proc.stderr
    assert _sha(cfg.config) == before


def test_error_text_has_no_traceback(cfg: Env) -> None:
    cfg.write("x = [\n")
    proc = cfg("agents", "list")
    assert proc.returncode == 78 and "Traceback" not in proc.stderr
    assert re.search(r"config\.toml:2:\d+: malformed TOML", proc.stderr), proc.stderr


# --- files that are not config files ------------------------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "huge"])
def test_a_config_that_is_no_regular_file_or_too_big_is_exit_78_at_once(cfg: Env, kind: str) -> None:
    cfg.config.parent.mkdir(parents=True, exist_ok=True)
    if kind == "fifo":
        os.mkfifo(cfg.config)
    elif kind == "dev-zero":
        os.symlink("/dev/zero", cfg.config)
    else:
        with open(cfg.config, "wb") as f:
            f.truncate(100 << 20)  # sparse: 100 MB without writing them
    started = time.monotonic()
    proc = cfg("agents", "list", timeout=20)
    assert proc.returncode == 78, (proc.returncode, proc.stderr)
    assert ("FIFO" in proc.stderr or "device" in proc.stderr or "larger than" in proc.stderr), proc.stderr
    assert time.monotonic() - started < 15, "it did not hang"  # a generous bound: the bug was a hang
    assert cfg("agents", "add", "x1").returncode == 78
    assert kind != "huge" or cfg.config.stat().st_size == 100 << 20, "left untouched"


def test_a_new_config_is_0600_and_records_are_the_owners_alone(cfg: Env) -> None:
    cfg.ok("agents", "add", "p1", "--env", "TOKEN=secret", umask=0o022)
    assert cfg.config.stat().st_mode & 0o777 == 0o600


@pytest.mark.skipif(os.geteuid() != 0, reason="the root-only refusal")
def test_root_runs_nothing_from_a_config_another_user_owns(cfg: Env, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    cfg.write(f'[agents.p1]\ncommand = "touch {marker}"\n', mode=0o644)
    os.chown(cfg.config, 1001, 1001)
    proc = cfg("run", "p1")
    assert proc.returncode == 77 and "uid 1001" in proc.stderr, proc.stderr
    os.chown(cfg.config, 0, 0)
    os.chown(cfg.config.parent, 1001, 1001)
    proc = cfg("run", "p1")
    assert proc.returncode == 77 and "uid 1001" in proc.stderr, proc.stderr
    assert not marker.exists()
    assert cfg("agents", "list").returncode == 0, "listing and editing stay possible"
