"""The systemd units of a service deployment (units/: the slice, the socket-activated broker,
the gc timer, the agent template), shipped inside the package so that a pip install can
deploy them too. ``corral install-units`` and ``make install`` both write them through
:func:`install_units`.

The files are templates: ``@BINDIR@`` becomes the directory of the ``corral`` to run and
``@DOCDIR@`` that of its documentation. For a user manager the block between
``# >>> system manager only`` and ``# <<< end of system manager only`` is dropped (the
hardening a user manager cannot apply)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .errors import CorralError, PermissionDenied, translate_oserror
from .records import atomic_write

SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
_SYSTEM_ONLY_START = "# >>> system manager only"
_SYSTEM_ONLY_END = "# <<< end of system manager only"


def user_unit_dir() -> Path:
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(config, "systemd", "user")


def unit_templates() -> dict[str, str]:
    """Unit file name -> template text, from the installed package."""
    folder = resources.files("corral") / "unit_files"
    out = {entry.name: entry.read_text() for entry in folder.iterdir() if entry.is_file()}
    if not out:
        raise CorralError("this corral package has no unit files (corral/unit_files is empty)",
                          hint="reinstall corral from a wheel or the source tree")
    return dict(sorted(out.items()))


def render(template: str, *, bindir: str, docdir: str, user: bool) -> str:
    lines: list[str] = []
    skipping = False
    for line in template.splitlines(keepends=True):
        if user and line.startswith(_SYSTEM_ONLY_START):
            skipping = True
        if not skipping:
            lines.append(line.replace("@BINDIR@", bindir).replace("@DOCDIR@", docdir))
        if skipping and line.startswith(_SYSTEM_ONLY_END):
            skipping = False
    return "".join(lines)


def default_bindir() -> str:
    """Where the running ``corral`` is (a symlink such as /usr/local/bin/corral is kept as
    it is: the unit then follows upgrades of the venv behind it)."""
    beside_python = os.path.join(os.path.dirname(sys.executable), "corral")  # `python -m corral` in a venv
    if sys.argv and os.path.basename(sys.argv[0]) == "corral":
        argv0: str | None = sys.argv[0]
    elif os.access(beside_python, os.X_OK):
        argv0 = beside_python
    else:
        argv0 = shutil.which("corral")
    if not argv0:
        raise CorralError("cannot tell where the corral command is", hint="pass --prefix (units run PREFIX/bin/corral)")
    return os.path.dirname(os.path.abspath(argv0))


@dataclass
class UnitInstall:
    dest: Path
    written: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    reloaded: bool = False
    bindir: str = ""

    def to_json(self) -> dict[str, object]:
        return {"dest": str(self.dest), "written": self.written, "removed": self.removed,
                "reloaded": self.reloaded, "bindir": self.bindir}


def install_units(*, user: bool = False, prefix: str | None = None, dest: Path | None = None,
                  reload: bool = True) -> UnitInstall:
    """Write every unit into *dest* (default: /etc/systemd/system, or the user manager's
    folder with *user*), each atomically (temp file, fsync, rename) with mode 0644, then
    ``systemctl [--user] daemon-reload`` if *reload* and a manager runs here."""
    bindir = os.path.join(prefix, "bin") if prefix else default_bindir()
    docdir = os.path.join(prefix or os.path.dirname(bindir), "share", "doc", "corral")
    target = dest or (user_unit_dir() if user else SYSTEM_UNIT_DIR)
    report = UnitInstall(dest=target, bindir=bindir)
    templates = unit_templates()
    try:
        target.mkdir(mode=0o755, parents=True, exist_ok=True)
        for name, template in templates.items():
            atomic_write(target / name, render(template, bindir=bindir, docdir=docdir, user=user).encode(), mode=0o644)
            report.written.append(name)
    except OSError as err:
        raise _deploy_error(err, target, user) from err
    report.reloaded = reload and _daemon_reload(user)
    return report


def remove_units(*, user: bool = False, dest: Path | None = None, reload: bool = True) -> UnitInstall:
    """Remove corral's unit files (by name) from *dest*; others are left alone."""
    target = dest or (user_unit_dir() if user else SYSTEM_UNIT_DIR)
    report = UnitInstall(dest=target)
    try:
        for name in unit_templates():
            try:
                (target / name).unlink()
                report.removed.append(name)
            except FileNotFoundError:
                pass
    except OSError as err:
        raise _deploy_error(err, target, user) from err
    report.reloaded = reload and bool(report.removed) and _daemon_reload(user)
    return report


def _deploy_error(err: OSError, target: Path, user: bool) -> CorralError:
    translated = translate_oserror(err, what="install units", path=str(target))
    if isinstance(translated, PermissionDenied):
        translated.hint = ("run as root for the system manager, or `corral install-units --user` for yours"
                           if not user else f"make {target} writable, or pass --dest DIR")
    return translated


def _daemon_reload(user: bool) -> bool:
    """Tell the manager about the new files; False where none runs (a container image, a
    staging DESTDIR: the next boot reads them anyway)."""
    if not Path("/run/systemd/system").exists() or shutil.which("systemctl") is None:
        return False
    cmd = ["systemctl", *(["--user"] if user else []), "daemon-reload"]
    try:
        return subprocess.run(cmd, capture_output=True, timeout=60, check=False).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
