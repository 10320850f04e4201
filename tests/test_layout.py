"""The package layout is the architecture (issue 17), so it is checked, not only described.

Every import counts here: module level, inside functions (the lazy ones that keep start-up
fast) and under ``TYPE_CHECKING``. A cycle through any of them is a design cycle.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
LINE_LIMIT = 420  # "no module over ~400 lines"


def modules(src: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package) for every module below *src*."""
    out = {}
    for path in sorted(src.rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_pkg)
    return out


def import_graph(src: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same tree it imports, anywhere in its body."""
    mods = modules(src)
    graph: dict[str, set[str]] = {name: set() for name in mods}
    for name, (path, is_pkg) in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                graph[name].update(alias.name for alias in node.names if alias.name in mods)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in mods:
                        graph[name].add(sub)  # `from pkg import module`
                    elif target in mods:
                        graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for succ in edges:
                if succ not in index:
                    index[succ] = low[succ] = counter
                    counter += 1
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph[succ]))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in graph[node]:
                        found.append(sorted(component))
    return found


def unit_of(module: str) -> str:
    """``corral.runs.launch`` -> ``corral.runs``; a top-level module is its own unit."""
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and (SRC / "corral" / parts[1]).is_dir()):
        return ".".join(parts[:2])
    return module


def allowed_imports(package: Path) -> set[str] | None:
    """The ``May import:`` line of a subpackage's docstring (None: any part of corral)."""
    doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
    match = re.search(r"^May import: (.+?)(?:\n\n|\Z)", doc, re.S | re.M)
    assert match, f"{package}/__init__.py: its docstring must say what the package may import"
    text = match.group(1).replace("\n", " ")
    if text.startswith("any part of corral"):
        return None
    return {name.strip().rstrip(".") for name in text.split(",")}


def test_cycle_finder_finds_a_cycle(tmp_path: Path) -> None:
    """The check below can fail: a two-module cycle through a lazy import and a type-only
    one is found, and a tree without one passes."""
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .b import g\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p.a import f\n")
    (pkg / "c.py").write_text("from . import a\n")
    assert cycles(import_graph(tmp_path)) == [["p.a", "p.b"]]
    (pkg / "b.py").write_text("import os\n")
    assert cycles(import_graph(tmp_path)) == []


def test_no_import_cycle() -> None:
    assert cycles(import_graph(SRC)) == []


def test_each_module_imports_alone() -> None:
    """Each module, first in a fresh interpreter: no module works only because another
    was imported before it."""
    names = [name for name in modules(SRC) if name.startswith("corral")]

    def alone(name: str) -> tuple[str, int, str]:
        proc = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, timeout=60,
                              check=False)
        return name, proc.returncode, proc.stderr[-2000:]

    with ThreadPoolExecutor(max_workers=4) as pool:
        failed = [(name, rc, err) for name, rc, err in pool.map(alone, names) if rc != 0]
    assert len(names) > 40
    assert failed == []


@pytest.mark.parametrize("package", sorted(p.name for p in (SRC / "corral").iterdir()
                                           if (p / "__init__.py").is_file()))
def test_package_imports_only_what_its_docstring_says(package: str) -> None:
    allowed = allowed_imports(SRC / "corral" / package)
    doc = ast.get_docstring(ast.parse((SRC / "corral" / package / "__init__.py").read_text())) or ""
    assert len(doc) > 200, f"corral.{package}: say in a paragraph what lives there"
    if allowed is None:
        return
    graph = import_graph(SRC)
    unit = f"corral.{package}"
    used = {unit_of(dep) for name, deps in graph.items() if unit_of(name) == unit for dep in deps} - {unit}
    assert used <= allowed, f"{unit} imports {sorted(used - allowed)}, which its docstring does not allow"


def test_only_main_imports_the_cli() -> None:
    importers = {name for name, deps in import_graph(SRC).items()
                 if unit_of(name) != "corral.cli" and any(unit_of(d) == "corral.cli" for d in deps)}
    assert importers == {"corral.__main__"}


def test_no_module_is_long() -> None:
    long = {str(path.relative_to(SRC)): n for path, _ in modules(SRC).values()
            if (n := len(path.read_text().splitlines())) > LINE_LIMIT}
    assert long == {}
