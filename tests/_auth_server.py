"""A real OAuth 2.0 authorization server for the auth tests: Authlib's RFC 6749 token
endpoint on werkzeug, on 127.0.0.1 only, run as a process of its own.

Subclassed to behave like the provider in issue 6:

- refresh tokens rotate (every refresh issues a new one);
- a refresh token is consumed atomically, under one lock, at the moment it is checked:
  two racing requests can never both spend it;
- a spent one gets OpenAI's answer: HTTP 401 ``{"message": ..., "type":
  "invalid_request_error", "code": "refresh_token_reused"}``;
- every request is counted; ``GET /stats`` shows the counts (and the newest refresh
  token, so a test can check that the store holds it).

Test-only endpoints: ``POST /mint`` issues a fresh pair (a "sign-in"), ``POST /config``
sets ``latency`` (seconds the token endpoint takes to answer, after consuming the token)
and ``lifetime`` (access token lifetime) and ``jwt`` (access tokens shaped like OpenAI's: an
unsigned JWT whose ``exp`` claim says when it expires), ``POST /reset`` zeroes the counts.

It also plays the provider's model backend, for the real agent CLIs: ``POST
/v1/responses`` (OpenAI's Responses API, codex) and ``POST /v1/messages`` (Anthropic's
Messages API, Claude Code) answer a stream if the bearer token is one this server issued
and it has not expired, else 401; each such request is logged (``/stats`` ``model``: time,
path, token, accepted). Anything else under ``/v1/``, ``/api/`` and ``/backend-api/``
(model lists, plugins, analytics) answers ``{}``.

Run: ``python _auth_server.py`` prints the port on its first line, then serves.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

os.environ["AUTHLIB_INSECURE_TRANSPORT"] = "1"  # plain http on loopback, for the test only

from authlib.oauth2.rfc6749 import AuthorizationServer, ClientMixin, OAuth2Request, TokenMixin  # noqa: E402
from authlib.oauth2.rfc6749 import grants  # noqa: E402
from authlib.oauth2.rfc6749.errors import InvalidGrantError, OAuth2Error  # noqa: E402
from authlib.oauth2.rfc6749.requests import BasicOAuth2Payload  # noqa: E402
from werkzeug.serving import make_server  # noqa: E402
from werkzeug.wrappers import Request, Response  # noqa: E402

CLIENT_ID = "corral-test"
REUSED_BODY = {
    "message": "Your refresh token has already been used to generate a new access token. "
               "Please try signing in again.",
    "type": "invalid_request_error",
    "code": "refresh_token_reused",
}


class RefreshTokenReused(OAuth2Error):
    """OpenAI's answer to a spent refresh token, byte for byte what issue 6 quotes."""

    status_code = 401
    error = "refresh_token_reused"

    def __call__(self, uri: str | None = None) -> tuple[int, dict[str, str], list[tuple[str, str]]]:
        return 401, dict(REUSED_BODY), self.get_headers()


class Client(ClientMixin):
    def get_client_id(self) -> str:
        return CLIENT_ID

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method == "none"  # a public client, like codex's CLI

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == "refresh_token"

    def get_allowed_scope(self, scope: str | None) -> str:
        return scope or "openid offline_access"


@dataclass
class Issued(TokenMixin):
    access_token: str
    refresh_token: str
    scope: str
    issued_at: float
    expires_in: int | float
    spent: bool = False

    def check_client(self, client: Any) -> bool:
        return client.get_client_id() == CLIENT_ID

    def get_scope(self) -> str:
        return self.scope

    def get_expires_in(self) -> int | float:
        return self.expires_in

    def is_expired(self) -> bool:
        return False  # refresh tokens here live until spent

    def is_revoked(self) -> bool:
        return self.spent

    def get_user(self) -> str:
        return "user1"

    def get_client(self) -> Client:
        return Client()


@dataclass
class State:
    lock: threading.Lock = field(default_factory=threading.Lock)
    tokens: dict[str, Issued] = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)
    latency: float = 0.0
    lifetime: float = 3600.0
    newest_refresh_token: str | None = None
    refresh_times: list[float] = field(default_factory=list)
    timings: list[tuple[float, float, float]] = field(default_factory=list)  # arrived, processed, answered
    model: list[dict[str, Any]] = field(default_factory=list)  # model requests: t, token, ok
    jwt: bool = False

    def access_token(self) -> str:
        if not self.jwt:
            return "at-" + secrets.token_urlsafe(16)
        claims = {"exp": int(time.time() + self.lifetime), "jti": secrets.token_urlsafe(12)}
        parts = [{"alg": "none", "typ": "JWT"}, claims]
        return ".".join(base64.urlsafe_b64encode(json.dumps(p).encode()).rstrip(b"=").decode()
                        for p in parts) + ".c2ln"

    def issue(self, scope: str = "openid offline_access") -> dict[str, Any]:
        token = Issued(self.access_token(), "rt-" + secrets.token_urlsafe(24), scope, time.time(),
                       self.lifetime)
        with self.lock:
            self.tokens[token.refresh_token] = token
            self.newest_refresh_token = token.refresh_token
        return {"token_type": "Bearer", "access_token": token.access_token, "refresh_token": token.refresh_token,
                "expires_in": self.lifetime, "scope": scope}


