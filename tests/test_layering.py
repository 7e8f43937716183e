"""The import rules of the layout: ``shared`` is the floor, the launcher is the top, and the
scheduler runs without torch. Read from the source (every import statement, lazy ones too)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "loomserve"
PARTS = ("gateway", "scheduler", "worker", "kernels", "shared")
LAUNCHER = ("cli", "supervisor", "local_engine")


def loomserve_imports(path: Path) -> set[str]:
    """The loomserve modules ``path`` imports, as dotted names below ``loomserve``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {n.removeprefix("loomserve.") for n in names if n.startswith("loomserve.")}
        if isinstance(node, ast.ImportFrom) and node.module == "loomserve":
            found |= {alias.name for alias in node.names}
    return found


@pytest.mark.parametrize("path", sorted((PACKAGE / "shared").glob("*.py")), ids=lambda p: p.name)
def test_shared_imports_nothing_above_it(path: Path) -> None:
    above = {name for name in loomserve_imports(path) if name.split(".")[0] in (*PARTS, *LAUNCHER)
             and not name.startswith("shared")}
    assert not above, f"shared/{path.name} imports {sorted(above)}"


@pytest.mark.parametrize("part", PARTS)
def test_no_part_imports_the_launcher(part: str) -> None:
    for path in (PACKAGE / part).rglob("*.py"):
        launcher = {n for n in loomserve_imports(path) if n.split(".")[0] in LAUNCHER}
        assert not launcher, f"{path.relative_to(PACKAGE)} imports {sorted(launcher)}"


def test_the_scheduler_imports_without_torch() -> None:
    code = ("import sys; import loomserve.scheduler.server, loomserve.scheduler.scheduler; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False"
