"""`corral run NAME` for a configured agent: its workspace, env, limits, command, cap."""

from __future__ import annotations

import time
from pathlib import Path

from conftest import CorralCLI


def test_run_takes_the_agents_settings_and_flags_override(corral: CorralCLI, tmp_path: Path) -> None:
    agent = corral.agent()
    ws = tmp_path / "ws"
    ws.mkdir()
    corral("agents", "add", agent, "--workspace", str(ws), "--env", "FROM_AGENT=yes", "--env", "BOTH=agent",
           "--memory-max", "300M", "--command", "sh -c 'echo default-command; pwd'", check=True)
    out = corral("run", agent, check=True).stdout.split()
    assert out == ["default-command", str(ws)]
    proc = corral("run", "--env", "BOTH=flag", agent, "--", "sh", "-c", 'echo "$FROM_AGENT $BOTH"; pwd', check=True)
    assert proc.stdout.split() == ["yes", "flag", str(ws)]
    run_id = corral.detach(agent, "sleep", "1000", opts=("--tasks-max", "77"))
    limits = corral.show(run_id)["limits"]["requested"]
    assert limits == {"memory_max": 300 * 2**20, "tasks_max": 77}, "agent limit kept, flag added"
    corral("kill", run_id, check=True)


def test_max_runs_waits_or_fails_with_75(corral: CorralCLI) -> None:
    agent = corral.agent()
    corral("agents", "add", agent, "--max-runs", "1", check=True)
    first = corral.detach(agent, "sleep", "1.5")
    proc = corral("run", "--no-wait", agent, "--", "true")
    assert proc.returncode == 75 and first in proc.stderr
    t0 = time.monotonic()
    proc = corral("run", agent, "--", "true", timeout=30)
    assert proc.returncode == 0
    assert "waiting" in proc.stderr and time.monotonic() - t0 > 0.5


def test_an_agent_without_command_needs_one(corral: CorralCLI) -> None:
    agent = corral.agent()
    assert corral("run", agent).returncode == 2  # ad hoc: no command
    corral("agents", "add", agent, check=True)
    proc = corral("run", agent)
    assert proc.returncode == 2 and "no default command" in proc.stderr


def test_malformed_config_is_78_for_run(corral: CorralCLI) -> None:
    cfg = Path(corral.env["XDG_CONFIG_HOME"]) / "corral" / "config.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text("[agents.x\nworkspace = 1\n")
    proc = corral("run", corral.agent(), "--", "true")
    assert proc.returncode == 78 and "config.toml" in proc.stderr
