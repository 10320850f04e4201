"""What a run used, kept by its owner so that an ended run still has its numbers: peak
memory, CPU time (``ps --all`` and ``show`` print them; the record keeps them).

Peak memory is the kernel's ``memory.peak`` where the memory controller is a cgroup v2
one; elsewhere (hybrid hosts: memory on v1) the highest of samples the owner takes while
it waits, each the sum of the payload's resident memory (one /proc read per process),
labelled ``sampled``: a spike between two samples is missed, a number is never invented.
"""

from __future__ import annotations

import time
from typing import Any

from ..linux.cgroup import CgroupDir
from ..linux.procs import rss_sum

INTERVAL = 1.0  # seconds between samples
BUSY_INTERVAL = 5.0  # ... for a payload of more than BUSY_PIDS processes (each is a read)
BUSY_PIDS = 200
FIRST = 0.1  # the first sample comes early: many runs are short


class RunMeter:
    def __init__(self, payload: CgroupDir) -> None:
        self.payload = payload
        self.peak: int | None = None
        self.next_at = time.monotonic() + FIRST

    def sample(self) -> None:
        """One sample now; the next is due at ``next_at``."""
        pids = []
        memory = self.payload.read_int("memory.current")
        if memory is None:
            pids = self.payload.pids()
            memory = rss_sum(pids) if pids else None
        if memory is not None and (self.peak is None or memory > self.peak):
            self.peak = memory
        self.next_at = time.monotonic() + (BUSY_INTERVAL if len(pids) > BUSY_PIDS else INTERVAL)

    def final(self) -> dict[str, Any]:
        """The record's numbers, read once the payload is empty (cpu.stat keeps the usage
        of every process that was in the cgroup)."""
        peak, source = self.payload.read_int("memory.peak"), "memory.peak"
        if peak is None:
            peak, source = self.peak, "sampled"
        return {"peak_memory_bytes": peak, "peak_memory_source": source if peak is not None else None,
                "cpu_usec": self.payload.cpu_usec()}
