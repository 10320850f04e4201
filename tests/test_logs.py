"""A detached run's output (runlog.py), what an ended run keeps (meter.py) and the process
tree of `show`, on every backend. On systemd, the run's lines are in the journal too."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import CorralCLI

# Two pipes: the order within a stream is exact, across streams it is the order in which
# the owner read them, so the script pauses where it switches.
SCRIPT = ("echo out1; sleep 0.1; echo err1 >&2; sleep 0.1; echo out2; printf 'no newline'; sleep 0.4; echo; "
          "sleep 0.1; echo err2 >&2; sleep 0.1; echo out3")


def _ended(corral: CorralCLI, run_id: str) -> dict:
    corral("wait", run_id, timeout=60)
    return corral.show(run_id)


def test_logs_tail_streams_timestamps_json(corral: CorralCLI) -> None:
    agent = corral.agent()
    run_id = corral.detach(agent, "sh", "-c", SCRIPT)
    _ended(corral, run_id)
    whole = corral("logs", run_id, check=True).stdout
    assert whole == "out1\nerr1\nout2\nno newline\nerr2\nout3\n"
    assert corral("logs", "-n", "2", run_id, check=True).stdout == "err2\nout3\n"
    assert corral("logs", "-n", "0", run_id, check=True).stdout == ""
    assert corral("logs", "--stream", "stderr", run_id, check=True).stdout == "err1\nerr2\n"
    assert corral("logs", "--stream", "stdout", "-n", "2", run_id, check=True).stdout == "no newline\nout3\n"
    stamped = corral("logs", "-t", run_id, check=True).stdout.splitlines()
    assert len(stamped) == 6
    for line in stamped:
        stamp, _, text = line.partition(" ")
        assert stamp.endswith("Z") and "T" in stamp and text, line
    rows = [json.loads(line) for line in corral("logs", "--json", run_id, check=True).stdout.splitlines()]
    assert [(r["stream"], r["line"]) for r in rows] == [
        ("stdout", "out1"), ("stderr", "err1"), ("stdout", "out2"), ("stdout", "no newline"), ("stderr", "err2"),
        ("stdout", "out3")]
    assert all(r["time"] <= rows[-1]["time"] for r in rows)


def test_logs_since(corral: CorralCLI) -> None:
    agent = corral.agent()
    run_id = corral.detach(agent, "sh", "-c", "echo early; sleep 1.5; echo late")
    _ended(corral, run_id)
    rows = [json.loads(line) for line in corral("logs", "--json", run_id, check=True).stdout.splitlines()]
    late = next(r["time"] for r in rows if r["line"] == "late")
    assert corral("logs", "--since", late, run_id, check=True).stdout == "late\n"
    assert corral("logs", "--since", "1h", run_id, check=True).stdout == "early\nlate\n"
    assert corral("logs", "--since", "2999-01-01T00:00:00Z", run_id, check=True).stdout == ""
    bad = corral("logs", "--since", "yesterday-ish", run_id)
    assert bad.returncode == 2 and "--since" in bad.stderr and "Traceback" not in bad.stderr


def test_logs_follow_shows_unfinished_line(corral: CorralCLI) -> None:
    """A prompt without a newline reaches `logs -f` while the run still waits."""
    agent = corral.agent()
    run_id = corral.detach(agent, "sh", "-c", "printf 'Continue? '; sleep 3; echo yes")
    proc = corral.popen("logs", "-f", run_id, stdout=subprocess.PIPE)
    try:
        os.set_blocking(proc.stdout.fileno(), False)
        got = b""
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline and b"Continue? " not in got:
            got += proc.stdout.read() or b""
            time.sleep(0.05)
        assert got == b"Continue? ", got
        assert proc.wait(timeout=30) == 0
        got += proc.stdout.read() or b""
    finally:
        if proc.poll() is None:
            proc.kill()
    assert got == b"Continue? yes\n"


def test_log_is_capped_with_one_rotation(corral: CorralCLI) -> None:
    agent = corral.agent()
    cap = 64 * 1024
    # ~10x the cap: 6400 lines of 100 bytes (records add ~27 bytes each)
    script = "i=0; while [ $i -lt 6400 ]; do printf '%099d\\n' $i; i=$((i+1)); done; echo last-line"
    run_id = corral.detach(agent, "sh", "-c", script, opts=("--log-max", "64K"))
    rec = _ended(corral, run_id)
    log = Path(rec["log"])
    rotated = log.with_name(log.name + ".1")
    assert log.exists() and rotated.exists()
    assert log.stat().st_size <= cap and rotated.stat().st_size <= cap
    assert corral("logs", "-n", "1", run_id, check=True).stdout == "last-line\n"
    lines = corral("logs", run_id, check=True).stdout.splitlines()
    assert 500 < len(lines) < 6401 and lines[-2] == f"{6399:099d}"  # the newest are kept, in order
    corral("gc", check=True)


def test_log_max_is_validated(corral: CorralCLI) -> None:
    agent = corral.agent()
    for bad in ("0", "1K", "lots"):
        out = corral("run", "--detach", "--log-max", bad, agent, "--", "true")
        assert out.returncode == 2, (bad, out.stdout, out.stderr)
        assert "log_max" in out.stderr and "Traceback" not in out.stderr
    assert not corral.scopes_of(agent)


def test_ended_run_keeps_peak_memory_cpu_and_duration(corral: CorralCLI) -> None:
    agent = corral.agent()
    script = ("import time\nb = bytearray(80 << 20)\nb[::4096] = b'x' * len(b[::4096])\ntime.sleep(1.5)\n"
              "t = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n")
    run_id = corral.detach(agent, "python3", "-c", script)
    rec = _ended(corral, run_id)
    assert rec["state"] == "exited"
    assert rec["peak_memory_bytes"] >= 80 << 20, rec
    assert rec["peak_memory_source"] in ("memory.peak", "sampled")
    assert rec["cpu_usec"] >= 300_000
    assert 1.5 <= rec["duration_s"] < 60
    (row,) = [r for r in corral.json("ps", "--all", "--json") if r["id"] == run_id]
    assert row["peak_memory_bytes"] == rec["peak_memory_bytes"] and row["cpu_usec"] == rec["cpu_usec"]
    text = corral("ps", "--all", agent, check=True).stdout
    assert "peak" in text and "exited(0) after" in text
    shown = corral("show", run_id, check=True).stdout
    assert "at its peak" in shown and "duration:" in shown


def test_attached_run_keeps_its_numbers_too(corral: CorralCLI) -> None:
    agent = corral.agent()
    corral("run", agent, "--", "sh", "-c", "sleep 0.5", check=True)
    (row,) = corral.json("ps", "--all", "--json", agent)
    assert row["peak_memory_bytes"] and row["cpu_usec"] is not None and row["duration_s"] >= 0.5


def test_show_draws_the_process_tree(corral: CorralCLI) -> None:
    agent = corral.agent()
    run_id = corral.detach(agent, "sh", "-c", "sleep 1000 & (sleep 1001 &); sleep 1002", opts=("--isolation", "none"))
    procs = corral.wait_for(lambda: [p for p in corral.show(run_id)["processes"] if "1002" in " ".join(p["argv"])]
                            and corral.show(run_id)["processes"], what="the run's processes")
    roles = {" ".join(p["argv"]): p["role"] for p in procs}
    assert roles["sleep 1000"] == "command" and roles["sleep 1002"] == "command"
    assert roles["sleep 1001"] == "leftover"  # its parent exited: no longer below main
    assert any(p["role"] == "main" and p["argv"][0] == "sh" for p in procs)
    assert any(p["role"] == "corral" for p in procs)
    assert all(isinstance(p["rss_bytes"], int) and p["rss_bytes"] > 0 for p in procs)
    text = corral("show", run_id, check=True).stdout
    assert "PID" in text and "ROLE" in text and "\u2514\u2500 " in text
    tree = text[text.index("processes:"):]
    assert tree.index("sh -c") < tree.index("sleep 1000")
    corral("kill", run_id, check=True)


def test_journal_has_the_run_lines(corral: CorralCLI) -> None:
    if corral.backend != "systemd":
        pytest.skip("the journal copy is made where systemd runs the run")
    journalctl = shutil.which("journalctl")
    assert journalctl, "systemd hosts have journalctl"
    agent = corral.agent()
    run_id = corral.detach(agent, "sh", "-c", "echo journal-out-1; echo journal-err-1 >&2")
    rec = _ended(corral, run_id)
    assert rec["journal"] is True
    user = os.geteuid() != 0
    unit_args = ["--user-unit" if user else "--unit", rec["unit"]]

    def lines(*match: str) -> list[str]:
        subprocess.run([journalctl, "--sync"], capture_output=True, timeout=30)
        out = subprocess.run([journalctl, "--no-pager", "-o", "cat", *match], capture_output=True, text=True,
                             timeout=30)
        return out.stdout.splitlines()

    got = corral.wait_for(lambda: {"journal-out-1", "journal-err-1"} <= set(lines(*unit_args)) and
                          lines(*unit_args), timeout=20, what="the run's lines in journalctl -u")
    assert "journal-out-1" in got
    tagged = lines(f"CORRAL_AGENT={agent}")
    assert {"journal-out-1", "journal-err-1"} <= set(tagged)
    assert set(lines(f"CORRAL_RUN_ID={run_id}", "CORRAL_STREAM=stderr")) == {"journal-err-1"}
