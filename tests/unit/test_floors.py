"""Imports in ``src/seqlease`` run one way down the floors of docs/concepts/architecture.md.

The page's table is the source: a module added to no floor, or an import into a higher (or
the same, other) floor at run time, fails here. Imports under ``TYPE_CHECKING`` are allowed.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "seqlease"
PAGE = ROOT / "docs" / "concepts" / "architecture.md"


def floors() -> dict[str, int]:
    """Module (top-level name under seqlease) -> floor, from the page's table."""
    found: dict[str, int] = {}
    for line in PAGE.read_text().splitlines():
        row = re.match(r"\|\s*(\d+)\s*\|([^|]*)\|", line)
        if row:
            for name in re.findall(r"`(\w+)`", row.group(2)):
                found[name] = int(row.group(1))
    return found


def unit_of(path: Path) -> str:
    return path.relative_to(PACKAGE).with_suffix("").parts[0]


def runtime_imports(path: Path) -> set[str]:
    """Top-level seqlease modules ``path`` imports outside ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only.update(id(n) for n in ast.walk(node))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] == "seqlease" and len(parts) > 1:
                found.add(parts[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "seqlease" and len(parts) > 1:
                    found.add(parts[1])
    return found


def test_the_page_names_every_module_once() -> None:
    table = floors()
    modules = {unit_of(p) for p in PACKAGE.rglob("*.py")} - {"__init__"}
    assert modules - table.keys() == set(), "add these modules to a floor of the page"
    assert table.keys() - modules == set(), "the page names modules that do not exist"


def test_imports_run_down_the_floors() -> None:
    table = floors()
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = unit_of(path)
        if unit == "__init__":
            continue  # the package's face re-exports from every floor
        for target in runtime_imports(path) - {unit}:
            if table[target] >= table[unit]:
                upward.append(
                    f"{path.relative_to(ROOT)} ({unit}, floor {table[unit]}) imports "
                    f"{target} (floor {table[target]})"
                )
    assert upward == []


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "from typing import TYPE_CHECKING\n"
        "from seqlease.engine.engine import Engine\n"
        "import seqlease.chat.session\n"
        "if TYPE_CHECKING:\n"
        "    from seqlease.server.app import create_app\n"
    )
    assert runtime_imports(module) == {"engine", "chat"}
