"""click parameter types shared by the command groups: values are parsed by the same
functions the library uses (units.py), so the CLI and the API accept the same inputs."""

from __future__ import annotations

from typing import Any

import click

from .errors import UsageError
from .units import parse_duration


class Duration(click.ParamType):
    """``90``, ``90s``, ``30m``, ``1h30m`` -> seconds (finite, at most a year); zero only
    where it means something (a grace of 0 is an immediate SIGKILL, a lock timeout of 0
    means "don't wait")."""

    name = "duration"

    def __init__(self, *, allow_zero: bool = False) -> None:
        self.allow_zero = allow_zero

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        try:
            return parse_duration(value, allow_zero=self.allow_zero)
        except UsageError as err:
            self.fail(err.message + (f" ({err.hint})" if err.hint else ""), param, ctx)


DURATION = Duration()
DURATION_OR_ZERO = Duration(allow_zero=True)
