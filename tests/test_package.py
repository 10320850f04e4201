"""The package as users meet it: `python -m corral`, and the README's library example
type-checks under mypy --strict (explicit re-exports, annotations that match)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_python_dash_m_corral() -> None:
    out = subprocess.run([sys.executable, "-m", "corral", "--version"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.startswith("corral, version "), out


def test_readme_library_example_passes_mypy_strict(tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks, "README has a library example"
    example = tmp_path / "example.py"
    example.write_text(blocks[0])
    out = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(example)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


WHEELS = REPO / ".wheels"  # `make wheels` (a prerequisite of `make test-host`): the dependencies as wheels


def _corral_wheel(tmp_path: Path) -> Path:
    """A wheel of this checkout, built the way pip builds it (isolated, setuptools from .wheels)."""
    out = tmp_path / "dist"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index", "--find-links",
                           str(WHEELS), "-w", str(out), str(REPO)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = out.glob("corral-*.whl")
    return wheel


@pytest.mark.skipif(not WHEELS.is_dir(), reason="needs .wheels (make wheels)")
def test_wheel_metadata_and_unit_files(tmp_path: Path) -> None:
    import corral

    wheel = _corral_wheel(tmp_path)
    assert wheel.name.startswith(f"corral-{corral.__version__}-"), "one version source: corral.__version__"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        units = {n.rsplit("/", 1)[1]: z.read(n).decode() for n in names if n.startswith("corral/unit_files/")}
    assert "License-Expression: MIT" in meta and "License-File: LICENSE" in meta
    assert "Classifier: Operating System :: POSIX :: Linux" in meta
    assert "Requires-Dist: pystemd>=0.13; extra == \"systemd\"" in meta
    assert not re.search(r"^Requires-Dist: pystemd[^;]*$", meta, re.M), "pystemd only in the systemd extra"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert units == {p.name: p.read_text() for p in (REPO / "units").iterdir()}


@pytest.mark.skipif(not WHEELS.is_dir(), reason="needs .wheels (make wheels)")
@pytest.mark.skipif(not os.environ.get("CORRAL_CGROUP_ROOT"), reason="needs the tests' own cgroup root (cgroupfs)")
def test_wheel_in_a_fresh_venv_without_a_compiler(tmp_path: Path) -> None:
    """A plain `pip install corral` from binary wheels only, with no compiler reachable,
    then `corral doctor` and a cgroupfs run: pystemd is an extra, not a requirement."""
    wheel = _corral_wheel(tmp_path)
    venv = tmp_path / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True, timeout=120)
    nocc = {**os.environ, "CC": "/bin/false", "CXX": "/bin/false", "PATH": f"{venv}/bin:/usr/bin:/bin"}
    proc = subprocess.run([str(venv / "bin/pip"), "install", "-q", "--disable-pip-version-check", "--no-index",
                           "--only-binary", ":all:", "--find-links", str(WHEELS), str(wheel)],
                          capture_output=True, text=True, timeout=300, env=nocc)
    assert proc.returncode == 0, proc.stderr
    assert subprocess.run([str(venv / "bin/python"), "-c", "import pystemd"], capture_output=True).returncode != 0
    env = {**nocc, "XDG_CONFIG_HOME": str(tmp_path / "c"), "XDG_STATE_HOME": str(tmp_path / "s"),
           "XDG_RUNTIME_DIR": str(tmp_path / "r"), "CORRAL_BACKEND": "cgroupfs"}
    corral = str(venv / "bin/corral")
    doctor = subprocess.run([corral, "doctor", "--json"], capture_output=True, text=True, timeout=60, env=env)
    assert doctor.returncode == 0, doctor.stderr
    report = json.loads(doctor.stdout)
    assert report["chosen"] == "cgroupfs"
    systemd = next(b for b in report["backends"] if b["name"] == "systemd")
    assert not systemd["usable"]
    run = subprocess.run([corral, "run", "pkgtest", "--", "sh", "-c", "echo $CORRAL_RUN_ID; exit 3"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert run.returncode == 3, run.stderr
    shown = json.loads(subprocess.run([corral, "show", "--json", run.stdout.strip()], capture_output=True,
                                      text=True, timeout=60, env=env).stdout)
    assert shown["state"] == "failed" and shown["exit_code"] == 3
    assert shown["cgroup"].startswith(os.environ["CORRAL_CGROUP_ROOT"])
    # ... and the units came with it: `corral install-units` from the installed wheel.
    dest = tmp_path / "units"
    proc = subprocess.run([corral, "install-units", "--dest", str(dest), "--no-reload"], capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert f"ExecStart={venv}/bin/corral gc" in (dest / "corral-gc.service").read_text()


def test_systemd_backend_without_pystemd_says_how_to_get_it(tmp_path: Path) -> None:
    """With pystemd not importable, starting a run on the systemd backend is exit 69 naming
    the extra. (Listing needs no bus: ps reads the cgroup tree.)"""
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "pystemd").mkdir()
    (blocker / "pystemd" / "__init__.py").write_text("raise ImportError('pystemd hidden by the test')\n")
    env = {**os.environ, "PYTHONPATH": str(blocker), "CORRAL_BACKEND": "systemd",
           "XDG_STATE_HOME": str(tmp_path / "s"), "XDG_CONFIG_HOME": str(tmp_path / "c")}
    if Path("/run/systemd/system").exists():
        proc = subprocess.run([sys.executable, "-m", "corral", "run", "nopystemd", "--", "true"], capture_output=True,
                              text=True, timeout=60, env=env)
        assert proc.returncode == 69, proc.stderr
        assert "corral[systemd]" in proc.stderr
        proc = subprocess.run([sys.executable, "-m", "corral", "ps", "--all", "--json"], capture_output=True, text=True,
                              timeout=60, env=env)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == [], "the refused run left no record: the bus is reached before anything"
    doctor = subprocess.run([sys.executable, "-m", "corral", "doctor", "--json"], capture_output=True, text=True,
                            timeout=60, env={**env, "CORRAL_BACKEND": ""})
    systemd = next(b for b in json.loads(doctor.stdout)["backends"] if b["name"] == "systemd")
    assert not systemd["usable"]
    if Path("/run/systemd/system").exists():
        assert "corral[systemd]" in " ".join(systemd["missing"])


def test_install_units_renders_for_system_and_user(tmp_path: Path) -> None:
    def install(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "corral", "install-units", "--no-reload", *args],
                              capture_output=True, text=True, timeout=60)

    system, user = tmp_path / "system", tmp_path / "user"
    assert install("--prefix", "/opt/corral", "--dest", str(system)).returncode == 0
    assert install("--user", "--prefix", "/opt/corral", "--dest", str(user)).returncode == 0
    names = sorted(p.name for p in (REPO / "units").iterdir())
    assert sorted(p.name for p in system.iterdir()) == names == sorted(p.name for p in user.iterdir())
    gc_system, gc_user = (system / "corral-gc.service").read_text(), (user / "corral-gc.service").read_text()
    assert "ExecStart=/opt/corral/bin/corral gc" in gc_system and "ExecStart=/opt/corral/bin/corral gc" in gc_user
    assert "ProtectSystem=" in gc_system and "ProtectSystem=" not in gc_user, "user units drop system-only hardening"
    assert "@BINDIR@" not in gc_system + gc_user and "@DOCDIR@" not in gc_system + gc_user
    assert all((p.stat().st_mode & 0o777) == 0o644 for p in system.iterdir())
    # --remove takes only corral's files; a file of someone else's stays.
    (system / "other.service").write_text("[Service]\nExecStart=/bin/true\n")
    proc = install("--remove", "--dest", str(system), "--json")
    assert proc.returncode == 0 and sorted(json.loads(proc.stdout)["removed"]) == names
    assert [p.name for p in system.iterdir()] == ["other.service"]
    # a destination that cannot be a directory: an error, nothing written
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = install("--dest", str(blocker / "sub"))
    assert proc.returncode == 1 and "install units" in proc.stderr and "Traceback" not in proc.stderr
    assert blocker.read_text() == "x"


def test_help_names_exit_codes_environment_and_every_option() -> None:
    import click

    import corral.errors as errors
    from corral.cli.main import ENVIRONMENT, EXIT_STATUS, cli

    out = subprocess.run([sys.executable, "-m", "corral", "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    for code, _meaning in EXIT_STATUS:
        assert re.search(rf"^\s+{re.escape(code)}\s+\S", out.stdout, re.M), code
    for name, _meaning in ENVIRONMENT:
        assert name in out.stdout
    # every exit code the error tree can produce is explained, in --help and in the README
    documented = {c for code, _ in EXIT_STATUS for c in code.split("/") if c.isdigit()}
    tree = {str(cls.exit_code) for cls in vars(errors).values()
            if isinstance(cls, type) and issubclass(cls, errors.CorralError) and isinstance(cls.exit_code, int)}
    assert tree <= documented, tree - documented
    readme = (REPO / "README.md").read_text()
    table = set(re.findall(r"^\| ([0-9/+N]+) \|", readme, re.M))
    assert table == {code for code, _ in EXIT_STATUS}, table ^ {code for code, _ in EXIT_STATUS}

    def missing_help(cmd: click.Command, path: str) -> list[str]:
        found = [f"{path} {p.opts[0]}" for p in cmd.params if isinstance(p, click.Option) and not p.help]
        if not (cmd.help or cmd.short_help):
            found.append(f"{path}: no help")
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                found += missing_help(sub, f"{path} {name}")
        return found

    assert missing_help(cli, "corral") == []


def test_completion_offers_agents_and_profiles_from_the_config(tmp_path: Path) -> None:
    (tmp_path / "corral").mkdir()
    (tmp_path / "corral" / "config.toml").write_text(
        '[agents.lane1]\n[agents.lane2]\n[agents.other]\n[auth.openai]\ntoken_url = "https://x"\n')

    def complete(words: str) -> list[str]:
        env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path), "COMP_WORDS": words,
               "COMP_CWORD": str(len(words.split()) - 1), "_CORRAL_COMPLETE": "bash_complete"}
        out = subprocess.run([sys.executable, "-m", "corral"], env=env, capture_output=True, text=True, timeout=30)
        return [line.split(",", 1)[1] for line in out.stdout.splitlines()]

    assert complete("corral agents show la") == ["lane1", "lane2"]
    assert complete("corral agents rm o") == ["other"]
    assert complete("corral auth token o") == ["openai"]
    assert complete("corral run --auth o") == ["openai"]
    assert complete("corral kill -s T") == ["TERM"]
