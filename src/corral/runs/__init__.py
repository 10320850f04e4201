"""The run lifecycle, from start to end record.

- :mod:`.corral`: the library's front, ``Corral`` and the ``Run`` handle;
- :mod:`.launch` and :mod:`.detach`: starting attached and detached runs, each command
  held at :mod:`.spawn`'s gate until it is in its cgroup; detached runs are owned by
  corral's shared owner (:mod:`.shared_owner`, :mod:`.ownerd`) where the caller may use it;
- :mod:`.supervise`: the owner, which waits, forwards :mod:`.signals`, keeps deadlines,
  kills what the command left and records the end; :mod:`.watchdog` kills the run if the
  owner dies;
- :mod:`.output` and :mod:`.runlog`: a detached run's log, written and read back;
- :mod:`.meter`: peak memory and CPU time; :mod:`.listing`: ``ps``, the records against
  the cgroup tree; :mod:`.top`: live usage over time; :mod:`.gc`: runs nobody owns.

The lifecycle functions take a :class:`.context.RunContext` (backend, record store,
directories) rather than the ``Corral`` class, so that no module imports its caller.

May import: corral.errors, corral.names, corral.paths, corral.units, corral.records,
corral.spec, corral.linux, corral.isolation, corral.backends, corral.leases,
corral.config, corral.auth.
"""
