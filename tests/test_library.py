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
