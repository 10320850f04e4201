"""What the lifecycle functions (:mod:`.launch`, :mod:`.detach`, :mod:`.gc`) need of a
:class:`~corral.runs.corral.Corral`: its backend, its record store and its directories.

A protocol, so that those modules do not import the class that calls them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..backends import Backend
    from ..paths import Dirs
    from ..records import RecordStore


class RunContext(Protocol):
    dirs: Dirs
    store: RecordStore

    @property
    def backend(self) -> Backend: ...
