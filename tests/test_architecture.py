"""The house's floors: workbench < efficient_models < analyses < apps, with the `wb` root on top.

An import never runs upward, and nothing imports the root. Read from the source (an AST walk of every
module, imports inside functions included), so a lazy import cannot hide a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = {"workbench": 0, "efficient_models": 1, "analyses": 2, "apps": 3, "wb": 4}


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import in a module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def upward_imports(package: str) -> list[str]:
    level = FLOORS[package]
    return [f"{path.relative_to(ROOT)}:{line} imports {imported}"
            for path in sorted((ROOT / package).rglob("*.py"))
            for line, imported in imported_packages(path)
            if FLOORS.get(imported, -1) > level or (imported == "wb" and package != "wb")]


@pytest.mark.parametrize("package", list(FLOORS))
def test_no_import_runs_upward(package):
    assert upward_imports(package) == []


def test_the_walk_sees_an_upward_import(tmp_path, monkeypatch):
    """The check itself can fail: a module of the base floor that imports the app is caught."""
    (tmp_path / "workbench").mkdir()
    (tmp_path / "workbench" / "bad.py").write_text("def f():\n    from apps.state import runs_root\n")
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    assert upward_imports("workbench") == ["workbench/bad.py:2 imports apps"]


def test_each_method_is_one_folder_that_registers_itself():
    from efficient_models import registry

    for name, method in registry.methods().items():
        module = method.config.__module__
        assert module.startswith("efficient_models."), f"{name}'s config lives outside efficient_models"
        folder = ROOT / Path(*module.split(".")[:2])
        assert folder.is_dir() and (folder / "__init__.py").is_file(), f"{name} is not a method folder"
