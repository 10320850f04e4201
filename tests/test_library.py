"""The Python API the CLI is built on."""

from __future__ import annotations

from pathlib import Path

import pytest

import corral
from corral import Corral, Dirs, Limits, RunSpec


@pytest.fixture
def lib(backend: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    dirs = Dirs(config=tmp_path / "c", state=tmp_path / "s", runtime=tmp_path / "r")
    with Corral(backend, dirs=dirs) as c:
        yield c


def test_public_api_is_exported() -> None:
    for name in ("Corral", "RunSpec", "Limits", "Run", "CorralError", "RunNotFound"):
        assert name in corral.__all__
    # The literal __all__, the lazy-import table and the TYPE_CHECKING imports name the same things.
    assert set(corral.__all__) == set(corral._WHERE) | {"__version__"}
    for name in corral.__all__:
        assert getattr(corral, name) is not None


def test_attached_run_wait(lib: Corral, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = lib.run(RunSpec(agent="libtest", argv=("sh", "-c", f"echo $CORRAL_RUN_ID > {out}; exit 7")))
    record = run.wait()
    assert record.exit_code == 7 and record.state == "failed"
    assert out.read_text().strip() == run.id
    assert run.outcome is not None and run.outcome.shell_status == 7
    assert not run.cgroup.exists()


def test_detached_run_usage_and_kill(lib: Corral) -> None:
    run = lib.run(RunSpec(agent="libtest", argv=("sh", "-c", "sleep 1000 & sleep 1000"),
                          limits=Limits.parse(memory_max="1G")), detach=True)
    try:
        view = run.usage()
        assert view.state == "running"
        assert view.record.main_pid
        assert run.kill() == []
        assert lib.view(run.id).state == "killed"
    finally:
        if run.cgroup.exists():
            run.cgroup.kill()


def test_unknown_run_raises_lookup_error(lib: Corral) -> None:
    with pytest.raises(LookupError):
        lib.get("deadbeef")


def test_wait_timeout_is_honoured_for_a_run_this_process_owns(lib: Corral) -> None:
    import time

    run = lib.run(RunSpec(agent="libtest", argv=("sleep", "5")))
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        run.wait(timeout="1s")
    assert time.monotonic() - t0 < 4, "returned when the run ended, not at the timeout"
    assert run.cgroup.exists(), "a wait that times out leaves the run alone"
    run.kill()
    assert run.wait().state == "killed"


def test_a_run_is_a_context_manager_that_ends_it(lib: Corral) -> None:
    with lib.run(RunSpec(agent="libtest", argv=("sleep", "30"), grace=1)) as run:
        assert run.cgroup.exists()
    assert run.record.ended and not run.cgroup.exists()


def test_library_errors_are_the_matching_builtins(lib: Corral) -> None:
    with pytest.raises(TypeError, match="not the string"):
        RunSpec(agent="libtest", argv="echo hi")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError) as err:
        lib.run(RunSpec(agent="libtest", argv=("corral-no-such-program",)))
    assert getattr(err.value, "exit_code", None) == 127
    spec = RunSpec(agent="libtest", argv=[Path("/bin/true")], timeout="1h30m")  # type: ignore[list-item]
    assert spec.argv == ("/bin/true",) and spec.timeout == 5400


def test_one_durable_record_write_per_run(lib: Corral, monkeypatch: pytest.MonkeyPatch) -> None:
    """The start and running records are atomic but not fsynced (the live cgroup is the
    truth, records.py); the end is: one file and one directory fsync per run. Counted, not
    faked: the real os.fsync runs."""
    import os

    synced: list[str] = []
    real = os.fsync

    def counting(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    import uuid

    run = lib.run(RunSpec(agent="lib" + uuid.uuid4().hex[:8], argv=("true",)))
    record = run.wait()
    assert record.state == "exited"
    runs_dir = str(lib.store.dir)
    assert len(synced) == 2, synced
    assert synced[1] == runs_dir and synced[0].startswith(runs_dir + "/")  # the temp file, then its directory
    on_disk = lib.store.load(record.id)
    assert on_disk is not None and on_disk.state == "exited"
