"""The isolation boundary around a run: bubblewrap namespaces, an environment allowlist, an identity.

The cgroup *contains* a run (listed, limited, killed as one unit). This module *isolates*
it, because its commands were written by an LLM: at ``standard`` the payload gets its own
PID, mount, IPC and cgroup namespaces (it sees only its own processes; corral's config,
state and runtime dirs are empty read-only tmpfs; the cgroup filesystem and the bus
sockets are out of reach), no capabilities, ``no_new_privs``, a new session, and only an
allowlisted environment. ``strict`` adds a read-only root with the workspace, ``rw_paths``,
a private /tmp and a per-agent home writable. ``none`` is containment only.

The sandbox is bubblewrap (the base of Flatpak and of codex's and Claude Code's Linux
sandboxes), exec'd by the gate child *after* it joined the run's cgroup: nothing of a run
is ever born outside it. Process shape inside the cgroup::

    bwrap (main_pid, outside the namespaces; ignores INT/TERM/HUP/QUIT)
      bwrap (pid 1 of the run's PID namespace: reaps)
        env --default-signal CMD...   (the command, signal dispositions reset)

What it cannot stop is written down in README ("How a run is built").
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import IsolationUnavailable, UsageError, spawn_error
from .policy import (
    Identity,
    Isolation,
    filter_env,
    resolve_identity,
)

# Sockets through which a run could ask a service manager to start work outside its cgroup.
BUS_SOCKETS = ("/run/dbus/system_bus_socket", "/var/run/dbus/system_bus_socket", "/run/systemd/private")


def bwrap_path() -> str | None:
    return shutil.which("bwrap", path="/usr/bin:/bin:/usr/local/bin")


def _under(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _cgroup_mounts_outside_sys() -> list[str]:
    from ..linux.cgroup import MOUNTINFO, _cgroup_mounts

    return [str(point) for _fs, _opts, point in _cgroup_mounts(MOUNTINFO) if not _under(str(point), ["/sys"])]


@dataclass
class Sandbox:
    """A planned isolation for one run, built in the parent; ``argv()`` runs in the child."""

    level: str
    network: str
    identity: Identity
    env: dict[str, str]
    command: tuple[str, ...]
    cwd: str
    hidden: tuple[str, ...] = ()  # corral's dirs and the auth store: empty and read-only inside
    bind_back: tuple[str, ...] = ()  # what must stay reachable although under a hidden dir
    rw_paths: tuple[str, ...] = ()
    home: str | None = None  # strict: the per-agent home on the host, bound at $HOME
    home_ro: tuple[str, ...] = ()  # strict: (real path) files bound read-only into $HOME
    bwrap: str = "/usr/bin/bwrap"
    notes: list[str] = field(default_factory=list)
    keep_fd: int = -1  # in the child: an fd bwrap reads (the seccomp filter)

    @property
    def active(self) -> bool:
        return self.level != "none"

    def describe(self, *, terminal: bool = False) -> dict[str, Any]:
        """For the run record and ``corral show``. *terminal*: it got its own relayed pty."""
        ident = self.identity
        uid = ident.uid if ident.uid is not None else os.geteuid()
        root_note = None
        if uid == 0:
            root_note = "uid 0 with no capabilities" if self.active else "full root (no isolation)"
        return {"level": self.level, "network": self.network, "uid": uid, "user": ident.name, "root": root_note,
                "layers": self.layers(terminal=terminal), "notes": list(self.notes)}

    def layers(self, *, terminal: bool = False) -> list[str]:
        if not self.active:
            return ["containment only: the run shares the caller's namespaces, environment and identity"]
        out = ["pid namespace: sees only its own processes",
               ("mount namespace: corral's config, state and runtime dirs hidden; cgroup fs read-only; "
                "bus sockets unreachable"),
               "new session on its own pty, relayed by corral" if terminal
               else "new session, no controlling terminal of the caller's",
               "no_new_privs, no capabilities",
               "environment allowlist"]
        if self.level == "strict":
            out.append("read-only filesystem except the workspace, rw_paths, /tmp (private) and a per-agent home")
        if self.network != "host":
            out.append(f"network: {self.network} (own network namespace)")
        return out

    def argv(self) -> list[str]:
        """The bwrap command line. Called in the child after it took on its identity, so
        a path the identity cannot reach is skipped (it cannot be read from inside either)."""
        # No --die-with-parent: the outer bwrap exits with the command, and its init must
        # outlive it while the command's leftovers live (they are counted, or drained with
        # --keep-leftovers, then killed with the cgroup). The watchdog covers a dead owner.
        a = [self.bwrap, "--unshare-pid", "--unshare-ipc", "--unshare-cgroup-try"]
        if self.network != "host":
            a.append("--unshare-net")  # only lo, not connected to anything
        if self.network == "none":
            self.keep_fd = _seccomp_fd()
            a += ["--seccomp", str(self.keep_fd)]
        a += ["--ro-bind", "/", "/"] if self.level == "strict" else ["--bind", "/", "/"]
        # Later mounts sit on top of earlier ones: fresh /proc and /dev, then the rest.
        a += ["--proc", "/proc", "--dev", "/dev", "--ro-bind", "/sys", "/sys"]
        for point in _cgroup_mounts_outside_sys():
            if os.path.isdir(point):
                a += ["--ro-bind", point, point]
        if self.level == "strict":
            a += ["--tmpfs", "/tmp"]
        if os.path.isdir("/run/user"):
            a += ["--tmpfs", "/run/user"]  # every user's session bus and runtime dir
        hidden = [p for p in self.hidden if os.path.isdir(p)]
        for path in hidden:
            a += ["--perms", "0555", "--tmpfs", path]
        for sock in self._bus_sockets():
            a += ["--ro-bind", "/dev/null", sock]
        if self.home is not None:
            home = self.env.get("HOME") or "/"
            a += ["--bind", self.home, home]
            real = self.identity.home or os.path.expanduser("~")
            for name in self.home_ro:
                src = os.path.join(real, name)
                if os.path.exists(src):
                    a += ["--ro-bind", src, os.path.join(home, name)]
        writable = self.level == "strict"
        for path in (self.cwd, *self.rw_paths, *self.bind_back):
            if not os.path.exists(path):
                continue
            if writable or _under(path, hidden) or _under(path, ["/run/user"]):
                a += ["--bind", path, path]
        for path in hidden:
            a += ["--remount-ro", path]
        ident_uid = os.geteuid()
        if ident_uid == 0:
            a += ["--cap-drop", "ALL"]
        a += ["--chdir", self.cwd, "--", "/usr/bin/env", "--default-signal"]
        command = list(self.command)
        if "=" in command[0]:  # env would take it for an assignment
            command[0] = _resolve(command[0], self.env, self.cwd) or command[0]
        return a + command

    def _bus_sockets(self) -> list[str]:
        out = [s for s in BUS_SOCKETS if os.path.exists(s)]
        runtime = os.environ.get("XDG_RUNTIME_DIR")
        if runtime and not _under(runtime, ["/run/user"]):
            out += [p for p in (f"{runtime}/bus", f"{runtime}/systemd/private") if os.path.exists(p)]
        return out


# network = "none": beyond a network namespace with only lo, no IP or packet sockets at all
# (socket(2) fails with EAFNOSUPPORT), and no io_uring, which could create them around it.
_AUDIT_ARCH = {"x86_64": (0xC000003E, 41, 425), "aarch64": (0xC00000B7, 198, 425)}  # arch, socket, io_uring_setup
_AF_DENIED = (2, 10, 17)  # AF_INET, AF_INET6, AF_PACKET


def seccomp_program() -> bytes | None:
    """A classic BPF seccomp filter (struct sock_filter[]), as bwrap --seccomp reads it."""
    import platform
    import struct

    arch = _AUDIT_ARCH.get(platform.machine())
    if arch is None:
        return None
    audit, nr_socket, nr_uring = arch
    ld, jeq, ret = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K
    allow, deny = 0x7FFF0000, 0x00050000 | 97  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO|EAFNOSUPPORT
    prog = [
        (ld, 0, 0, 4), (jeq, 1, 0, audit), (ret, 0, 0, allow),  # another ABI: not ours to judge
        (ld, 0, 0, 0),
        (jeq, 7, 0, nr_uring), (jeq, 6, 0, nr_uring | 0x40000000),
        (jeq, 1, 0, nr_socket), (jeq, 0, 4, nr_socket | 0x40000000),
        (ld, 0, 0, 16),
        (jeq, 2, 0, _AF_DENIED[0]), (jeq, 1, 0, _AF_DENIED[1]), (jeq, 0, 1, _AF_DENIED[2]),
        (ret, 0, 0, deny), (ret, 0, 0, allow),
    ]
    # fix the jumps: after "ld nr" (index 3) deny is at index 12, allow at 13
    prog[4] = (jeq, 12 - 5, 0, nr_uring)
    prog[5] = (jeq, 12 - 6, 0, nr_uring | 0x40000000)
    prog[6] = (jeq, 1, 0, nr_socket)
    prog[7] = (jeq, 0, 13 - 8, nr_socket | 0x40000000)
    return b"".join(struct.pack("=HBBI", *insn) for insn in prog)


def _seccomp_fd() -> int:
    """In the child: the filter in a pipe whose read end the child keeps open for bwrap."""
    program = seccomp_program()
    if program is None:
        raise OSError(95, "network none needs a seccomp filter for this CPU architecture")
    r, w = os.pipe()
    os.write(w, program)
    os.close(w)
    os.set_inheritable(r, True)
    return r


def _resolve(cmd: str, env: Mapping[str, str], cwd: str) -> str | None:
    if "/" in cmd:
        path = os.path.join(cwd, cmd)
        return path if os.path.isfile(path) and os.access(path, os.X_OK) else None
    return shutil.which(cmd, path=env.get("PATH", os.defpath))


def _status(pid: int | str) -> tuple[int, list[str]]:
    """(ppid, NSpid) of a process; (0, []) if it is gone."""
    ppid, nspid = 0, []
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("PPid:"):
                    ppid = int(line.split()[1])
                elif line.startswith("NSpid:"):
                    nspid = line.split()[1:]
                    break
    except (OSError, ValueError):
        pass
    return ppid, nspid


def sandbox_pids(pids: Sequence[int]) -> list[int]:
    """corral's own processes among a run's: each run namespace's init (pid 1 one level
    below ours) and its parent, the outer bwrap. The rest is the command's. Works from the
    cgroup alone, so also for a run whose record is gone."""
    depth = len(_status("self")[1])
    members = set(pids)
    out = set()
    for pid in pids:
        ppid, ns = _status(pid)
        if len(ns) == depth + 1 and ns[-1] == "1":
            out.add(pid)
            if ppid in members:
                out.add(ppid)
    return sorted(out)


def plan(iso: Isolation, *, agent: str, argv: Sequence[str], cwd: str, env: Mapping[str, str],
         corral_env: Mapping[str, str], hidden: Sequence[str], bind_back: Sequence[str], state_dir: str,
         unset: Sequence[str] = ()) -> Sandbox:
    """Everything the child needs, decided before the fork. *env* is what the agent's config,
    ``--env`` and ``--auth`` give; *corral_env* the ``CORRAL_*`` variables; *unset* the
    inherited variables the run must not get (another credential its CLI would prefer)."""
    identity = resolve_identity(iso, cwd)
    if iso.level == "none":
        full = {**{k: v for k, v in os.environ.items() if k not in unset}, **env, **corral_env}
        return Sandbox(level="none", network="host", identity=identity, env=full, command=tuple(argv), cwd=cwd,
                       hidden=tuple(hidden))
    if iso.network != "host" and iso.level == "none":  # pragma: no cover - caught above
        raise UsageError("--network needs an isolation level other than none")
    bwrap = bwrap_path()
    if bwrap is None:
        raise IsolationUnavailable(
            f"isolation {iso.level!r} needs bubblewrap, which is not installed",
            hint="install it (apt-get install bubblewrap, or `make deps`), or run with --isolation none")
    base = {k: v for k, v in filter_env(os.environ, iso.env_passthrough).items() if k not in unset}
    if identity.uid is not None:
        base.update(HOME=identity.home or "/", USER=identity.name or str(identity.uid),
                    LOGNAME=identity.name or str(identity.uid), SHELL=identity.shell or "/bin/sh")
    full = {**base, **env, **corral_env}
    if "PATH" not in full:
        full["PATH"] = "/usr/local/bin:/usr/bin:/bin"
    if _resolve(argv[0], full, cwd) is None:
        import errno

        exists = "/" in argv[0] and os.path.exists(os.path.join(cwd, argv[0]))
        code = errno.EACCES if exists else errno.ENOENT
        raise spawn_error(f"cannot run {argv[0]!r}: {os.strerror(code)}", errno=code,
                         hint="check the command name and PATH" if code == errno.ENOENT else None)
    home = None
    if iso.level == "strict":
        home = os.path.join(state_dir, "homes", agent)
        os.makedirs(home, mode=0o700, exist_ok=True)
        if identity.uid is not None:
            os.chown(home, identity.uid, identity.gid if identity.gid is not None else identity.uid)
        full.setdefault("HOME", identity.home or os.path.expanduser("~"))
    return Sandbox(level=iso.level, network=iso.network, identity=identity, env=full, command=tuple(argv), cwd=cwd,
                   hidden=tuple(os.path.abspath(h) for h in hidden), bind_back=tuple(bind_back),
                   rw_paths=tuple(os.path.abspath(os.path.expanduser(p)) for p in iso.rw_paths), home=home,
                   home_ro=iso.home_ro, bwrap=bwrap)


def probe() -> dict[str, Any]:
    """For ``corral doctor``: can this machine build each level, and if not, why."""
    import subprocess

    bwrap = bwrap_path()
    out: dict[str, Any] = {"bwrap": bwrap, "levels": {"none": {"usable": True, "reason": "containment only"}}}
    if bwrap is None:
        reason = "bubblewrap is not installed (apt-get install bubblewrap)"
        out["levels"].update({lvl: {"usable": False, "reason": reason} for lvl in ("standard", "strict")})
        return out
    try:
        proc = subprocess.run([bwrap, "--bind", "/", "/", "--unshare-pid", "--unshare-cgroup-try", "--proc", "/proc",
                               "--dev", "/dev", "--unshare-net", "--", "/bin/true"], capture_output=True, timeout=10,
                              check=False)
        ok, why = proc.returncode == 0, proc.stderr.decode(errors="replace").strip()
    except (OSError, subprocess.SubprocessError) as err:
        ok, why = False, str(err)
    reason = ("bubblewrap can create pid, mount, ipc, cgroup and network namespaces here" if ok else
              f"bubblewrap cannot create namespaces here: {why or 'exit status ' + str(proc.returncode)}"
              + ("" if os.geteuid() == 0 else " (unprivileged user namespaces may be disabled: "
                 "sysctl user.max_user_namespaces, kernel.apparmor_restrict_unprivileged_userns)"))
    out["levels"].update({lvl: {"usable": ok, "reason": reason} for lvl in ("standard", "strict")})
    return out
