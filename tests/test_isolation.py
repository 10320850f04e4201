"""A hostile payload tries, from inside a run, every attack of issue 11; each must fail.

Runs over every backend and tier (host cgroupfs as root; systemd in the container as root
and as uid 1001 under the user manager). After each attempt ``corral kill`` leaves 0
processes. The payloads are plain sh (and python for ioctls), as an agent would write them.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import shutil
import signal
import subprocess
import tempfile
import termios
import time
from pathlib import Path

import pytest

from conftest import CORRAL, CorralCLI, alive

ROOT = os.geteuid() == 0
SECRET = "rt-secret-0123456789abcdef"


def _cgroup_root() -> str:
    from corral.linux.cgroup import find_cgroup2_mount

    return str(find_cgroup2_mount())


def _run(corral: CorralCLI, agent: str, script: str, *opts: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return corral("run", *opts, agent, "--", "sh", "-c", script, timeout=timeout)


def _plant_secrets(corral: CorralCLI) -> list[Path]:
    """A refresh token in the auth store and in config.toml, and a run record: what a run
    must never read."""
    state = Path(corral.env["XDG_STATE_HOME"]) / "corral"
    config = Path(corral.env["XDG_CONFIG_HOME"]) / "corral"
    (state / "auth").mkdir(parents=True, exist_ok=True)
    (state / "runs").mkdir(parents=True, exist_ok=True)
    config.mkdir(parents=True, exist_ok=True)
    store = state / "auth" / "p1.json"
    store.write_text(json.dumps({"refresh_token": SECRET}))
    os.chmod(store, 0o600)
    (config / "config.toml").write_text(f'# {SECRET}\n[agents.x]\nenv = {{ T = "{SECRET}" }}\n')
    return [store, config / "config.toml", state / "runs"]


def _assert_all_gone(corral: CorralCLI, agent: str) -> None:
    proc = corral("kill", agent)
    assert proc.returncode == 0, proc.stderr
    for scope in corral.scopes_of(agent):
        assert "populated 0" in (scope / "cgroup.events").read_text()
    # nothing carries one of this agent's run ids outside its cgroups either
    from corral.linux.procs import escaped

    for record in corral.json("ps", "--all", "--json"):
        if record["agent"] == agent:
            assert escaped(record["id"], "/nonexistent") == [], record


def test_run_cannot_write_any_cgroup_file(corral: CorralCLI) -> None:
    agent = corral.agent()
    root, slices = _cgroup_root(), str(corral.slice_dir())
    script = f"""
        scope={slices}/corral-{agent}.slice/corral-{agent}-$CORRAL_RUN_ID.scope
        for f in {root}/cgroup.procs {slices}/cgroup.procs $scope/cgroup.procs $scope/supervisor/cgroup.procs \
                 $scope/supervisor/cgroup.freeze $scope/payload/cgroup.freeze $scope/cgroup.freeze \
                 {slices}/cgroup.kill $scope/supervisor/cgroup.kill; do
            if echo $$ > $f 2>/dev/null || echo 1 > $f 2>/dev/null; then echo "WROTE $f"; fi
        done
        mkdir {slices}/escape 2>/dev/null && echo "WROTE mkdir"
        mount -t cgroup2 none /mnt 2>/dev/null && echo "WROTE mount"
        # a nested user namespace with its own cgroup namespace: its root is our own leaf
        unshare -UrmC sh -c 'mount -t cgroup2 none /mnt && echo $$ > /mnt/cgroup.procs' 2>/dev/null
        sleep 1000 & echo started
        wait
    """
    p = corral.popen("run", agent, "--", "sh", "-c", script, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        corral.wait_for(lambda: [v for v in corral.json("ps", "--json") if v["agent"] == agent and v["pids"] >= 2],
                        what="the run and its sleep")
        # every process whose environment says it belongs to the run is still inside its scope
        from corral.linux.procs import escaped

        for v in corral.json("ps", "--json"):
            if v["agent"] == agent:
                assert escaped(v["id"], corral.show(v["id"])["cgroup"]) == []
        _assert_all_gone(corral, agent)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert "WROTE" not in out, out
    assert "started" in out


def test_run_cannot_see_or_signal_owner_watchdog_or_other_runs(corral: CorralCLI) -> None:
    agent = corral.agent()
    victim = corral.detach(agent, "sleep", "1000")
    rec = corral.show(victim)
    record_file = Path(corral.env["XDG_STATE_HOME"]) / "corral" / "runs" / f"{victim}.json"
    helpers = json.loads(record_file.read_text())["helper_pids"]
    theirs = sorted({rec["main_pid"], *helpers, os.getpid()})
    script = f"""
        n=$(ls /proc | grep -c '^[0-9]')
        echo "visible $n"
        for p in {' '.join(map(str, theirs))}; do
            [ -e /proc/$p ] && echo "SEEN $p"
            kill -STOP $p 2>/dev/null && echo "SIGNALLED $p"
            echo done > /proc/$p/fd/0 2>/dev/null && echo "WROTE $p"
        done
        kill -STOP -1 2>/dev/null
        kill -KILL -1 2>/dev/null
        echo end
    """
    proc = _run(corral, agent, script)
    assert "SEEN" not in proc.stdout and "SIGNALLED" not in proc.stdout and "WROTE" not in proc.stdout, proc.stdout
    visible = int(proc.stdout.split("visible ")[1].split()[0])
    assert visible <= 6, proc.stdout  # bwrap's init, sh, ls, grep (and their pipe)
    for pid in theirs:
        with open(f"/proc/{pid}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] not in ("T", "t"), pid
    assert corral.show(victim)["state"] == "running"
    _assert_all_gone(corral, agent)


def test_run_cannot_read_corral_config_records_or_token_store(corral: CorralCLI) -> None:
    agent = corral.agent()
    secrets = _plant_secrets(corral)
    other = corral.detach(agent, "sleep", "1000")
    script = " ; ".join(f"cat {p} 2>/dev/null; ls -a {p} 2>/dev/null; cat {p}/* 2>/dev/null" for p in secrets)
    script += f"; grep -rl {SECRET} {corral.tmp} /run /var/lib 2>/dev/null | head -5; echo end"
    proc = _run(corral, agent, script, "--env", "PATTERN=none", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert SECRET not in proc.stdout, proc.stdout
    assert f"{other}.json" not in proc.stdout
    assert "end" in proc.stdout
    # and nothing it could write there either
    proc = _run(corral, agent, f"echo x > {secrets[2]}/{other}.json && echo WROTE; "
                               f"echo x > {secrets[0]} && echo WROTE; true")
    assert "WROTE" not in proc.stdout
    assert json.loads(secrets[0].read_text()) == {"refresh_token": SECRET}
    _assert_all_gone(corral, agent)


def test_run_cannot_reach_the_service_manager(corral: CorralCLI) -> None:
    agent = corral.agent()
    marker = f"corral-escape-{agent}"
    script = f"""
        systemd-run --user --unit={marker}-u sleep 999 2>/dev/null && echo ESCAPED-user
        systemd-run --unit={marker}-s sleep 999 2>/dev/null && echo ESCAPED-system
        systemd-run --user --scope true 2>/dev/null && echo ESCAPED-scope
        busctl --user list 2>/dev/null | head -1 | grep -q . && echo ESCAPED-bus
        echo end
    """
    proc = _run(corral, agent, script)
    assert "ESCAPED" not in proc.stdout, proc.stdout
    assert "end" in proc.stdout
    if shutil.which("systemctl"):
        for flag in (["--user"] if not ROOT else []) + [[]]:  # type: ignore[operator]
            args = ["systemctl", *([flag] if flag else []), "is-active", f"{marker}-u", f"{marker}-s"]
            out = subprocess.run(args, capture_output=True, text=True).stdout
            assert "active\n" not in out.replace("inactive", ""), out
    _assert_all_gone(corral, agent)


def test_caller_environment_stays_out_unless_passed(corral: CorralCLI) -> None:
    agent = corral.agent()
    corral.env.update(AWS_SECRET_ACCESS_KEY="aws-" + SECRET, DBUS_SESSION_BUS_ADDRESS="unix:path=/x",
                      XDG_DATA_HOME="/x", LC_ALL="C.UTF-8")
    proc = corral("run", agent, "--env", "GIVEN=1", "--", "env", check=True)
    names = {line.split("=", 1)[0] for line in proc.stdout.splitlines()}
    assert "AWS_SECRET_ACCESS_KEY" not in names and "DBUS_SESSION_BUS_ADDRESS" not in names
    assert not any(n.startswith("XDG_") for n in names), names
    assert {"PATH", "LC_ALL", "GIVEN", "CORRAL_RUN_ID", "CORRAL_AGENT"} <= names
    corral("agents", "add", agent, check=True)
    corral("agents", "set", agent, "env_passthrough=AWS_*,XDG_DATA_HOME", check=True)
    out = corral("run", agent, "--", "env", check=True).stdout
    assert f"AWS_SECRET_ACCESS_KEY=aws-{SECRET}" in out and "XDG_DATA_HOME=/x" in out
    assert "DBUS_SESSION_BUS_ADDRESS" not in out
    # containment only: today's behaviour, everything inherited
    out = corral("run", "--isolation", "none", agent, "--", "env", check=True).stdout
    assert "DBUS_SESSION_BUS_ADDRESS=unix:path=/x" in out


def test_no_capabilities_and_no_new_privs(corral: CorralCLI) -> None:
    agent = corral.agent()
    out = corral("run", agent, "--", "grep", "-E", "^(Uid|CapEff|CapPrm|NoNewPrivs)", "/proc/self/status",
                 check=True).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines())
    assert int(fields["CapEff"].strip(), 16) == 0 and int(fields["CapPrm"].strip(), 16) == 0
    assert fields["NoNewPrivs"].strip() == "1"
    assert int(fields["Uid"].split()[0]) == os.geteuid()  # the workspace (tmp) is the caller's
    proc = _run(corral, agent, "umount /proc 2>/dev/null && echo UMOUNTED; "
                               "mount -t tmpfs none /mnt 2>/dev/null && echo MOUNTED; echo end")
    assert "UMOUNTED" not in proc.stdout and "MOUNTED" not in proc.stdout and "end" in proc.stdout
    show = corral.show(corral.json("ps", "--all", "--json")[-1]["id"])
    assert show["isolation"]["level"] == "standard"
    if ROOT:
        assert show["isolation"]["root"] == "uid 0 with no capabilities"


@pytest.mark.skipif(not ROOT, reason="only root can run as another user")
def test_root_runs_as_user_or_workspace_owner(corral: CorralCLI) -> None:
    import pwd

    nobody = pwd.getpwnam("nobody")
    agent = corral.agent()
    out = corral("run", "--user", "nobody", "--cwd", "/", agent, "--", "id", "-u", check=True).stdout
    assert out.strip() == str(nobody.pw_uid)
    ws = tempfile.mkdtemp(prefix="corral-ws-", dir="/tmp")
    try:
        os.chown(ws, nobody.pw_uid, nobody.pw_gid)
        os.chmod(ws, 0o755)
        out = corral("run", "--cwd", ws, agent, "--", "sh", "-c", "id -u; touch ok; grep CapEff /proc/self/status",
                     check=True).stdout
        assert out.split()[0] == str(nobody.pw_uid) and int(out.split()[-1], 16) == 0
        assert os.stat(os.path.join(ws, "ok")).st_uid == nobody.pw_uid
        corral("agents", "add", agent, check=True)
        corral("agents", "set", agent, "user=nobody", check=True)
        assert corral("run", "--cwd", "/", agent, "--", "id", "-u", check=True).stdout.strip() == str(nobody.pw_uid)
        # full root only at --isolation none, and show says so
        out = corral("run", "--isolation", "none", "--user", "root", agent, "--", "grep", "CapEff", "/proc/self/status",
                     check=True).stdout
        assert int(out.split()[-1], 16) != 0
        last = corral.json("ps", "--all", "--json")[-1]["id"]
        assert corral.show(last)["isolation"]["root"] == "full root (no isolation)"
    finally:
        shutil.rmtree(ws, ignore_errors=True)
    assert corral("run", "--user", "no-such-user-x", agent, "--", "true").returncode == 2


class Terminal:
    """A pty standing in for the user's terminal, with corral as its foreground job."""

    def __init__(self, corral: CorralCLI, *args: str, rows: int = 33, cols: int = 101) -> None:
        import struct

        self.master, self.slave = pty.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.output = b""

        def own_terminal() -> None:  # the caller's shell: corral runs in the terminal's session
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen([*CORRAL, *args], env=corral.env, stdin=self.slave, stdout=self.slave,
                                     stderr=self.slave, preexec_fn=own_terminal)

    def read_until(self, needle: bytes, timeout: float = 30) -> bytes:
        import select

        deadline = time.monotonic() + timeout
        while needle not in self.output and time.monotonic() < deadline:
            if select.select([self.master], [], [], 0.1)[0]:
                try:
                    self.output += os.read(self.master, 4096)
                except OSError:
                    break
        assert needle in self.output, self.output
        return self.output

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def finish(self, timeout: float = 30) -> int:
        import select

        code = self.proc.wait(timeout=timeout)
        while select.select([self.master], [], [], 0.2)[0]:  # what corral relayed before it exited
            try:
                self.output += os.read(self.master, 4096)
            except OSError:
                break
        return code

    def pending_input(self) -> int:
        """Bytes queued in the terminal's input: what the caller's shell would read next."""
        return int.from_bytes(fcntl.ioctl(self.slave, termios.FIONREAD, b"\0\0\0\0"), "little")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        os.close(self.slave)


