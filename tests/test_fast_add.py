"""``corral agents add`` without click (corral.cli.fast_add): the same command, the same
file, the same messages and exit codes as click's, and click for anything else."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

FAST = [sys.executable, "-m", "corral"]  # the console script's entry point, corral.__main__
CLICK = [sys.executable, "-m", "corral.cli.main"]  # click for every command line


def _env(tmp: Path, name: str) -> dict[str, str]:
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp / name / "config"), XDG_STATE_HOME=str(tmp / name / "state"),
               PYTHONDONTWRITEBYTECODE="1")
    (tmp / name / "config").mkdir(parents=True)
    return env


def _both(tmp: Path, *lines: list[str]) -> list[tuple[tuple[int, str, str], tuple[int, str, str]]]:
    """Run each command line through both parsers, in two config dirs; return the pairs."""
    envs = {"fast": _env(tmp, "fast"), "click": _env(tmp, "click")}
    out = []
    for line in lines:
        got = []
        for which, argv in (("fast", FAST), ("click", CLICK)):
            proc = subprocess.run([*argv, "agents", "add", *line], env=envs[which], capture_output=True, text=True,
                                  timeout=60, check=False)
            got.append((proc.returncode, proc.stdout, proc.stderr))
        out.append((got[0], got[1]))
    return out


def _config(tmp: Path, name: str) -> str:
    return (tmp / name / "config" / "corral" / "config.toml").read_text()


def test_the_fast_path_knows_exactly_the_click_commands_options() -> None:
    from corral.cli.agents import add
    from corral.cli.fast_add import FLAGS, OPTIONS, REPEATED

    declared = {opt: param for param in add.params for opt in param.opts if opt.startswith("--")}
    valued = {o for o, p in declared.items() if not getattr(p, "is_flag", False) and not getattr(p, "multiple", False)}
    assert set(OPTIONS) == valued - {"--worktree"}, "--worktree is click's alone (it runs git)"
    assert set(REPEATED) == {o for o, p in declared.items() if getattr(p, "multiple", False)}
    assert set(FLAGS) == {o for o, p in declared.items() if getattr(p, "is_flag", False)}
    assert {p.human_readable_name for p in add.params if p.param_type_name == "argument"} == {"NAME"}


def test_same_file_same_output_same_errors(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    pairs = _both(
        tmp_path,
        ["lane1"],
        ["lane2", "--workspace", str(ws), "--memory-max", "2G", "--cpu-quota=150%", "--env", "A=1", "--env=B=x y"],
        ["lane3", "--command", "codex exec --full-auto", "--max-runs", "2", "--tasks-max", "64", "--memory-high", "1G"],
        ["lane1"],  # exists: exit 2
        ["lane1", "--update", "--memory-max", "1G"],
        ["a-b"],  # invalid name: exit 2
        ["lane4", "--memory-max", "lots"],  # bad value: exit 2, nothing written
        ["lane5", "--env", "NOEQUALS"],
        ["lane6", "--workspace", str(tmp_path / "missing")],
        ["nope", "--update"],
    )
    for fast, slow in pairs:
        assert fast == slow, (fast, slow)
    assert [fast[0] for fast, _ in pairs] == [0, 0, 0, 2, 0, 2, 2, 2, 2, 0]  # --update of a new name adds it
    assert _config(tmp_path, "fast") == _config(tmp_path, "click")
    config = _config(tmp_path, "fast")
    assert "lane4" not in config and "lane5" not in config and "lane6" not in config and "[agents.nope]" in config
    assert '"codex", "exec", "--full-auto"' in config, config
    import tomllib

    lane2 = tomllib.loads(config)["agents"]["lane2"]
    assert lane2["env"] == {"A": "1", "B": "x y"} and lane2["workspace"] == str(ws), lane2


@pytest.mark.parametrize("line", [["--help"], ["lane1", "--help"], ["lane1", "--bogus", "x"], ["lane1", "--memory-max"],
                                  ["lane1", "extra"], ["lane1", "--", "x"], []])
def test_anything_but_the_plain_form_is_clicks(tmp_path: Path, line: list[str]) -> None:
    ((fast, slow),) = _both(tmp_path, line)
    assert fast == slow, (fast, slow)
    assert fast[0] in (0, 2), fast


def test_the_plain_form_imports_no_click(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "corral", "agents", "add", "lane1"],
                          env=_env(tmp_path, "x"), capture_output=True, text=True, timeout=60, check=True)
    assert proc.stdout == "lane1: added\n"
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "corral.cli.fast_add" in imported and "click" not in imported, sorted(imported)


def test_the_fast_path_settles_lost_runs_as_every_command_does(tmp_path: Path) -> None:
    """A detached run whose owner died is recorded as lost by the next command of any kind."""
    import json
    import time

    env = _env(tmp_path, "x")
    agent = "fastlost" + os.urandom(3).hex()
    run_id = subprocess.run([*CLICK, "run", "-d", "--isolation", "none", agent, "--", "sleep", "1000"], env=env,
                            capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    runs = tmp_path / "x" / "state" / "corral" / "runs"
    owner = json.loads((runs / f"{run_id}.json").read_text())["owner_pid"]
    os.kill(owner, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not (runs / f"{run_id}.lost").exists():
        assert time.monotonic() < deadline, "the watchdog's note"
        time.sleep(0.05)
    subprocess.run([*FAST, "agents", "add", "lane1"], env=env, capture_output=True, text=True, timeout=60, check=True)
    record = json.loads((runs / f"{run_id}.json").read_text())
    assert record["state"] == "lost", record
