"""What a caller asks for: the run's command, place and limits."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ArgumentTypeError, UsageError
from .isolation.policy import Isolation
from .names import validate_agent
from .units import (
    MAX_TASKS,
    parse_duration,
    parse_log_max,
    parse_percent,
    parse_positive_int,
    parse_size,
)

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Limits:
    memory_max: int | None = None  # bytes
    memory_high: int | None = None  # bytes
    cpu_quota: float | None = None  # percent of one CPU
    tasks_max: int | None = None

    @classmethod
    def parse(
        cls,
        *,
        memory_max: str | int | None = None,
        memory_high: str | int | None = None,
        cpu_quota: str | float | None = None,
        tasks_max: str | int | None = None,
    ) -> Limits:
        return cls(
            memory_max=parse_size(memory_max) if memory_max is not None else None,
            memory_high=parse_size(memory_high) if memory_high is not None else None,
            cpu_quota=parse_percent(cpu_quota) if cpu_quota is not None else None,
            tasks_max=parse_positive_int(tasks_max, "tasks max", maximum=MAX_TASKS) if tasks_max is not None else None,
        )

    def requested(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class RunSpec:
    """One run to start. ``argv[0]`` is looked up on PATH like a shell would."""

    agent: str
    argv: tuple[str, ...]
    cwd: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    timeout: float | None = None  # seconds
    session: str | None = None
    lock_timeout: float | None = None  # seconds to wait for the session lease; None: no limit
    max_runs: int | None = None  # the agent's concurrency cap (from its config)
    wait_for_slot: bool = True  # at the cap: wait (True) or fail with exit 75 (False)
    budget: Limits | None = None  # [corral] limits for corral.slice (all agents together)
    hidden_paths: tuple[str, ...] = ()  # directories the run must not see (the auth store)
    grace: float = 10.0  # seconds between SIGTERM and SIGKILL on stop/signal
    keep_leftovers: bool = False  # let processes main left behind end on their own
    strict_limits: bool = False  # refuse to start where a requested limit would not be enforced
    log_max: int | str | None = None  # a detached run's log rotates at this size (runs/output.py; default 10M)
    isolation: Isolation = field(default_factory=Isolation)  # the boundary around the run
    # Auth profiles granted to the run (auth/runauth.py): each is written in the form its
    # kind's CLI reads, and the run's broker socket serves these and no others.
    auth: tuple[str, ...] = ()
    env_unset: tuple[str, ...] = ()  # inherited variables the run must not get
    bind_back: tuple[str, ...] = ()  # paths under the hidden dirs the run must still reach (auth/runauth.py)

    def __post_init__(self) -> None:
        validate_agent(self.agent)
        if isinstance(self.argv, (str, bytes)):
            raise ArgumentTypeError(f"argv must be a list of arguments, not the string {self.argv!r}",
                                    hint='e.g. RunSpec(agent, argv=["echo", "hi"]), or ["sh", "-c", "..."] for '
                                    'a shell line')
        if not self.argv:
            raise UsageError("no command given", hint="put the command after --, e.g. corral run lane1 -- make test")
        if any(isinstance(a, (bytes, bytearray)) for a in self.argv):
            raise ArgumentTypeError("argv items must be str (or os.PathLike), not bytes",
                                    hint="decode them with os.fsdecode()")
        object.__setattr__(self, "argv", tuple(os.fspath(a) if isinstance(a, os.PathLike) else str(a)
                                                  for a in self.argv))
        auth = (self.auth,) if isinstance(self.auth, str) else tuple(self.auth)
        object.__setattr__(self, "auth", tuple(dict.fromkeys(auth)))  # in order, each once
        object.__setattr__(self, "env_unset", tuple(self.env_unset))
        object.__setattr__(self, "bind_back", tuple(self.bind_back))
        if self.timeout is not None:
            object.__setattr__(self, "timeout", parse_duration(self.timeout))
        if self.lock_timeout is not None:
            object.__setattr__(self, "lock_timeout", parse_duration(self.lock_timeout, allow_zero=True))
        object.__setattr__(self, "grace", parse_duration(self.grace, allow_zero=True))
        if self.log_max is not None:
            object.__setattr__(self, "log_max", parse_log_max(self.log_max))
        if self.session is not None and not str(self.session).strip():
            raise UsageError("empty session name", hint="give a name, e.g. --session pr-42, or leave it out")
        if not self.argv[0]:
            raise UsageError("the command is an empty string", hint="put the command after --, e.g. -- make test")
        for key in self.env:
            if not _ENV_NAME.fullmatch(key):
                raise UsageError(f"invalid environment variable name {key!r}",
                                 hint="letters, digits and _, not starting with a digit")