def test_attached_run_on_a_terminal_cannot_type_into_it(corral: CorralCLI) -> None:
    agent = corral.agent()
    probe = ("import fcntl, termios, os\n"
             "try:\n    fcntl.ioctl(0, termios.TIOCSTI, b'X'); print('queued into', os.ttyname(0))\n"
             "except OSError as e:\n    print('refused', e.errno)\n"
             "print('tty', os.isatty(0), os.isatty(1), os.ttyname(0))\n")
    term = Terminal(corral, "run", agent, "--", "python3", "-c", probe)
    try:
        assert term.finish() == 0
        out = term.read_until(b"tty True True")
        # The run is on a terminal, but its own: whatever it queued went to itself.
        assert os.ttyname(term.slave).encode() not in out.split(b"tty True True", 1)[1], out
        time.sleep(0.1)
        assert term.pending_input() == 0  # nothing for the caller's shell to run after corral
        # and corral gave the terminal back in the mode it found it
        assert termios.tcgetattr(term.slave)[3] & termios.ICANON
    finally:
        term.close()


def test_terminal_relay_keys_size_input_and_exit_status(corral: CorralCLI) -> None:
    agent = corral.agent()
    script = ("stty size; read line; echo \"got $line\"; "
              "trap 'echo got-int; exit 9' INT; echo ready; while :; do sleep 0.05; done")
    term = Terminal(corral, "run", agent, "--", "sh", "-c", script, rows=33, cols=101)
    try:
        term.read_until(b"33 101")
        term.type(b"hello\r")
        term.read_until(b"got hello")
        term.read_until(b"ready")
        term.type(b"\x03")  # Ctrl-C on the user's terminal
        assert term.finish() == 9
        assert b"got-int" in term.output
    finally:
        term.close()
    term = Terminal(corral, "run", agent, "--", "sh", "-c", "exit 7")
    try:
        assert term.finish() == 7
    finally:
        term.close()
    shown = corral("show", corral.json("ps", "--all", "--json")[-1]["id"])
    assert "own pty" in shown.stdout, shown.stdout


