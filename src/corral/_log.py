"""corral's logger (``logging.getLogger("corral")``), made on first use.

``import logging`` costs ~2.5 ms at start-up (it pulls in traceback, string templates and
threading), and most commands never log a line: ``ps``, ``run`` and ``agents add`` pay
for it only if they do. A debug or info line before anything has imported logging is
dropped without importing it: with no handler and no level set by anyone, logging itself
would drop it (its last-resort handler prints warnings and worse only).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import logging


class _FirstUse:
    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        if name in ("debug", "info") and "logging" not in sys.modules:
            return _dropped
        import logging

        return getattr(logging.getLogger("corral"), name)


def _dropped(*args: Any, **kwargs: Any) -> None:
    pass


log = cast("logging.Logger", _FirstUse())
