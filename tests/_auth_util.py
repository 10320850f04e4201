"""Helpers for the auth tests: the OAuth server process, private corral dirs, forked workers.

Workers are real processes forked from the test process after corral is imported: each
has its own fds and address space and contends through the same flock as independent
``corral auth token`` processes would, without paying ~0.15 s of interpreter start-up
each (hundreds of them run here, on 2 CPUs).
"""

from __future__ import annotations

import json
import math
import os
import select
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.paths import Dirs

HERE = Path(__file__).resolve().parent
CORRAL = [sys.executable, "-m", "corral.cli.main"]
STOP_ENV = "CORRAL_AUTH_TEST_STOP_AT"
REAUTH = "sign in again: corral auth login p1"  # the message for profile p1 when only a new sign-in helps

# Only 127.0.0.1: never let a proxy from the environment see the test traffic.
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _stand_apart() -> None:
    """The server stands in for a provider on another machine: it should not queue for
    CPU behind the 64 test processes it serves, on a 2-CPU VM. Root may raise its priority."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, -20)
    except OSError:
        pass


class OAuthServer:
    """The server of ``_auth_server.py``, in a process of its own."""

    def __init__(self) -> None:
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        self.proc = subprocess.Popen([sys.executable, str(HERE / "_auth_server.py")], stdout=subprocess.PIPE,
                                     env=env, text=True, preexec_fn=_stand_apart)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 20)
        assert ready, "the OAuth test server did not start"
        self.port = int(self.proc.stdout.readline())
        self.base = f"http://127.0.0.1:{self.port}"
        self.token_url = f"{self.base}/token"

    def call(self, path: str, data: dict[str, Any] | None = None) -> Any:
        body = json.dumps(data).encode() if data is not None else (b"" if path != "/stats" else None)
        req = urllib.request.Request(self.base + path, data=body, method="GET" if body is None else "POST")
        with _LOCAL.open(req, timeout=10) as resp:
            return json.loads(resp.read())

    def stats(self) -> dict[str, Any]:
        return self.call("/stats")  # type: ignore[no-any-return]

    def mint(self) -> dict[str, Any]:
        return self.call("/mint")  # type: ignore[no-any-return]

    def configure(self, *, latency: float = 0.0, lifetime: float = 3600.0) -> None:
        self.call("/config", {"latency": latency, "lifetime": lifetime})
        self.call("/reset")

    def refresh_directly(self, refresh_token: str) -> tuple[int, dict[str, Any]]:
        """Spend *refresh_token* as another tool holding a copy of it would."""
        from urllib.parse import urlencode

        req = urllib.request.Request(self.token_url, data=urlencode(
            {"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": "corral-test"}).encode())
        try:
            with _LOCAL.open(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Env:
    """Private corral dirs, as Dirs for the library and as XDG variables for the CLI."""

    root: Path
    dirs: Dirs = field(init=False)
    env: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        xdg = {"XDG_CONFIG_HOME": self.root / "config", "XDG_STATE_HOME": self.root / "state",
               "XDG_RUNTIME_DIR": self.root / "run"}
        for path in xdg.values():
            path.mkdir(parents=True, exist_ok=True)
        self.dirs = Dirs(config=xdg["XDG_CONFIG_HOME"] / "corral", state=xdg["XDG_STATE_HOME"] / "corral",
                         runtime=xdg["XDG_RUNTIME_DIR"] / "corral")
        self.env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and not k.startswith("CORRAL_")}
        self.env.update({k: str(v) for k, v in xdg.items()})
        self.env["PYTHONDONTWRITEBYTECODE"] = "1"

    def cli(self, *args: str, input: str | None = None, timeout: float = 30,
            extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([*CORRAL, *args], env={**self.env, **(extra_env or {})}, input=input,
                              capture_output=True, text=True, timeout=timeout)

    def store_path(self, profile: str) -> Path:
        return self.dirs.state / "auth" / f"{profile}.json"

    def stored(self, profile: str) -> dict[str, Any]:
        return json.loads(self.store_path(profile).read_text())  # type: ignore[no-any-return]


def setup_profile(env: Env, server: OAuthServer, name: str = "p1", *, expired: bool = True,
                  refresh_window: float | None = None) -> dict[str, Any]:
    """Add profile *name* and sign it in with a freshly minted pair (its access token
    already expired when *expired*). Returns the minted pair."""
    from corral.auth import add_profile, login

    add_profile(env.dirs, name, token_url=server.token_url, client_id="corral-test",
                refresh_window=refresh_window, update=True)
    pair = server.mint()
    login(env.dirs, name, refresh_token=pair["refresh_token"], access_token=pair["access_token"],
          expires_at=time.time() - 1 if expired else time.time() + pair["expires_in"], source="test")
    return pair


# --- forked workers -----------------------------------------------------------------------


@dataclass
class Worker:
    pid: int
    out: int  # read end of the worker's result pipe

    def result(self, timeout: float = 30.0, *, reap: bool = True) -> dict[str, Any]:
        ready, _, _ = select.select([self.out], [], [], timeout)
        data = os.read(self.out, 65536) if ready else b""
        os.close(self.out)
        if reap or not data:
            _reap(self.pid, block=bool(data))
        if not data:
            raise AssertionError(f"worker {self.pid} gave no result within {timeout}s")
        return json.loads(data)  # type: ignore[no-any-return]


class Gate:
    """Starts forked workers at one moment (*go*) and keeps them alive until all have
    reported (*hold*): a child forked from pytest takes ~1 ms of CPU to exit (its copy of
    a large address space is torn down), and 63 exits would compete with the workers still
    waiting for their token, which is not what is being measured."""

    def __init__(self) -> None:
        self.go_r, self.go_w = os.pipe()
        self.hold_r, self.hold_w = os.pipe()
        self.workers: list[Worker] = []

    def fork(self, dirs: Dirs, profile: str, **kw: Any) -> Worker:
        worker = fork_worker(dirs, profile, go=self.go_r, hold=self.hold_r, **kw)
        self.workers.append(worker)
        return worker

    def release(self) -> float:
        """Let them all go; returns the moment (monotonic)."""
        t_go = time.monotonic()
        os.write(self.go_w, b"x")
        return t_go

    def results(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        try:
            return [w.result(timeout, reap=False) for w in self.workers]
        finally:
            os.write(self.hold_w, b"x")
            for w in self.workers:
                _reap(w.pid, block=True)
            for fd in (self.go_r, self.go_w, self.hold_r, self.hold_w):
                os.close(fd)


def _reap(pid: int, *, block: bool) -> None:
    try:
        os.waitpid(pid, 0 if block else os.WNOHANG)
    except ChildProcessError:
        pass


def fork_worker(dirs: Dirs, profile: str, *, go: int | None = None, hold: int | None = None,
                timeout: float = 10.0, stop_at: str | None = None) -> Worker:
    """A process that (once the pipe *go* is readable, if given) calls ``get_token``
    and reports ``{ok, token | kind, message, exit_code, t0, t1}`` (monotonic clock)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 0
        try:
            os.close(r)
            if stop_at:
                os.environ[STOP_ENV] = stop_at
            else:
                os.environ.pop(STOP_ENV, None)
            from corral.auth import TokenStore, get_profile, get_token
            from corral.errors import CorralError

            if go is not None:
                # A process that has been running a while, asking at expiry: warm (its
                # pages copied after fork, the config and store read once), then wait.
                get_profile(dirs, profile)
                TokenStore.of(dirs, profile).load()
                # Wait for the go pipe to become readable, without reading: poll wakes every
                # waiter at once, where a blocking read on a pipe wakes readers one after
                # another (exclusive waits: ~3 ms each, 200 ms for 64).
                select.select([go], [], [])
            t0 = time.monotonic()
            try:
                tok = get_token(dirs, profile, timeout=timeout)
                res: dict[str, Any] = {"ok": True, "token": tok.access_token}
            except CorralError as err:
                res = {"ok": False, "kind": type(err).__name__, "message": str(err), "exit_code": err.exit_code}
            res.update(t0=t0, t1=time.monotonic(), pid=os.getpid())
            os.write(w, json.dumps(res).encode())
            if hold is not None:
                select.select([hold], [], [])
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    return Worker(pid, r)


def wait_stopped(pid: int, timeout: float = 10.0) -> None:
    """Until *pid* (our child) has stopped itself with SIGSTOP."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got, status = os.waitpid(pid, os.WUNTRACED | os.WNOHANG)
        if got == pid:
            if os.WIFSTOPPED(status):
                return
            raise AssertionError(f"worker {pid} ended (status {status}) instead of stopping")
        time.sleep(0.002)
    raise AssertionError(f"worker {pid} did not reach its stop point")


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]
