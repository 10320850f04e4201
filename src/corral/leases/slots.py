"""An agent's concurrency cap (``max_runs``): N slot files, each an flock.

A run holds one slot for its whole life, on corral's side of the run (the owner), like a
session lease: the kernel frees it when the owner dies, so a slot can never go stale.
A slot records the run holding it, so "the agent is at its cap" can say which runs.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import Busy, translate_oserror
from ..names import validate_agent
from ..paths import Dirs
from ..records import now_iso

POLL_START, POLL_MAX = 0.005, 0.1  # seconds: no kernel event says "one of N flocks is free"


class AgentBusy(Busy):
    """The agent already has ``max_runs`` runs."""

    def __init__(self, agent: str, max_runs: int, holders: list[str]) -> None:
        runs = ", ".join(holders) or "?"
        super().__init__(
            f"agent {agent} is at its cap of {max_runs} run(s): {runs}",
            hint=f"wait for one to end (drop --no-wait), or end one: corral stop <id>; raise it with: "
            f"corral agents set {agent} max_runs=N",
        )
        self.agent, self.max_runs, self.holders = agent, max_runs, holders


class Slot:
    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd
        self._holder: dict[str, Any] = {"since": now_iso(), "owner_pid": os.getpid()}

    @classmethod
    def acquire(cls, dirs: Dirs, agent: str, max_runs: int, *, wait: bool = True, timeout: float | None = None,
                on_wait: Callable[[str], None] | None = None) -> Slot:
        validate_agent(agent)
        directory = dirs.runtime / "agents" / agent
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as err:
            raise translate_oserror(err, what="create slot dir", path=str(directory)) from err
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = POLL_START
        told = False
        while True:
            for i in range(max_runs):
                path = directory / f"slot.{i}"
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                slot = cls(path, fd)
                slot._write()
                return slot
            holders = _holders(directory, max_runs)
            if not wait or (deadline is not None and time.monotonic() >= deadline):
                raise AgentBusy(agent, max_runs, holders)
            if not told and on_wait is not None:
                on_wait(f"agent {agent} is at its cap of {max_runs} run(s) ({', '.join(holders)}); waiting for one to end")
                told = True
            time.sleep(delay)
            delay = min(delay * 2, POLL_MAX)

    def _write(self) -> None:
        data = json.dumps(self._holder).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def update_holder(self, **fields: Any) -> None:
        if self._fd < 0:
            return
        self._holder.update({k: v for k, v in fields.items() if k in ("run_id", "main_pid", "owner_pid", "cgroup")})
        self._write()

    def fileno(self) -> int:
        return self._fd

    def release(self) -> None:
        """Free the slot for every process sharing it (a forked owner and its parent)."""
        if self._fd < 0:
            return
        try:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self.close()

    def fds(self) -> list[int]:
        return [self._fd] if self._fd >= 0 else []

    def rebind(self, moved: Mapping[int, int]) -> None:
        """In the shared owner: the same open file, received under another number."""
        self._fd = moved.get(self._fd, -1)

    def close(self) -> None:
        """Drop this process's fd only; the lock lasts while another process keeps it."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


def _holders(directory: Path, max_runs: int) -> list[str]:
    out = []
    for i in range(max_runs):
        try:
            data = json.loads((directory / f"slot.{i}").read_bytes() or b"{}")
        except (OSError, ValueError):
            continue
        if data.get("run_id"):
            out.append(str(data["run_id"]))
    return out
