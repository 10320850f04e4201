"""Worker processes for the config stress tests (run as a script, not collected by pytest).

    python _config_workers.py hammer CONFIG WORKER COUNT   # COUNT updates via ConfigStore.update
    python _config_workers.py sigkill CONFIG TRIALS SEED    # SIGKILL a writer at random moments

Both wait for EOF on stdin before starting, so the test can release all workers at once.
``sigkill`` prints one JSON summary line; the test asserts on it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import filelock
import tomlkit

from corral.config.store import TEMP_SUFFIX, ConfigStore


def hammer(config: Path, worker: int, count: int) -> None:
    store = ConfigStore(config, lock_timeout=300)
    sys.stdin.read()  # the start gun: EOF when the test closes our stdin
    for i in range(count):
        def change(doc: Any, i: int = i) -> None:
            table = doc["stress"]
            table[f"w{worker}_{i}"] = i  # a distinct key per update
            table["counter"] = int(table["counter"]) + 1  # one shared counter
        store.update(change)


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[int(0.99 * (len(ordered) - 1))]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _setter(key: str, value: int) -> Callable[[Any], None]:
    def change(doc: Any) -> None:
        doc["state"][key] = value
    return change


def _expected(before: bytes, change: Callable[[Any], None]) -> bytes:
    doc = tomlkit.parse(before.decode())
    change(doc)
    return tomlkit.dumps(doc).encode()


def _writer_child(store: ConfigStore, go_r: int, change: Callable[[Any], None]) -> None:
    os.read(go_r, 1)
    try:
        store.update(change)
    finally:
        os._exit(0)


def _one_write(store: ConfigStore, change: Callable[[Any], None], kill_after: float | None) -> float:
    """Fork a writer, start it, SIGKILL it *kill_after* seconds later (None: let it finish).
    Returns how long the child lived after the start."""
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(go_w)
        _writer_child(store, go_r, change)
    os.close(go_r)
    os.write(go_w, b"g")
    start = time.perf_counter()
    if kill_after is not None:
        deadline = start + kill_after
        while time.perf_counter() < deadline:  # sleep() is too coarse for sub-ms moments
            pass
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    lived = time.perf_counter() - start
    os.close(go_w)
    return lived


def sigkill(config: Path, trials: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    store = ConfigStore(config, lock_timeout=5)
    directory = store.target.parent
    # How long a whole write takes from the start signal, so kill moments cover all of it.
    span = statistics.median(_one_write(store, _setter("warmup", n), None) for n in range(15))
    sys.stdin.read()
    outcomes = {"old": 0, "new": 0}
    bad: list[str] = []
    temps_left_by_kill = 0
    free_at_once = 0
    waits: list[float] = []
    next_writes: list[float] = []
    for trial in range(trials):
        before = config.read_bytes()
        change = _setter("trial", trial)
        after = _expected(before, change)
        _one_write(store, change, rng.uniform(0, span * 1.1))
        now = config.read_bytes()
        if _sha(now) == _sha(before):
            outcomes["old"] += 1
        elif _sha(now) == _sha(after):
            outcomes["new"] += 1
        else:
            bad.append(f"trial {trial}: sha256 {_sha(now)} is neither the old nor the new content")
        temps_left_by_kill += any(n.endswith(TEMP_SUFFIX) for n in os.listdir(directory))
        # The next writer: the lock must be free at once (a kernel lock dies with its holder)...
        fd = os.open(store.lock_path, os.O_RDWR)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                free_at_once += 1
            except BlockingIOError:
                fcntl.flock(fd, fcntl.LOCK_EX)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        # ...and what a writer sees (filelock's acquire, wall clock)...
        t0 = time.perf_counter()
        lock = filelock.FileLock(store.lock_path, timeout=5, poll_interval=0.001)
        lock.acquire()
        waits.append(time.perf_counter() - t0)
        lock.release()
        # ...and its write sweeps the temp file the killed writer may have left.
        t0 = time.perf_counter()
        store.update(_setter("after", trial))
        next_writes.append(time.perf_counter() - t0)
        leftovers = [n for n in os.listdir(directory) if n.endswith(TEMP_SUFFIX)]
        if leftovers:
            bad.append(f"trial {trial}: temp files left after the next write: {leftovers}")
    return {
        "trials": trials, "span_ms": span * 1e3, "outcomes": outcomes, "bad": bad[:20],
        "temps_left_by_kill": temps_left_by_kill,
        "lock_free_at_once": free_at_once, "p99_lock_wait_ms": _p99(waits) * 1e3,
        "max_lock_wait_ms": max(waits) * 1e3, "max_next_write_ms": max(next_writes) * 1e3,
        "p50_next_write_ms": statistics.median(next_writes) * 1e3,
    }


def main() -> None:
    mode, config = sys.argv[1], Path(sys.argv[2])
    if mode == "hammer":
        hammer(config, int(sys.argv[3]), int(sys.argv[4]))
    elif mode == "sigkill":
        print(json.dumps(sigkill(config, int(sys.argv[3]), int(sys.argv[4]))), flush=True)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
