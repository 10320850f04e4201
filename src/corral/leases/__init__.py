"""Kernel locks that die with their holder: session leases and an agent's ``max_runs`` slots.

- :mod:`.sessions`: the lease on (agent, KEY), held by a run's owner for the whole run,
  never granted while the previous holder's run still has live processes;
- :mod:`.session_files`: a session's directory, its holder note, and the listing;
- :mod:`.queue`: arrival order among waiters (plain flock is not FIFO);
- :mod:`.slots`: ``max_runs``, N slot files, each an flock.

Each is an flock(2) (:mod:`corral.linux.flock`): when a holder dies the kernel releases
it, so nothing is reclaimed by guesswork and no timeout needs tuning. Why the config has
a lock stack of its own is in :mod:`corral.config.lock`.

May import: corral.errors, corral.names, corral.paths, corral.records, corral.linux.
"""
