"""Shared fixtures: the same run tests over every backend this machine (or container) has.

``CORRAL_TEST_BACKENDS`` (comma-separated) picks the backends; by default every usable
one. The Makefile runs the host tier with ``cgroupfs`` and, inside a throwaway systemd
container, the ``systemd`` tier as root (system manager) and as a user (user manager).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import psutil
import pytest

CORRAL = [sys.executable, "-m", "corral.cli.main"]


def _usable_backends() -> list[str]:
    wanted = os.environ.get("CORRAL_TEST_BACKENDS")
    if wanted:
        return [b.strip() for b in wanted.split(",") if b.strip()]
    from corral.backends import probe_all

    return [p.name for p in probe_all() if p.usable]


BACKENDS = _usable_backends()


def _own_cgroup_root() -> Path | None:
    """On the cgroupfs backend the tests work under a cgroup root of their own (a child of
    the cgroup2 mount, ``CORRAL_CGROUP_ROOT``), so that other corral users on this machine
    neither break the tests nor are touched by them. Set before anything reads it; every
    subprocess inherits it. An explicit CORRAL_CGROUP_ROOT is kept."""
    if "cgroupfs" not in BACKENDS or os.environ.get("CORRAL_CGROUP_ROOT"):
        return None
    from corral.linux.cgroup import find_cgroup2_mount

    mount = find_cgroup2_mount()
    if mount is None:
        return None
    root = mount / f"corral-test-{uuid.uuid4().hex[:8]}"
    try:
        root.mkdir()
    except OSError:
        return None  # not ours to write (a user without delegation): the default root then
    os.environ["CORRAL_CGROUP_ROOT"] = str(root)
    return root


TEST_CGROUP_ROOT = _own_cgroup_root()


def kill_cgroup(path: Path, *, timeout: float) -> None:
    """cgroup.kill, then wait (up to *timeout* s) until the cgroup is empty or gone."""
    try:
        (path / "cgroup.kill").write_text("1")
    except OSError:
        pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if "populated 0" in (path / "cgroup.events").read_text():
                return
        except OSError:
            return
        time.sleep(0.02)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Kill what is left in our own cgroup root, by cgroup, and remove it."""
    root = TEST_CGROUP_ROOT
    if root is None or not root.exists():
        return
    kill_cgroup(root, timeout=10)
    for dirpath, _dirs, _files in sorted(os.walk(root, topdown=False), key=lambda w: -len(w[0])):
        try:
            os.rmdir(dirpath)
        except OSError:
            pass


def pytest_report_header(config: pytest.Config) -> str:
    who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
    root = f"; cgroup root {os.environ['CORRAL_CGROUP_ROOT']}" if os.environ.get("CORRAL_CGROUP_ROOT") else ""
    return f"corral backends under test: {', '.join(BACKENDS) or 'none'} (as {who}){root}"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", BACKENDS)


class CorralCLI:
    """Drives the ``corral`` CLI as a user would, in a private state dir, with unique agents."""

    def __init__(self, backend: str, tmp_path: Path) -> None:
        self.backend = backend
        self.tmp = tmp_path
        self.env = dict(os.environ)
        for var, sub in (("XDG_STATE_HOME", "state"), ("XDG_CONFIG_HOME", "config")):
            (tmp_path / sub).mkdir(exist_ok=True)
            self.env[var] = str(tmp_path / sub)
        self.env["CORRAL_BACKEND"] = backend
        self.env["PYTHONDONTWRITEBYTECODE"] = "1"
        self.agents: list[str] = []

    def agent(self) -> str:
        name = "t" + uuid.uuid4().hex[:10]
        self.agents.append(name)
        return name

    def __call__(self, *args: str, timeout: float = 60, check: bool = False, **kw: Any) -> subprocess.CompletedProcess:
        proc = subprocess.run([*CORRAL, *args], env=self.env, capture_output=True, text=True, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"corral {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def popen(self, *args: str, **kw: Any) -> subprocess.Popen:
        return subprocess.Popen([*CORRAL, *args], env=self.env, **kw)

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, check=True).stdout)

    def detach(self, agent: str, *cmd: str, opts: tuple[str, ...] = ()) -> str:
        out = self("run", "--detach", *opts, agent, "--", *cmd, check=True).stdout
        run_id = out.strip()
        assert len(run_id) == 8, out
        return run_id

    def show(self, run_id: str) -> dict[str, Any]:
        return self.json("show", run_id, "--json")

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.05)

    def slice_dir(self) -> Path:
        from corral.backends import open_backend

        b = open_backend(self.backend)
        try:
            return b.slice_dir()
        finally:
            b.close()

    def scopes_of(self, agent: str) -> list[Path]:
        d = self.slice_dir() / f"corral-{agent}.slice"
        return sorted(d.glob(f"corral-{agent}-*.scope")) if d.exists() else []

    def cleanup(self) -> None:
        """Kill what this test's agents left, by cgroup, and remove the cgroups."""
        for agent in self.agents:
            for scope in self.scopes_of(agent):
                kill_cgroup(scope, timeout=5)
                if self.backend == "cgroupfs":
                    for leaf in ("payload", "supervisor", ""):
                        try:
                            os.rmdir(scope / leaf if leaf else scope)
                        except OSError:
                            pass
            if self.backend == "cgroupfs":
                try:
                    os.rmdir(self.slice_dir() / f"corral-{agent}.slice")
                except OSError:
                    pass


@pytest.fixture
def corral(backend: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    cli = CorralCLI(backend, tmp_path)
    yield cli
    cli.cleanup()


@pytest.fixture(scope="module")
def server():  # type: ignore[no-untyped-def]
    """A real OAuth 2.0 server on 127.0.0.1 (tests/_auth_server.py), one per test module."""
    from _auth_util import OAuthServer  # authlib: imported only by the tests that use it

    srv = OAuthServer()
    yield srv
    srv.stop()


def alive(pids: list[int]) -> list[int]:
    """Those of *pids* that are still running (zombies count as gone: they are dead)."""
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
