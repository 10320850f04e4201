"""Deployment as a Linux service: units/, make install/uninstall, systemctl (system tier).

Runs only as root inside the throwaway systemd container (the Makefile's second tier):
it installs into /opt/corral and /etc/systemd/system of that container, never the host.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from conftest import alive, kill_pids

REPO = Path(__file__).resolve().parent.parent
PREFIX = "/opt/corral"
CORRAL = f"{PREFIX}/bin/corral"
UNITDIR = Path("/etc/systemd/system")

root_tier = pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/run/systemd/system").is_dir() or os.environ.get("CORRAL_TEST_BACKENDS") != "systemd",
    reason="needs root inside the systemd test container",
)


def sh(*argv: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def installed_env() -> dict[str, str]:
    """The environment a service would have: no XDG overrides, so root's default dirs."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "CORRAL_"))}


@pytest.fixture(scope="module")
def installed():  # type: ignore[no-untyped-def]
    wheels = REPO / ".wheels"
    flags = f"PIP_FLAGS=--no-index --find-links={wheels}" if wheels.is_dir() else "PIP_FLAGS="
    sh("make", "-C", str(REPO), "install", f"PREFIX={PREFIX}", flags)
    yield
    sh("make", "-C", str(REPO), "uninstall", f"PREFIX={PREFIX}")


@root_tier
def test_units_verify(installed: None, tmp_path: Path) -> None:
    units = sorted(UNITDIR.glob("corral*"))
    assert {u.name for u in units} >= {"corral.slice", "corral-gc.service", "corral-gc.timer", "corral-broker.socket",
                                       "corral-broker.service", "corral-agent@.service"}
    instance = tmp_path / "corral-agent@lane1.service"
    instance.write_text((UNITDIR / "corral-agent@.service").read_text())
    for unit in [*[u for u in units if "@" not in u.name], instance]:
        proc = sh("systemd-analyze", "verify", "--man=no", str(unit), check=False)
        assert proc.returncode == 0 and not proc.stderr.strip(), f"{unit.name}: {proc.stderr}"
        assert f"{PREFIX}/bin/corral" in unit.read_text() or unit.suffix in (".slice", ".socket", ".timer")


@root_tier
def test_installed_cli_runs(installed: None) -> None:
    assert sh(CORRAL, "--version").stdout.startswith("corral")
    assert "chosen: systemd" in sh(CORRAL, "doctor", env=installed_env()).stdout


