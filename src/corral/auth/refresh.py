"""Single-flight refresh across processes, and sign-in (storing a first token).

The seed failure (issue 6): agents sharing one OAuth credential refresh it at the same
moment; the provider rotates refresh tokens, so every refresher but the first sends a
spent token and gets ``refresh_token_reused``. Here, exactly one process refreshes:

1. read the store without a lock; a token outside its refresh window is returned as is;
2. otherwise take the profile's flock, re-read the store, and refresh only if the token
   is *still* expiring (a waiter finds the pair the holder stored and returns it);
3. write the in-flight marker, send the grant, mark the marker ``answered``, store the
   new pair, remove the marker, and only then release the lock.

A waiter whose timeout passes gets :class:`~corral.errors.AuthBusy` (exit 75) and never
refreshes with the old token itself. A refresh token the provider rejects ends in
:class:`~corral.errors.SignInAgain` (exit 77), once: the store is marked dead, so later
calls fail at once instead of sending the spent token again.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import time
from dataclasses import dataclass
from typing import NoReturn

from .._log import log
from ..errors import AuthBusy, AuthError, CorralError, SignInAgain
from ..paths import Dirs
from .oauth import Rejected, TransportError, checkpoint, refresh_grant
from .profiles import Profile, get_profile
from .store import Marker, Token, TokenStore, boot_clock, fingerprint, iso

DEFAULT_TIMEOUT = 30.0  # how long a caller waits for another process's refresh
DEFAULT_HTTP_TIMEOUT = 30.0


@dataclass(frozen=True)
class AccessToken:
    """What callers get: never the refresh token."""

    profile: str
    access_token: str
    token_type: str
    expires_at: float | None
    via: str = "local"  # local | broker

    def to_json(self) -> dict[str, object]:
        return {"profile": self.profile, "access_token": self.access_token, "token_type": self.token_type,
                "expires_at": self.expires_at}


def _public(profile: str, token: Token) -> AccessToken:
    assert token.access_token is not None
    return AccessToken(profile, token.access_token, token.token_type, token.effective_expiry(time.time()))


def get_token(dirs: Dirs, name: str, *, timeout: float = DEFAULT_TIMEOUT,
              http_timeout: float = DEFAULT_HTTP_TIMEOUT, min_valid: float = 0.0) -> AccessToken:
    """A valid access token for profile *name*, refreshing it single-flight if needed.

    *timeout* bounds the wait for another process's refresh (then :class:`AuthBusy`,
    exit 75); *http_timeout* bounds this process's own request to the token endpoint.
    *min_valid*: refresh if it expires sooner than that (an adapter writing a file that a
    CLI refreshes by itself near expiry needs the token to outlast the CLI's own margin);
    like the profile's refresh window, never more than half the token's lifetime."""
    profile = get_profile(dirs, name)
    if min_valid > profile.refresh_window:
        profile = dataclasses.replace(profile, refresh_window=min_valid)
    store = TokenStore.of(dirs, name)
    seen = _load(store)
    if not seen.needs_refresh(profile.refresh_window, time.time()):
        return _public(name, seen)
    started = time.monotonic()
    deadline = started + timeout
    try:
        with store.lock() as lock:
            if not lock.try_exclusive():
                # Someone is refreshing: wait for them, shared, together with every other
                # waiter, and take what they stored.
                if not lock.wait(fcntl.LOCK_SH, deadline):
                    raise store.busy(started)
                current = _load(store)
                if _refreshed_for_us(current, seen, profile, time.time()):
                    return _public(name, current)
                if not lock.wait(fcntl.LOCK_EX, deadline):  # nobody did: refresh ourselves
                    raise store.busy(started)
            return _public(name, _refresh_locked(profile, store, seen, http_timeout))
    except AuthBusy:
        # The holder may be hung. A token that is merely inside its refresh window is
        # still good: hand it out rather than fail. An expired one is not.
        if seen.valid(time.time(), margin=1.0):
            log.warning("auth %s: refresh lock busy; using the current token (expires %s)", name,
                        iso(seen.expires_at))
            return _public(name, seen)
        raise


def _refreshed_for_us(current: Token, seen: Token, profile: Profile, now: float) -> bool:
    """Whether *current* answers a caller who found *seen* expiring: someone refreshed
    since (a new generation, still valid), or it is not expiring at all."""
    if current.generation != seen.generation and current.valid(now):
        return True
    return not current.needs_refresh(profile.refresh_window, now)


def _load(store: TokenStore) -> Token:
    token = store.load()
    if token is None:
        raise SignInAgain(store.profile, "not signed in (no stored token)")
    if token.dead:
        raise SignInAgain(store.profile, token.dead)
    return token


def _refresh_locked(profile: Profile, store: TokenStore, seen: Token, http_timeout: float) -> Token:
    store.sweep_temps()
    current = _load(store)
    now = time.time()
    prior = store.read_marker()
    if prior is not None:
        # We hold the lock, so whoever wrote the marker is gone: it died mid-refresh.
        if prior.generation not in (current.generation, -1):  # -1: unreadable, assume the worst
            log.info("auth %s: the refresher (%s) stored its answer and died before clearing its marker",
                     profile.name, prior.describe())
            store.clear_marker()
            prior = None
        elif prior.phase == "answered":
            # The provider has rotated the token; the new one died with the refresher.
            # Sending the stored one would only be rejected (and may revoke the family).
            _mark_dead(store, current, (
                f"the refresher ({prior.describe()}) died after the provider issued a new refresh token "
                f"(at {iso(prior.answered_at)}) and before it was stored; the stored refresh token is spent"))
    if prior is None and _refreshed_for_us(current, seen, profile, now):
        return current
    return _refresh(profile, store, current, prior, http_timeout)


def _refresh(profile: Profile, store: TokenStore, current: Token, prior: Marker | None,
             http_timeout: float) -> Token:
    """Send the grant and store the answer. Called with the lock held."""
    # The endpoint pinned at sign-in, not config.toml's (which a run may be able to write).
    # A credential from before pinning is pinned now, to the config it has always used.
    target = profile.pinned_to(current.endpoint)
    if target.token_url != profile.token_url:
        log.warning("auth %s: config.toml's token_url differs from the one pinned at sign-in; refreshing at the "
                    "pinned %s (sign in again to change it)", profile.name, target.token_url)
    marker = Marker(pid=os.getpid(), started_at=time.time(), phase="sending", generation=current.generation,
                    refresh_fp=fingerprint(current.refresh_token))
    try:
        store.write_marker(marker)
    except CorralError as err:
        raise AuthError(f"auth profile {profile.name!r}: cannot refresh, the token store cannot be written "
                        f"({err.message}); nothing was sent, the stored credential is intact",
                        hint=f"free space (or fix permissions) in {store.dir}, then retry") from None
    checkpoint("before_send")
    sent = False

    def on_sent() -> None:
        nonlocal sent
        sent = True

    try:
        grant = refresh_grant(target, current.refresh_token, timeout=http_timeout, on_sent=on_sent)
    except Rejected as err:
        if not err.sign_in_again:
            store.clear_marker()  # an error answer issues nothing: the old token stands
            raise AuthError(f"auth profile {profile.name!r}: the token endpoint refused the refresh ({err})",
                            hint="check the profile's token URL and client id: corral auth status") from None
        if prior is not None:
            reason = (f"the refresher ({prior.describe()}) sent the stored refresh token and never stored the "
                      f"answer (it died or timed out); the provider has since rotated it ({err.code})")
        else:
            reason = f"the provider rejected the stored refresh token ({err.code}"
            reason += ": it was already used, by another copy of this credential)" if err.code == \
                "refresh_token_reused" else ")"
        _mark_dead(store, current, reason)
    except TransportError as err:
        if not sent:
            store.clear_marker()  # it never left: the old token is untouched
        # Otherwise keep the marker: the provider may have rotated the token, and the
        # next caller must know that (it sends once; a rejection then says exactly this).
        raise AuthError(f"auth profile {profile.name!r}: {err}",
                        hint=None if not sent else "the request may have reached the provider; "
                        "the next `corral auth token` will tell whether the credential survived") from None
    # From here the old refresh token is spent and the new one exists only in this
    # process: should it die before the store, the next caller must not send the old one.
    answered = dataclasses.replace(marker, phase="answered", answered_at=grant.received_at)
    try:
        store.write_marker(answered)
    except CorralError:
        pass  # the "sending" marker stays: the next caller still knows a grant may have been spent
    checkpoint("after_response")
    boot = boot_clock()
    new = Token(
        refresh_token=grant.refresh_token or current.refresh_token, access_token=grant.access_token,
        token_type=grant.token_type, expires_at=grant.expires_at, obtained_at=grant.received_at,
        boot_id=boot[0], boot_obtained=boot[1] - max(0.0, time.time() - grant.received_at),
        scope=grant.scope or current.scope, last_refresh=grant.received_at,
        refresh_count=current.refresh_count + 1, generation=current.generation + 1, source=current.source,
        endpoint=current.endpoint or target.endpoint(),
        extra={**(current.extra or {}), "id_token": grant.id_token} if grant.id_token else current.extra,
    )
    try:
        store.save(new)
    except CorralError as err:
        # The old file is intact (atomic write), but the provider has consumed its refresh
        # token: the new one dies with this process. Say exactly that.
        raise SignInAgain(profile.name, f"the provider issued a new credential, but it could not be saved "
                                        f"({err.message}); that refresh consumed the stored refresh token (free "
                                        f"space in {store.dir} first)") from None
    checkpoint("after_store")
    store.clear_marker()
    if prior is not None:
        log.warning("auth %s: the refresher (%s) had died before its request reached the provider; "
                    "refreshed again", profile.name, prior.describe())
    log.info("auth %s: refreshed (generation %d, expires %s)", profile.name, new.generation, iso(new.expires_at))
    return new


def _mark_dead(store: TokenStore, current: Token, reason: str) -> NoReturn:
    """Record that the refresh token is spent, so later calls fail at once; then raise."""
    store.save(current.replace(dead=reason, generation=current.generation + 1))
    store.clear_marker()
    raise SignInAgain(store.profile, reason)


def login(dirs: Dirs, name: str, *, refresh_token: str, access_token: str | None = None,
          expires_at: float | None = None, scope: str | None = None, source: str = "login",
          extra: dict[str, str] | None = None, timeout: float = DEFAULT_TIMEOUT) -> Token:
    """Store a first (or replacement) credential for profile *name*, under its lock so it
    never interleaves with a refresh. Clears a dead mark and a stale in-flight marker.
    Pins the profile's endpoint as config.toml has it now (see profiles.py)."""
    profile = get_profile(dirs, name)  # unknown profile: exit 3, before anything is written
    refresh_token = refresh_token.strip()
    if not refresh_token or any(c.isspace() for c in refresh_token):
        from ..errors import UsageError

        raise UsageError("the refresh token is empty or contains whitespace")
    store = TokenStore.of(dirs, name)
    now = time.time()
    with store.locked(timeout):
        try:
            old = store.load()
        except SignInAgain:
            old = None  # an unreadable store is exactly what a new sign-in replaces
        token = Token(refresh_token=refresh_token, access_token=access_token or None,
                      expires_at=expires_at if access_token else None, obtained_at=now, scope=scope,
                      generation=(old.generation + 1) if old else 1, source=source,
                      refresh_count=old.refresh_count if old else 0,
                      last_refresh=old.last_refresh if old else None, endpoint=profile.endpoint(),
                      extra=dict(extra) if extra else None, boot_id=boot_clock()[0], boot_obtained=boot_clock()[1])
        store.save(token)
        store.clear_marker()
    return token


__all__ = ["DEFAULT_TIMEOUT", "AccessToken", "get_token", "login"]
