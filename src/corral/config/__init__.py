"""corral's config file, ``config.toml``: agents, defaults, the whole budget, auth profiles.

- :mod:`.store`: the one write path, a locked, atomic, comment-preserving TOML
  read-modify-write; readers take no lock. :mod:`.lock` is its lock, and says why it is
  not the leases' lock stack;
- :mod:`.settings`: agents and global settings as typed values; add, set, remove, load;
- :mod:`.values`: how each key is parsed and checked (the CLI's ``--set K=V`` too);
- :mod:`.runconf`: the config plus the command line's flags, made into a RunSpec.

A run reads the file with the standard library's tomllib; tomlkit is loaded only to edit
it or to point at the line and column of a malformed file.

May import: corral.errors, corral.names, corral.paths, corral.units, corral._log,
corral.spec, corral.worktree, corral.linux, corral.isolation.
"""
