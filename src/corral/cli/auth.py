"""``corral auth add|login|status|token`` and ``corral broker``: parse, call, print.

Errors are raised as CorralError subclasses; ``corral.cli.main.main`` maps them to exit codes
(3 unknown profile, 75 a refresh held by a hung process, 77 sign in again).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..errors import UsageError
from ..paths import Dirs
from .output import echo_json, table
from .params import DURATION_OR_ZERO, complete_profiles


@click.group()
def auth() -> None:
    """Auth profiles: one credential per provider, refreshed single-flight, never copied into agents."""


@auth.command()
@click.argument("profile")
@click.option("--token-url", metavar="URL", help="The provider's OAuth 2.0 token endpoint (https).")
@click.option("--client-id", metavar="ID", help="The OAuth client id the credential was issued to.")
@click.option("--scope", metavar="S", help="Scope to ask for on refresh (default: as originally granted).")
@click.option("--env-var", metavar="NAME", help="Variable a run gets the access token in (default CORRAL_ACCESS_TOKEN).")
@click.option("--refresh-window", metavar="SECS", help="Refresh this long before expiry (default 300).")
@click.option("--token-format", type=click.Choice(["form", "json"]), default=None,
              help="Body of the refresh request: form (RFC 6749, default) or json (Anthropic's endpoint).")
@click.option("--kind", type=click.Choice(["env", "codex", "claude", "claude-api-key", "openclaw"]), default=None,
              help="The CLI runs use it with: env (a variable, default), codex ($CODEX_HOME/auth.json), claude "
                   "($CLAUDE_CONFIG_DIR/.credentials.json), claude-api-key (Claude Code's apiKeyHelper runs "
                   "`corral auth token`) or openclaw (a token profile in $OPENCLAW_STATE_DIR).")
@click.option("--provider", metavar="ID", help="With --kind openclaw: openclaw's provider id (default: from the "
                                               "token URL, openai or anthropic).")
@click.option("--update", is_flag=True, help="Change an existing profile (only the options given).")
def add(profile: str, token_url: str | None, client_id: str | None, scope: str | None, env_var: str | None,
        refresh_window: str | None, token_format: str | None, kind: str | None, provider: str | None,
        update: bool) -> None:
    """Add auth PROFILE to config.toml (no secret goes there). The endpoint settings are
    pinned with the credential at `corral auth login`: change them, then sign in again."""
    from ..auth.profiles import add_profile

    p = add_profile(Dirs.from_env(), profile, token_url=token_url, client_id=client_id, scope=scope,
                    env_var=env_var, refresh_window=refresh_window, token_format=token_format, kind=kind,
                    provider=provider, update=update)
    click.echo(f"auth profile {p.name}: {p.token_url} (client {p.client_id}); "
               f"sign in with: corral auth login {p.name} --refresh-token-stdin")


@auth.command()
@click.argument("profile", shell_complete=complete_profiles)
@click.option("--refresh-token-stdin", "from_stdin", is_flag=True, help="Read a refresh token from stdin.")
@click.option("--from-file", "from_file", metavar="FILE", type=click.Path(dir_okay=False),
              help="Import another tool's JSON auth file (e.g. ~/.codex/auth.json); its refresh token moves here.")
@click.option("--keep-file", is_flag=True, help="With --from-file: leave the file's refresh token in place.")
def login(profile: str, from_stdin: bool, from_file: str | None, keep_file: bool) -> None:
    """Store PROFILE's credential (a refresh token, and an access token if the file has one).

    A provider that rotates refresh tokens (OpenAI, Anthropic) accepts each one once, so
    two holders of one credential end in refresh_token_reused: an imported file's refresh
    token is replaced with a sentinel (under codex's own lock for its auth.json)."""
    from ..auth.importers import move_out, read_auth_file
    from ..auth.refresh import login as do_login
    from ..auth.store import iso

    if from_stdin == (from_file is not None):
        raise UsageError("give exactly one of --refresh-token-stdin and --from-file FILE")
    dirs = Dirs.from_env()
    if from_stdin:
        if sys.stdin.isatty():
            click.echo("paste the refresh token, then press Enter:", err=True)
        token = do_login(dirs, profile, refresh_token=sys.stdin.readline(), source="login:stdin")
    else:
        assert from_file is not None
        imported = read_auth_file(from_file)
        token = do_login(dirs, profile, refresh_token=imported.refresh_token, access_token=imported.access_token,
                         expires_at=imported.expires_at, scope=imported.scope, extra=imported.extra,
                         source=f"login:file:{Path(from_file).resolve()}")
        if keep_file:
            click.echo(f"note: {from_file} still holds a copy of this credential; after corral's first refresh it "
                       "is spent. Point that tool at `corral auth token` (or remove its copy) instead of using both.",
                       err=True)
        elif move_out(from_file, imported.refresh_token):
            click.echo(f"note: the refresh token moved from {from_file} into corral. The tool that owns the file "
                       f"keeps working under corral (corral run --auth {profile} ...); used outside corral it must "
                       "sign in separately.", err=True)
        else:
            click.echo(f"note: {from_file} changed while it was imported; it was left as it is", err=True)
    expiry = f"access token valid until {iso(token.expires_at)}" if token.valid(token.obtained_at) else \
        "access token will be fetched on first use"
    click.echo(f"signed in auth profile {profile} ({expiry})")


@auth.command()
@click.argument("profile", shell_complete=complete_profiles)
@click.option("--force", is_flag=True, help="Remove it even if agents name it (their runs then fail with exit 3).")
def rm(profile: str, force: bool) -> None:
    """Remove auth PROFILE from config.toml and its stored credential (sign-out)."""
    from ..auth.profiles import remove_profile

    had_credential = remove_profile(Dirs.from_env(), profile, force=force)
    click.echo(f"removed auth profile {profile}" + (" and its stored credential" if had_credential else ""))


@auth.command()
@click.argument("profile", required=False, shell_complete=complete_profiles)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(profile: str | None, as_json: bool) -> None:
    """Expiry, last refresh and state of PROFILE (or all profiles). Never prints a secret."""
    from ..auth.status import status as get_status

    report = get_status(Dirs.from_env(), profile)
    if as_json:
        echo_json(report)
        return
    broker = report["broker"]
    click.echo(f"broker: {'up (pid ' + str(broker['pid']) + ')' if broker['up'] else 'not running'} "
               f"at {broker['socket']}")
    rows = [[p["profile"], p["state"], p.get("expires_at") or "-", _left(p.get("expires_in")),
             p.get("last_refresh") or "-", str(p.get("refresh_count", 0)), p["env_var"]] for p in report["profiles"]]
    header = ["PROFILE", "STATE", "EXPIRES", "LEFT", "LAST REFRESH", "REFRESHES", "ENV VAR"]
    table(rows, header)
    for p in report["profiles"]:
        if p.get("problem"):
            click.echo(f"{p['profile']}: {p['problem']}", err=True)


def _left(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    if seconds <= 0:
        return "expired"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


@auth.command()
@click.argument("profile", shell_complete=complete_profiles)
@click.option("--timeout", type=DURATION_OR_ZERO, default=30.0, show_default=True, metavar="DURATION",
              help="How long to wait for a refresh another process is doing (then exit 75).")
@click.option("--no-broker", is_flag=True, help="Refresh in this process even if a broker is listening.")
def token(profile: str, timeout: float, no_broker: bool) -> None:
    """Print a valid access token for PROFILE on stdout (for scripts and credential helpers)."""
    from ..auth.client import access_token

    got = access_token(Dirs.from_env(), profile, timeout=timeout, use_broker=not no_broker)
    click.echo(got.access_token)


@click.command()
@click.option("--socket", "socket_path", metavar="PATH", type=click.Path(dir_okay=False),
              help="Listen here (default: <runtime dir>/broker.sock, or the socket systemd passes).")
@click.option("--timeout", type=DURATION_OR_ZERO, default=30.0, show_default=True, metavar="DURATION",
              help="How long a request waits for a refresh another process is doing.")
def broker(socket_path: str | None, timeout: float) -> None:
    """Serve access tokens over a unix socket; refresh tokens never leave this process."""
    import logging  # only the broker logs: every other command starts without it

    from ..auth.broker import run_broker

    logging.basicConfig(level=logging.INFO, format="corral: %(message)s", stream=sys.stderr)
    run_broker(Dirs.from_env(), path=Path(socket_path) if socket_path else None, timeout=timeout)
