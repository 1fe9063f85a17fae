"""The import graph points one way: clients -> api and worker (siblings) -> service ->
warp_core. A module that imports upward or sideways fails here, so the layering stays true."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "warp_core": {"service", "api", "worker", "client"},
    "service": {"api", "worker", "client"},
    "api": {"worker", "client"},
    "worker": {"api", "client"},
    "client": {"worker"},
}
"""Package -> the top-level packages its modules may not import."""


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_down_only(package: str) -> None:
    modules = sorted((REPO / package).rglob("*.py"))
    assert modules, f"no modules under {package}/"
    wrong = [
        f"{path.relative_to(REPO)}:{line} imports {name}"
        for path in modules
        for line, name in imported_packages(path)
        if name in FORBIDDEN[package]
    ]
    assert not wrong, "\n".join(wrong)


def test_no_relative_imports_hide_the_graph() -> None:
    relative = [
        f"{path.relative_to(REPO)}:{node.lineno}"
        for package in FORBIDDEN
        for path in sorted((REPO / package).rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.ImportFrom) and node.level > 0
    ]
    assert not relative, relative
