"""``corral install-units``: the service deployment's units, from the installed package."""

from __future__ import annotations

from pathlib import Path

import click

from .output import echo_json


@click.command("install-units")
@click.option("--user", is_flag=True, help="For your user manager (~/.config/systemd/user), without the "
                                           "hardening only a system manager applies.")
@click.option("--prefix", metavar="PREFIX", help="Units run PREFIX/bin/corral (default: this corral's own path).")
@click.option("--dest", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Write the files here instead (a staging DESTDIR, a container image).")
@click.option("--remove", is_flag=True, help="Remove corral's unit files instead (by name; others are left).")
@click.option("--no-reload", is_flag=True, help="Do not run systemctl daemon-reload afterwards.")
@click.option("--json", "as_json", is_flag=True, help="Print what was done as a JSON object.")
def install_units(user: bool, prefix: str | None, dest: Path | None, remove: bool, no_reload: bool,
                  as_json: bool) -> None:
    """Install the systemd units of a service deployment: corral.slice, the socket-activated
    auth broker, the gc timer and the corral-agent@ template.

    \b
    Examples:
      sudo corral install-units && sudo systemctl enable --now corral-broker.socket corral-gc.timer
      corral install-units --user && systemctl --user enable --now corral-gc.timer
      corral install-units --prefix /opt/corral --dest "$DESTDIR/etc/systemd/system" --no-reload"""
    from ..deploy import install_units as install, remove_units

    if remove:
        report = remove_units(user=user, dest=dest, reload=not no_reload)
    else:
        report = install(user=user, prefix=prefix, dest=dest, reload=not no_reload)
    if as_json:
        echo_json(report.to_json())
        return
    if remove:
        click.echo(f"removed {len(report.removed)} unit file(s) from {report.dest}: {' '.join(report.removed) or '-'}")
    else:
        click.echo(f"installed {len(report.written)} unit file(s) in {report.dest} (ExecStart: "
                   f"{report.bindir}/corral): {' '.join(report.written)}")
    if not no_reload:
        manager = "systemctl --user" if user else "systemctl"
        click.echo(f"{manager} daemon-reload: {'done' if report.reloaded else 'skipped (no manager running here)'}")
