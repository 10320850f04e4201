"""Auth broker: one credential per provider profile, refreshed single-flight, never
copied into agents (issue 6; "Auth broker" in DESIGN.md).

- :mod:`.profiles`: ``[auth.NAME]`` in config.toml (token URL, client id, scope, env var);
- :mod:`.store`: the token store, 0600 files in a 0700 dir, atomic writes, the lock and
  the in-flight marker;
- :mod:`.oauth`: the RFC 6749 section 6 refresh grant, standard library only;
- :mod:`.refresh`: single-flight refresh across processes, and sign-in;
- :mod:`.broker` / :mod:`.client`: the unix-socket daemon and its callers;
- :mod:`.runauth` / :mod:`.adapters`: what a run granted profiles gets (its own broker
  socket; codex's, Claude Code's or a variable's form of the credential, kept fresh).

May import: corral.errors, corral.paths, corral._log, corral.records, corral.linux,
corral.config.
"""

from __future__ import annotations

from .broker import Broker, run_broker
from .client import PROFILE_ENV, SOCKET_ENV, access_token, socket_path, token_from_broker
from .importers import read_auth_file
from .profiles import DEFAULT_ENV_VAR, Profile, add_profile, get_profile, list_profiles
from .refresh import AccessToken, get_token, login
from .status import status
from .store import Token, TokenStore

__all__ = [
    "DEFAULT_ENV_VAR",
    "PROFILE_ENV",
    "SOCKET_ENV",
    "AccessToken",
    "Broker",
    "Profile",
    "Token",
    "TokenStore",
    "access_token",
    "add_profile",
    "get_profile",
    "get_token",
    "list_profiles",
    "login",
    "read_auth_file",
    "run_broker",
    "socket_path",
    "status",
    "token_from_broker",
]
