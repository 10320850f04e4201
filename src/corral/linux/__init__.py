"""The Linux interfaces corral stands on, each wrapped once: cgroup v2 directories
(:mod:`.cgroup`), process identity in /proc (:mod:`.procs`), flock(2) with a deadline
(:mod:`.flock`) and pseudo-terminals (:mod:`.terminal`).

Nothing here knows about runs, agents or config: these modules take paths, pids and fds,
and raise corral's errors (:mod:`corral.errors`) in place of OSError.

May import: corral.errors, corral.names.
"""
