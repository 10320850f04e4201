"""Git worktrees that corral creates for agents, and removes only if it created them.

``--worktree REPO[@BRANCH]`` runs real git: ``git worktree add`` on the agent's own
branch (``corral/<agent>`` unless named), in a directory corral owns
(``<state>/worktrees/<agent>``). The config entry records that corral created it; only
such a worktree, at that place and still registered with its repository, is ever
removed, with ``git worktree remove`` (which itself refuses uncommitted changes).
Branches are never deleted: they may hold the agent's commits.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CorralError, UsageError

if TYPE_CHECKING:
    import subprocess

GIT_TIMEOUT = 600.0  # a checkout of a large repository can take minutes


@dataclass(frozen=True)
class Worktree:
    """A worktree recorded in an agent's config entry."""

    repo: str  # top level of the repository it was added to
    branch: str
    path: str
    created: bool = True  # corral ran `git worktree add`; only then may `agents rm` remove it

    def to_toml(self) -> dict[str, Any]:
        return {"repo": self.repo, "branch": self.branch, "path": self.path, "created": self.created}

    @classmethod
    def from_toml(cls, data: Mapping[str, Any]) -> Worktree:
        for key in ("repo", "branch", "path"):
            if not isinstance(data.get(key), str) or not data[key]:
                raise ValueError(f"worktree.{key} must be a non-empty string")
        if not isinstance(data.get("created", False), bool):
            raise ValueError("worktree.created must be true or false")  # noqa: TRY004 -- "bad data" is ValueError to every caller
        unknown = set(data) - {"repo", "branch", "path", "created"}
        if unknown:
            raise ValueError(f"unknown worktree key(s): {', '.join(sorted(unknown))}")
        return cls(data["repo"], data["branch"], data["path"], bool(data.get("created", False)))


class WorktreeDirty(UsageError):
    """The worktree has uncommitted changes and --force was not given (exit 2)."""

    def __init__(self, path: str, changes: list[str]) -> None:
        shown = "; ".join(changes[:5]) + (" ..." if len(changes) > 5 else "")
        super().__init__(
            f"worktree {path} has uncommitted changes ({len(changes)}: {shown}); nothing was removed",
            hint="commit or stash them, or pass --force to discard them",
        )
        self.path = path
        self.changes = changes


def _git(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    import subprocess  # only worktree commands run git: ~2 ms that agents add and run skip

    env = {**os.environ, "LC_ALL": "C", "GIT_TERMINAL_PROMPT": "0"}
    try:
        proc = subprocess.run(["git", *args], capture_output=True, text=True, env=env, timeout=GIT_TIMEOUT,
                              stdin=subprocess.DEVNULL, check=False)
    except FileNotFoundError:
        raise CorralError("git is not installed", hint="install git to use --worktree") from None
    except subprocess.TimeoutExpired:
        raise CorralError(f"git {' '.join(args)}: no answer within {GIT_TIMEOUT:g}s") from None
    if check and proc.returncode != 0:
        raise CorralError(f"git {' '.join(args)} failed: {_last_line(proc.stderr)}")
    return proc


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no message)"


def parse_worktree_arg(text: str) -> tuple[str, str | None]:
    """``REPO[@BRANCH]`` -> (repo, branch). A path that exists as given wins, so a repo
    directory with an ``@`` in its name works."""
    if not text:
        raise UsageError("empty --worktree", hint="use --worktree REPO[@BRANCH]")
    if os.path.isdir(text):
        return text, None
    repo, sep, branch = text.rpartition("@")
    if not sep:
        return text, None
    if not repo or not branch:
        raise UsageError(f"invalid --worktree {text!r}", hint="use --worktree REPO[@BRANCH]")
    return repo, branch


def worktree_home(state_dir: Path) -> Path:
    """Where corral's worktrees live: a place corral owns, one directory per agent."""
    return state_dir / "worktrees"


