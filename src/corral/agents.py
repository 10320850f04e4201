"""Agent lifecycle beyond the config entry: worktrees on add, runs and worktrees on remove.

``create_agent`` validates everything first (values, names, the repository), creates the
worktree *outside* the config lock (a checkout can take minutes; other writers should not
wait for it), then records the entry under the lock; if recording fails, the worktree it
just made is removed again. ``delete_agent`` stops the agent's runs, removes the worktree
corral created, and removes the entry, in that order, so a failure at any step leaves a
state that running it again completes (idempotent).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import worktree as _wt
from ._log import log
from .config.settings import (
    AgentConfig,
    add_agent,
    get_agent,
    normalize_changes,
    open_store,
    remove_agent,
)
from .errors import NoBackend, NotFound, UsageError
from .names import validate_agent
from .paths import Dirs


def stop_agent_runs(name: str, *, dirs: Dirs, backend: str | None = None, grace: float = 10.0) -> list[str]:
    """Stop the agent's live runs; return their ids. Kept small on purpose: how runs are
    found may change when ``corral run`` takes its settings from the agent."""
    from .runs.corral import Corral  # lazily: config commands should not load the run engine

    with Corral(backend, dirs=dirs) as c:
        try:
            # Not c.targets(name): an all-hex agent name ("cafe") would also match run ids
            # by prefix there, and rm must never stop another agent's run.
            runs = [v.record for v in c.ps() if v.record.agent == name]
        except NoBackend:
            # No backend here: nothing can be running unless a record says so.
            if any(r.agent == name and not r.ended for r in c.store.all()):
                raise
            return []
        for record in runs:
            try:
                c.stop_run(record.id, grace)
            except NotFound:
                pass  # it ended on its own meanwhile
        return [r.id for r in runs]


def create_agent(dirs: Dirs, name: str, changes: Mapping[str, Any] | None = None, *, worktree: str | None = None,
                 update: bool = False, cwd: str | None = None) -> AgentConfig:
    """``agents add``: the entry, and with *worktree* (``REPO[@BRANCH]``) a git worktree on
    the agent's own branch, used as its workspace."""
    validate_agent(name)
    changes = dict(changes or {})
    store = open_store(dirs)
    if worktree is None:
        return add_agent(store, name, changes, update=update, cwd=cwd)
    if changes.get("workspace") is not None:
        raise UsageError("--workspace and --worktree exclude each other", hint="the worktree is the workspace")
    normalize_changes(changes, cwd=cwd)  # every bad value fails before git runs
    repo, branch = _wt.parse_worktree_arg(worktree)
    existing = get_agent(store, name)
    if existing is not None and not update:
        raise UsageError(f"agent {name!r} already exists",
                         hint=f"use --update to change it, or: corral agents set {name} KEY=VALUE")
    if existing is not None and existing.worktree is not None:
        # --update of an agent that has its worktree: keep it, never make a second one.
        if os.path.realpath(repo) != os.path.realpath(existing.worktree.repo) or (
                branch is not None and branch != existing.worktree.branch):
            raise UsageError(f"agent {name!r} already has a worktree of {existing.worktree.repo} "
                             f"({existing.worktree.branch})", hint=f"remove it first: corral agents rm {name}")
        return add_agent(store, name, changes, update=True, cwd=cwd)
    plan = _wt.plan(repo, branch, agent=name, state_dir=dirs.state)
    made = _wt.create(plan)
    try:
        return add_agent(store, name, {**changes, "workspace": made.path, "worktree": made}, update=update, cwd=cwd)
    except BaseException:
        _undo_worktree(store, name, made, dirs)
        raise


def _undo_worktree(store: Any, name: str, made: _wt.Worktree, dirs: Dirs) -> None:
    try:
        recorded = get_agent(store, name)
    except Exception:  # noqa: BLE001 -- an unreadable config: keep the worktree, it is safer
        return
    if recorded is not None and recorded.worktree == made:
        return  # the entry was written after all (only the dir fsync failed): keep both
    try:
        _wt.remove(made, state_dir=dirs.state, force=True)
    except Exception as err:  # noqa: BLE001 -- the first error is the one to report
        log.warning("could not remove worktree %s after a failed add: %s", made.path, err)


@dataclass(frozen=True)
class Removal:
    """What ``agents rm`` did."""

    name: str
    found: bool
    stopped: list[str] = field(default_factory=list)
    worktree: str | None = None  # removed | gone | kept: <why> | None (it had none)


def delete_agent(dirs: Dirs, name: str, *, force: bool = False, backend: str | None = None,
                 grace: float = 10.0) -> Removal:
    """``agents rm``: stop the agent's runs, remove the worktree corral created (refused
    with uncommitted changes unless *force*), remove the entry. Running it again after a
    failure finishes the job; on an agent that is not configured it does nothing."""
    validate_agent(name)
    store = open_store(dirs)
    agent = get_agent(store, name)
    if agent is None:
        return Removal(name, found=False)
    wt = agent.worktree
    # Refuse before any side effect: a dirty worktree should not cost the agent its runs.
    if (wt is not None and not force and _wt.removable(wt, state_dir=dirs.state) is None
            and os.path.isdir(wt.path)):
        dirty = _wt.changes(wt.path)
        if dirty:
            raise _wt.WorktreeDirty(wt.path, dirty)
    stopped = stop_agent_runs(name, dirs=dirs, backend=backend, grace=grace)
    status = _wt.remove(wt, state_dir=dirs.state, force=force) if wt is not None else None
    remove_agent(store, name)
    return Removal(name, found=True, stopped=stopped, worktree=status)