STATE = State()


class RotatingRefreshGrant(grants.RefreshTokenGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ["none"]
    INCLUDE_NEW_REFRESH_TOKEN = True  # rotate

    def authenticate_refresh_token(self, refresh_token: str) -> Issued:
        # Check and spend in one step, under the lock: Authlib would otherwise validate here
        # and revoke later (revoke_old_credential), and two racing requests could both pass.
        with STATE.lock:
            token = STATE.tokens.get(refresh_token)
            if token is None:
                STATE.counts["unknown"] += 1
                raise InvalidGrantError()
            if token.spent:
                STATE.counts["reused"] += 1
                raise RefreshTokenReused()
            token.spent = True
            return token

    def authenticate_user(self, refresh_token: Issued) -> str:
        return refresh_token.get_user()

    def revoke_old_credential(self, refresh_token: Issued) -> None:
        pass  # already spent in authenticate_refresh_token


class WerkzeugRequest(OAuth2Request):
    def __init__(self, request: Request) -> None:
        super().__init__(request.method, request.url, headers=request.headers)
        self._request = request
        # A JSON body too, as Anthropic's token endpoint takes (profiles' token_format = "json")
        self._data = request.get_json(force=True) if request.is_json else request.form.to_dict()
        self.payload = BasicOAuth2Payload(self._data)

    @property
    def form(self) -> Any:
        return self._data

    @property
    def args(self) -> Any:
        return self._request.args


class Server(AuthorizationServer):
    def query_client(self, client_id: str) -> Client | None:
        return Client() if client_id == CLIENT_ID else None

    def save_token(self, token: dict[str, Any], request: OAuth2Request) -> None:
        issued = Issued(token["access_token"], token["refresh_token"], token.get("scope", ""), time.time(),
                        token["expires_in"])
        with STATE.lock:
            STATE.tokens[issued.refresh_token] = issued
            STATE.newest_refresh_token = issued.refresh_token
            STATE.counts["refreshed"] += 1
            STATE.refresh_times.append(time.time())

    def create_oauth2_request(self, request: Request) -> OAuth2Request:
        return WerkzeugRequest(request)

    def handle_response(self, status: int, body: Any, headers: list[tuple[str, str]]) -> Response:
        return Response(json.dumps(body), status=status, headers=headers)

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        pass


def _generate(grant_type: str, client: Client, user: Any = None, scope: str | None = None,
              expires_in: int | None = None, include_refresh_token: bool = True) -> dict[str, Any]:
    token = {"token_type": "Bearer", "access_token": STATE.access_token(),
             "expires_in": STATE.lifetime, "scope": scope or "openid offline_access"}
    if include_refresh_token:
        token["refresh_token"] = "rt-" + secrets.token_urlsafe(24)
    return token


AUTH = Server()
AUTH.register_grant(RotatingRefreshGrant)
AUTH.register_token_generator("default", _generate)


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data), status=status, mimetype="application/json")


def _sse(events: list[dict[str, Any]]) -> Response:
    body = "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events)
    return Response(body, mimetype="text/event-stream")


def _bearer_ok(request: Request) -> bool:
    """Log a model request; True if its bearer token was issued here and is unexpired."""
    auth = request.headers.get("Authorization", "")
    bearer = auth[7:] if auth.startswith("Bearer ") else ""
    now = time.time()
    with STATE.lock:
        issued = next((t for t in STATE.tokens.values() if t.access_token == bearer), None)
        ok = issued is not None and now < issued.issued_at + issued.expires_in
        STATE.model.append({"t": now, "path": request.path, "token": bearer, "ok": ok,
                            "account": request.headers.get("ChatGPT-Account-Id"),
                            "api_key": request.headers.get("x-api-key")})
    return ok


