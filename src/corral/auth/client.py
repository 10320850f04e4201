"""Getting an access token: from the broker if one is listening, else in this process.

Both paths end in the same single-flight refresh (:func:`corral.auth.refresh.get_token`),
so mixing them never refreshes one token twice. What a run gets is in :mod:`.runauth`.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from pathlib import Path
from typing import Any

from ..errors import (
    AuthBusy,
    AuthError,
    ConfigError,
    CorralError,
    PermissionDenied,
    ProfileNotFound,
    SignInAgain,
    UsageError,
)
from ..paths import Dirs
from .refresh import DEFAULT_HTTP_TIMEOUT, DEFAULT_TIMEOUT, AccessToken, get_token

SOCKET_ENV = "CORRAL_AUTH_SOCKET"
PROFILE_ENV = "CORRAL_AUTH_PROFILE"


def socket_path(dirs: Dirs) -> Path:
    return dirs.runtime / "broker.sock"



def broker_socket(dirs: Dirs) -> Path:
    """The broker socket a caller should try: ``$CORRAL_AUTH_SOCKET`` inside a run, else
    the runtime dir's."""
    return Path(os.environ.get(SOCKET_ENV) or socket_path(dirs))


def ask_broker(path: Path, request: dict[str, Any], *, timeout: float) -> dict[str, Any] | None:
    """One request, one answer. None when no broker listens at *path*."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            return None
        except PermissionError:
            raise PermissionDenied(f"{path}: permission denied; the broker there belongs to another user",
                                   hint=f"unset {SOCKET_ENV}, or run as the broker's user") from None
        try:
            sock.sendall(json.dumps(request).encode() + b"\n")
            reader = sock.makefile("rb")
            line = reader.readline(1 << 16)
        except TimeoutError:
            raise AuthError(f"the broker at {path} did not answer within {timeout:g}s") from None
        except OSError as err:
            if err.errno in (errno.ECONNRESET, errno.EPIPE):
                line = b""
            else:
                raise AuthError(f"talking to the broker at {path}: {err.strerror or err}") from None
    finally:
        sock.close()
    if not line:
        raise AuthError(f"the broker at {path} closed the connection without an answer")
    try:
        answer = json.loads(line)
        if not isinstance(answer, dict):
            raise ValueError  # noqa: TRY004 -- "bad data" is ValueError to every caller
    except ValueError:
        raise AuthError(f"the broker at {path} sent something that is not a JSON object") from None
    return answer


def _raise_remote(answer: dict[str, Any], profile: str) -> None:
    """The broker's error, as the exception the same failure raises in-process."""
    kind, message, hint = answer.get("kind"), str(answer.get("error") or "broker error"), answer.get("hint")
    err: CorralError
    if kind == "sign_in_again":
        err = SignInAgain(profile, str(answer.get("reason") or message))
    elif kind == "busy":
        err = AuthBusy(profile, waited=float(answer.get("waited") or 0), holder=answer.get("holder"))
    elif kind == "not_found":
        err = ProfileNotFound(profile, hint="the broker does not know it: is it using the same config?")
    elif kind == "permission":
        err = PermissionDenied(message, hint=hint)
    elif kind == "config":
        err = ConfigError(message, hint=hint)
    elif kind == "usage":
        err = UsageError(message, hint=hint)
    else:
        err = AuthError(message, hint=hint)
    raise err


def token_from_broker(path: Path, profile: str, *, timeout: float = DEFAULT_TIMEOUT) -> AccessToken | None:
    """An access token from the broker at *path*; None when no broker listens there."""
    answer = ask_broker(path, {"op": "token", "profile": profile, "timeout": timeout},
                        timeout=timeout + DEFAULT_HTTP_TIMEOUT + 5)
    if answer is None:
        return None
    if not answer.get("ok"):
        _raise_remote(answer, profile)
    access = answer.get("access_token")
    if not isinstance(access, str) or not access:
        raise AuthError(f"the broker at {path} answered without an access token")
    expires = answer.get("expires_at")
    return AccessToken(profile, access, str(answer.get("token_type") or "Bearer"),
                       float(expires) if isinstance(expires, (int, float)) else None, via="broker")


def access_token(dirs: Dirs, profile: str, *, timeout: float = DEFAULT_TIMEOUT, use_broker: bool = True) -> AccessToken:
    """A valid access token for *profile*: from the broker if it is up, else refreshed here
    under the same single-flight lock. ``corral auth token`` prints this."""
    if use_broker:
        path = broker_socket(dirs)
        got = token_from_broker(path, profile, timeout=timeout)
        if got is not None:
            return got
        if os.environ.get("CORRAL_RUN_ID") and os.environ.get(SOCKET_ENV):
            # Inside a run the token store is hidden: "not signed in" would be a lie.
            raise AuthError(f"the run's broker socket {path} does not answer (did the run's owner end?)",
                            hint="tokens reach a run only through its socket; start the run again")
    try:
        return get_token(dirs, profile, timeout=timeout)
    except (ProfileNotFound, SignInAgain) as err:
        run_id = os.environ.get("CORRAL_RUN_ID")
        # Inside a run with no grants corral's config and store are hidden from it: "no
        # profile" or "not signed in" would mislead.
        if not run_id or os.environ.get(SOCKET_ENV) or not _inside_run(run_id):
            raise
        raise PermissionDenied(f"run {run_id} was granted no auth profile, so it cannot get {profile!r} "
                               f"({err.message})",
                               hint=f'start the run with --auth {profile}, or give its agent auth = "{profile}"') \
            from None


def _inside_run(run_id: str) -> bool:
    """Is this process in run *run_id*'s cgroup? Its scope in our cgroup path, or (in the
    run's cgroup namespace, whose root is the run's own leaf) a path of "/"."""
    try:
        with open("/proc/self/cgroup", encoding="utf-8", errors="replace") as f:
            paths = [line.rstrip("\n").split(":", 2)[2] for line in f if line.startswith("0::")]
    except (OSError, IndexError):
        return False
    return any(p == "/" or f"-{run_id}.scope" in p for p in paths)


__all__ = ["PROFILE_ENV", "SOCKET_ENV", "access_token", "ask_broker", "broker_socket",
           "token_from_broker"]
