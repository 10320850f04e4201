"""``corral auth status``: what each profile's credential looks like. Never a secret."""

from __future__ import annotations

import time
from typing import Any

from ..paths import Dirs
from .client import ask_broker, socket_path
from .profiles import Profile, get_profile, list_profiles
from .store import TokenStore, iso


def profile_status(dirs: Dirs, profile: Profile, *, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    store = TokenStore.of(dirs, profile.name)
    token = store.load()  # a store others can read is refused here too (exit 77)
    out: dict[str, Any] = {**profile.to_json(), "profile": profile.name, "store": str(store.path)}
    del out["name"]
    if token is None:
        return {**out, "state": "not-signed-in", "problem": f"sign in: corral auth login {profile.name}"}
    marker = store.read_marker()
    state, problem = "valid", None
    if token.dead:
        state, problem = "sign-in-again", f"{token.dead}; sign in again: corral auth login {profile.name}"
    elif marker is not None and marker.generation in (token.generation, -1):  # else: stored, only not cleared
        if store.lock_is_free():
            state = "interrupted"
            problem = (f"a refresh ({marker.describe()}) died at phase {marker.phase!r}; "
                       "the next `corral auth token` resolves it or says to sign in again")
        else:
            state = "refreshing"
    elif not token.valid(now):
        state = "expired"
    elif token.needs_refresh(profile.refresh_window, now):
        state = "expiring"
    differs = profile.endpoint_differences(token.endpoint)
    if differs and problem is None:
        pinned = token.endpoint or {}
        problem = (f"config.toml changed {', '.join(differs)} since sign-in; refreshes still go to the pinned "
                   f"{pinned.get('token_url')} (client {pinned.get('client_id')}). To use the new settings, "
                   f"sign in again: corral auth login {profile.name}")
    return {
        **out, "state": state, "problem": problem,
        "expires_at": iso(token.effective_expiry(now)),
        "expires_in": None if token.expires_at is None else int(token.effective_expiry(now) - now),  # type: ignore[operator]
        "last_refresh": iso(token.last_refresh), "refresh_count": token.refresh_count,
        "signed_in_from": token.source, "generation": token.generation,
        "pinned": token.endpoint, "endpoint_differs": differs,
    }


def status(dirs: Dirs, name: str | None = None) -> dict[str, Any]:
    """``{"broker": {...}, "profiles": [...]}`` for one profile or all of them."""
    profiles = [get_profile(dirs, name)] if name else list_profiles(dirs)
    path = socket_path(dirs)
    try:
        up = ask_broker(path, {"op": "ping"}, timeout=2.0)
    except Exception:  # noqa: BLE001 -- status reports, it does not fail on a sick broker
        up = None
    broker = {"socket": str(path), "up": bool(up and up.get("ok")), "pid": (up or {}).get("pid")}
    return {"broker": broker, "profiles": [profile_status(dirs, p) for p in profiles]}


__all__ = ["profile_status", "status"]
