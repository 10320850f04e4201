"""``corral broker``: the unix socket (0600, peer uid checked, socket activation) and what
an agent run gets through it: an access token, never the refresh token (issue 6)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from _auth_util import CORRAL, Env, OAuthServer, setup_profile
from conftest import BACKENDS
from corral.auth.client import ask_broker

pytestmark = pytest.mark.timeout(60)

NOBODY = 65534


@pytest.fixture
def open_root() -> Iterator[Path]:
    """A base dir another uid can walk (pytest's tmp dirs are 0700), removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="corral-auth-"))
    os.chmod(root, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def env(open_root: Path, server: OAuthServer) -> Env:
    server.configure()
    e = Env(open_root)
    for sub in ("config", "state", "run"):
        os.chmod(open_root / sub, 0o755)
    return e


class BrokerProcess:
    def __init__(self, env: Env, *, argv_prefix: tuple[str, ...] = (), extra_env: dict[str, str] | None = None,
                 pass_fds: tuple[int, ...] = (), socket_path: Path | None = None) -> None:
        self.path = socket_path or env.dirs.runtime / "broker.sock"
        self.proc = subprocess.Popen([*argv_prefix, *CORRAL, "broker"], env={**env.env, **(extra_env or {})},
                                     stderr=subprocess.PIPE, text=True, pass_fds=pass_fds)
        deadline = time.monotonic() + 15
        while True:
            try:
                if ask_broker(self.path, {"op": "ping"}, timeout=2):
                    break
            except Exception:  # noqa: BLE001 -- not up yet
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"broker did not come up: {self.stop()}")
            time.sleep(0.02)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err


@pytest.fixture
def broker(env: Env, server: OAuthServer) -> Iterator[BrokerProcess]:
    setup_profile(env, server)
    b = BrokerProcess(env)
    yield b
    b.stop()


def _raw(path: Path, payload: bytes) -> dict:  # type: ignore[type-arg]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(payload)
        return json.loads(s.makefile("rb").readline())  # type: ignore[no-any-return]


def test_broker_socket_is_0600_and_serves_access_tokens_only(env: Env, server: OAuthServer,
                                                               broker: BrokerProcess) -> None:
    st = os.stat(broker.path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    assert stat.S_IMODE(os.stat(broker.path.parent).st_mode) == 0o700

    answer = _raw(broker.path, b'{"op": "token", "profile": "p1"}\n')
    stored = env.stored("p1")
    assert answer == {"ok": True, "profile": "p1", "access_token": stored["access_token"], "token_type": "Bearer",
                      "expires_at": stored["expires_at"]}
    assert server.stats()["token_requests"] == 1
    # The CLI finds the broker by itself and gets the same token; nothing is refreshed again.
    proc = env.cli("auth", "token", "p1")
    assert proc.stdout.strip() == stored["access_token"]
    assert server.stats()["token_requests"] == 1
    assert json.loads(env.cli("auth", "status", "--json").stdout)["broker"]["up"] is True

    assert _raw(broker.path, b"not json\n")["kind"] == "usage"
    assert _raw(broker.path, b'{"op": "token", "profile": "nope"}\n')["kind"] == "not_found"
    assert env.cli("auth", "token", "nope").returncode == 3  # the broker's error keeps its exit code
    assert env.cli("auth", "token", "p1").returncode == 0  # a bad request did not end the broker


def test_broker_refuses_other_uids(env: Env, broker: BrokerProcess) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to become another uid")

    def connect_as_nobody() -> dict:  # type: ignore[type-arg]
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                try:
                    out = {"answer": _raw(broker.path, b'{"op": "token", "profile": "p1"}\n')}
                except OSError as err:
                    out = {"errno": err.errno}
                os.write(w, json.dumps(out).encode())
            finally:
                os._exit(0)
        os.close(w)
        data = os.read(r, 65536)
        os.close(r)
        os.waitpid(pid, 0)
        return json.loads(data)  # type: ignore[no-any-return]

    import errno

    assert connect_as_nobody() == {"errno": errno.EACCES}  # the 0700 dir and 0600 mode keep it out
    os.chmod(broker.path.parent, 0o711)
    assert connect_as_nobody() == {"errno": errno.EACCES}  # the socket's own 0600 does
    # A socket whose mode lets others in (a passed socket, a hand-made unit): the peer
    # credential check still refuses, and no token is sent.
    os.chmod(broker.path, 0o666)
    got = connect_as_nobody()["answer"]
    assert got["ok"] is False and got["kind"] == "permission" and "uid 65534" in got["error"]
    assert "access_token" not in got
    assert "refused pid" in broker.stop()


def test_socket_activation_via_listen_fds(env: Env, server: OAuthServer) -> None:
    setup_profile(env, server)
    path = env.dirs.runtime / "activated.sock"
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    os.chmod(path, 0o600)
    listener.listen(16)
    fd = listener.fileno()
    # As systemd does it: the socket on fd 3, LISTEN_FDS=1, and LISTEN_PID set to the pid
    # of the broker itself (the shim execs into it, so its pid is the broker's).
    shim = ("import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); os.close(fd); "
            "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); os.execv(sys.argv[2], sys.argv[2:])")
    prefix = (sys.executable, "-c", shim, str(fd))
    b = BrokerProcess(env, argv_prefix=prefix, pass_fds=(fd,), socket_path=path)
    listener.close()  # only the broker holds it now
    try:
        assert _raw(path, b'{"op": "token", "profile": "p1"}\n')["access_token"] == env.stored("p1")["access_token"]
        assert not (env.dirs.runtime / "broker.sock").exists()  # it did not bind a socket of its own
    finally:
        log = b.stop()
    assert "socket passed by systemd" in log
    assert path.exists()  # the socket is systemd's: the broker leaves it in place


def test_a_second_broker_refuses_to_start(env: Env, broker: BrokerProcess) -> None:
    proc = env.cli("broker", timeout=10)
    assert proc.returncode == 75 and "already listening" in proc.stderr


@pytest.mark.skipif("cgroupfs" not in BACKENDS, reason="needs the cgroupfs backend")
def test_agent_run_sees_an_access_token_and_no_refresh_token(env: Env, server: OAuthServer,
                                                              broker: BrokerProcess) -> None:
    from corral import Corral, RunSpec

    from corral.auth import get_token

    get_token(env.dirs, "p1")  # signed in with a refresh token only: the first access token
    stored = env.stored("p1")
    access, refresh = stored["access_token"], stored["refresh_token"]

    out = env.root / "out"
    out.mkdir(mode=0o777)
    os.chmod(out, 0o777)
    corral_cmd = " ".join(CORRAL)
    # The agent: dump its environment; ask the broker for a token itself (CORRAL_AUTH_SOCKET);
    # list every file it can read under the state, runtime and config dirs that holds the
    # refresh token: as its own uid (the same as the broker's) and as another uid.
    script = f"""
        env > {out}/env
        {corral_cmd} auth token p1 > {out}/token 2> {out}/token.err
        find {env.root} -type f -readable ! -path '{out}/*' -exec grep -lF -f {out}/pattern {{}} + > {out}/same-uid 2>/dev/null
        true
    """
    # The same search outside any run, as another uid (a run has no capability to switch).
    other = f"""
        id -u > {out}/other-id
        find {env.root} -type f -readable ! -path "{out}/*" > {out}/other-readable 2>/dev/null
        find {env.root} -type f -readable ! -path "{out}/*" -exec grep -lF -f {out}/pattern {{}} + \
            > {out}/other-uid 2>/dev/null
        true"""
    # The probe gets the refresh token only as a pattern to look for, in a file of the
    # output dir it does not search (in argv it would land in the run's record).
    (out / "pattern").write_text(refresh + "\n")
    os.chmod(out / "pattern", 0o644)
    with Corral("cgroupfs", dirs=env.dirs) as c:
        run = c.run(RunSpec(agent="authprobe", argv=("sh", "-c", script), auth=("p1",),
                            env={"XDG_CONFIG_HOME": env.env["XDG_CONFIG_HOME"],
                                 "XDG_STATE_HOME": env.env["XDG_STATE_HOME"]}))
        record = run.wait()
    assert record.exit_code == 0 and record.grants == ["p1"]

    agent_env = (out / "env").read_text()
    assert f"CORRAL_ACCESS_TOKEN={access}\n" in agent_env
    # its own broker socket, which asks the broker service (one is listening) for tokens
    assert f"CORRAL_AUTH_SOCKET={env.dirs.runtime}/run-auth/{record.id}/auth.sock\n" in agent_env
    assert not (env.dirs.runtime / "run-auth" / record.id).exists(), "removed when the run ended"
    assert refresh not in agent_env
    assert (out / "token").read_text().strip() == access, (out / "token.err").read_text()
    # The refresh token is in exactly one file: the broker's 0600 store. Not in the run's
    # record or log, the config, the runtime dir. Another uid cannot read even that one.
    # Inside the run (isolation standard) corral's state dir is an empty tmpfs: the refresh
    # token is in no file the run can read, its own uid's 0600 store included.
    assert (out / "same-uid").read_text().split() == []
    subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--", "sh", "-c", other],
                   check=True)
    assert (out / "other-id").read_text().strip() == str(NOBODY)
    readable = (out / "other-readable").read_text().split()
    # config.toml (agents' env) and the records (argv, env) are the owner's alone too
    assert str(env.dirs.config / "config.toml") not in readable and not any("/runs/" in f for f in readable), readable
    assert (out / "other-uid").read_text().split() == []
    assert server.stats()["token_requests"] == 1


def test_concurrent_broker_clients_at_expiry_share_one_refresh(env: Env, server: OAuthServer,
                                                                broker: BrokerProcess) -> None:
    # The broker serves each connection in a thread; its threads go through the same
    # single-flight lock as separate processes do.
    server.configure(latency=0.2)
    clients = 32
    r, w = os.pipe()
    pids = []
    for _ in range(clients):
        pid = os.fork()
        if pid == 0:
            try:
                answer = _raw(broker.path, b'{"op": "token", "profile": "p1"}\n')
                os.write(w, (json.dumps(answer) + "\n").encode())
            finally:
                os._exit(0)
        pids.append(pid)
    os.close(w)
    with os.fdopen(r) as f:
        answers = [json.loads(line) for line in f]
    for pid in pids:
        os.waitpid(pid, 0)
    assert len(answers) == clients and all(a["ok"] for a in answers), answers[:2]
    assert {a["access_token"] for a in answers} == {env.stored("p1")["access_token"]}
    assert server.stats()["token_requests"] == 1


def test_sd_notify_reaches_the_notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Readiness without pystemd: one datagram to $NOTIFY_SOCKET, as systemd's sd_notify sends it."""
    import socket

    from corral.auth.broker import sd_notify

    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert sd_notify("READY=1")
        assert listener.recv(64) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not sd_notify("READY=1")  # not under systemd: nothing to tell
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert not sd_notify("READY=1")  # a socket that went away is not an error
