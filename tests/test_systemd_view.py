"""What systemd's own tools show of corral's runs (systemd tier only)."""

from __future__ import annotations

import os
import subprocess

import pytest

from conftest import CorralCLI

pytestmark = pytest.mark.systemd


@pytest.fixture
def sd(corral: CorralCLI) -> CorralCLI:
    if corral.backend != "systemd":
        pytest.skip("systemd tier only")
    return corral


def _tool(*argv: str) -> subprocess.CompletedProcess:
    user = ["--user"] if os.geteuid() != 0 else []
    return subprocess.run([argv[0], *user, *argv[1:]], capture_output=True, text=True, timeout=30)


def test_systemctl_and_cgls_show_the_run(sd: CorralCLI) -> None:
    agent = sd.agent()
    run_id = sd.detach(agent, "sh", "-c", "sleep 1000 & sleep 1001 & wait")
    unit = f"corral-{agent}-{run_id}.scope"
    sd.wait_for(lambda: sd.show(run_id)["pids"] == 3, what="three processes")
    status = _tool("systemctl", "status", "--no-pager", unit)
    assert f"corral {agent}: sh -c" in status.stdout, status.stdout + status.stderr
    assert "active (running)" in status.stdout
    assert "sleep 1001" in status.stdout
    assert _tool("systemctl", "show", "-P", "Slice", unit).stdout.strip() == f"corral-{agent}.slice"
    if os.geteuid() == 0:
        cgls = subprocess.run(["systemd-cgls", "--no-pager", "/corral.slice"], capture_output=True, text=True)
    else:
        cgls = subprocess.run(["systemd-cgls", "--no-pager", "--user-unit", unit], capture_output=True, text=True)
    assert unit in cgls.stdout or "payload" in cgls.stdout, cgls.stdout + cgls.stderr
    assert "sleep 1000" in cgls.stdout
    listed = _tool("systemctl", "list-units", "--no-pager", "--plain", f"corral-{agent}-*.scope").stdout
    assert unit in listed
    sd("kill", run_id, check=True)
    sd.wait_for(lambda: _tool("systemctl", "is-active", unit).stdout.strip() in ("inactive", "unknown", ""),
                what="unit gone after kill")
    assert unit not in _tool("systemctl", "list-units", "--no-pager", "--plain", f"corral-{agent}-*.scope").stdout


def test_systemctl_stop_of_the_agent_slice_ends_its_runs(sd: CorralCLI) -> None:
    agent = sd.agent()
    ids = [sd.detach(agent, "sleep", "1000") for _ in range(2)]
    proc = _tool("systemctl", "stop", f"corral-{agent}.slice")
    assert proc.returncode == 0, proc.stderr
    for run_id in ids:
        rec = sd.wait_for(lambda: (r := sd.show(run_id))["state"] != "running" and r, what="run ended")
        assert rec["state"] in ("killed", "lost"), rec
        assert rec["pids"] == 0
    assert not [r for r in sd.json("ps", "--json") if r["agent"] == agent]


def test_attached_run_unit_is_visible_while_running(sd: CorralCLI) -> None:
    agent = sd.agent()
    # Seen from outside: the run itself can reach no service manager (test_isolation.py).
    p = sd.popen("run", agent, "--", "sleep", "1000")
    try:
        rec = sd.wait_for(lambda: [r for r in sd.json("ps", "--json") if r["agent"] == agent and r["pids"] >= 1],
                          what="the run")[0]
        assert _tool("systemctl", "is-active", rec["unit"]).stdout.strip() == "active"
        command = [pid for pid in sd.show(rec["id"])["processes"] if pid["role"] == "main"]
        assert command, sd.show(rec["id"])
        cgroup = open(f"/proc/{command[0]['pid']}/cgroup").read()
        assert f"corral-{agent}.slice/corral-{agent}-{rec['id']}.scope/payload" in cgroup, cgroup
    finally:
        sd("kill", agent)
        p.wait(timeout=30)