def test_a_run_with_a_garbage_record_is_listed_and_killable(corral: CorralCLI) -> None:
    agent = corral.agent()
    runs = Path(corral.env["XDG_STATE_HOME"]) / "corral" / "runs"
    for how in ("id", "agent", "gc"):
        run_id = corral.detach(agent, "sh", "-c", "sleep 1000 & sleep 1000")
        (runs / f"{run_id}.json").write_text("{garbage")
        listed = {v["id"]: v for v in corral.json("ps", "--json")}
        assert listed[run_id]["state"] == "unknown" and str(runs / f"{run_id}.json") in listed[run_id]["problem"]
        assert corral.show(run_id)["state"] == "unknown"
        if how == "gc":
            report = corral.json("gc", "--json")
            assert run_id in [r["id"] for r in report["reaped"]]
        else:
            assert corral("kill", run_id if how == "id" else agent).returncode == 0
        assert run_id not in {v["id"] for v in corral.json("ps", "--json")}
        assert not [s for s in corral.scopes_of(agent) if run_id in s.name and
                    "populated 1" in (s / "cgroup.events").read_text()]


def test_strict_leaves_only_workspace_tmp_and_home_writable(corral: CorralCLI) -> None:
    agent = corral.agent()
    ws = corral.tmp / "ws"
    extra = corral.tmp / "extra"
    ws.mkdir()
    extra.mkdir()
    outside_dir = Path(tempfile.mkdtemp(prefix=f"{agent}-", dir="/var/tmp"))  # neither /tmp nor the workspace
    os.chmod(outside_dir, 0o777)
    outside = outside_dir / "outside"
    corral("agents", "add", agent, "--workspace", str(ws), check=True)
    corral("agents", "set", agent, "isolation=strict", f"rw_paths={extra}", check=True)
    script = f"""
        touch {ws}/in-ws && echo ws-ok
        touch {extra}/in-extra && echo extra-ok
        touch {outside} 2>/dev/null && echo WROTE-outside
        touch /etc/corral-strict-probe 2>/dev/null && echo WROTE-etc
        touch /tmp/private && echo tmp-ok
        echo kept >> $HOME/.history; cat $HOME/.history | wc -l
    """
    out = corral("run", agent, "--", "sh", "-c", script, check=True).stdout
    assert "ws-ok" in out and "extra-ok" in out and "tmp-ok" in out and "WROTE" not in out, out
    assert not outside.exists() and not os.path.exists("/etc/corral-strict-probe")
    assert not os.path.exists("/tmp/private") or os.stat("/tmp/private").st_mtime < time.time() - 60
    out2 = corral("run", agent, "--", "sh", "-c", script, check=True).stdout
    assert out.split()[-1] == "1" and out2.split()[-1] == "2"  # the per-agent home persists
    shutil.rmtree(outside_dir)


