"""Pure functions: names, values, records. No processes."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from corral import InvalidName, RunRecord, UsageError
from corral.names import parse_scope_name, scope_name, validate_agent
from corral.records import RecordStore
from corral.units import parse_duration, parse_percent, parse_signal, parse_size


@pytest.mark.parametrize("name", ["lane1", "a", "Lane_2", "x" * 64, "9lives"])
def test_valid_agent_names(name: str) -> None:
    assert validate_agent(name) == name


@pytest.mark.parametrize("name", ["", "a-b", "../x", "a b", "x" * 65, "_x", "a.b", "é", "a\0b", "a/b"])
def test_invalid_agent_names(name: str) -> None:
    with pytest.raises(InvalidName) as err:
        validate_agent(name)
    assert isinstance(err.value, ValueError)
    assert err.value.exit_code == 2


def test_scope_names_round_trip() -> None:
    assert scope_name("lane1", "0a1b2c3d") == "corral-lane1-0a1b2c3d.scope"
    assert parse_scope_name("corral-lane1-0a1b2c3d.scope") == ("lane1", "0a1b2c3d")
    assert parse_scope_name("corral-lane1.slice") is None
    assert parse_scope_name("other-lane1-0a1b2c3d.scope") is None


@pytest.mark.parametrize("text,want", [("512M", 512 * 2**20), ("2G", 2 * 2**30), ("100", 100), ("1.5K", 1536)])
def test_sizes(text: str, want: int) -> None:
    assert parse_size(text) == want


@pytest.mark.parametrize("text,want", [("90s", 90), ("30m", 1800), ("2h", 7200), ("1.5", 1.5), ("500ms", 0.5),
                                       ("1h30m", 5400), ("2h 30min", 9000), ("1min 30s", 90), ("5 minutes", 300),
                                       ("2 weeks", 14 * 86400), ("3sec", 3), ("1 hour 5 minutes 3 seconds", 3903),
                                       ("250msec", 0.25), ("1d 2hr", 93600), ("90", 90)])
def test_durations(text: str, want: float) -> None:
    """systemd.time(7)'s spans, in its spellings, alone or summed."""
    assert parse_duration(text) == pytest.approx(want)


@pytest.mark.parametrize("bad", ["1h30", "5mins", "m", "1.5.5", "3 s 2", "h1", "1 fortnight", ""])
def test_bad_durations(bad: str) -> None:
    with pytest.raises(UsageError):
        parse_duration(bad)


@pytest.mark.parametrize("bad", ["lots", "-1", "0", "1x"])
def test_bad_values(bad: str) -> None:
    for parse in (parse_size, parse_duration):
        with pytest.raises(UsageError):
            parse(bad)


def test_percent_and_signal() -> None:
    assert parse_percent("150%") == 150.0
    with pytest.raises(UsageError):
        parse_percent("-5%")
    assert parse_signal("TERM") == signal.SIGTERM
    assert parse_signal("sigkill") == signal.SIGKILL
    assert parse_signal("9") == 9
    with pytest.raises(UsageError):
        parse_signal("NOPE")


def test_record_store_atomic_and_prefix(tmp_path: Path) -> None:
    store = RecordStore(tmp_path / "runs")
    rec = RunRecord(id="0a1b2c3d", agent="a", argv=["true"], cwd="/", backend="cgroupfs", unit="u",
                    cgroup="/sys/fs/cgroup/corral.slice/corral-a.slice/corral-a-0a1b2c3d.scope")
    store.save(rec)
    store.save(rec.replace(state="exited", exit_code=0))
    assert store.load("0a1b2c3d").exit_code == 0  # type: ignore[union-attr]
    assert store.resolve("0a1b") == "0a1b2c3d"
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["0a1b2c3d.json"], "no temp files left"
    data = json.loads((tmp_path / "runs" / "0a1b2c3d.json").read_text())
    assert data["state"] == "exited"
    with pytest.raises(LookupError):
        store.resolve("ffff")
    with pytest.raises(LookupError):
        store.resolve("../etc")


@pytest.mark.parametrize("bad", ["nan", "NaN%", "inf", "-inf"])
def test_non_finite_numbers_are_invalid(bad: str) -> None:
    with pytest.raises(UsageError):
        parse_percent(bad)
    with pytest.raises(UsageError):
        parse_duration(bad.rstrip("%"))


def test_durations_are_bounded() -> None:
    assert parse_duration("30d") == 30 * 86400  # longer than poll(2) can wait in one call
    with pytest.raises(UsageError):
        parse_duration("400d")
