"""The OAuth 2.0 ``refresh_token`` grant (RFC 6749 section 6), with urllib only.

One POST, no retries and no redirects: a refresh token is single-use where providers
rotate them, so sending it twice (or to a second URL) can only hurt. The caller learns
whether the request left this process (``on_sent``), because after that moment a failure
leaves the old refresh token in doubt.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from .profiles import Profile

DEFAULT_EXPIRES_IN = 3600.0  # RFC 6749 5.1: expires_in is only RECOMMENDED
MAX_BODY = 1 << 20

# Answers after which only a new sign-in helps. `refresh_token_reused` is OpenAI's
# (issue 6): the token was already spent, by a racing refresher or a copy elsewhere.
SIGN_IN_AGAIN_CODES = frozenset({
    "invalid_grant", "refresh_token_reused", "refresh_token_expired", "refresh_token_invalidated",
    "invalid_refresh_token", "token_expired", "token_revoked",
})

TEST_STOP_ENV = "CORRAL_AUTH_TEST_STOP_AT"


def checkpoint(name: str) -> None:
    """Tests only: stop this process (SIGSTOP) at a named point of a refresh, so a test can
    SIGKILL it exactly there. ``$CORRAL_AUTH_TEST_STOP_AT`` lists points, comma-separated:
    before_send, in_flight, after_response, after_store. Unset, this costs one lookup."""
    points = os.environ.get(TEST_STOP_ENV)
    if points and name in points.split(","):
        os.kill(os.getpid(), signal.SIGSTOP)


@dataclass(frozen=True)
class Grant:
    """A successful token response (RFC 6749 5.1)."""

    access_token: str
    token_type: str
    expires_at: float
    refresh_token: str | None  # None: the server kept the old one (it MAY issue a new one)
    scope: str | None
    received_at: float
    id_token: str | None = None  # OpenID Connect (OpenAI sends a fresh one with each refresh)


class Rejected(Exception):
    """The token endpoint answered with an error (RFC 6749 5.2 or a provider's own shape)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"HTTP {status}: {code}{': ' + message if message else ''}")
        self.status = status
        self.code = code
        self.message = message

    @property
    def sign_in_again(self) -> bool:
        return self.code in SIGN_IN_AGAIN_CODES


class TransportError(Exception):
    """No usable answer: network, timeout, a body that is not a token response."""


def _error_fields(body: bytes) -> tuple[str, str]:
    try:
        data = json.loads(body)
    except ValueError:
        return "", body[:200].decode("utf-8", "replace").strip()
    if not isinstance(data, dict):
        return "", ""
    err = data.get("error")
    if isinstance(err, dict):  # {"error": {"code": ..., "message": ...}}
        data, err = err, None
    code = data.get("code") if isinstance(data.get("code"), str) else err if isinstance(err, str) else ""
    message = data.get("message") or data.get("error_description") or ""
    return str(code or data.get("type") or ""), str(message)[:300]


def jwt_expiry(token: str) -> float | None:
    """``exp`` of a JWT access token, unverified: only used to know when to refresh."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        exp = payload.get("exp") if isinstance(payload, dict) else None
        return float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None
    except (ValueError, TypeError):
        return None


def _grant(data: Any, received_at: float) -> Grant:
    if not isinstance(data, dict) or not isinstance(data.get("access_token"), str) or not data["access_token"]:
        raise TransportError("the token endpoint's answer has no access_token")
    expires_in = data.get("expires_in")
    if isinstance(expires_in, str) and expires_in.isdigit():
        expires_in = int(expires_in)
    if isinstance(expires_in, (int, float)) and not isinstance(expires_in, bool) and expires_in > 0:
        expires_at = received_at + float(expires_in)
    else:
        expires_at = jwt_expiry(data["access_token"]) or received_at + DEFAULT_EXPIRES_IN
    refresh = data.get("refresh_token")
    return Grant(
        access_token=data["access_token"], token_type=str(data.get("token_type") or "Bearer"),
        expires_at=expires_at, refresh_token=refresh if isinstance(refresh, str) and refresh else None,
        scope=data.get("scope") if isinstance(data.get("scope"), str) else None, received_at=received_at,
        id_token=data["id_token"] if isinstance(data.get("id_token"), str) and data["id_token"] else None,
    )


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a 3xx stays an HTTPError: the token goes to the configured URL only


def _opener(on_sent: Callable[[], None]) -> urllib.request.OpenerDirector:
    # urllib's handlers call conn.request() and then conn.getresponse(); the moment in
    # between is when the request has left this process. Subclassing the connection is
    # the one seam urllib offers there; proxies (CONNECT tunnels) keep working.
    class Conn(http.client.HTTPConnection):
        def getresponse(self) -> http.client.HTTPResponse:
            on_sent()
            checkpoint("in_flight")
            return super().getresponse()

    class TLSConn(http.client.HTTPSConnection):
        def getresponse(self) -> http.client.HTTPResponse:
            on_sent()
            checkpoint("in_flight")
            return super().getresponse()

    class Plain(urllib.request.HTTPHandler):
        def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(Conn, req)

    class TLS(urllib.request.HTTPSHandler):
        def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(TLSConn, req, context=self._context)  # type: ignore[attr-defined]

    return urllib.request.build_opener(Plain(), TLS(), _NoRedirect())


def refresh_grant(profile: Profile, refresh_token: str, *, timeout: float = 30.0,
                  on_sent: Callable[[], None] = lambda: None) -> Grant:
    """POST ``grant_type=refresh_token`` to the profile's token endpoint (a form body, or
    JSON where the profile's ``token_format`` says so).

    Raises :class:`Rejected` for an error answer and :class:`TransportError` when there
    is no usable answer. Neither message ever contains a token.
    """
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": profile.client_id}
    if profile.scope:
        form["scope"] = profile.scope
    if profile.token_format == "json":  # e.g. Anthropic's endpoint takes a JSON body
        body, content_type = json.dumps(form).encode(), "application/json"
    else:
        body, content_type = urlencode(form).encode(), "application/x-www-form-urlencoded"
    request = urllib.request.Request(
        profile.token_url, data=body, method="POST",
        headers={"Content-Type": content_type, "Accept": "application/json", "User-Agent": "corral/0.1 (auth broker)"},
    )
    try:
        with _opener(on_sent).open(request, timeout=timeout) as resp:
            body = resp.read(MAX_BODY)
            received = time.time()
    except urllib.error.HTTPError as err:
        body = err.read(MAX_BODY) if err.fp is not None else b""
        code, message = _error_fields(body)
        raise Rejected(err.code, code or f"http_{err.code}", message) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", None) or err
        raise TransportError(f"cannot reach {profile.token_url}: {reason}") from None
    try:
        return _grant(json.loads(body), received)
    except ValueError:
        raise TransportError("the token endpoint's answer is not JSON") from None


__all__ = ["SIGN_IN_AGAIN_CODES", "Grant", "Rejected", "TransportError", "checkpoint", "jwt_expiry", "refresh_grant"]