def test_network_loopback_and_none(corral: CorralCLI) -> None:
    agent = corral.agent()
    probe = ("import socket\n"
             "for fam in (socket.AF_INET, socket.AF_INET6):\n"
             "    try:\n        socket.socket(fam).close(); print(int(fam), 'ok')\n"
             "    except OSError as e:\n        print(int(fam), 'denied', e.errno)\n"
             "print('ifaces', sorted(l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:]))\n")
    out = corral("run", "--network", "loopback", agent, "--", "python3", "-c", probe, check=True).stdout
    assert "ifaces ['lo']" in out and "2 ok" in out
    out = corral("run", "--network", "none", agent, "--", "python3", "-c", probe, check=True).stdout
    assert "2 denied 97" in out and "10 denied 97" in out and "ifaces ['lo']" in out


def test_signals_reach_the_sandboxed_command(corral: CorralCLI) -> None:
    agent = corral.agent()
    script = "trap 'echo got-term; exit 7' TERM; sleep 1000 & wait"
    p = corral.popen("run", agent, "--", "sh", "-c", script, stdout=subprocess.PIPE, text=True)
    corral.wait_for(lambda: [v for v in corral.json("ps", "--json") if v["agent"] == agent and v["pids"] >= 2],
                    what="the run")
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=30)
    assert "got-term" in out and p.returncode == 7
    p = corral.popen("run", agent, "--", "sleep", "1000")
    corral.wait_for(lambda: [v for v in corral.json("ps", "--json") if v["agent"] == agent and v["pids"] >= 1],
                    what="the run")
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=30) == 130
    last = corral.json("ps", "--all", "--json")[-1]
    assert last["signal"] == signal.SIGINT and last["state"] == "killed"
    assert not alive([last["main_pid"]])
