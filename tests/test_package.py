"""The package as users meet it: `python -m corral`, and the README's library example
type-checks under mypy --strict (explicit re-exports, annotations that match)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

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
