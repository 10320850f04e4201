"""Parsing of sizes, durations, percentages and signals given on the command line."""

from __future__ import annotations

import math
import re
import signal as _signal
from typing import Any

from .errors import UsageError

_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
MAX_DURATION = 366 * 86400.0  # a year: longer is a typo, not a deadline
# systemd.time(7)'s time spans (months and years are left out: beyond the one-year cap).
_DURATION_UNITS = {
    "": 1,
    **dict.fromkeys(("us", "usec", "µs", "μs"), 1e-6),
    **dict.fromkeys(("ms", "msec"), 1e-3),
    **dict.fromkeys(("s", "sec", "second", "seconds"), 1),
    **dict.fromkeys(("m", "min", "minute", "minutes"), 60),
    **dict.fromkeys(("h", "hr", "hour", "hours"), 3600),
    **dict.fromkeys(("d", "day", "days"), 86400),
    **dict.fromkeys(("w", "week", "weeks"), 604800),
}
# longest first, so that "min" is not read as "m" + "in", nor "ms" as "m" + "s"
_UNIT_RE = "|".join(sorted((re.escape(u) for u in _DURATION_UNITS if u), key=len, reverse=True))


MAX_SIZE = 1 << 60  # 1 EiB: beyond it the kernel and systemd overflow; it is a typo
MAX_TASKS = 4194304  # the kernel's PID_MAX_LIMIT: pids.max can't usefully be higher
MIN_CPU_QUOTA = 1.0  # percent: cgroup v2 cpu.max takes at least 1 ms per 100 ms period


def parse_size(text: str | int) -> int:
    """``512M``, ``2G``, ``1048576`` -> bytes (base 1024, as systemd does)."""
    if isinstance(text, bool):
        raise UsageError(f"invalid size {text!r}", hint="use bytes or K/M/G/T, e.g. 512M or 2G")
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
        if not m:
            raise UsageError(f"invalid size {text!r}", hint="use bytes or K/M/G/T, e.g. 512M or 2G")
        value = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    if value <= 0:
        raise UsageError(f"invalid size {text!r}: must be greater than 0")
    if value > MAX_SIZE:
        raise UsageError(f"invalid size {text!r}: the largest is 1024P (1 EiB)")
    return value


MIN_LOG_MAX = 4096
DEFAULT_LOG_MAX = 10 << 20  # per file; a run's log takes at most twice this


def parse_log_max(value: str | int) -> int:
    """``log_max``: the size at which a run's log is rotated (its log takes at most twice it)."""
    try:
        size = parse_size(value)
    except UsageError as err:
        raise UsageError(f"log_max: {err.message}", hint=f"a size of at least {MIN_LOG_MAX // 1024}K, e.g. 10M") \
            from None
    if size < MIN_LOG_MAX:
        raise UsageError(f"log_max {value!r} is too small", hint=f"at least {MIN_LOG_MAX // 1024}K, e.g. 10M")
    return size


def parse_duration(text: str | float, *, allow_zero: bool = False) -> float:
    """``90s``, ``30m``, ``2h``, ``1h30m``, ``2h 30min``, ``1.5`` -> seconds: systemd.time's
    spans (us..weeks, in its spellings). A bare number is seconds. NaN, infinities,
    negatives, zero (unless *allow_zero*) and more than a year are a UsageError."""
    if isinstance(text, bool):
        raise UsageError(f"invalid duration {text!r}", hint="use e.g. 90s, 30m, 2h, 1h30m")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        raw = str(text).strip()
        parts = re.findall(rf"(\d+(?:\.\d+)?)\s*({_UNIT_RE})?\s*", raw)
        if not raw or not re.fullmatch(rf"(?:\d+(?:\.\d+)?\s*(?:{_UNIT_RE})?\s*)+", raw) or \
                (len(parts) > 1 and not all(unit for _n, unit in parts)):
            raise UsageError(f"invalid duration {text!r}", hint="use e.g. 90s, 30m, 2h, 1h30m")
        value = sum(float(n) * _DURATION_UNITS[unit] for n, unit in parts)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = "0 or more" if allow_zero else "greater than 0"
        raise UsageError(f"invalid duration {text!r}: must be a finite number {bound}")
    if value > MAX_DURATION:
        raise UsageError(f"invalid duration {text!r}: the longest is {MAX_DURATION / 86400:.0f} days")
    return value


def parse_percent(text: str | float) -> float:
    """``150%`` or ``150`` -> 150.0 (percent of one CPU, as systemd's CPUQuota)."""
    raw = str(text).strip().rstrip("%").strip()
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"invalid CPU quota {text!r}", hint="use a percentage of one CPU, e.g. 50% or 200%") from None
    if not math.isfinite(value) or value <= 0 or value > 100_000:
        raise UsageError(f"invalid CPU quota {text!r}: must be between 0% and 100000%")
    if value < MIN_CPU_QUOTA:
        raise UsageError(f"invalid CPU quota {text!r}: the smallest the kernel enforces is {MIN_CPU_QUOTA:g}%")
    return value


def parse_positive_int(text: str | float, what: str, *, maximum: int | None = None) -> int:
    """A whole number > 0 (and <= *maximum*). ``1.5``, ``inf``, ``true`` are errors, not 1."""
    if isinstance(text, bool) or (isinstance(text, float) and not (math.isfinite(text) and text.is_integer())):
        raise UsageError(f"invalid {what} {text!r}: not a whole number")
    try:
        value = int(text)
    except (TypeError, ValueError, OverflowError):
        raise UsageError(f"invalid {what} {text!r}: not a whole number") from None
    if value <= 0:
        raise UsageError(f"invalid {what} {text!r}: must be greater than 0")
    if maximum is not None and value > maximum:
        raise UsageError(f"invalid {what} {text!r}: at most {maximum}")
    return value


def parse_signal(text: str | int) -> int:
    """``KILL``, ``SIGTERM``, ``9`` -> signal number."""
    if isinstance(text, int) or str(text).isdigit():
        num = int(text)
        try:
            _signal.Signals(num)
        except ValueError:
            raise UsageError(f"invalid signal {text!r}") from None
        return num
    name = str(text).upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(_signal.Signals[name])
    except KeyError:
        raise UsageError(f"invalid signal {text!r}", hint="use a name like TERM or KILL, or a number") from None


def format_bytes(value: int | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "K", "M", "G"):
        if value < 1024 or unit == "G":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024  # type: ignore[assignment]
    return str(value)


def format_limit(key: str, value: Any) -> str:
    """A limit as a person reads it: memory limits in K/M/G (records keep bytes, as the
    kernel does), the others as they are."""
    if key.startswith("memory") and isinstance(value, int) and not isinstance(value, bool):
        return format_bytes(value)
    return "-" if value is None else str(value)


def parse_env_pairs(pairs: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``("K=V", ...)`` from repeated ``--env`` flags -> a dict; a pair without '=' is an error."""
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"invalid --env {pair!r}: use KEY=VALUE")
        env[key] = value
    return env