@root_tier
def test_gc_timer_reaps_a_lost_run(installed: None) -> None:
    sh("systemctl", "enable", "--now", "corral-gc.timer")
    assert sh("systemctl", "is-active", "corral-gc.timer").stdout.strip() == "active"
    # enabling may fire the timer at once (OnBootSec passed): let that pass end first
    deadline = time.monotonic() + 30
    while sh("systemctl", "is-active", "corral-gc.service", check=False).stdout.strip() in ("active", "activating"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    agent = "lost" + uuid.uuid4().hex[:6]
    env = installed_env()
    run_id = sh(CORRAL, "run", "--detach", agent, "--", "sh", "-c", "sleep 1000 & sleep 1000", env=env).stdout.strip()
    unit = f"corral-{agent}-{run_id}.scope"
    deadline = time.monotonic() + 10
    import json

    while True:
        info = json.loads(sh(CORRAL, "show", run_id, "--json", env=env).stdout)
        if info["pids"] == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    payload = [p["pid"] for p in info["processes"] if p["role"] != "corral"]
    helpers = {"watchdog": p["pid"] for p in info["processes"] if "corral-watchdog" in p["argv"]}
    helpers["owner"] = info["owner_pid"]  # corral's shared owner, outside the scope
    # corral crashes hard: its watchdog cannot react (stopped), its owner is killed
    os.kill(helpers["watchdog"], signal.SIGSTOP)
    os.kill(helpers["owner"], signal.SIGKILL)
    time.sleep(0.2)
    assert alive(payload) == payload
    try:
        sh("systemctl", "start", "corral-gc.service")  # what the timer starts
        assert alive(payload) == []
        state = json.loads(sh(CORRAL, "show", run_id, "--json", env=env).stdout)["state"]
        assert state == "lost"
        assert sh("systemctl", "is-active", unit, check=False).stdout.strip() != "active"
    finally:
        kill_pids(alive(payload + list(helpers.values())))


@root_tier
def test_stopping_corral_slice_ends_every_run(installed: None) -> None:
    env = installed_env()
    agents = ["sa" + uuid.uuid4().hex[:6], "sb" + uuid.uuid4().hex[:6]]
    ids = [sh(CORRAL, "run", "--detach", a, "--", "sleep", "1000", env=env).stdout.strip() for a in agents]
    cgls = sh("systemd-cgls", "--no-pager", "/corral.slice").stdout
    for a, rid in zip(agents, ids):
        assert f"corral-{a}-{rid}.scope" in cgls
    sh("systemctl", "stop", "corral.slice")
    import json

    runs = {r["id"]: r for r in json.loads(sh(CORRAL, "ps", "--all", "--json", env=env).stdout)}
    for rid in ids:
        assert runs[rid]["state"] in ("killed", "lost"), runs[rid]
        assert runs[rid]["pids"] == 0
    assert not json.loads(sh(CORRAL, "ps", "--json", env=env).stdout)


@root_tier
def test_agent_template_runs_the_agent_in_its_slice(installed: None) -> None:
    import json

    env = installed_env()
    agent = "svc" + uuid.uuid4().hex[:6]
    sh(CORRAL, "agents", "add", agent, "--command", "sh -c 'sleep 1000 & sleep 1001'", env=env)
    service = f"corral-agent@{agent}.service"
    try:
        sh("systemctl", "start", service)
        deadline = time.monotonic() + 15
        while True:
            runs = [r for r in json.loads(sh(CORRAL, "ps", "--json", env=env).stdout) if r["agent"] == agent]
            if runs and runs[0]["pids"] == 3 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        (run,) = runs
        assert run["pids"] == 3
        assert sh("systemctl", "show", "-P", "Slice", service).stdout.strip() == f"corral-{agent}.slice"
        assert sh("systemctl", "show", "-P", "Slice", run["unit"]).stdout.strip() == f"corral-{agent}.slice"
        cgls = sh("systemd-cgls", "--no-pager", f"/corral.slice/corral-{agent}.slice").stdout
        assert service in cgls and run["unit"] in cgls and "sleep 1001" in cgls
        sh("systemctl", "stop", service)
        after = {r["id"]: r for r in json.loads(sh(CORRAL, "ps", "--all", "--json", env=env).stdout)}[run["id"]]
        assert after["state"] == "killed" and after["pids"] == 0
    finally:
        sh("systemctl", "stop", service, check=False)
        sh(CORRAL, "agents", "rm", agent, env=env, check=False)


@root_tier
def test_broker_socket_activation_serves_tokens(installed: None) -> None:
    """The installed broker socket listens; `corral auth token` through it starts the
    broker service, which refreshes against a real OAuth server on 127.0.0.1."""
    import json

    from _auth_util import OAuthServer

    env = installed_env()
    server = OAuthServer()
    try:
        pair = server.mint()
        sh("systemctl", "enable", "--now", "corral-broker.socket")
        sock = Path("/run/corral/broker.sock")
        assert sock.is_socket() and (sock.stat().st_mode & 0o777) == 0o600
        assert sh("systemctl", "is-active", "corral-broker.service", check=False).stdout.strip() != "active"
        profile = "deploy" + uuid.uuid4().hex[:4]
        sh(CORRAL, "auth", "add", profile, "--token-url", server.token_url, "--client-id", "corral-test", env=env)
        proc = subprocess.run([CORRAL, "auth", "login", profile, "--refresh-token-stdin"], input=pair["refresh_token"] + "\n",
                              capture_output=True, text=True, env=env, timeout=60)
        assert proc.returncode == 0, proc.stderr
        token = sh(CORRAL, "auth", "token", profile, env=env).stdout.strip()
        assert token and token != pair["refresh_token"]
        assert sh("systemctl", "is-active", "corral-broker.service").stdout.strip() == "active", "socket-activated"
        status = json.loads(sh(CORRAL, "auth", "status", profile, "--json", env=env).stdout)
        assert pair["refresh_token"] not in json.dumps(status)
    finally:
        server.stop()
        sh("systemctl", "stop", "corral-broker.service", "corral-broker.socket", check=False)


@root_tier
def test_uninstall_leaves_nothing(installed: None) -> None:
    sh("make", "-C", str(REPO), "uninstall", f"PREFIX={PREFIX}")
    assert not list(UNITDIR.glob("corral*"))
    assert not list(UNITDIR.glob("*.wants/corral*"))
    assert not Path(PREFIX).exists()
    # reinstall so the module fixture's own uninstall has something to remove
    wheels = REPO / ".wheels"
    sh("make", "-C", str(REPO), "install", f"PREFIX={PREFIX}", f"PIP_FLAGS=--no-index --find-links={wheels}")


@pytest.mark.skipif(os.geteuid() == 0 or not Path("/run/systemd/system").is_dir()
                    or os.environ.get("CORRAL_TEST_BACKENDS") != "systemd", reason="user-manager tier only")
def test_user_units_install_and_activate() -> None:
    """`make install-user`: the same units for `systemctl --user`, with the hardening a user
    manager cannot apply left out; the broker is socket-activated there too."""
    import json

    from _auth_util import OAuthServer

    unitdir = Path.home() / ".config" / "systemd" / "user"
    prefix = str(REPO / ".venv")  # an existing install: the repository's own venv
    env = installed_env()
    corral = f"{prefix}/bin/corral"
    sh("make", "-C", str(REPO), "install-user", f"PREFIX={prefix}", f"USERUNITDIR={unitdir}")
    server = OAuthServer()
    try:
        for unit in sorted(unitdir.glob("corral*")):
            if "@" not in unit.name:
                proc = sh("systemd-analyze", "--user", "verify", "--man=no", str(unit), check=False)
                assert proc.returncode == 0, f"{unit.name}: {proc.stderr}"
        sh("systemctl", "--user", "enable", "--now", "corral-broker.socket", "corral-gc.timer")
        sock = Path(os.environ["XDG_RUNTIME_DIR"]) / "corral" / "broker.sock"
        assert sock.is_socket() and (sock.stat().st_mode & 0o777) == 0o600
        profile = "user" + uuid.uuid4().hex[:4]
        pair = server.mint()
        sh(corral, "auth", "add", profile, "--token-url", server.token_url, "--client-id", "corral-test", env=env)
        proc = subprocess.run([corral, "auth", "login", profile, "--refresh-token-stdin"], input=pair["refresh_token"] + "\n",
                              capture_output=True, text=True, env=env, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert sh(corral, "auth", "token", profile, env=env).stdout.strip()
        assert sh("systemctl", "--user", "is-active", "corral-broker.service").stdout.strip() == "active"
        status = json.loads(sh(corral, "auth", "status", profile, "--json", env=env).stdout)
        assert pair["refresh_token"] not in json.dumps(status)
    finally:
        server.stop()
        sh("systemctl", "--user", "disable", "--now", "corral-broker.socket", "corral-gc.timer", check=False)
        sh("systemctl", "--user", "stop", "corral-broker.service", check=False)
        sh("make", "-C", str(REPO), "uninstall-user", f"USERUNITDIR={unitdir}")
    assert not list(unitdir.glob("corral*"))