def _anthropic_messages(request: Request) -> Response:
    """Anthropic's Messages API, as Claude Code calls it (streamed or not)."""
    if not _bearer_ok(request):
        return _json({"type": "error", "error": {"type": "authentication_error",
                                                 "message": "OAuth token has expired."}}, 401)
    body = request.get_json(force=True, silent=True) or {}
    model = body.get("model", "claude-test")
    usage = {"input_tokens": 1, "output_tokens": 1}
    message = {"id": "msg_" + secrets.token_hex(4), "type": "message", "role": "assistant", "model": model,
               "content": [], "stop_reason": None, "stop_sequence": None, "usage": usage}
    command = _tool_command(body.get("messages") or [])
    if command is None:
        block, delta, stop = {"type": "text", "text": ""}, {"type": "text_delta", "text": "done"}, "end_turn"
    else:  # a prompt "RUN: <command>" gets one Bash tool call, then "done"
        block = {"type": "tool_use", "id": "toolu_" + secrets.token_hex(4), "name": "Bash", "input": {}}
        delta = {"type": "input_json_delta", "partial_json": json.dumps({"command": command})}
        stop = "tool_use"
    if not body.get("stream"):
        content = {**block, "input": {"command": command}} if command else {"type": "text", "text": "done"}
        return _json({**message, "content": [content], "stop_reason": stop})
    return _sse([
        {"type": "message_start", "message": message},
        {"type": "content_block_start", "index": 0, "content_block": block},
        {"type": "content_block_delta", "index": 0, "delta": delta},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
         "usage": {"output_tokens": 1}},
        {"type": "message_stop"},
    ])


def _tool_command(messages: list[dict[str, Any]]) -> str | None:
    """The command to call a tool with: the text after "RUN: " in the conversation's first
    user message, unless a tool result already came back."""
    def texts(message: dict[str, Any]) -> list[str]:
        content = message.get("content")
        if isinstance(content, str):
            return [content]
        return [c.get("text", "") for c in content or [] if isinstance(c, dict) and c.get("type") == "text"]

    if any(isinstance(c, dict) and c.get("type") == "tool_result"
           for m in messages if isinstance(m.get("content"), list) for c in m["content"]):
        return None
    for m in messages:
        if m.get("role") == "user":
            for text in texts(m):
                if "RUN: " in text:
                    return text.split("RUN: ", 1)[1].strip().splitlines()[0]
    return None


def _model_api(request: Request) -> Response:
    if request.method == "POST" and request.path == "/v1/messages":
        return _anthropic_messages(request)
    if not (request.method == "POST" and request.path == "/v1/responses"):
        return _json({})
    if not _bearer_ok(request):
        return _json({"error": {"message": "Your access token has expired.", "type": "invalid_request_error",
                                "code": "token_expired"}}, 401)
    rid = "resp_" + secrets.token_hex(4)
    return _sse([
        {"type": "response.created", "response": {"id": rid}},
        {"type": "response.output_item.done", "item": {"type": "message", "role": "assistant", "id": "msg_1",
                                                       "content": [{"type": "output_text", "text": "done"}]}},
        {"type": "response.completed", "response": {"id": rid, "usage": {
            "input_tokens": 1, "input_tokens_details": None, "output_tokens": 1, "output_tokens_details": None,
            "total_tokens": 2}}},
    ])


@Request.application
def app(request: Request) -> Response:
    if request.path == "/token" and request.method == "POST":
        arrived = time.time()
        with STATE.lock:
            STATE.counts["token_requests"] += 1
            if request.is_json:
                STATE.counts["json_requests"] += 1
        response = AUTH.create_token_response(request)
        processed = time.time()
        # The latency comes after the token was spent: a client killed while waiting
        # for this answer has lost its new token, as with a real provider.
        if STATE.latency:
            time.sleep(STATE.latency)
        with STATE.lock:
            STATE.timings.append((arrived, processed, time.time()))
        return response
    if request.path == "/stats":
        with STATE.lock:
            return _json({**STATE.counts, "newest_refresh_token": STATE.newest_refresh_token,
                          "refresh_times": STATE.refresh_times, "timings": STATE.timings, "latency": STATE.latency,
                          "lifetime": STATE.lifetime, "model": STATE.model})
    if request.path == "/mint" and request.method == "POST":
        with STATE.lock:
            STATE.counts["minted"] += 1
        return _json(STATE.issue())
    if request.path == "/config" and request.method == "POST":
        conf = request.get_json(force=True)
        STATE.latency = float(conf.get("latency", STATE.latency))
        STATE.lifetime = float(conf.get("lifetime", STATE.lifetime))
        STATE.jwt = bool(conf.get("jwt", STATE.jwt))
        return _json({"latency": STATE.latency, "lifetime": STATE.lifetime, "jwt": STATE.jwt})
    if request.path == "/reset" and request.method == "POST":
        with STATE.lock:
            STATE.counts.clear()
            STATE.refresh_times.clear()
            STATE.timings.clear()
            STATE.model.clear()
        return _json({"ok": True})
    if request.path.startswith(("/v1/", "/backend-api/", "/api/")):
        return _model_api(request)
    return _json({"error": "not_found"}, 404)


def main() -> None:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = make_server("127.0.0.1", 0, app, threaded=True)
    print(server.server_port, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
