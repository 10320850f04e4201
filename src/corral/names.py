"""Agent names, run ids and the unit / cgroup names built from them.

Names become systemd unit names and cgroup directories, so they are validated, not
escaped: a dash would add a slice level (``corral-a-b.slice`` is a child of
``corral-a.slice``), a slash or dot-dot would leave the tree, whitespace and control
characters break tools. What is allowed is small on purpose.
"""

from __future__ import annotations

import os
import re

from .errors import InvalidName

AGENT_NAME_MAX = 64
_AGENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_]*")
_RUN_ID_RE = re.compile(r"[0-9a-f]{8}")
RUN_ID_BYTES = 4

ROOT_SLICE = "corral.slice"


def validate_agent(name: str) -> str:
    """Return *name* if it can be an agent name, else raise :class:`InvalidName` (exit 2)."""
    if not isinstance(name, str) or not name:
        raise InvalidName("agent name is empty", hint="use letters, digits and '_', e.g. lane1")
    if len(name) > AGENT_NAME_MAX:
        raise InvalidName(
            f"agent name is {len(name)} characters long; the limit is {AGENT_NAME_MAX}",
            hint="choose a shorter name",
        )
    if not _AGENT_RE.fullmatch(name):
        bad = sorted({c for c in name if not (c.isascii() and (c.isalnum() or c == "_"))})
        why = "a dash would add a slice level" if "-" in bad else f"characters not allowed: {bad!r}"
        if not bad:
            why = "it must start with a letter or digit"
        raise InvalidName(
            f"invalid agent name {name!r}: {why}",
            hint="use letters, digits and '_' only, starting with a letter or digit (e.g. lane_1)",
        )
    return name


def new_run_id() -> str:
    return os.urandom(RUN_ID_BYTES).hex()  # not secrets: it drags in hashlib/hmac at start-up


def is_run_id(text: str) -> bool:
    return bool(_RUN_ID_RE.fullmatch(text))


def agent_slice(agent: str) -> str:
    return f"corral-{agent}.slice"


def scope_name(agent: str, run_id: str) -> str:
    return f"corral-{agent}-{run_id}.scope"


def parse_scope_name(name: str) -> tuple[str, str] | None:
    """``corral-lane1-0a1b2c3d.scope`` -> ``("lane1", "0a1b2c3d")``; None if not ours."""
    m = re.fullmatch(r"corral-([A-Za-z0-9][A-Za-z0-9_]*)-([0-9a-f]{8})\.scope", name)
    return (m.group(1), m.group(2)) if m else None


def parse_agent_slice(name: str) -> str | None:
    m = re.fullmatch(r"corral-([A-Za-z0-9][A-Za-z0-9_]*)\.slice", name)
    return m.group(1) if m else None