def plan(repo: str, branch: str | None, *, agent: str, state_dir: Path) -> Worktree:
    """Validate REPO and BRANCH with read-only git and say where the worktree would go.
    Raises :class:`UsageError` (exit 2) for bad input; creates nothing."""
    if not os.path.isdir(repo):
        raise UsageError(f"--worktree: no such directory {repo!r}")
    top = _git("-C", repo, "rev-parse", "--show-toplevel", check=False)
    if top.returncode != 0:
        raise UsageError(f"--worktree: {repo} is not a git work tree: {_last_line(top.stderr)}")
    branch = branch or f"corral/{agent}"
    if _git("check-ref-format", "--branch", branch, check=False).returncode != 0:
        raise UsageError(f"--worktree: invalid branch name {branch!r}")
    path = worktree_home(state_dir) / agent
    if os.path.lexists(path):
        raise UsageError(
            f"--worktree: {path} already exists",
            hint=f"a previous worktree of {agent!r} is still there; remove it with: git worktree remove {path}",
        )
    return Worktree(repo=top.stdout.strip(), branch=branch, path=str(path), created=True)


def create(wt: Worktree) -> Worktree:
    """``git worktree add``: check out wt.branch (created from HEAD if it does not exist)."""
    path = Path(wt.path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CorralError(f"cannot create {path.parent}: {err.strerror}") from err
    exists = _git("-C", wt.repo, "rev-parse", "--verify", "--quiet", f"refs/heads/{wt.branch}", check=False)
    if exists.returncode == 0:
        args = ["worktree", "add", str(path), wt.branch]  # reuse it: it may hold earlier work
    else:
        args = ["worktree", "add", "-b", wt.branch, str(path)]
    proc = _git("-C", wt.repo, *args, check=False)
    if proc.returncode != 0:
        raise UsageError(f"git worktree add {path} ({wt.branch}) failed: {_last_line(proc.stderr)}")
    return wt


def changes(path: str) -> list[str]:
    """Uncommitted changes in a worktree, as ``git status --porcelain`` lines (untracked
    files count: ``git worktree remove`` would refuse them too)."""
    return [ln for ln in _git("-C", path, "status", "--porcelain").stdout.splitlines() if ln.strip()]


def _registered(repo: str, path: Path) -> bool:
    proc = _git("-C", repo, "worktree", "list", "--porcelain", check=False)
    if proc.returncode != 0:
        return False
    real = os.path.realpath(path)
    return any(ln.startswith("worktree ") and os.path.realpath(ln[9:]) == real for ln in proc.stdout.splitlines())


def removable(wt: Worktree, *, state_dir: Path) -> str | None:
    """None if corral may remove *wt*, else why it must be left alone."""
    if not wt.created:
        return "corral did not create it"
    home = os.path.realpath(worktree_home(state_dir))
    real = os.path.realpath(wt.path)
    if os.path.dirname(real) != home:
        return f"it is not under {home}, where corral keeps its worktrees"
    if os.path.lexists(wt.path) and not _registered(wt.repo, Path(wt.path)):
        return f"it is not a registered worktree of {wt.repo}"
    return None


def remove(wt: Worktree, *, state_dir: Path, force: bool = False) -> str:
    """Remove a worktree corral created. Returns ``removed``, ``gone`` (already removed:
    idempotent) or ``kept: <why>``. Raises :class:`WorktreeDirty` on uncommitted changes
    unless *force*."""
    why = removable(wt, state_dir=state_dir)
    if why:
        return f"kept: {why}"
    if not os.path.lexists(wt.path):
        if os.path.isdir(wt.repo):
            _git("-C", wt.repo, "worktree", "prune", check=False)  # forget its admin files
        return "gone"
    if not force:
        dirty = changes(wt.path)
        if dirty:
            raise WorktreeDirty(wt.path, dirty)
    proc = _git("-C", wt.repo, "worktree", "remove", *(["--force"] if force else []), wt.path, check=False)
    if proc.returncode != 0:
        if not force and "modified or untracked" in proc.stderr:
            raise WorktreeDirty(wt.path, [_last_line(proc.stderr)])
        raise CorralError(f"git worktree remove {wt.path} failed: {_last_line(proc.stderr)}")
    return "removed"
