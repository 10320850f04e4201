"""corral's logger (``logging.getLogger("corral")``), made on first use.

``import logging`` costs ~2.5 ms at start-up (it pulls in traceback, string templates and
threading), and most commands never log a line: ``ps``, ``run`` and ``agents add`` pay
for it only if they do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import logging


class _FirstUse:
    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        import logging

        return getattr(logging.getLogger("corral"), name)


log = cast("logging.Logger", _FirstUse())
