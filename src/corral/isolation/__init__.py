"""The boundary around a run, beyond its cgroup. A run's commands were written by an
LLM, so its payload is treated as hostile (DESIGN.md, "Threat model and isolation").

- :mod:`.policy`: what a run asks for (level, network, user, environment allowlist), as
  plain values that the spec and the config carry;
- :mod:`.sandbox`: that policy as a bubblewrap command line, a seccomp filter and an
  environment; and how to tell bwrap's own processes from the command's;
- :mod:`.mountns`: an empty tmpfs over the token store, for runs at isolation ``none``
  that were granted auth.

May import: corral.errors, corral.linux.
"""
